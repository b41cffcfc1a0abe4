"""Fuzzing the ProxyDHCP path with valid DISCOVERs (built by scapy) mutated into
every shape a broken ROM, a hostile host or a bad relay can send.

Two variants share one generator: 100,000 packets straight into
``ProxyDhcp.handle`` (no exception may escape, every packet is counted), and
100,000 over UDP at the running server in a lab namespace, interleaved with
valid requests that must keep being answered while its RSS stays flat.
"""

from __future__ import annotations

import random
import re
import select
import time
from collections.abc import Iterator

import pytest

from netboot.boot.booter import Booter
from netboot.config import ConfigStore
from netboot.dhcp.proxy import ProxyDhcp
from netboot.metrics import Counters
from tests.lab import can_run_lab
from tests.test_dhcp_server import Served, pxe_discover, start_served

N_PACKETS = 100_000
OUTCOMES = ("dhcp_malformed_total", "dhcp_ignored_total", "dhcp_offers_total",
            "dhcp_acks_total")


def seeds() -> list[bytes]:
    """Valid requests as ROMs, iPXE, HTTP-boot firmware and relays send them."""
    from scapy.layers.dhcp import BOOTP, DHCP

    def pkt(opts: list, **bootp) -> bytes:
        fields = {"op": 1, "xid": 0x01020304, "flags": 0x8000,
                      "chaddr": bytes.fromhex("525400c0ffee") + b"\0" * 10}
        fields.update(bootp)
        return bytes(BOOTP(**fields) / DHCP(options=[*opts, "end"]))

    uuid97 = b"\0" + bytes(range(16))
    bios = [("message-type", "discover"), ("vendor_class_id",
            b"PXEClient:Arch:00000:UNDI:002001"), (93, b"\0\0"), (94, b"\x01\x02\x01"),
            (97, uuid97), ("param_req_list", [1, 3, 43, 60, 66, 67])]
    return [
        pkt(bios),
        pkt([("message-type", "discover"), ("vendor_class_id",
             b"PXEClient:Arch:00007:UNDI:003016"), (93, b"\0\x07"), (97, uuid97)]),
        pkt([*bios, ("user_class", b"iPXE"), (175, b"\xb1\x05\x01\x80\x86\x10\x0e")]),
        pkt([("message-type", "discover"), ("vendor_class_id",
             b"HTTPClient:Arch:00016:UNDI:003001"), (93, b"\0\x10")]),
        pkt([*bios, ("relay_agent_information", b"\x01\x04eth1\x02\x06switch")],
            giaddr="10.78.0.1", hops=1),
        pkt([("message-type", "request"), ("vendor_class_id", b"PXEClient"), (97, uuid97)],
            ciaddr="10.77.0.50"),
        pkt([("message-type", "discover"), ("hostname", b"plain-dhcp-client")]),
        pkt([("message-type", "discover"), ("vendor_class_id", b"PXEClient:Arch:00000"),
             ("overload", 3)], sname=b"\x3c\x09PXEClient\xff", file=b"\x5d\x02\x00\x00\xff"),
    ]


def _options_end(data: bytearray) -> int:
    end = data.find(b"\xff", 240)
    return end if end > 0 else len(data)


