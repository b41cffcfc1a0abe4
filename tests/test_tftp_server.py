"""The real server on 127.0.0.1 (ephemeral port) against raw UDP sockets and curl."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from netboot.metrics import Counters
from netboot.tftp import packet as pk
from netboot.tftp.provider import BytesProvider, Provider, RootResolver, TftpError
from netboot.tftp.server import TftpServer, start_tftp
from tests.tftp_helpers import RawClient

SMALL = os.urandom(3 * 1468 + 100)
MEDIUM = os.urandom(2 * 1024 * 1024 + 17)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "small").write_bytes(SMALL)
    (tmp_path / "medium").write_bytes(MEDIUM)
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "boot").mkdir()
    (tmp_path / "boot" / "x.efi").write_bytes(b"efi")
    return tmp_path


@pytest.fixture(params=[0, 1], ids=["in-process", "worker"])
async def server(root: Path, request: pytest.FixtureRequest) -> AsyncIterator[TftpServer]:
    """Every test on this fixture runs twice: file transfers on this loop, and in the
    worker process (netboot/tftp/offload.py), which `netboot serve` uses by default."""
    srv = await start_tftp(RootResolver([root]), "127.0.0.1", 0, workers=request.param)
    yield srv
    await srv.close()


def addr(srv: TftpServer) -> tuple[str, int]:
    return ("127.0.0.1", srv.port)


async def wait_for(cond, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def run(*argv: str, timeout: float = 120) -> tuple[int, bytes]:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out


needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")


# -- raw protocol sequences ---------------------------------------------------


async def test_plain_fetch_no_options(server: TftpServer) -> None:
    c = RawClient()
    try:
        assert await c.fetch(addr(server), "small") == SMALL
        assert await c.fetch(addr(server), "/boot\\x.efi") == b"efi"
        assert await c.fetch(addr(server), "empty") == b""
    finally:
        c.close()
    await wait_for(lambda: server.counters.get("tftp_transfers_completed") == 3)
    assert server.counters.get("tftp_bytes_sent") == len(SMALL) + 3


async def test_oack_blksize_tsize(server: TftpServer) -> None:
    c = RawClient()
    try:
        await c.send(pk.encode_request(pk.RRQ, "small", "octet",
                                       {"blksize": "1468", "tsize": "0", "foo": "1"}), addr(server))
        data, tid = await c.recv()
        assert tid[1] != server.port  # a fresh TID per transfer
        assert pk.parse_oack(data) == {"blksize": "1468", "tsize": str(len(SMALL))}
    finally:
        c.close()
    c = RawClient()
    try:
        assert await c.fetch(addr(server), "small", {"blksize": "1468"}) == SMALL
    finally:
        c.close()


async def test_loopback_mtu_allows_big_blocks(server: TftpServer) -> None:
    c = RawClient()
    try:
        await c.send(pk.encode_request(pk.RRQ, "medium", "octet", {"blksize": "65464"}),
                     addr(server))
        data, _ = await c.recv()
        assert pk.parse_oack(data) == {"blksize": "65464"}  # loopback MTU is 65536
    finally:
        c.close()


@pytest.mark.parametrize("workers", [0, 1])
async def test_uefi_size_probe_sequence(root: Path, workers: int) -> None:
    seen: list[tuple[str, bool]] = []
    server = await start_tftp(RootResolver([root]), "127.0.0.1", 0, workers=workers,
                              on_transfer=lambda path, client, ok: seen.append((path, ok)))
    c = RawClient()
    try:
        await c.send(pk.encode_request(pk.RRQ, "medium", "octet", {"tsize": "0",
                                                                   "blksize": "1468"}),
                     addr(server))
        data, tid = await c.recv()
        assert pk.parse_oack(data)["tsize"] == str(len(MEDIUM))
        await c.send(pk.encode_error(pk.ERR_OPTION, "tsize probe only"), tid)
        await c.expect_silence(0.3)
        got = await c.fetch(addr(server), "medium", {"blksize": "1468", "windowsize": "4"})
        assert got == MEDIUM
    finally:
        c.close()
    ctr = server.counters
    await wait_for(lambda: ctr.get("tftp_transfers_completed") == 1)
    assert ctr.get("tftp_size_probes") == 1
    assert ctr.total("tftp_transfers_failed") == 0
    assert seen == [("medium", True)]
    await server.close()


async def test_wrong_tid_gets_error5_and_transfer_continues(server: TftpServer) -> None:
    c, intruder = RawClient(), RawClient()
    try:
        await c.send(pk.encode_request(pk.RRQ, "small", "octet"), addr(server))
        data, tid = await c.recv()
        assert pk.parse_data(data)[0] == 1
        await intruder.send(pk.encode_ack(1), tid)
        err, src = await intruder.recv()
        assert pk.parse_error(err)[0] == pk.ERR_UNKNOWN_TID and src == tid
        await intruder.send(pk.encode_error(0, "x"), tid)  # an ERROR is never answered
        await intruder.expect_silence(0.2)
        out = bytearray(pk.parse_data(data)[1])
        block = 1
        while True:
            await c.send(pk.encode_ack(block), tid)
            if len(out) == len(SMALL):
                break
            data, _ = await c.recv()
            block, payload = pk.parse_data(data)
            out += payload
        assert bytes(out) == SMALL
    finally:
        c.close()
        intruder.close()
    await wait_for(lambda: server.counters.get("tftp_transfers_completed") == 1)
    assert server.counters.get("tftp_wrong_tid") == 2


async def test_errors_for_missing_escape_write_and_mode(server: TftpServer) -> None:
    c = RawClient()
    try:
        for req, code in [
            (pk.encode_request(pk.RRQ, "nope"), pk.ERR_NOT_FOUND),
            (pk.encode_request(pk.RRQ, "../etc/passwd"), pk.ERR_ACCESS),
            (pk.encode_request(pk.RRQ, "/etc/passwd"), pk.ERR_NOT_FOUND),
            (pk.encode_request(pk.RRQ, "boot"), pk.ERR_NOT_FOUND),
            (pk.encode_request(pk.WRQ, "upload"), pk.ERR_ACCESS),
            (pk.encode_request(pk.RRQ, "small", "mail"), pk.ERR_ILLEGAL),
        ]:
            await c.send(req, addr(server))
            data, src = await c.recv()
            assert src[1] == server.port
            assert pk.parse_error(data)[0] == code, req
    finally:
        c.close()
    ctr = server.counters
    assert ctr.get("tftp_errors_sent", code="1") == 3
    assert ctr.get("tftp_refused", reason="write") == 1
    assert server.active == 0


async def test_malformed_packets_dropped_and_counted(server: TftpServer) -> None:
    c = RawClient()
    try:
        for junk in (b"", b"\x00", b"\x00\x01nofields", b"\xff\xff\xff", b"\x00\x04\x00\x01",
                     os.urandom(700)):
            await c.send(junk, addr(server))
        await c.expect_silence(0.2)
        assert await c.fetch(addr(server), "small") == SMALL
    finally:
        c.close()
    assert server.counters.get("tftp_malformed") >= 4


async def test_netascii_mode(server: TftpServer, root: Path) -> None:
    (root / "cfg").write_bytes(b"line1\nline2\n")
    c = RawClient()
    try:
        await c.send(pk.encode_request(pk.RRQ, "cfg", "netascii"), addr(server))
        data, _ = await c.recv()
        assert pk.parse_data(data) == (1, b"line1\r\nline2\r\n")
    finally:
        c.close()


async def test_duplicate_rrq_ignored(server: TftpServer) -> None:
    c = RawClient()
    try:
        rrq = pk.encode_request(pk.RRQ, "medium")
        await c.send(rrq, addr(server))
        await c.recv()
        await c.send(rrq, addr(server))
        await c.expect_silence(0.2)
        assert server.active == 1
        assert server.counters.get("tftp_duplicate_requests") == 1
    finally:
        c.close()


async def test_retries_then_gives_up(root: Path) -> None:
    results: list[bool] = []
    srv = await start_tftp(RootResolver([root]), "127.0.0.1", 0, timeout=0.05, retries=2,
                           on_transfer=lambda p, c, ok: results.append(ok))
    c = RawClient()
    try:
        await c.send(pk.encode_request(pk.RRQ, "small"), addr(srv))
        packets = [await c.recv() for _ in range(3)]  # original + 2 retransmits
        assert {pk.parse_data(d)[0] for d, _ in packets} == {1}
        err, _ = await c.recv()
        assert pk.parse_error(err)[0] == pk.ERR_UNDEFINED
        await wait_for(lambda: results == [False])
        assert srv.counters.get("tftp_transfers_failed", reason="timeout") == 1
        assert srv.counters.get("tftp_retransmits") == 2
        assert srv.active == 0
    finally:
        c.close()
        await srv.close()


async def test_limits_per_client_and_total(root: Path) -> None:
    srv = await start_tftp(RootResolver([root]), "127.0.0.1", 0, max_transfers=3,
                           max_per_client=2)
    clients = [RawClient() for _ in range(4)]
    try:
        for c in clients[:2]:
            await c.send(pk.encode_request(pk.RRQ, "medium"), addr(srv))
            await c.recv()
        await clients[2].send(pk.encode_request(pk.RRQ, "medium"), addr(srv))
        err, _ = await clients[2].recv()
        assert pk.parse_error(err)[0] == pk.ERR_UNDEFINED
        assert srv.counters.get("tftp_refused", reason="client_limit") == 1
        other = RawClient("127.0.0.2")
        clients.append(other)
        await other.send(pk.encode_request(pk.RRQ, "medium"), addr(srv))
        await other.recv()
        late = RawClient("127.0.0.3")
        clients.append(late)
        await late.send(pk.encode_request(pk.RRQ, "medium"), addr(srv))
        err, _ = await late.recv()
        assert pk.parse_error(err) == (0, "server busy")
        assert srv.active == 3
    finally:
        for c in clients:
            c.close()
        await srv.close()
    assert srv.counters.get("tftp_transfers_failed", reason="shutdown") == 3


async def test_resolver_with_generated_content_and_bad_resolver() -> None:
    def resolver(path: str, client: tuple[str, int]) -> Provider:
        if path == "pxelinux.cfg/01-aa":
            return BytesProvider(f"DEFAULT local # {client[0]}\n".encode())
        if path == "boom":
            raise RuntimeError("bug")
        raise TftpError(1, "no such thing")

    counters = Counters()
    srv = await start_tftp(resolver, "127.0.0.1", 0, counters=counters)
    c = RawClient()
    try:
        assert await c.fetch(addr(srv), "/pxelinux.cfg/01-aa") == b"DEFAULT local # 127.0.0.1\n"
        await c.send(pk.encode_request(pk.RRQ, "boom"), addr(srv))
        err, _ = await c.recv()
        assert pk.parse_error(err) == (0, "internal error")
    finally:
        c.close()
        await srv.close()
    assert srv.counters is counters
    assert counters.get("tftp_refused", reason="resolver_error") == 1


async def test_single_port_mode(root: Path) -> None:
    srv = await start_tftp(RootResolver([root]), "127.0.0.1", 0, single_port=True)
    c, intruder = RawClient(), RawClient()
    try:
        await c.send(pk.encode_request(pk.RRQ, "small", "octet", {"blksize": "1468"}), addr(srv))
        data, src = await c.recv()
        assert src == addr(srv) and pk.parse_oack(data) == {"blksize": "1468"}
        await intruder.send(pk.encode_ack(0), addr(srv))
        err, _ = await intruder.recv()
        assert pk.parse_error(err)[0] == pk.ERR_UNKNOWN_TID
        await c.send(pk.encode_ack(0), addr(srv))
        out = bytearray()
        while True:
            data, src = await c.recv()
            assert src == addr(srv)
            block, payload = pk.parse_data(data)
            out += payload
            await c.send(pk.encode_ack(block), addr(srv))
            if len(payload) < 1468:
                break
        assert bytes(out) == SMALL
        await wait_for(lambda: srv.counters.get("tftp_transfers_completed") == 1)
    finally:
        c.close()
        intruder.close()
        await srv.close()


async def test_flood_of_missing_file_requests_leaves_nothing_behind(server: TftpServer) -> None:
    c = RawClient()
    n = 2000
    try:
        rrq = pk.encode_request(pk.RRQ, "missing/file", "octet", {"tsize": "0"})
        for i in range(n):
            await c.send(rrq, addr(server))
            if i % 50 == 49:
                await asyncio.sleep(0)
        await wait_for(lambda: server.counters.get("tftp_requests") >= n * 0.95)
    finally:
        c.close()
    assert server.active == 0  # no transfer, socket or timer is left for a refused request
    got = server.counters.get("tftp_requests")
    assert server.counters.get("tftp_refused", reason="not_found") == got
    assert server.counters.get("tftp_errors_sent", code="1") == got


# -- real clients ---------------------------------------------------------------


@needs_curl
async def test_curl_blksize_1468(server: TftpServer, tmp_path: Path) -> None:
    out = tmp_path / "out"
    rc, log = await run("curl", "-sS", "--tftp-blksize", "1468", "-o", str(out),
                        f"tftp://127.0.0.1:{server.port}/medium")
    assert rc == 0, log
    assert out.read_bytes() == MEDIUM


@needs_curl
async def test_curl_missing_file_fails(server: TftpServer, tmp_path: Path) -> None:
    rc, _ = await run("curl", "-sS", "-o", str(tmp_path / "x"),
                      f"tftp://127.0.0.1:{server.port}/does-not-exist")
    assert rc != 0


async def test_worker_runs_file_transfers_and_its_loss_falls_back(root: Path) -> None:
    """With workers=1 a file transfer runs in the worker process and is reported back
    (counters, on_transfer); a transfer in flight when the worker dies is counted as
    failed, and later requests are served by the main process."""
    seen: list[tuple[str, bool]] = []
    server = await start_tftp(RootResolver([root]), "127.0.0.1", 0, workers=1,
                              on_transfer=lambda path, client, ok: seen.append((path, ok)))
    assert server.offload is not None
    c = RawClient()
    try:
        assert await c.fetch(addr(server), "medium", {"blksize": "1468"}) == MEDIUM
        await wait_for(lambda: seen == [("medium", True)])
        assert server.active == 0
        assert server.counters.get("tftp_bytes_sent") == len(MEDIUM)
        # a transfer left hanging at its OACK, then the worker dies
        await c.send(pk.encode_request(pk.RRQ, "small", "octet", {"blksize": "512"}),
                     addr(server))
        data, _tid = await c.recv()
        assert pk.opcode_of(data) == pk.OACK
        assert server.active == 1
        os.kill(server.offload.pid, 9)
        await wait_for(lambda: not server.offload.alive)  # type: ignore[union-attr]
        await wait_for(lambda: server.active == 0)
        assert server.counters.get("tftp_transfers_failed", reason="worker lost") == 1
        assert seen[-1] == ("small", False)
        c2 = RawClient()
        try:
            assert await c2.fetch(addr(server), "small", {"blksize": "1468"}) == SMALL
        finally:
            c2.close()
        await wait_for(lambda: seen[-1] == ("small", True))
    finally:
        c.close()
        await server.close()
