"""Server-rendered dashboard: what every node is doing, and which are stuck.

Plain jinja2 templates, one stylesheet and one small script shipped as package
data, nothing to build: it must work from a crash-cart browser. The script keeps
rows live from ``/api/v1/events`` (Server-Sent Events) and runs the power and
deploy buttons with an operator token it asks for once (kept for the tab only);
without JavaScript the page refreshes itself every few seconds instead.
"""

from __future__ import annotations

import time
import urllib.parse
from pathlib import Path

import jinja2
from aiohttp import web

from ..storage.pages import DEFAULT_LIMIT
from ..storage.registry import STATES
from ..util.text import human_duration
from .context import HttpContext, ctx_of
from .nodes import LIST_QUERY, ListQuery, list_query, node_page
from .power import power_out
from .routes import Route, path_uuid

PACKAGE_DIR = Path(__file__).resolve().parent.parent
REFRESH_SECONDS = 10


def _timestamp(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


class Dashboard:
    def __init__(self) -> None:
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(PACKAGE_DIR / "templates"),
            autoescape=jinja2.select_autoescape(["html"]), undefined=jinja2.StrictUndefined)
        self.env.filters["duration"] = human_duration
        self.env.filters["timestamp"] = _timestamp

    def render(self, name: str, status: int = 200, **ctx: object) -> web.Response:
        html = self.env.get_template(name).render(refresh=REFRESH_SECONDS, states=STATES, **ctx)
        return web.Response(text=html, status=status, content_type="text/html")


_dashboard = Dashboard()


def _unavailable(ctx: HttpContext) -> web.Response:
    return web.Response(status=503, content_type="text/plain",
                        text=f"netboot: the registry is not available "
                             f"({ctx.lifecycle.problem or 'not open'}); see /health\n")


def _page_href(query: ListQuery, cursor: str | None) -> str | None:
    """The dashboard URL of the page at ``cursor`` with the same filters (None: no page)."""
    if cursor is None:
        return None
    keep = query.model_dump(exclude_defaults=True, exclude={"cursor"})
    return "/?" + urllib.parse.urlencode({**keep, "cursor": cursor})


async def dashboard_index(request: web.Request) -> web.Response:
    """One page of nodes (like GET /api/v1/nodes), with search, filters and page links."""
    ctx = ctx_of(request)
    if ctx.registry is None:
        return _unavailable(ctx)
    try:
        query = list_query(request)
        page = await node_page(ctx, query)
    except ValueError as exc:
        return web.Response(status=400, content_type="text/plain",
                            text=f"netboot: {exc}; the first page is at /\n")
    nodes = page.nodes
    profiles = sorted({*ctx.booter.config.snapshot.profiles, *([query.profile] if query.profile
                                                                else [])})
    return _dashboard.render("index.html", nodes=nodes, counts=ctx.registry.counts_by_state(),
                             stuck={n.uuid for n in ctx.lifecycle.stuck()},
                             stuck_after=ctx.lifecycle.stuck_after, now=ctx.registry.now(),
                             query=query, filtered=bool(query.state or query.profile
                                                        or query.label or query.q),
                             filter_state=query.state or "", profiles=profiles,
                             limit=query.limit if query.limit != DEFAULT_LIMIT else None,
                             next_href=_page_href(query, page.next_cursor),
                             prev_href=_page_href(query, page.prev_cursor),
                             power={n.uuid: power_out(ctx, n.uuid) for n in nodes})


async def dashboard_node(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    if ctx.registry is None:
        return _unavailable(ctx)
    uuid = path_uuid(request)
    node = ctx.registry.get(uuid)
    if node is None:
        return _dashboard.render("missing.html", status=404, uuid=uuid)
    inventory = await ctx.registry.inventory(uuid)
    bmcs = ctx.lifecycle.bmcs
    return _dashboard.render(
        "node.html", node=node, events=await ctx.registry.events(uuid),
        stuck=ctx.lifecycle.is_stuck(node), now=ctx.registry.now(),
        stuck_after=ctx.lifecycle.stuck_after, power=power_out(ctx, uuid),
        bmc=bmcs.describe(uuid) if bmcs is not None else None,
        inventory=inventory[1] if inventory else None,
        inventory_time=inventory[0] if inventory else None,
        audit=await ctx.registry.audit(target=uuid, limit=50),
        # what an operator deploys: ordinary profiles first, commissioning ones last
        profiles=sorted(ctx.booter.config.snapshot.profiles.values(),
                        key=lambda p: (p.commission, p.name)))


def add_static(app: web.Application) -> None:
    app.router.add_static("/static/", PACKAGE_DIR / "static")


ROUTES = (
    Route("GET", "/", dashboard_index, "Dashboard: a page of nodes, searchable", "viewer",
          content_type="text/html", query=LIST_QUERY, tag="dashboard"),
    Route("GET", "/nodes/{uuid}", dashboard_node, "Dashboard: one node and its events",
          "viewer", content_type="text/html", tag="dashboard"),
)
