"""Server-rendered dashboard: what every node is doing, and which are stuck.

Plain jinja2 templates and one stylesheet shipped as package data, a meta
refresh instead of JavaScript: it must work from a crash-cart browser with
nothing to build.
"""

from __future__ import annotations

import time
from pathlib import Path

import jinja2
from aiohttp import web

from ..registry import STATES, Registry
from ..util.text import human_duration

PACKAGE_DIR = Path(__file__).resolve().parent.parent
REFRESH_SECONDS = 10


def _timestamp(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


class Dashboard:
    def __init__(self, registry: Registry):
        self.registry = registry
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(PACKAGE_DIR / "templates"),
            autoescape=jinja2.select_autoescape(["html"]), undefined=jinja2.StrictUndefined)
        self.env.filters["duration"] = human_duration
        self.env.filters["timestamp"] = _timestamp

    def add_static(self, app: web.Application) -> None:
        app.router.add_static("/static/", PACKAGE_DIR / "static")

    def _render(self, name: str, status: int = 200, **ctx: object) -> web.Response:
        html = self.env.get_template(name).render(refresh=REFRESH_SECONDS, states=STATES, **ctx)
        return web.Response(text=html, status=status, content_type="text/html")

    async def index(self, request: web.Request) -> web.Response:
        q = request.query
        state = q.get("state") or None
        nodes = await self.registry.list(state=state if state in STATES else None,
                                         profile=q.get("profile") or None,
                                         label=q.get("label") or None)
        return self._render("index.html", nodes=nodes, counts=self.registry.counts_by_state(),
                            stuck={n.uuid for n in self.registry.stuck()},
                            stuck_after=self.registry.stuck_after, now=self.registry.now(),
                            filter_state=state or "")

    async def node(self, request: web.Request, uuid: str) -> web.Response:
        node = self.registry.get(uuid)
        if node is None:
            return self._render("missing.html", status=404, uuid=uuid)
        return self._render("node.html", node=node, events=await self.registry.events(uuid),
                            stuck=self.registry.is_stuck(node), now=self.registry.now(),
                            stuck_after=self.registry.stuck_after)
