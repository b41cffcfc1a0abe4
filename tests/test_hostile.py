"""Hostile input on every port of a running ``netboot serve`` (a subprocess in a
network namespace, probed from a second namespace): path traversal over TFTP and
HTTP, oversized and malformed requests, unknown identities at every API
endpoint, and a flood of TFTP requests for a missing file."""

from __future__ import annotations

import os
import random
import socket
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from bench.storm_lab import (
    RELAY_ADDR,
    SERVER_ADDR,
    NetbootServer,
    StormLab,
    can_run,
    machine_addr,
    netns_socket,
    run_storm,
)
from bench.storm_probe import metric, rrq, sha256, tftp_fetch, udp, vm_rss_kib, wait_for

pytestmark = [pytest.mark.lab, pytest.mark.timeout(300)]

CANARY = f"CANARY-{uuidlib.uuid4().hex}".encode()
MACHINES = 80  # client addresses, for the session-bound flood


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetbootServer]:
    reason = can_run()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("hostile")
    with StormLab(root / "lab", machines=MACHINES) as lab:
        server = NetbootServer(lab, root / "nb")
        # Secrets beside (outside) the images root, and symlinks pointing at them.
        (server.root / "secret.txt").write_bytes(CANARY)
        os.symlink(server.root / "secret.txt", server.images / "evil-link")
        os.symlink(server.root, server.images / "evil-dir")
        os.symlink("/etc", server.images / "etc-link")
        server.start()
        yield server
        log = server.log_text()
        print("---- netboot log (tail) ----\n" + log[-4000:])


def assert_alive(srv: NetbootServer) -> None:
    assert srv.alive(), srv.log_text()[-3000:]
    status, _ = srv.http("GET", "/health")
    assert status == 200
    # TFTP and DHCP still answer real requests
    assert sha256(tftp_fetch(srv, "undionly.kpxe")) == sha256(Path("/usr/lib/ipxe/undionly.kpxe"))


# -- path traversal ------------------------------------------------------------------------

TFTP_ESCAPES = [
    "../secret.txt", "images/../secret.txt", "images/../../nb/secret.txt",
    "images/..%2fsecret.txt", "images/%2e%2e/secret.txt", "images/%2e%2e%2fsecret.txt",
    "/etc/passwd", "//etc/passwd", "images//etc/passwd", "/images/../secret.txt",
    "images\\..\\secret.txt", "..\\..\\..\\etc\\passwd", "images/storm/../../secret.txt",
    "undionly.kpxe/../../../../etc/passwd", "images/evil-link", "images/evil-dir/secret.txt",
    "images/etc-link/passwd", "images/./../secret.txt", "images/.../secret.txt",
    "pxelinux.cfg/../../secret.txt", "pxelinux.cfg/01-../../etc/passwd",
    "/usr/lib/ipxe/undionly.kpxe/../../../../etc/passwd", "../" * 40 + "etc/passwd",
]


def test_tftp_control_serves_files_inside_the_root(srv: NetbootServer) -> None:
    """The traversal tests below mean something only if the same paths done right work."""
    got = tftp_fetch(srv, "images/storm/initrd.cpio.gz")
    assert sha256(got) == sha256(srv.images / "storm/initrd.cpio.gz")


@pytest.mark.parametrize("name", TFTP_ESCAPES)
def test_tftp_path_traversal_refused(srv: NetbootServer, name: str) -> None:
    replies = udp(srv, rrq(name), 69)
    assert replies, f"no answer at all to RRQ {name!r}"
    for r in replies:
        assert r[:2] == b"\0\x05", f"RRQ {name!r} answered with {r[:2].hex()}: {r[:60]!r}"
        assert CANARY not in r and b"root:" not in r


def test_tftp_nul_inside_name_refused(srv: NetbootServer) -> None:
    # The filename field ends at the first NUL: what follows is taken as the mode.
    for raw in (b"\0\x01images/evil-link\0\0octet\0", b"\0\x01../secret.txt\0octet\0",
                b"\0\x01images/storm/vmlinuz\0../../secret.txt\0octet\0"):
        for r in udp(srv, raw, 69):
            assert r[:2] == b"\0\x05", (raw, r[:40])


