"""Signed per-node artefacts: the Ignition config and the OEM archive, each only to a
holder of that node's unexpired signed URL (it appears only in its boot script)."""

from __future__ import annotations

import logging

from aiohttp import web

from ..identity import IdentityError, normalise_uuid
from .context import ctx_of
from .routes import Route

log = logging.getLogger("netboot.http")


async def _signed(request: web.Request, kind: str) -> web.Response:
    ctx = ctx_of(request)
    address = request.remote or ""
    try:
        uuid: str | None = normalise_uuid(request.match_info["uuid"])
    except IdentityError:
        uuid = None
    if ctx.artifacts is None or uuid is None:
        ctx.counters.inc("http_not_found_total", route=kind)
        raise web.HTTPNotFound(text="not found\n")
    reason = ctx.artifacts.check(kind, uuid, request.query.get("exp"),  # type: ignore[arg-type]
                                 request.query.get("sig"))
    if reason is not None:
        ctx.artifacts.refused(reason, kind, uuid, address, "http")
        raise web.HTTPForbidden(text=f"forbidden: {reason}\n")
    a = ctx.lifecycle.handed_out(uuid, address)
    if a is None or not a.ok:
        why = (a.error if a is not None else None) or "no Ignition profile for this node"
        log.error("cannot serve %s for %s to %s: %s", kind, uuid, address, why)
        raise web.HTTPServiceUnavailable(text=f"netboot: {why}\n")
    ctx.counters.inc("ignition_served_total", kind=kind, transport="http")
    if request.method == "GET":
        ctx.lifecycle.fetched(address, "http")
    headers = {"ETag": f'"{a.digest}"', "Cache-Control": "no-store"}
    if kind == "ignition":
        return web.Response(body=a.config, headers=headers,
                            content_type="application/vnd.coreos.ignition+json")
    return web.Response(body=a.archive, headers=headers, content_type="application/gzip")


async def ignition_config(request: web.Request) -> web.Response:
    return await _signed(request, "ignition")


async def oem_archive(request: web.Request) -> web.Response:
    return await _signed(request, "oem")


ROUTES = (
    Route("GET", "/ignition/{uuid}.ign", ignition_config,
          "The node's Ignition config (signed URL: ?exp=&sig=)",
          content_type="application/vnd.coreos.ignition+json", query=("exp", "sig")),
    Route("GET", "/oem/{uuid}.cpio.gz", oem_archive,
          "The node's OEM archive holding its Ignition config (signed URL: ?exp=&sig=)",
          content_type="application/gzip", query=("exp", "sig")),
)
