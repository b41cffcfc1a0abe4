"""The nodes API: the booted OS reports for itself with its node token (an HMAC of
its UUID, handed out in the boot script); admins change things with a bearer token.
Reads are open, like the rest of netboot's HTTP side. Who may call what, and what
each answer looks like, is declared in ``ROUTES`` below (see :mod:`.routes`)."""

from __future__ import annotations

import json
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..boot.lifecycle import NotCommissioning
from ..boot.spec import Cpu
from ..config import IPv4Text
from ..identity import normalise_mac
from ..storage.pages import DEFAULT_LIMIT, MAX_LIMIT, MAX_QUERY, CursorError
from ..storage.registry import STATES, Node, NodeFilter, NodePage
from .context import HttpContext, ctx_of
from .routes import Route, caller_of, error, path_uuid

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
    #: the OS read the SecureBoot EFI variable: on (true), off (false); BIOS: absent
    secure_boot: bool | None = None

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str | None) -> str | None:
        return normalise_mac(v) if v else None


class FailedBody(_Body):
    reason: str = Field("no reason given", min_length=1, max_length=2000)


class PatchBody(_Body):
    """Operator changes; labels merge, a null value removes that label; ``profile`` is
    the profile the node boots from now on ('' gives it back to its machine file)."""

    rearm: bool = False
    labels: dict[str, str | None] | None = None
    profile: str | None = Field(None, max_length=256)
    hostname: str | None = Field(None, max_length=256)


class PowerState(BaseModel):
    state: Literal["on", "off", "unknown"]
    checked: float | None
    reason: str | None


class BmcInfo(BaseModel):
    driver: str
    address: str
    port: int | None
    username: str
    system: str | None
    source: str = Field(description="file, commissioning or api")
    updated: float
    has_password: bool


class NodeOut(BaseModel):
    uuid: str
    serial: str | None
    vendor: str | None
    product: str | None
    asset: str | None
    macs: list[str]
    address: str | None
    hostname: str | None
    profile: str | None = Field(description="the profile it last booted")
    assigned_profile: str | None = Field(
        None, description="the profile an operator chose; it boots that next")
    labels: dict[str, str]
    boot_count: int
    first_seen: float
    last_seen: float
    state: Literal[STATES]  # type: ignore[valid-type]
    state_since: float
    time_in_state: float
    reason: str | None
    armed: bool
    secure_boot: bool | None = Field(
        None, description="Secure Boot was on in the booted OS (its SecureBoot EFI "
        "variable, as the OS reported it); null: not reported (BIOS)")
    arch: Cpu | None = Field(
        None, description="the CPU architecture its last boot's kernel was for")
    instance: str | None = Field(
        None, description="the netboot instance that served it last (a fleet sharing one "
        "registry: its `instance:` name)")
    stuck: bool = Field(False, description="deploying or commissioning for longer than "
                        "stuck_after")
    power: PowerState = Field(description="power as last polled from its BMC")
    bmc: BmcInfo | None = Field(None, description="its BMC (never the password)")


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
    events: list[EventOut] = Field(description="the latest 200 events, oldest first")


class NodeList(BaseModel):
    nodes: list[NodeOut] = Field(description="one page, in order of first sighting")
    counts: dict[str, int] = Field(description="all nodes per state (not only this page's)")
    next_cursor: str | None = Field(description="cursor= of the next page; null: the last")
    prev_cursor: str | None = Field(description="cursor= of the page before; null: the first")


class ListQuery(BaseModel):
    """The node list's query string (API and dashboard); empty values mean 'not given'."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)
    limit: int = Field(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT)
    cursor: str | None = Field(None, max_length=400)
    state: Literal[STATES] | None = None  # type: ignore[valid-type]
    profile: str | None = Field(None, max_length=256)
    label: str | None = Field(None, max_length=512)
    q: str | None = Field(None, max_length=MAX_QUERY)

    @model_validator(mode="before")
    @classmethod
    def _blanks(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v != ""} if isinstance(data, dict) else data

    def where(self) -> NodeFilter:
        return NodeFilter(state=self.state, profile=self.profile, label=self.label, q=self.q)


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

def _validation_message(exc: ValidationError, what: str = "request body") -> str:
    parts = []
    for e in exc.errors():
        where = ".".join(str(x) for x in e["loc"]) or "body"
        parts.append(f"{where}: {e['msg']}")
    return f"invalid {what}: " + "; ".join(parts)


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
    from .power import power_out

    assert ctx.registry is not None
    bmcs = ctx.lifecycle.bmcs
    return {**node.to_json(ctx.registry.now()), "stuck": ctx.lifecycle.is_stuck(node),
            "power": power_out(ctx, node.uuid),
            "bmc": bmcs.describe(node.uuid) if bmcs is not None else None}


def _known(ctx: HttpContext, uuid: str) -> Node:
    assert ctx.registry is not None
    node = ctx.registry.get(uuid)
    if node is None:
        raise error(web.HTTPNotFound, f"no node {uuid}")
    return node


# -- reads and admin changes ------------------------------------------------------------

def list_query(request: web.Request) -> ListQuery:
    """The node list's query string; ValueError with what is wrong and what to send."""
    try:
        return ListQuery.model_validate(dict(request.query))
    except ValidationError as exc:
        raise ValueError(_validation_message(exc, "query") + f" (limit: 1 to {MAX_LIMIT}, "
                         f"default {DEFAULT_LIMIT})") from None


async def node_page(ctx: HttpContext, query: ListQuery) -> NodePage:
    """The page ``query`` asks for (ValueError for a cursor this server did not make)."""
    assert ctx.registry is not None
    try:
        return await ctx.registry.page(query.where(), limit=query.limit, cursor=query.cursor)
    except CursorError as exc:
        raise ValueError(str(exc)) from None