def mutate(rng: random.Random, base: bytes) -> bytes:
    """One mutation (sometimes two) of ``base``, chosen to hit the codec's edges."""
    d = bytearray(base)
    for _ in range(1 + (rng.random() < 0.3)):
        m = rng.randrange(14)
        if m == 0:  # truncated anywhere, options included
            d = d[: rng.randrange(len(d) + 1)]
        elif m == 1:  # random byte flips
            for _ in range(rng.randint(1, 8)):
                if d:
                    d[rng.randrange(len(d))] = rng.randrange(256)
        elif m == 2 and len(d) > 242:  # an option's length byte lies
            pos = 240
            while pos + 1 < len(d) and d[pos] not in (0, 255) and rng.random() < 0.7:
                pos += 2 + d[pos + 1]
            if pos + 1 < len(d):
                d[pos + 1] = rng.choice((0, 1, 255, rng.randrange(256)))
        elif m == 3 and len(d) >= 240:  # no (or a wrong) magic cookie
            d[236:240] = rng.choice((b"\0\0\0\0", b"\x63\x82\x53\x64", rng.randbytes(4)))
        elif m == 4 and len(d) > 240:  # option overload, any value, garbage in sname/file
            end = _options_end(d)
            d[end:end] = bytes((52, 1, rng.randrange(256)))
            if rng.random() < 0.5:
                d[44:44 + 64] = rng.randbytes(64)
            if rng.random() < 0.5:
                d[108:108 + 128] = rng.randbytes(128)
        elif m == 5 and len(d) > 2:  # huge or odd hlen, htype, op, hops
            d[rng.choice((0, 1, 2, 3))] = rng.choice((0, 2, 6, 7, 16, 17, 255, rng.randrange(256)))
        elif m == 6:  # pure noise of a plausible size
            d = bytearray(rng.randbytes(rng.choice((0, 1, 100, 239, 240, 241, 300, 576, 1500))))
        elif m == 7 and len(d) > 240:  # an option truncated before its length
            d = d[: _options_end(d)] + bytes((rng.randrange(1, 255),))
        elif m == 8 and len(d) > 240:  # repeated options (RFC 3396 concatenation)
            end = _options_end(d)
            code = rng.choice((53, 60, 93, 97, 77, 175, 82, 43, rng.randrange(1, 255)))
            for _ in range(rng.randint(1, 5)):
                v = rng.randbytes(rng.randrange(256))
                d[end:end] = bytes((code, len(v))) + v
        elif m == 9 and len(d) > 240:  # the END option removed: options run off the end
            end = _options_end(d)
            d = d[:end] + rng.randbytes(rng.randrange(4))
        elif m == 10 and len(d) > 240:  # odd values for the options the policy reads
            end = _options_end(d)
            code, value = rng.choice((
                (93, rng.randbytes(rng.randrange(4))), (97, rng.randbytes(rng.randrange(20))),
                (60, b"PXEClient:Arch:" + rng.randbytes(rng.randrange(12))),
                (60, b"HTTPClient:Arch:99999"), (53, rng.randbytes(rng.randrange(3))),
                (77, rng.choice((b"iPXE", b"", rng.randbytes(5)))), (82, rng.randbytes(40))))
            d[end:end] = bytes((code, len(value))) + value
        elif m == 11 and len(d) > 240:  # padding storm
            end = _options_end(d)
            d[end:end] = b"\0" * rng.randrange(1, 1200)
        elif m == 12 and len(d) > 28:  # another client: random chaddr from a small pool
            d[28:34] = bytes((0x52, 0x54, 0, 0xfe, 0, rng.randrange(64)))
        elif m == 13 and len(d) > 240:  # giaddr set (replies go unicast to a "relay")
            d[24:28] = bytes((10, 77, 0, rng.choice((3, 9, 250))))
    return bytes(d)


def packets(n: int, seed: int = 20261122) -> Iterator[bytes]:
    rng = random.Random(seed)
    base = seeds()
    for _ in range(n):
        yield mutate(rng, rng.choice(base))


def test_generator_hits_every_outcome(store: ConfigStore) -> None:
    """The mutations are not all rejected at the door: some still reach the policy."""
    proxy = ProxyDhcp(Booter(store, "10.0.0.2", 8080), "10.0.0.2", Counters())
    for data in packets(5000):
        proxy.handle(data, 67, ("10.0.0.9", 68))
    c = proxy.counters
    assert c.total("dhcp_malformed_total") > 500
    assert c.total("dhcp_ignored_total") > 500
    assert c.total("dhcp_offers_total") > 200
    ignored = {dict(k).get("reason") for n, k, _ in c.items() if n == "dhcp_ignored_total"}
    assert {"not-pxe", "message-type", "not-ethernet-request", "policy"} <= ignored


