"""Boot scripts: ``/boot.ipxe`` (chain with the hardware's identity) and the per-node
``/ipxe/node`` script; GRUB's stub and per-node config for a GRUB loaded over HTTP.
Admit (a new node), decide, render, record."""

from __future__ import annotations

import logging

from aiohttp import web

from ..boot import grub, ipxe
from ..boot.spec import Cpu, Refusal
from ..identity import IdentityError, node_uuid, normalise_mac, normalise_uuid
from .context import ctx_of
from .routes import Route

log = logging.getLogger("netboot.http")

#: what iPXE's chain script sends back, as the registry names it
_IDENTITY = {"serial": "serial", "manufacturer": "vendor", "product": "product",
             "asset": "asset"}


def _param(request: web.Request, name: str) -> str | None:
    v = request.query.get(name, "").strip()
    return v or None


async def boot_ipxe(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    ctx.counters.inc("http_requests_total", route="boot.ipxe")
    base = ctx.booter_for(request.remote).base_url
    return web.Response(text=ipxe.chain_script(base), content_type="text/plain")


async def node_ipxe(request: web.Request) -> web.Response:
    """The per-machine script; the query carries what iPXE knows of the hardware."""
    ctx = ctx_of(request)
    ctx.counters.inc("http_requests_total", route="ipxe-node")
    try:
        uuid = normalise_uuid(u) if (u := _param(request, "uuid")) else None
        mac = normalise_mac(m) if (m := _param(request, "mac")) else None
    except IdentityError as exc:
        raise web.HTTPBadRequest(text=f"#!ipxe\necho netboot: {exc}\n") from None
    address = request.remote or ""
    uuid = node_uuid(uuid, mac)
    # a new machine over limits.new_nodes is told to ask again, before anything is decided
    booter = ctx.booter_for(address)  # URLs in the address family the client used
    # iPXE's ${buildarch}: arm64 for an arm64 build, which boots the profile's arches.arm64
    cpu: Cpu = "arm64" if _param(request, "buildarch") == "arm64" else "amd64"
    decision = ctx.lifecycle.admit(uuid, mac, address, "ipxe") or booter.decide(
        mac, uuid, "ipxe", cpu)
    script = ipxe.render(decision, booter.base_url)
    ctx.lifecycle.served(decision, address, "ipxe",
                         {ours: _param(request, q) for q, ours in _IDENTITY.items()})
    if not (isinstance(decision, Refusal) and decision.retry is not None):  # the limiter's
        log.info("boot script: mac=%s uuid=%s from %s -> %s %s", mac or "-", uuid or "-",
                 address, type(decision).__name__, getattr(decision, "profile", None) or "-")
    return web.Response(text=script, content_type="text/plain")


async def grub_stub(request: web.Request) -> web.Response:
    ctx_of(request).counters.inc("http_requests_total", route="grub-stub")
    return web.Response(text=grub.STUB, content_type="text/plain")


async def node_grub(request: web.Request) -> web.Response:
    """``/grub/mac/<mac>.cfg`` for a GRUB whose root is this server (a build with
    ``http``; Debian's signed GRUB has none and reads it over TFTP)."""
    ctx = ctx_of(request)
    ctx.counters.inc("http_requests_total", route="grub-node")
    try:
        mac = normalise_mac(request.match_info["mac"])
    except IdentityError:
        raise web.HTTPNotFound() from None
    address = request.remote or ""
    uuid = ctx.lifecycle.sightings.uuid_for_mac(mac)
    decision = ctx.lifecycle.admit(uuid, mac, address, "http") or ctx.booter.decide(
        mac, uuid, "grub")
    text = grub.render(decision, http=True)
    if text is None:  # not a GRUB machine, or not now: the stub tries its next file
        raise web.HTTPNotFound()
    ctx.lifecycle.served(decision, address, "http")
    return web.Response(text=text, content_type="text/plain")


ROUTES = (
    Route("GET", "/boot.ipxe", boot_ipxe, "First iPXE script: chains with the hardware's "
          "identity", content_type="text/plain"),
    Route("GET", "/ipxe/node", node_ipxe, "The per-node iPXE script",
          content_type="text/plain", query=("uuid", "mac", "serial", "manufacturer",
                                             "product", "asset")),
    Route("GET", "/grub/grub.cfg", grub_stub, "GRUB's stub config: hands over to the "
          "node's own file", content_type="text/plain"),
    Route("GET", "/grub/mac/{mac}.cfg", node_grub, "The per-node GRUB config (GRUB "
          "loaded over HTTP)", content_type="text/plain"),
)
