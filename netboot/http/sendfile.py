"""Serving image files: aiohttp's FileResponse with sendfile(2) under uvloop too, and
without its two thread-pool hand-offs per request."""

from __future__ import annotations

import asyncio
import os
from typing import IO, Any

from aiohttp import hdrs, web, web_fileresponse
from aiohttp.abc import AbstractStreamWriter

#: aiohttp's own steps of FileResponse.prepare (3.11 and later): decide on the
#: validators and open the file (``_make_response``), then answer (``_prepare_open_file``)
_Result = getattr(web_fileresponse, "_FileResponseResult", None)
_INLINE = _Result is not None and all(
    hasattr(web.FileResponse, name)
    for name in ("_make_response", "_prepare_open_file", "_precondition_failed",
                 "_not_modified"))


class ImageResponse(web.FileResponse):
    """aiohttp's FileResponse (Range, ETag, Last-Modified, If-None-Match, HEAD), with
    sendfile(2) under uvloop too, and If-Range by entity tag. uvloop has no
    ``loop.sendfile``, so aiohttp would copy each file through a thread pool: four
    times the CPU per byte, measured here.

    aiohttp stats and opens the file in its default thread pool and closes it there
    too: two hand-offs per request, which in a boot storm cost the main thread more
    than the stat and open themselves (bench/storm.py; docs/BENCHMARKS.md). Here they
    run on the loop. They are the same kind of call the route has just made there
    (util/confine resolves the path with lstat), on ``images_dir``, a local directory
    whose entries are in the kernel's cache once a rack has asked for them."""

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:  # sent by the handler itself (http/files.py: loader): once
            return await web.StreamResponse.prepare(self, request)
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
        if not _INLINE:
            return await super().prepare(request)
        return await self._prepare_inline(request)

    async def _prepare_inline(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        """aiohttp's FileResponse.prepare with its own steps, called on the loop."""
        assert _Result is not None
        accept_encoding = request.headers.get(hdrs.ACCEPT_ENCODING, "").lower()
        try:
            result, fobj, st, encoding = self._make_response(request, accept_encoding)
        except PermissionError:
            self.set_status(web.HTTPForbidden.status_code)
            return await web.StreamResponse.prepare(self, request)
        except OSError:  # gone since the route confined it, or a symlink loop
            self.set_status(web.HTTPNotFound.status_code)
            return await web.StreamResponse.prepare(self, request)
        if result is _Result.NOT_ACCEPTABLE:  # not a regular file
            self.set_status(web.HTTPForbidden.status_code)
            return await web.StreamResponse.prepare(self, request)
        if result is _Result.PRE_CONDITION_FAILED:
            return await self._precondition_failed(request)
        if result is _Result.NOT_MODIFIED:
            return await self._not_modified(request, f"{st.st_mtime_ns:x}-{st.st_size:x}",
                                            st.st_mtime)
        assert fobj is not None
        try:
            return await self._prepare_open_file(request, fobj, st, encoding)
        finally:
            fobj.close()

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


async def _sendfile_fd(loop: asyncio.AbstractEventLoop, sock_fd: int, file_fd: int,
                       offset: int, count: int) -> None:
    """os.sendfile on a non-blocking socket, waiting for writability on a dup of it:
    uvloop refuses add_writer on a descriptor its transport owns, and the dup is its
    own epoll entry, removed (remove_writer) before it is closed."""
    dup = os.dup(sock_fd)
    try:
        while count > 0:
            try:
                sent = os.sendfile(sock_fd, file_fd, offset, min(count, SENDFILE_CHUNK))
            except BlockingIOError:
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
            await asyncio.sleep(0)  # a fast client must not hold the loop DHCP and TFTP share
    finally:
        os.close(dup)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