def test_in_process_fuzz_no_exception_escapes(store: ConfigStore) -> None:
    proxy = ProxyDhcp(Booter(store, "10.0.0.2", 8080), "10.0.0.2", Counters())
    for i, data in enumerate(packets(N_PACKETS)):
        port = 4011 if i % 7 == 0 else 67
        try:
            reply = proxy.handle(data, port, ("10.0.0.9", 68))
        except Exception as exc:  # noqa: BLE001 - the failing input is the report
            pytest.fail(f"packet {i} ({data.hex()}) raised {exc!r}")
        if reply is not None:
            assert len(reply.data) >= 300 and reply.data[0] == 2
    # every packet is accounted for by exactly one outcome counter
    assert sum(proxy.counters.total(name) for name in OUTCOMES) == N_PACKETS


@pytest.fixture(scope="module")
def fuzz_served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    reason = can_run_lab()
    if reason:
        pytest.skip(reason)
    lab, s = start_served(tmp_path_factory.mktemp("dhcpfuzz"), site_dhcp=False,
                          log_level="info")
    try:
        yield s
    finally:
        lab.down_all()


@pytest.mark.lab
def test_running_server_survives_100k_mutated_packets(fuzz_served: Served) -> None:
    s = fuzz_served
    lab = s.lab
    sock = lab.udp_socket(s.client_ns, 68)
    batch = 500  # closed loop: a batch, then one valid request that must be answered
    answered = 0
    valid_sent = 0
    rss: list[int] = []
    handled0 = _handled(s)
    started = time.monotonic()
    gen = packets(N_PACKETS, seed=7)
    try:
        for b in range(N_PACKETS // batch):
            for i in range(batch):
                data = next(gen)
                dest = (lab.boot_addr, 4011) if i % 5 == 0 else ("255.255.255.255", 67)
                try:
                    sock.sendto(data, dest)
                except OSError:
                    pass  # e.g. an empty datagram the stack refuses: not the server's fault
            xid = 0x7E000000 + b
            sock.sendto(pxe_discover(xid=xid, mac="52:54:00:aa:01:01"),
                        ("255.255.255.255", 67))
            valid_sent += 1
            # 2 s: a batch takes ~30 ms; a reply path stalled on ARP takes 3 s
            if _answered(sock, xid, lab.boot_addr, timeout=2.0):
                answered += 1
            if b == 40:  # after 20,000 packets: caches and allocator pools are warm
                rss.append(s.rss_kb())
        rss.append(s.rss_kb())
    finally:
        sock.close()
    elapsed = time.monotonic() - started
    log = lab.netboot_log()
    assert "Traceback" not in log, log[-4000:]
    assert answered == valid_sent, f"{valid_sent - answered} valid requests unanswered"
    assert rss[1] - rss[0] < 6 * 1024, f"RSS grew from {rss[0]} kB to {rss[1]} kB"
    handled = _handled(s) - handled0
    assert handled >= 0.99 * (N_PACKETS + valid_sent), f"only {handled} packets reached netboot"
    m = s.metrics()
    assert "netboot_dhcp_malformed_total" in m and "netboot_dhcp_errors_total" not in m, m
    print(f"fuzz: {N_PACKETS} packets + {valid_sent} valid in {elapsed:.1f}s, "
          f"RSS {rss[0]} -> {rss[1]} kB")


def _handled(s: Served) -> float:
    """Datagrams netboot has read: every one ends in exactly one outcome counter."""
    return sum(s.metric(name, **labels) for name, labels in _series(s.metrics()))


def _series(text: str) -> list[tuple[str, dict[str, str]]]:
    out = []
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0].removeprefix("netboot_")
        if name in OUTCOMES:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            out.append((name, labels))
    return out


def _answered(sock, xid: int, server: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([sock], [], [], left)
        if not ready:
            return False
        data, src = sock.recvfrom(4096)
        if src[0] == server and len(data) >= 8 and int.from_bytes(data[4:8], "big") == xid:
            return True
    return False