HTTP_ESCAPES = [
    "/images/../secret.txt", "/images/../../nb/secret.txt", "/images/..%2fsecret.txt",
    "/images/..%2F..%2Fnb%2Fsecret.txt", "/images/%2e%2e/secret.txt",
    "/images/%2e%2e%2fsecret.txt", "/images/%252e%252e%252fsecret.txt",
    "/images//etc/passwd", "/images/%2fetc%2fpasswd", "/images/%2Fetc/passwd",
    "/images/..\\secret.txt", "/images/..%5csecret.txt", "/images/storm/..%5c..%5csecret.txt",
    "/images/evil-link", "/images/evil-dir/secret.txt", "/images/etc-link/passwd",
    "/images/storm/vmlinuz%00.txt", "/images/%00../secret.txt",
    "/images/storm%2f..%2f..%2fsecret.txt",
    "/loader/..%2f..%2f..%2fetc%2fpasswd", "/loader/../../etc/passwd", "/loader/%2e%2e",
    "/loader/%2fetc%2fpasswd", "/images/" + "../" * 30 + "etc/passwd",
    "/../../../../etc/passwd", "/images/.%2e/secret.txt",
]


def test_http_control_serves_files_inside_the_root(srv: NetbootServer) -> None:
    status, body = srv.http("GET", "/images/storm/initrd.cpio.gz")
    assert status == 200 and sha256(body) == sha256(srv.images / "storm/initrd.cpio.gz")
    status, body = srv.http("GET", "/loader/undionly.kpxe")
    assert status == 200 and sha256(body) == sha256(Path("/usr/lib/ipxe/undionly.kpxe"))


def raw_http(srv: NetbootServer, request: bytes, timeout: float = 10) -> bytes:
    s = netns_socket(srv.lab.ns_cli, socket.SOCK_STREAM, connect=(SERVER_ADDR, 8080),
                     timeout=timeout)
    try:
        try:
            s.sendall(request)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server refused before reading it all: read what it said
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            out += chunk
        return out
    finally:
        s.close()


