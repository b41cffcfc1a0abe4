"""HTTP side of booting: iPXE scripts, kernels and initrds, loaders for UEFI
HTTP boot, and health. Registry, API, dashboard and metrics routes are added
by :mod:`netboot.http.api` when a registry is present.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..booter import Booter
from ..identity import IdentityError, normalise_mac, normalise_uuid
from ..images import ImageResponse
from ..loaders import LoaderTable
from ..metrics import Counters
from ..registry import RegistryError
from ..util.confine import ConfineError, confine

if TYPE_CHECKING:
    from ..artifacts import Artifacts, Kind, NodeArtifacts
    from ..registry import Registry

log = logging.getLogger("netboot.http")


def safe_path(root: Path, relative: str) -> Path | None:
    """The regular file ``relative`` names inside ``root`` (util/confine rules), else None."""
    try:
        return confine(root, relative)
    except ConfineError:
        return None


@dataclass
class HttpContext:
    booter: Booter
    counters: Counters
    images_dir: Path
    loaders: LoaderTable
    registry: Registry | None = None
    started: float = field(default_factory=time.time)
    #: client address -> (uuid, mac) as identified by its boot script request
    by_address: OrderedDict[str, tuple[str | None, str | None]] = field(
        default_factory=OrderedDict)
    max_addresses: int = 100_000
    #: per-node Ignition configs and OEM archives (the same object as booter.artifacts)
    artifacts: Artifacts | None = None
    data_dir: Path | None = None
    #: why the registry cannot record (full or read-only data_dir...), for /health
    registry_problem: str | None = None
    _registry_logged: float = float("-inf")

    def remember(self, address: str, uuid: str | None, mac: str | None) -> None:
        """Which node an address just booted as (HTTP and TFTP), bounded."""
        self.by_address[address] = (uuid, mac)
        self.by_address.move_to_end(address)
        if len(self.by_address) > self.max_addresses:
            self.by_address.popitem(last=False)

    async def record(self, call: Awaitable[Any]) -> None:
        """Await a registry write; if the data dir fails, boots go on without it.

        A full or read-only disk must not stop machines from getting their boot
        scripts: the failure is counted, logged once a minute and shown at /health.
        """
        try:
            await call
        except (RegistryError, sqlite3.Error, OSError) as exc:
            self.counters.inc("registry_write_errors_total")
            self.registry_problem = f"registry in {self.data_dir}: {exc}"
            now = time.monotonic()
            if now - self._registry_logged >= 60:
                self._registry_logged = now
                log.error("cannot record boots: %s (still serving boot files and scripts; "
                          "free space or fix permissions in %s)", exc, self.data_dir)


CTX = web.AppKey("netboot", HttpContext)


def _param(request: web.Request, name: str) -> str | None:
    v = request.query.get(name, "").strip()
    return v or None


async def boot_ipxe(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    ctx.counters.inc("http_requests_total", route="boot.ipxe")
    return web.Response(text=ctx.booter.chain_script(), content_type="text/plain")


async def node_ipxe(request: web.Request) -> web.Response:
    """The per-machine script; the query carries what iPXE knows of the hardware."""
    ctx = request.app[CTX]
    ctx.counters.inc("http_requests_total", route="ipxe-node")
    try:
        uuid = normalise_uuid(u) if (u := _param(request, "uuid")) else None
        mac = normalise_mac(m) if (m := _param(request, "mac")) else None
    except IdentityError as exc:
        raise web.HTTPBadRequest(text=f"#!ipxe\necho netboot: {exc}\n") from None
    address = request.remote or ""
    script, resolved = ctx.booter.ipxe_script(mac, uuid)
    ctx.remember(address, uuid, mac)
    log.info("boot script: mac=%s uuid=%s from %s -> profile %s%s", mac or "-", uuid or "-",
             address, resolved.profile.name if resolved.profile else "none",
             f" ({resolved.reason})" if resolved.reason else "")
    if ctx.registry is not None and uuid and not resolved.local_boot:
        hostname = ctx.booter.hostname(resolved, mac) if resolved.profile else None
        await ctx.record(ctx.registry.observe(
            uuid, mac=mac, address=address, source="ipxe", boot=True,
            serial=_param(request, "serial"), vendor=_param(request, "manufacturer"),
            product=_param(request, "product"), asset=_param(request, "asset"),
            hostname=hostname, profile=resolved.profile.name if resolved.profile else None))
        await ctx.record(ctx.registry.transition(uuid, "booting", source="ipxe",
                                                 address=address))
    await boot_outcome(ctx, resolved, uuid, address, "ipxe")
    return web.Response(text=script, content_type="text/plain")


async def boot_outcome(ctx: HttpContext, resolved: Any, uuid: str | None, address: str,
                       source: str) -> None:
    """After a boot script or pxelinux config was handed out: report what failed in it."""
    await ignition_outcome(ctx, resolved, uuid, address, source)
    await boot_failed(ctx, resolved, uuid, address, source)


async def boot_failed(ctx: HttpContext, resolved: Any, uuid: str | None, address: str,
                      source: str) -> None:
    """A profile whose kernel arguments do not render: say why, and mark the node."""
    if resolved.error is None:
        return
    log.error("not booting %s (%s via %s): %s", uuid or "-", address, source, resolved.error)
    if ctx.registry is not None and uuid:
        await ctx.record(ctx.registry.transition(uuid, "error", source=source,
                                                 reason=resolved.error, address=address))


async def ignition_outcome(ctx: HttpContext, resolved: Any, uuid: str | None, address: str,
                           source: str) -> None:
    """After a boot script or pxelinux config: let the address fetch the node's OEM
    archive, or log the failed config and move the node to 'error' with the reason."""
    if resolved.profile is None or not resolved.profile.ignition:
        return
    a = resolved.artifacts
    if resolved.ignition_error is None and a is not None:
        if ctx.artifacts is not None:
            ctx.artifacts.grant(address, a.uuid)
        return
    reason = resolved.ignition_error or "Ignition config failed"
    log.error("not booting %s (%s via %s, profile %s): %s", uuid or "-", address, source,
              resolved.profile.name, reason)
    if ctx.registry is not None and uuid:
        await ctx.record(ctx.registry.transition(uuid, "error", source="ignition",
                                                 reason=reason, address=address))


def _artifact_for(ctx: HttpContext, uuid: str) -> NodeArtifacts | None:
    """What the node's boot script promised; re-rendered only if that was forgotten."""
    assert ctx.artifacts is not None
    a = ctx.artifacts.issued(uuid)
    if a is None:
        node = ctx.registry.get(uuid) if ctx.registry is not None else None
        mac = node.macs[0] if node is not None and node.macs else None
        a, _ = ctx.booter.node_artifacts(mac, uuid)
    return a


