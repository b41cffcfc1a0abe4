"""``/health`` and ``/metrics``: always served, with or without the registry, so a
broken data dir shows up where operators look instead of hiding the counters."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from .context import ctx_of
from .routes import Route


async def health(request: web.Request) -> dict[str, Any]:
    ctx = ctx_of(request)
    store = ctx.booter.config
    problems = store.problems
    registry_problem = ctx.lifecycle.problem
    if ctx.registry is None and registry_problem is None:
        registry_problem = "not open"
    return {
        "status": "degraded" if problems or registry_problem else "ok",
        "config_generation": store.snapshot.generation,
        "config_problems": problems,
        "registry": ("absent: " if ctx.registry is None else "") + (registry_problem or "ok"),
        "profiles": sorted(store.snapshot.profiles),
        "machines": len(store.snapshot.machine_files),
        "uptime_seconds": round(time.time() - ctx.started, 1),
    }


async def metrics(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    text = ctx.counters.render() + ctx.node_metrics.render(ctx.registry, ctx.lifecycle)
    return web.Response(body=text.encode(), headers={
        "Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


ROUTES = (
    Route("GET", "/health", health, "Health: config problems, registry state, uptime",
          tag="meta"),
    Route("GET", "/metrics", metrics, "Prometheus metrics",
          content_type="text/plain; version=0.0.4", tag="meta"),
)
