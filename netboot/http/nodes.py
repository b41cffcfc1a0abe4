"""The nodes API: the booted OS reports for itself with its node token (an HMAC of
its UUID, handed out in the boot script); admins change things with a bearer token.
Reads are open, like the rest of netboot's HTTP side. Who may call what, and what
each answer looks like, is declared in ``ROUTES`` below (see :mod:`.routes`)."""

from __future__ import annotations

import json
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..identity import normalise_mac
from ..storage.registry import STATES, Node
from .context import HttpContext, ctx_of
from .routes import Route, error, path_uuid

# -- request and response models (the API edge) ---------------------------------------

class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


_Text = Field(None, max_length=256)


class RegisterBody(_Body):
    """Identity the booted OS can add (dmidecode, hostname, a NIC)."""

    serial: str | None = _Text
    vendor: str | None = _Text
    product: str | None = _Text
    asset: str | None = _Text
    hostname: str | None = _Text
    mac: str | None = None

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str | None) -> str | None:
        return normalise_mac(v) if v else None


class FailedBody(_Body):
    reason: str = Field("no reason given", min_length=1, max_length=2000)


class PatchBody(_Body):
    """Admin changes; labels merge, a null value removes that label."""

    rearm: bool = False
    labels: dict[str, str | None] | None = None
    profile: str | None = Field(None, max_length=256)
    hostname: str | None = Field(None, max_length=256)


class NodeOut(BaseModel):
    uuid: str
    serial: str | None
    vendor: str | None
    product: str | None
    asset: str | None
    macs: list[str]
    address: str | None
    hostname: str | None
    profile: str | None
    labels: dict[str, str]
    boot_count: int
    first_seen: float
    last_seen: float
    state: Literal[STATES]  # type: ignore[valid-type]
    state_since: float
    time_in_state: float
    reason: str | None
    armed: bool
    stuck: bool = Field(False, description="in deploying for longer than stuck_after")


class EventOut(BaseModel):
    id: int
    time: float
    kind: str = Field(description="discovered, boot, state, stuck, rearm or patch")
    state: str | None
    from_: str | None = Field(alias="from")
    source: str | None
    address: str | None
    detail: str | None


class NodeWithEvents(NodeOut):
    events: list[EventOut]


class NodeList(BaseModel):
    nodes: list[NodeOut]
    counts: dict[str, int]


class ProfileOut(BaseModel):
    uuid: str
    name: str | None
    profile: dict[str, Any] | None


class DetailOut(BaseModel):
    uuid: str
    address: str | None
    hostname: str | None
    labels: dict[str, str]


class Deleted(BaseModel):
    deleted: str


class Error(BaseModel):
    error: str


# -- edge helpers -------------------------------------------------------------------