@pytest.mark.parametrize("path", HTTP_ESCAPES)
def test_http_path_traversal_refused(srv: NetbootServer, path: str) -> None:
    reply = raw_http(srv, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    status_line = reply.split(b"\r\n", 1)[0]
    assert CANARY not in reply and b"root:x:0:0" not in reply, f"{path} leaked a file"
    assert b" 200 " not in status_line, f"{path}: {status_line!r}"


def test_http_raw_nul_and_backslash_request_lines(srv: NetbootServer) -> None:
    for line in (b"GET /images/storm/vmlinuz\x00/../../secret.txt HTTP/1.1",
                 b"GET /images\\..\\secret.txt HTTP/1.1", b"GET images/../secret.txt HTTP/1.1",
                 b"GET http://x/images/../secret.txt HTTP/1.1"):
        reply = raw_http(srv, line + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert CANARY not in reply and b" 200 " not in reply.split(b"\r\n", 1)[0], line


# -- oversized and malformed ---------------------------------------------------------------

def test_http_oversized_requests(srv: NetbootServer) -> None:
    # a 256 KiB header, 20,000 headers, a 1 MiB request line: refused, not stored
    for req in (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (256 << 10) + b"\r\n\r\n",
                b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 20000 + b"\r\n",
                b"GET /" + b"a" * (1 << 20) + b" HTTP/1.1\r\nHost: x\r\n\r\n"):
        reply = raw_http(srv, req)
        assert not reply.startswith(b"HTTP/1.1 200"), reply[:100]
    # a 64 MiB body announced to the callback endpoint: refused before it is read
    uuid = str(uuidlib.uuid4())
    head = (f"POST /api/v1/nodes/{uuid}/register?token=x HTTP/1.1\r\nHost: x\r\n"
            f"Content-Type: application/json\r\nContent-Length: {64 << 20}\r\n\r\n").encode()
    reply = raw_http(srv, head + b"{" * (2 << 20))
    assert reply.split(b"\r\n", 1)[0][9:12] in (b"413", b"403", b"400"), reply[:200]
    # garbage instead of HTTP
    for junk in (os.urandom(65536), b"\x16\x03\x01\x02\x00" + os.urandom(512), b"\r\n" * 5000):
        reply = raw_http(srv, junk)
        assert not reply.startswith(b"HTTP/1.1 200")
    assert_alive(srv)


def test_garbage_datagrams_on_every_udp_port(srv: NetbootServer) -> None:
    rng = random.Random(8)
    dhcp_hdr = bytearray(300)
    dhcp_hdr[0:4] = b"\x01\x01\x06\x00"
    dhcp_hdr[236:240] = b"\x63\x82\x53\x63"
    bad_dhcp = [
        bytes(dhcp_hdr[:240]) + b"\x35\x01",  # option runs past the end
        bytes(dhcp_hdr[:240]) + b"\x35\xff\x01",  # length beyond the packet
        bytes(dhcp_hdr[:240]) + b"\x34\x01\x03\x35\x01\x01\x3c\x20"
        + b"PXEClient:Arch:00000:UNDI:002001",  # option overload pointing at empty fields
        bytes(dhcp_hdr[:240]) + b"\x35\x01\x01\x3c\x09PXEClient\x5d\x01\x00\x61\x05\x00abcd\xff",
        bytes(dhcp_hdr[:240]) + b"\x35\x01\x01\x3c\x09PXEClient\x5d\x00\xff",
        bytes(dhcp_hdr[:240]) + b"\x35\x01\x01\x3c\x09PXEClient" + b"\x00" * 60000,
        bytes(dhcp_hdr[:239]),
    ]
    sizes = [0, 1, 2, 3, 4, 235, 240, 300, 576, 1500, 9000, 65507]
    for port in (67, 4011, 69):
        for n in sizes:
            junk = bytes(rng.getrandbits(8) for _ in range(min(n, 4096))) * (n // 4096 + 1)
            udp(srv, junk[:n], port, wait=0.05)
        for raw in bad_dhcp:
            udp(srv, raw, port, wait=0.05)
    bad_tftp = [
        b"\0\x01undionly.kpxe",  # RRQ without the NUL
        b"\0\x01undionly.kpxe\0",  # mode missing
        b"\0\x01undionly.kpxe\0octet",  # mode without NUL
        b"\0\x01\0octet\0", b"\0\x01", b"\0", b"\0\x09abc\0", b"\0\x03\0\x01" + b"x" * 512,
        b"\0\x04\0\x01", b"\0\x05\0\x01oops\0", b"\0\x06blksize\x001468\0",
        rrq("undionly.kpxe", b"mail"), rrq("undionly.kpxe", b"OCTET\x00\xff"),
        rrq("undionly.kpxe", blksize="0"), rrq("undionly.kpxe", blksize="-5"),
        rrq("undionly.kpxe", blksize="99999999999999999999"), rrq("undionly.kpxe", tsize="-1"),
        rrq("undionly.kpxe", windowsize="0"), rrq("undionly.kpxe", timeout="0"),
        rrq("undionly.kpxe", blksize="abc", windowsize="1e9"),
        b"\0\x01undionly.kpxe\0octet\0blksize\0",  # option without value
        b"\0\x01" + b"A" * 65000 + b"\0octet\0",  # 64 KiB file name
        b"\0\x01undionly.kpxe\0octet\0" + b"x\0y\0" * 8000,  # thousands of options
    ]
    for raw in bad_tftp:
        for r in udp(srv, raw, 69, wait=0.2):
            op = r[:2]
            # garbage may start a transfer only when it is a valid RRQ of a real file
            assert op in (b"\0\x05", b"\0\x06", b"\0\x03"), (raw[:40], r[:40])
            if op != b"\0\x05":
                assert raw.startswith(b"\0\x01undionly.kpxe\0"), (raw[:40], r[:40])
    status, body = srv.http("GET", "/metrics")
    text = body.decode()
    assert metric(text, "netboot_dhcp_malformed_total") > 0
    assert metric(text, "netboot_tftp_malformed") > 0
    assert_alive(srv)


# -- unknown identities at every endpoint --------------------------------------------------

def test_unknown_uuids_and_macs_at_every_api_endpoint(srv: NetbootServer) -> None:
    from netboot.http.app import all_routes

    unknown = str(uuidlib.uuid4())
    bad_ids = [unknown, "not-a-uuid", "00000000-0000-0000-0000-000000000000", "%2e%2e%2f",
               "x" * 5000, "%00", "' OR 1=1 --"]
    auth = {"Authorization": "Bearer storm-admin-token"}
    seen_5xx = []
    for r in all_routes():
        if "{uuid}" not in r.path:
            continue
        for ident in bad_ids:
            path = r.path.replace("{uuid}", quote(ident, safe="%"))
            for headers, query in (({}, ""), ({}, "?token=abc"), (auth, ""),
                                   ({"X-Node-Token": "a" * 64}, "")):
                body = b"{}" if r.method in ("POST", "PATCH") else None
                hdrs = {**headers, "Content-Type": "application/json"} if body else headers
                status, text = srv.http(r.method, path + query, body=body, headers=hdrs)
                if status >= 500:
                    seen_5xx.append((r.method, path[:60], status, text[:120]))
                assert status != 200, (r.method, path, status, text[:200])
    assert not seen_5xx, seen_5xx
    # iPXE script endpoint: malformed identities are a 400, unknown ones get the default
    for q in ("uuid=not-a-uuid", "mac=zz:zz", "mac=" + "1" * 4000, "uuid=%00", "mac=../../x"):
        status, _ = srv.http("GET", f"/ipxe/node?{q}")
        assert status == 400, q
    status, body = srv.http("GET", f"/ipxe/node?uuid={unknown}&mac=52:54:79:ff:ff:fe")
    assert status == 200 and body.startswith(b"#!ipxe")
    status, _ = srv.http("GET", f"/nodes/{uuidlib.uuid4()}")
    assert status == 404
    status, body = srv.http("GET", "/api/v1/nodes?state=nonsense&profile=%00")
    assert status < 500, body[:200]
    assert_alive(srv)


# -- floods --------------------------------------------------------------------------------

def test_flood_of_rrqs_for_a_missing_file(srv: NetbootServer) -> None:
    """20,000 RRQs for a missing file from 64 source ports in a few seconds: the server
    stays up, answers the ones it reads with ERROR 1, keeps memory flat, counts them,
    and does not write a log line per packet."""
    assert srv.proc is not None
    pid = srv.proc.pid
    _, before = srv.http("GET", "/metrics")
    base = metric(before.decode(), "netboot_tftp_refused", reason="not_found")
    log_before = len(srv.log_text().splitlines())
    rss0 = vm_rss_kib(pid)
    socks = [netns_socket(srv.lab.ns_cli, bind=(RELAY_ADDR, 0), timeout=0.0) for _ in range(64)]
    t0 = time.monotonic()
    sent = 0
    for i in range(20000):
        s = socks[i % 64]
        try:
            s.sendto(rrq(f"no-such-file-{i % 97}.bin"), (SERVER_ADDR, 69))
            sent += 1
        except OSError:
            pass
        if i % 64 == 63:
            time.sleep(0.008)  # about 20,000 in 3 s
            for s2 in socks:  # drain the ERRORs so our own buffers do not drop
                try:
                    while True:
                        s2.recv(2048)
                except OSError:
                    pass
    flood_s = time.monotonic() - t0
    for s in socks:
        s.close()
    time.sleep(1.0)
    _, after = srv.http("GET", "/metrics")
    refused = metric(after.decode(), "netboot_tftp_refused", reason="not_found") - base
    rss1 = vm_rss_kib(pid)
    new_log = srv.log_text().splitlines()[log_before:]
    print(f"flood: {sent} RRQs in {flood_s:.1f}s, {refused:.0f} refused as not_found, "
          f"RSS {rss0} -> {rss1} KiB, {len(new_log)} log lines")
    assert flood_s < 30
    assert refused >= sent * 0.5, "the server should have read most of the flood"
    assert rss1 - rss0 < 30 * 1024, f"RSS grew {rss1 - rss0} KiB"
    assert len(new_log) < 50, "one log line per packet:\n" + "\n".join(new_log[:20])
    assert_alive(srv)


def test_flood_is_explained_in_the_log(srv: NetbootServer) -> None:
    log_before = len(srv.log_text())
    socks = [netns_socket(srv.lab.ns_cli, bind=(RELAY_ADDR, 0), timeout=0.0) for _ in range(8)]
    for i in range(3000):
        try:
            socks[i % 8].sendto(rrq("missing-again.bin"), (SERVER_ADDR, 69))
        except OSError:
            pass
    for s in socks:
        s.close()
    text = wait_for(lambda: "missing-again" in srv.log_text()[log_before:]
                    or "not found" in srv.log_text()[log_before:].lower(), timeout=15)
    assert text, "nothing in the log says TFTP requests are being refused"


def test_flood_of_rrqs_for_a_real_file_is_bounded_in_sessions(srv: NetbootServer) -> None:
    """RRQs for a real file from 80 addresses x 40 ports, never ACKed: transfers are
    capped (per client and in total), refused ones are counted, and everything
    times out and frees itself; a real client is then served."""
    assert srv.proc is not None
    pid = srv.proc.pid
    rss0 = vm_rss_kib(pid)
    _, before = srv.http("GET", "/metrics")
    started0 = metric(before.decode(), "netboot_tftp_transfers_started")
    socks = []
    for i in range(MACHINES):
        for _ in range(40):
            s = netns_socket(srv.lab.ns_cli, bind=(machine_addr(i), 0), timeout=0.0)
            s.sendto(rrq("undionly.kpxe", blksize="1468"), (SERVER_ADDR, 69))
            socks.append(s)
    time.sleep(0.5)
    _, mid = srv.http("GET", "/metrics")
    mid_text = mid.decode()
    started = metric(mid_text, "netboot_tftp_transfers_started") - started0
    limited = metric(mid_text, "netboot_tftp_refused", reason="client_limit")
    rss1 = vm_rss_kib(pid)
    for s in socks:
        s.close()
    print(f"abandoned-transfer flood: {started:.0f} started, {limited:.0f} refused per client, "
          f"RSS {rss0} -> {rss1} KiB")
    assert started <= MACHINES * 16, "max_per_client not enforced"
    assert limited > 0
    assert rss1 - rss0 < 60 * 1024
    # everything abandoned times out (5 retries backing off 1, 2, 4, 8, 8 s) and frees itself
    def all_ended() -> bool:
        text = srv.http("GET", "/metrics")[1].decode()
        ended = sum(metric(text, f"netboot_tftp_transfers_{k}")
                    for k in ("completed", "failed"))
        return ended >= metric(text, "netboot_tftp_transfers_started")

    assert wait_for(all_ended, timeout=45), "abandoned transfers were never freed"
    assert_alive(srv)
    result = run_storm(srv.lab, srv.root / "after-flood.json", "-n", "3", "--seed", "77")
    assert result["completed"] == 3, result


def test_malformed_http_flood_is_not_a_log_flood(srv: NetbootServer) -> None:
    """200 malformed HTTP requests must not write hundreds of log lines."""
    before = len(srv.log_text().splitlines())
    for i in range(200):
        raw_http(srv, b"GET /\x01bad%d HTTP/1.1\r\nHost: x\r\n\r\n" % i, timeout=2)
    time.sleep(0.5)
    new = srv.log_text().splitlines()[before:]
    assert len(new) < 50, f"{len(new)} log lines for 200 bad requests:\n" + "\n".join(new[:12])