async def list_nodes(request: web.Request) -> dict[str, Any]:
    """One page of nodes; follow ``next_cursor`` for the rest (keyset: stable under writes)."""
    ctx = ctx_of(request)
    assert ctx.registry is not None
    try:
        page = await node_page(ctx, list_query(request))
    except ValueError as exc:
        raise error(web.HTTPBadRequest, str(exc)) from None
    return {"nodes": [node_out(ctx, n) for n in page.nodes],
            "counts": ctx.registry.counts_by_state(),
            "next_cursor": page.next_cursor, "prev_cursor": page.prev_cursor}


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
    node = await ctx.lifecycle.patch(uuid, actor=caller_of(request).name, rearm=body.rearm,
                                     labels=body.labels, assign=body.profile,
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


class SmbiosIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    uuid: str | None = Field(None, max_length=64)
    serial: str | None = Field(None, max_length=256)
    vendor: str | None = Field(None, max_length=256)
    product: str | None = Field(None, max_length=256)
    bios_version: str | None = Field(None, max_length=256)


class BmcIn(BaseModel):
    """The BMC's LAN settings as read in-band; the address must be an IPv4 address."""

    model_config = ConfigDict(extra="allow")
    address: IPv4Text | None = None
    netmask: str | None = Field(None, max_length=64)
    gateway: str | None = Field(None, max_length=64)
    mac: str | None = Field(None, max_length=64)
    source: str | None = Field(None, max_length=64)


class InventoryBody(BaseModel):
    """What a commissioning OS reports (extra keys are kept as reported)."""

    model_config = ConfigDict(extra="allow")
    smbios: SmbiosIn | None = None
    cpu: dict[str, Any] | None = None
    memory_bytes: int | None = Field(None, ge=0)
    disks: list[dict[str, Any]] = Field(default_factory=list, max_length=256)
    nics: list[dict[str, Any]] = Field(default_factory=list, max_length=256)
    lldp: dict[str, Any] | None = None
    #: the SecureBoot EFI variable as the OS read it; null on BIOS
    secure_boot: bool | None = None
    bmc: BmcIn | None = None

    @field_validator("nics")
    @classmethod
    def _macs(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for nic in v:
            if nic.get("mac"):
                nic["mac"] = normalise_mac(str(nic["mac"]))
        return v


class InventoryAnswer(BaseModel):
    node: NodeOut
    action: Literal["set-bmc", "wait", "poweroff"]
    bmc_address: str | None
    bmc_netmask: str | None
    bmc_gateway: str | None
    note: str


class InventoryOut(BaseModel):
    uuid: str
    time: float | None
    inventory: dict[str, Any] | None


class AuditRow(BaseModel):
    id: int
    time: float
    actor: str
    role: str | None
    action: str
    target: str | None
    result: str
    detail: str | None


class AuditOut(BaseModel):
    audit: list[AuditRow]


async def node_inventory(request: web.Request) -> Any:
    """The commissioning OS reports; ``?format=sh`` answers as shell-safe lines."""
    ctx = ctx_of(request)
    uuid = path_uuid(request)
    body: InventoryBody = await read_body(request, InventoryBody)
    try:
        node, answer = await ctx.lifecycle.inventoried(uuid, body.model_dump(),
                                                       address=request.remote)
    except NotCommissioning as exc:
        raise error(web.HTTPConflict, str(exc)) from None
    if request.query.get("format") == "sh":
        lines = [f"NETBOOT_ACTION={answer.action}"]
        for key, value in (("ADDRESS", answer.address), ("NETMASK", answer.netmask),
                           ("GATEWAY", answer.gateway)):
            if value:
                lines.append(f"NETBOOT_BMC_{key}={value}")  # IPv4 only (config-validated)
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")
    return {"node": node_out(ctx, node), "action": answer.action,
            "bmc_address": answer.address, "bmc_netmask": answer.netmask,
            "bmc_gateway": answer.gateway, "note": answer.note}


async def show_inventory(request: web.Request) -> dict[str, Any]:
    ctx = ctx_of(request)
    assert ctx.registry is not None
    uuid = path_uuid(request)
    _known(ctx, uuid)
    got = await ctx.registry.inventory(uuid)
    return {"uuid": uuid, "time": got[0] if got else None, "inventory": got[1] if got else None}


async def show_audit(request: web.Request) -> dict[str, Any]:
    ctx = ctx_of(request)
    assert ctx.registry is not None
    node = request.query.get("node") or None
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        raise error(web.HTTPBadRequest, "limit must be a whole number") from None
    return {"audit": await ctx.registry.audit(target=node, limit=limit)}


_N = "/api/v1/nodes/{uuid}"
LIST_QUERY = ("limit", "cursor", "state", "profile", "label", "q")
ROUTES = (
    Route("GET", "/api/v1/nodes", list_nodes, "A page of nodes, optionally filtered or "
          "searched; next_cursor leads to the next", "viewer",
          response=NodeList, query=LIST_QUERY, tag="admin", registry=True),
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
    Route("POST", _N + "/inventory", node_inventory, "A commissioning OS reports the "
          "hardware; the answer says what it does next (?format=sh: shell-safe lines)",
          "node", InventoryBody, InventoryAnswer, query=("format",), tag="node",
          registry=True),
    Route("GET", _N + "/inventory", show_inventory, "The hardware a node last reported",
          "viewer", response=InventoryOut, tag="admin", registry=True),
    Route("GET", "/api/v1/audit", show_audit, "Who did what, newest first", "viewer",
          response=AuditOut, query=("node", "limit"), tag="admin", registry=True),
)