def _validation_message(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors():
        where = ".".join(str(x) for x in e["loc"]) or "body"
        parts.append(f"{where}: {e['msg']}")
    return "invalid request body: " + "; ".join(parts)


async def read_body(request: web.Request, model: type[BaseModel]) -> Any:
    """The request body (JSON or a form) as ``model``; 400 with what is wrong."""
    data: Any = {}
    if request.body_exists:
        if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
            data = dict(await request.post())
        else:
            raw = await request.text()
            if raw.strip():
                try:
                    data = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise error(web.HTTPBadRequest, f"body is not JSON: {exc}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise error(web.HTTPBadRequest, _validation_message(exc)) from None


def node_out(ctx: HttpContext, node: Node) -> dict[str, Any]:
    assert ctx.registry is not None
    return {**node.to_json(ctx.registry.now()), "stuck": ctx.lifecycle.is_stuck(node)}


def _known(ctx: HttpContext, uuid: str) -> Node:
    assert ctx.registry is not None
    node = ctx.registry.get(uuid)
    if node is None:
        raise error(web.HTTPNotFound, f"no node {uuid}")
    return node


# -- reads and admin changes ------------------------------------------------------------

async def list_nodes(request: web.Request) -> dict[str, Any]:
    ctx = ctx_of(request)
    assert ctx.registry is not None
    state = request.query.get("state") or None
    if state is not None and state not in STATES:
        raise error(web.HTTPBadRequest, f"state must be one of {', '.join(STATES)}")
    nodes = await ctx.registry.list(state=state, profile=request.query.get("profile") or None,
                                    label=request.query.get("label") or None)
    return {"nodes": [node_out(ctx, n) for n in nodes],
            "counts": ctx.registry.counts_by_state()}


async def show_node(request: web.Request) -> dict[str, Any]:
    ctx = ctx_of(request)
    assert ctx.registry is not None
    uuid = path_uuid(request)
    node = _known(ctx, uuid)
    return {**node_out(ctx, node), "events": await ctx.registry.events(uuid)}


async def patch_node(request: web.Request) -> dict[str, Any]:
    ctx = ctx_of(request)
    uuid = path_uuid(request)
    body: PatchBody = await read_body(request, PatchBody)
    _known(ctx, uuid)
    node = await ctx.lifecycle.patch(uuid, actor=request.remote or "admin", rearm=body.rearm,
                                     labels=body.labels, profile=body.profile,
                                     hostname=body.hostname)
    return node_out(ctx, node)


async def delete_node(request: web.Request) -> dict[str, Any]:
    uuid = path_uuid(request)
    if not await ctx_of(request).lifecycle.forget(uuid):
        raise error(web.HTTPNotFound, f"no node {uuid}")
    return {"deleted": uuid}


# -- the node itself ----------------------------------------------------------------------

async def node_profile(request: web.Request) -> dict[str, Any]:
    ctx = ctx_of(request)
    uuid = path_uuid(request)
    node = _known(ctx, uuid)
    prof = None
    if node.profile:
        p = ctx.booter.config.snapshot.profiles.get(node.profile)
        prof = p.model_dump(mode="json") if p is not None else None
    return {"uuid": uuid, "name": node.profile, "profile": prof}


async def node_detail(request: web.Request) -> dict[str, Any]:
    ctx = ctx_of(request)
    uuid = path_uuid(request)
    node = _known(ctx, uuid)
    return {"uuid": uuid, "address": node.address, "hostname": node.hostname,
            "labels": node.labels}


async def node_register(request: web.Request) -> dict[str, Any]:
    ctx = ctx_of(request)
    uuid = path_uuid(request)
    body: RegisterBody = await read_body(request, RegisterBody)
    node = await ctx.lifecycle.reported(uuid, "register", address=request.remote,
                                        identity=body.model_dump())
    return node_out(ctx, node)


async def node_installed(request: web.Request) -> dict[str, Any]:
    ctx = ctx_of(request)
    node = await ctx.lifecycle.reported(path_uuid(request), "installed", address=request.remote)
    return node_out(ctx, node)


async def node_failed(request: web.Request) -> dict[str, Any]:
    ctx = ctx_of(request)
    body: FailedBody = await read_body(request, FailedBody)
    node = await ctx.lifecycle.reported(path_uuid(request), "failed", address=request.remote,
                                        reason=body.reason)
    return node_out(ctx, node)


_N = "/api/v1/nodes/{uuid}"
_LIST_QUERY = ("state", "profile", "label")
ROUTES = (
    Route("GET", "/api/v1/nodes", list_nodes, "List nodes, optionally filtered", "viewer",
          response=NodeList, query=_LIST_QUERY, tag="admin", registry=True),
    Route("GET", _N, show_node, "One node with its event history", "viewer",
          response=NodeWithEvents, tag="admin", registry=True),
    Route("PATCH", _N, patch_node, "Re-arm, relabel, set profile or hostname", "operator",
          PatchBody, NodeOut, tag="admin", registry=True),
    Route("DELETE", _N, delete_node, "Forget a node and its history", "admin",
          response=Deleted, tag="admin", registry=True),
    Route("GET", _N + "/profile", node_profile, "What this node should run", "node",
          response=ProfileOut, tag="node", registry=True),
    Route("GET", _N + "/detail", node_detail, "This node's address, hostname and labels",
          "node", response=DetailOut, tag="node", registry=True),
    Route("POST", _N + "/register", node_register, "Add identity from the booted OS",
          "node", RegisterBody, NodeOut, tag="node", registry=True),
    Route("POST", _N + "/installed", node_installed, "Report a finished install", "node",
          response=NodeOut, tag="node", registry=True),
    Route("POST", _N + "/failed", node_failed, "Report a failed install", "node",
          FailedBody, NodeOut, tag="node", registry=True),
)
