"""Serving image files: aiohttp's FileResponse with sendfile(2) under uvloop too."""

from __future__ import annotations

import asyncio
import os
import select
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter


class ImageResponse(web.FileResponse):
    """aiohttp's FileResponse (Range, ETag, Last-Modified, If-None-Match, HEAD), with
    sendfile(2) under uvloop too, and If-Range by entity tag. uvloop has no
    ``loop.sendfile``, so aiohttp would copy each file through a thread pool: four
    times the CPU per byte, measured here."""

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        # aiohttp honours only dates in If-Range; with an ETag it always sent the range,
        # so a client resuming a replaced image would splice two files together.
        if_range = request.headers.get(hdrs.IF_RANGE, "")
        if hdrs.RANGE in request.headers and if_range.startswith(('"', "W/")):
            try:
                st = os.stat(self._path)
                current = f'"{st.st_mtime_ns:x}-{st.st_size:x}"'  # aiohttp's strong ETag
            except OSError:
                current = ""
            if if_range != current:  # weak tags never match (RFC 9110 13.1.5)
                headers = request.headers.copy()
                del headers[hdrs.RANGE]
                request = request.clone(headers=headers)
        return await super().prepare(request)

    async def _sendfile(self, request: web.BaseRequest, fobj: IO[Any], offset: int,
                        count: int) -> AbstractStreamWriter:
        loop = asyncio.get_running_loop()
        transport = request.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if (type(loop).sendfile is not asyncio.AbstractEventLoop.sendfile or sock is None
                or self.compression or transport is None):
            return await super()._sendfile(request, fobj, offset, count)
        writer = await web.StreamResponse.prepare(self, request)  # sends the headers
        assert writer is not None
        for _ in range(1000):  # headers normally leave at once; never send the file before
            if not transport.get_write_buffer_size():
                break
            await asyncio.sleep(0.001)
        else:
            raise ConnectionResetError("client is not reading the response headers")
        await _sendfile_fd(loop, sock.fileno(), fobj.fileno(), offset, count)
        await web.StreamResponse.write_eof(self)
        return writer


SENDFILE_CHUNK = 2 << 20  # per call, then yield: nginx's sendfile_max_chunk default
#: threads that run the sendfile calls: the kernel's copy runs without the GIL, so the
#: event loop (DHCP, TFTP decisions, boot scripts) goes on meanwhile, on the other core
SENDFILE_THREADS = 8
THREAD_WAIT_MS = 20  # a slow client gives its thread back after this, and waits on the loop
_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(SENDFILE_THREADS, thread_name_prefix="sendfile")
    return _pool


def _send_some(sock_fd: int, file_fd: int, offset: int, count: int) -> int:
    """sendfile calls until ``count`` bytes are sent or the socket stays full for
    THREAD_WAIT seconds, waiting in poll(2) meanwhile (no GIL, no loop round trip per
    call). Returns the bytes sent (0: the file ended early), -1 if the socket stayed full
    (the loop then waits for it)."""
    sent = 0
    poller: select.poll | None = None
    while sent < count:
        try:
            n = os.sendfile(sock_fd, file_fd, offset + sent, count - sent)
        except BlockingIOError:
            if poller is None:
                poller = select.poll()
                poller.register(sock_fd, select.POLLOUT)
            if not poller.poll(THREAD_WAIT_MS):
                break
            continue
        if n == 0:  # end of file: it shrank (the caller's count came from its size)
            return sent
        sent += n
    return sent if sent else -1


async def _sendfile_fd(loop: asyncio.AbstractEventLoop, sock_fd: int, file_fd: int,
                       offset: int, count: int) -> None:
    """os.sendfile on a non-blocking socket, in a thread, waiting for writability on a
    dup of it: uvloop refuses add_writer on a descriptor its transport owns, and the dup
    is its own epoll entry, removed (remove_writer) before it is closed. The thread sends
    through the dup too: if the client goes away meanwhile and the loop closes the
    transport's descriptor (whose number may be reused at once), the dup still names
    this connection's socket."""
    dup = os.dup(sock_fd)
    try:
        file_dup = os.dup(file_fd)  # aiohttp closes its file when this coroutine ends
    except OSError:
        os.close(dup)
        raise
    pool = _executor()
    pending: asyncio.Future[int] | None = None
    try:
        while count > 0:
            pending = loop.run_in_executor(pool, _send_some, dup, file_dup, offset,
                                           min(count, SENDFILE_CHUNK))
            sent = await asyncio.shield(pending)
            pending = None
            if sent < 0:
                ready = loop.create_future()
                loop.add_writer(dup, _wake, ready)
                try:
                    await ready
                finally:
                    loop.remove_writer(dup)
                continue
            if sent == 0:
                raise ConnectionResetError("image file shrank while it was being sent")
            offset += sent
            count -= sent
    finally:
        if pending is not None and not pending.done():  # cancelled mid-call: close after it
            pending.add_done_callback(lambda _f: _close(dup, file_dup))
        else:
            _close(dup, file_dup)


def _close(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
