"""The aiohttp application: every endpoint file's ``ROUTES``, behind :func:`.routes.guard`.

One file per endpoint group:

- :mod:`.boot`: ``/boot.ipxe`` and the per-node iPXE script;
- :mod:`.files`: kernels and initrds, UEFI HTTP Boot loaders;
- :mod:`.signed`: per-node Ignition configs and OEM archives (signed URLs);
- :mod:`.nodes`: the nodes API (node tokens, inventory, audit);
- :mod:`.power`: power, deploy, bulk power jobs, BMC credentials;
- :mod:`.dashboard`, :mod:`.health` (health and metrics), :mod:`.openapi`.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from . import boot, dashboard, events, files, health, nodes, openapi, power, signed
from .context import CTX, HttpContext
from .routes import Route, guard


def all_routes() -> tuple[Route, ...]:
    return (*boot.ROUTES, *files.ROUTES, *signed.ROUTES, *nodes.ROUTES, *power.ROUTES,
            *health.ROUTES, *openapi.ROUTES, *dashboard.ROUTES, *events.ROUTES)


@web.middleware
async def count_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        request.app[CTX].counters.inc("http_responses_total", code=str(exc.status))
        raise


def make_app(ctx: HttpContext) -> web.Application:
    app = web.Application(middlewares=[count_errors], client_max_size=1 << 20)
    app[CTX] = ctx
    for r in all_routes():
        if r.method == "GET":  # and HEAD: UEFI HTTP Boot sizes a file before it fetches it
            app.router.add_get(r.path, guard(r))
        else:
            app.router.add_route(r.method, r.path, guard(r))
    dashboard.add_static(app)

    async def end_streams(_app: web.Application) -> None:
        ctx.events.close()

    app.on_shutdown.append(end_streams)
    return app
