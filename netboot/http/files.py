"""Boot files over HTTP: kernels and initrds under ``images/``, and first-stage
loaders for UEFI HTTP Boot."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from ..util.confine import ConfineError, confine
from .context import ctx_of
from .routes import Route
from .sendfile import ImageResponse


def image_path(root: Path, relative: str) -> Path | None:
    """The regular file ``relative`` names inside ``root`` (util/confine's rules, the
    same as TFTP's), else None."""
    try:
        return confine(root, relative)
    except ConfineError:
        return None


async def image(request: web.Request) -> web.StreamResponse:
    ctx = ctx_of(request)
    path = image_path(ctx.images_dir, request.match_info["path"])
    if path is None:
        ctx.counters.inc("http_not_found_total", route="images")
        raise web.HTTPNotFound(text="no such image\n")
    ctx.counters.inc("http_requests_total", route="images")
    if request.method == "GET":
        ctx.lifecycle.fetched(request.remote or "", "http")
    return ImageResponse(path, chunk_size=1 << 20)


async def loader(request: web.Request) -> web.StreamResponse:
    """First-stage loaders over HTTP, for UEFI HTTP Boot clients. The firmware sends
    HEAD, then GET (docs/firmware.md): both get the headers of one file response
    (Content-Length, ETag, Last-Modified, Accept-Ranges), HEAD without a body. A GET
    whose whole file went out is reported, so a firmware that will not run the loader
    can be told apart (boot/refusals.py)."""
    ctx = ctx_of(request)
    name = request.match_info["name"]
    path = ctx.loaders.path(name)
    if path is None:
        ctx.counters.inc("http_not_found_total", route="loader")
        raise web.HTTPNotFound(text="no such loader\n")
    if request.method != "GET":
        ctx.counters.inc("http_requests_total", route="loader-head")
        return ImageResponse(path)
    ctx.counters.inc("http_requests_total", route="loader")
    response = ImageResponse(path)
    await response.prepare(request)
    await response.write_eof()
    if response.status == 200:  # not a range (206), a 304 or a missing file
        ctx.lifecycle.loader_sent(request.remote or "", name, "http")
    return response


ROUTES = (
    Route("GET", "/images/{path:.+}", image, "A kernel or initrd under images_dir",
          content_type="application/octet-stream"),
    Route("GET", "/loader/{name}", loader, "A first-stage loader (UEFI HTTP Boot)",
          content_type="application/octet-stream"),
)