async def _signed(request: web.Request, kind: Kind) -> web.Response:
    """Serve a node's config or archive to a holder of that node's unexpired signed URL."""
    ctx = request.app[CTX]
    address = request.remote or ""
    raw = request.match_info["uuid"]
    try:
        uuid = normalise_uuid(raw)
    except IdentityError:
        uuid = None
    if ctx.artifacts is None or uuid is None:
        ctx.counters.inc("http_not_found_total", route=kind)
        raise web.HTTPNotFound(text="not found\n")
    reason = ctx.artifacts.check(kind, uuid, request.query.get("exp"), request.query.get("sig"))
    if reason is not None:
        ctx.artifacts.refused(reason, kind, uuid, address, "http")
        raise web.HTTPForbidden(text=f"forbidden: {reason}\n")
    a = _artifact_for(ctx, uuid)
    if a is None or not a.ok:
        why = (a.error if a is not None else None) or "no Ignition profile for this node"
        log.error("cannot serve %s for %s to %s: %s", kind, uuid, address, why)
        raise web.HTTPServiceUnavailable(text=f"netboot: {why}\n")
    ctx.artifacts.counters.inc("ignition_served_total", kind=kind, transport="http")
    await _deploying(ctx, request)
    headers = {"ETag": f'"{a.digest}"', "Cache-Control": "no-store"}
    if kind == "ignition":
        return web.Response(body=a.config, headers=headers,
                            content_type="application/vnd.coreos.ignition+json")
    return web.Response(body=a.archive, headers=headers, content_type="application/gzip")


async def ignition_config(request: web.Request) -> web.Response:
    return await _signed(request, "ignition")


async def oem_archive(request: web.Request) -> web.Response:
    return await _signed(request, "oem")


async def image(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CTX]
    path = safe_path(ctx.images_dir, request.match_info["path"])
    if path is None:
        ctx.counters.inc("http_not_found_total", route="images")
        raise web.HTTPNotFound(text="no such image\n")
    ctx.counters.inc("http_requests_total", route="images")
    await _deploying(ctx, request)
    return ImageResponse(path, chunk_size=1 << 20)


async def _deploying(ctx: HttpContext, request: web.Request) -> None:
    """A kernel or initrd fetch by a machine we just scripted moves it to 'deploying'."""
    if ctx.registry is None or request.method != "GET":
        return
    uuid, _mac = ctx.by_address.get(request.remote or "", (None, None))
    if uuid is not None:
        node = ctx.registry.get(uuid)
        if node is not None and node.state == "booting":
            await ctx.record(ctx.registry.transition(uuid, "deploying", source="http",
                                                     address=request.remote))


async def loader(request: web.Request) -> web.StreamResponse:
    """First-stage loaders over HTTP, for UEFI HTTP Boot clients."""
    ctx = request.app[CTX]
    path = ctx.loaders.path(request.match_info["name"])
    if path is not None:
        ctx.counters.inc("http_requests_total", route="loader")
        return web.FileResponse(path)
    ctx.counters.inc("http_not_found_total", route="loader")
    raise web.HTTPNotFound(text="no such loader\n")


async def health(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    store = ctx.booter.config
    problems = store.problems
    body: dict[str, Any] = {
        "status": "degraded" if problems or ctx.registry_problem else "ok",
        "config_generation": store.snapshot.generation,
        "config_problems": problems,
        "registry": ("absent: " if ctx.registry is None else "") + (
            ctx.registry_problem or "ok"),
        "profiles": sorted(store.snapshot.profiles),
        "machines": len(store.snapshot.machine_files),
        "uptime_seconds": round(time.time() - ctx.started, 1),
    }
    return web.json_response(body)


@web.middleware
async def count_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        request.app[CTX].counters.inc("http_responses_total", code=str(exc.status))
        raise


def make_app(ctx: HttpContext, *, admin_token: str | None = None) -> web.Application:
    app = web.Application(middlewares=[count_errors], client_max_size=1 << 20)
    app[CTX] = ctx
    app.router.add_get("/boot.ipxe", boot_ipxe)
    app.router.add_get("/ipxe/node", node_ipxe)
    app.router.add_get("/images/{path:.+}", image)
    app.router.add_get("/loader/{name}", loader)
    app.router.add_get("/health", health)
    app.router.add_get("/ignition/{uuid}.ign", ignition_config)
    app.router.add_get("/oem/{uuid}.cpio.gz", oem_archive)
    if ctx.registry is not None:
        from .api import setup_api

        store = ctx.booter.config
        setup_api(app, registry=ctx.registry, counters=ctx.counters, admin_token=admin_token,
                  profiles=lambda: {n: p.model_dump() for n, p in
                                    store.snapshot.profiles.items()})
    return app
