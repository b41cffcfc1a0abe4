"""Serving images over HTTP: Range, ETag/Last-Modified, conditional requests, HEAD,
symlinks, and many concurrent downloads, against netboot's real aiohttp app on
127.0.0.1, run in its own thread under both the default loop and uvloop (the
loop ``netboot serve`` uses, where sendfile is netboot's own code)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import uvloop
from aiohttp import web

from netboot.config import ConfigStore
from netboot.http import sendfile
from netboot.metrics import Counters
from netboot.server import build

SIZE = 8 << 20
pytestmark = pytest.mark.timeout(120)  # a stalled transfer fails, not hangs


@dataclass
class Served:
    url: str
    port: int
    data: bytes
    counters: Counters
    loop: asyncio.AbstractEventLoop


def _serve(app: web.Application, loop: asyncio.AbstractEventLoop, ready: threading.Event,
           box: dict[str, object]) -> None:
    asyncio.set_event_loop(loop)
    runner = web.AppRunner(app, access_log=None)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    box["port"] = runner.addresses[0][1]
    ready.set()
    loop.run_forever()
    loop.run_until_complete(runner.cleanup())
    loop.close()


LOADER = os.urandom(300_000)  # an ipxe.efi's size


@pytest.fixture
def config_tree(config_tree: Path) -> Path:
    """The shared tree, with a loader directory of its own as the TFTP (and loader) root."""
    loaders = config_tree.parent / "loaders"
    loaders.mkdir()
    (loaders / "ipxe.efi").write_bytes(LOADER)
    with config_tree.open("a") as f:
        f.write("tftp:\n  roots: [loaders]\n")
    return config_tree


@pytest.fixture(params=["asyncio", "uvloop"])
def served(request: pytest.FixtureRequest, store: ConfigStore, tmp_path: Path) -> Iterator[Served]:
    images = store.server.images_dir
    data = os.urandom(SIZE)
    (images / "big.bin").write_bytes(data)
    (images / "flatcar" / "3975.2.0").mkdir(parents=True)
    (images / "flatcar" / "3975.2.0" / "k").write_bytes(data[:1000])
    os.symlink("3975.2.0", images / "flatcar" / "stable")  # alias inside the root: served
    (tmp_path / "secret").write_text("outside images_dir")
    os.symlink(tmp_path / "secret", images / "escape")  # leaves the root: refused
    counters = Counters()
    app = build(store, "127.0.0.1", registry=None, secret=b"s", counters=counters).app()
    loop = uvloop.new_event_loop() if request.param == "uvloop" else asyncio.new_event_loop()
    ready, box = threading.Event(), {}
    thread = threading.Thread(target=_serve, args=(app, loop, ready, box), daemon=True)
    thread.start()
    assert ready.wait(10)
    port = int(box["port"])  # type: ignore[call-overload]
    yield Served(f"http://127.0.0.1:{port}/images", port, data, counters, loop)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


async def test_get_has_validators_and_length(served: Served) -> None:
    async with aiohttp.ClientSession() as s, s.get(f"{served.url}/big.bin") as r:
        body = await r.read()
        assert r.status == 200 and body == served.data
        assert r.headers["Content-Length"] == str(SIZE)
        assert r.headers["Accept-Ranges"] == "bytes"
        assert r.headers["ETag"].startswith('"') and r.headers["Last-Modified"].endswith("GMT")
    assert served.counters.get("http_requests_total", route="images") == 1


class CountingExecutor(concurrent.futures.ThreadPoolExecutor):
    def __init__(self) -> None:
        super().__init__(max_workers=2)
        self.calls: list[str] = []

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def,override]
        self.calls.append(getattr(fn, "__qualname__", repr(fn)))
        return super().submit(fn, *args, **kwargs)


@pytest.mark.skipif(not sendfile._INLINE, reason="this aiohttp lacks the steps ImageResponse "
                    "calls on the loop; it falls back to FileResponse.prepare")
async def test_images_open_and_close_on_the_loop_and_leak_nothing(served: Served) -> None:
    """No thread-pool hand-off per request (aiohttp's FileResponse makes two: open,
    close), and every descriptor opened for a response is closed again."""
    executor = CountingExecutor()
    served.loop.set_default_executor(executor)
    fds = len(os.listdir("/proc/self/fd"))
    async with aiohttp.ClientSession() as s:
        for _ in range(10):
            async with s.get(f"{served.url}/big.bin") as r:
                assert r.status == 200 and len(await r.read()) == SIZE
                etag = r.headers["ETag"]
            async with s.get(f"{served.url}/big.bin", headers={"Range": "bytes=10-19"}) as r:
                assert r.status == 206 and await r.read() == served.data[10:20]
            async with s.get(f"{served.url}/big.bin", headers={"If-None-Match": etag}) as r:
                assert r.status == 304
            async with s.head(f"{served.url}/big.bin") as r:
                assert r.status == 200
    assert executor.calls == []
    for _ in range(100):  # the server notices the closed connection a moment later
        if len(os.listdir("/proc/self/fd")) <= fds:
            break
        await asyncio.sleep(0.02)
    assert len(os.listdir("/proc/self/fd")) <= fds


async def test_head_sends_headers_only(served: Served) -> None:
    async with aiohttp.ClientSession() as s, s.head(f"{served.url}/big.bin") as r:
        assert r.status == 200 and r.headers["Content-Length"] == str(SIZE)
        assert "ETag" in r.headers and await r.read() == b""


def _exchange(port: int, *requests: str) -> bytes:
    """Send ``requests`` on one keep-alive connection (the last closes it); all bytes back."""
    sock = socket.create_connection(("127.0.0.1", port))
    with sock:
        for i, line in enumerate(requests):
            close = "Connection: close\r\n" if i == len(requests) - 1 else ""
            sock.sendall(f"{line} HTTP/1.1\r\nHost: x\r\n{close}\r\n".encode())
        buf = bytearray()
        while chunk := sock.recv(65536):
            buf += chunk
    return bytes(buf)


def _headers(head: bytes) -> dict[str, str]:
    lines = head.decode().split("\r\n")[1:]
    return {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines)}


def _responses(raw: bytes) -> list[tuple[dict[str, str], bytes]]:
    """Split what came back on one connection into (headers, body) by Content-Length, the
    first body taken as empty (a HEAD's), the others as long as their header says."""
    out: list[tuple[dict[str, str], bytes]] = []
    while raw:
        head, _, raw = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head[:200]  # nothing between two responses
        headers = _headers(head)
        n = 0 if len(out) % 2 == 0 else int(headers["content-length"])  # HEAD, GET, HEAD...
        out.append((headers, raw[:n]))
        raw = raw[n:]
    return out


@pytest.mark.parametrize("path", ["/loader/ipxe.efi", "/images/flatcar/stable/k"])
async def test_head_then_get_as_uefi_http_boot_does(served: Served, path: str) -> None:
    """HEAD then GET on one connection (OVMF's order), then HEAD again: a HEAD has GET's
    headers and puts no byte of body on the wire, and the connection serves on after the
    GET, or the next status line would not follow at once."""
    size = len(LOADER) if path.startswith("/loader") else 1000
    raw = await asyncio.to_thread(_exchange, served.port, f"HEAD {path}", f"GET {path}",
                                  f"HEAD {path}")
    (h1, _), (h2, body), (h3, _) = _responses(raw)
    assert h1["content-length"] == h2["content-length"] == h3["content-length"] == str(size)
    for name in ("content-type", "etag", "last-modified", "accept-ranges"):
        assert h1[name] == h2[name] == h3[name], name
    assert len(body) == size
    if path.startswith("/loader"):
        assert body == LOADER
        # the GET is a download; the HEADs are not
        assert served.counters.get("loader_downloads_total", transport="http") == 1
        assert served.counters.get("http_requests_total", route="loader-head") == 2


async def test_a_loader_range_is_not_a_download(served: Served) -> None:
    async with aiohttp.ClientSession() as s, s.get(
            f"http://127.0.0.1:{served.port}/loader/ipxe.efi",
            headers={"Range": "bytes=0-99"}) as r:
        assert r.status == 206 and await r.read() == LOADER[:100]
    assert served.counters.total("loader_downloads_total") == 0


async def test_conditional_requests(served: Served) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{served.url}/big.bin") as r:
            etag, modified = r.headers["ETag"], r.headers["Last-Modified"]
            await r.read()
        async with s.get(f"{served.url}/big.bin", headers={"If-None-Match": etag}) as r:
            assert r.status == 304 and await r.read() == b""
            assert r.headers["ETag"] == etag
        async with s.get(f"{served.url}/big.bin", headers={"If-Modified-Since": modified}) as r:
            assert r.status == 304
        async with s.get(f"{served.url}/big.bin", headers={"If-None-Match": '"other"'}) as r:
            assert r.status == 200 and len(await r.read()) == SIZE
        # A Range that only applies while the file is unchanged (resuming clients).
        async with s.get(f"{served.url}/big.bin",
                         headers={"Range": "bytes=10-19", "If-Range": etag}) as r:
            assert r.status == 206 and await r.read() == served.data[10:20]
        async with s.get(f"{served.url}/big.bin",
                         headers={"Range": "bytes=10-19", "If-Range": '"stale"'}) as r:
            assert r.status == 200 and len(await r.read()) == SIZE


@pytest.mark.parametrize("spec,start,end", [
    ("bytes=100-199", 100, 200),
    ("bytes=-100", SIZE - 100, SIZE),
    (f"bytes={SIZE - 5000}-", SIZE - 5000, SIZE),
    ("bytes=0-", 0, SIZE),
])
async def test_ranges(served: Served, spec: str, start: int, end: int) -> None:
    async with aiohttp.ClientSession() as s, \
            s.get(f"{served.url}/big.bin", headers={"Range": spec}) as r:
        assert r.status == 206
        assert r.headers["Content-Range"] == f"bytes {start}-{end - 1}/{SIZE}"
        assert await r.read() == served.data[start:end]


async def test_unsatisfiable_range(served: Served) -> None:
    async with aiohttp.ClientSession() as s, \
            s.get(f"{served.url}/big.bin", headers={"Range": f"bytes={SIZE}-"}) as r:
        assert r.status == 416 and r.headers["Content-Range"] == f"bytes */{SIZE}"


@pytest.mark.parametrize("path,status", [
    ("flatcar/stable/k", 200), ("flatcar/3975.2.0/k", 200), ("escape", 404),
    ("flatcar/../../secret", 404), ("%2e%2e/secret", 404), ("nope", 404),
])
async def test_symlinks_and_escapes(served: Served, path: str, status: int) -> None:
    async with aiohttp.ClientSession() as s, \
            s.get(f"{served.url}/{path}", allow_redirects=False) as r:
        assert r.status == status, await r.text()
        if status == 200:
            assert await r.read() == served.data[:1000]


async def test_50_concurrent_range_downloads_reassemble(served: Served) -> None:
    parts = 50
    step = -(-SIZE // parts)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)  # 50 real connections

    async with aiohttp.ClientSession(connector=connector) as s:
        async def part(i: int) -> bytes:
            lo, hi = i * step, min(SIZE, (i + 1) * step) - 1
            async with s.get(f"{served.url}/big.bin", headers={"Range": f"bytes={lo}-{hi}"}) as r:
                assert r.status == 206, r.status
                assert r.headers["Content-Range"] == f"bytes {lo}-{hi}/{SIZE}"
                return await r.read()

        async def full() -> bytes:
            async with s.get(f"{served.url}/big.bin") as r:
                return await r.read()

        results = await asyncio.gather(*(part(i) for i in range(parts)),
                                       *(full() for _ in range(5)))
    assert hashlib.sha256(b"".join(results[:parts])).digest() == \
        hashlib.sha256(served.data).digest()
    assert all(r == served.data for r in results[parts:])


def _raw_get(port: int, path: str, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET /images/{path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    return sock


def _read_response(sock: socket.socket, delay: float = 0.0) -> tuple[bytes, bytes]:
    buf = bytearray()
    while chunk := sock.recv(65536):
        buf += chunk
        if delay:
            time.sleep(delay)
    head, _, body = bytes(buf).partition(b"\r\n\r\n")
    return head, body


async def test_slow_reader_gets_every_byte_and_blocks_no_one(served: Served) -> None:
    """A client that reads slowly fills its socket buffer, so the server must wait for
    writability (the EAGAIN path) without stalling other clients."""
    sock = _raw_get(served.port, "big.bin", rcvbuf=16384)
    slow = asyncio.create_task(asyncio.to_thread(_read_response, sock, 0.004))  # >= 2 s
    await asyncio.sleep(0.2)
    async with aiohttp.ClientSession() as s:
        started = time.monotonic()
        async with s.get(f"{served.url}/flatcar/stable/k") as r:
            assert await r.read() == served.data[:1000]
        assert time.monotonic() - started < 1.5
        assert not slow.done()  # still downloading while another client was served
    head, body = await slow
    sock.close()
    assert head.startswith(b"HTTP/1.1 200") and body == served.data


async def test_client_vanishing_midway_leaves_server_serving(served: Served) -> None:
    for _ in range(5):
        sock = _raw_get(served.port, "big.bin", rcvbuf=16384)
        assert sock.recv(65536)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()  # RST with most of the file unsent
    await asyncio.sleep(0.2)
    async with aiohttp.ClientSession() as s, s.get(f"{served.url}/big.bin") as r:
        assert await r.read() == served.data
