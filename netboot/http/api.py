"""Registry HTTP API, metrics and dashboard routes.

Two audiences: the booted OS reports for itself with its node token (HMAC of
its UUID, handed out in the boot script), and admins change things with a
bearer token. Reads (list, show, dashboard, metrics) are open, like the rest
of netboot's HTTP side. Every route is declared once in ``ROUTES``; the same
table registers the handlers and generates the OpenAPI document, so the two
cannot drift apart.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.json_schema import models_json_schema

from ..identity import IdentityError, normalise_mac, normalise_uuid
from ..metrics import Counters
from ..registry import STATES, Node, Registry
from .dashboard import Dashboard

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Auth = Literal["none", "node", "admin"]

ADMIN_HINT = ("admin API disabled: set api.admin_token in netboot.yaml or $NETBOOT_ADMIN_TOKEN "
              "and send 'Authorization: Bearer <token>'")


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
    state: Literal["discovered", "booting", "deploying", "installed", "error"]
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


# -- the route table ------------------------------------------------------------------

@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: str  # method name on _Api
    summary: str
    auth: Auth = "none"
    body: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    content_type: str = "application/json"
    query: tuple[str, ...] = ()
    tag: str = "admin"


_N = "/api/v1/nodes/{uuid}"
ROUTES: tuple[Route, ...] = (
    Route("GET", "/api/v1/nodes", "list_nodes", "List nodes, optionally filtered",
          response=NodeList, query=("state", "profile", "label")),
    Route("GET", _N, "show_node", "One node with its event history", response=NodeWithEvents),
    Route("PATCH", _N, "patch_node", "Re-arm, relabel, set profile or hostname", "admin",
          PatchBody, NodeOut),
    Route("DELETE", _N, "delete_node", "Forget a node and its history", "admin",
          response=Deleted),
    Route("GET", _N + "/profile", "node_profile", "What this node should run", "node",
          response=ProfileOut, tag="node"),
    Route("GET", _N + "/detail", "node_detail", "This node's address, hostname and labels",
          "node", response=DetailOut, tag="node"),
    Route("POST", _N + "/register", "node_register", "Add identity from the booted OS",
          "node", RegisterBody, NodeOut, tag="node"),
    Route("POST", _N + "/installed", "node_installed", "Report a finished install", "node",
          response=NodeOut, tag="node"),
    Route("POST", _N + "/failed", "node_failed", "Report a failed install", "node",
          FailedBody, NodeOut, tag="node"),
    Route("GET", "/api/v1/openapi.json", "openapi", "This document", tag="meta"),
    Route("GET", "/metrics", "metrics", "Prometheus metrics",
          content_type="text/plain; version=0.0.4", tag="meta"),
    Route("GET", "/", "dashboard_index", "Dashboard: all nodes", content_type="text/html",
          query=("state", "profile", "label"), tag="dashboard"),
    Route("GET", "/nodes/{uuid}", "dashboard_node", "Dashboard: one node and its events",
          content_type="text/html", tag="dashboard"),
)


def _error(status: type[web.HTTPException], message: str, **headers: str) -> web.HTTPException:
    return status(text=json.dumps({"error": message}), content_type="application/json",
                  headers=headers or None)


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors():
        where = ".".join(str(x) for x in e["loc"]) or "body"
        parts.append(f"{where}: {e['msg']}")
    return "invalid request body: " + "; ".join(parts)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda o: json.dumps(o, default=str))


class _Api:
    def __init__(self, registry: Registry, counters: Counters, admin_token: str | None,
                 profiles: Callable[[], dict[str, Any]] | None):
        self.registry = registry
        self.counters = counters
        self.admin_token = admin_token
        self.profiles = profiles
        self.dashboard = Dashboard(registry)
        self._openapi: dict[str, Any] | None = None

    # -- edge helpers ---------------------------------------------------------
    def _uuid(self, request: web.Request) -> str:
        try:
            return normalise_uuid(request.match_info["uuid"])
        except IdentityError as exc:
            raise _error(web.HTTPBadRequest, str(exc)) from None

    def _node_auth(self, request: web.Request) -> str:
        uuid = self._uuid(request)
        token = request.headers.get("X-Node-Token") or request.query.get("token")
        if not token:
            raise _error(web.HTTPUnauthorized, "node token required: ?token= or X-Node-Token")
        if not self.registry.check_node_token(uuid, token):
            self.counters.inc("api_forbidden_total")
            raise _error(web.HTTPForbidden, "this token is not valid for this node")
        return uuid

    def _admin_auth(self, request: web.Request) -> None:
        if self.admin_token is None:
            raise _error(web.HTTPUnauthorized, ADMIN_HINT)
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), self.admin_token.encode()):
            raise _error(web.HTTPUnauthorized, "admin token required: Authorization: Bearer ...",
                         **{"WWW-Authenticate": 'Bearer realm="netboot"'})

    async def _body(self, request: web.Request, model: type[BaseModel]) -> Any:
        data: Any = {}
        if request.body_exists:
            ctype = request.content_type
            if ctype in ("application/x-www-form-urlencoded", "multipart/form-data"):
                data = dict(await request.post())
            else:
                raw = await request.text()
                if raw.strip():
                    try:
                        data = json.loads(raw)
                    except json.JSONDecodeError as exc:
                        raise _error(web.HTTPBadRequest, f"body is not JSON: {exc}") from None
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise _error(web.HTTPBadRequest, _validation_message(exc)) from None

    def _out(self, node: Node) -> dict[str, Any]:
        return {**node.to_json(self.registry.now()), "stuck": self.registry.is_stuck(node)}

    def _node(self, uuid: str) -> Any:
        node = self.registry.get(uuid)
        if node is None:
            raise _error(web.HTTPNotFound, f"no node {uuid}")
        return node

    # -- admin -------------------------------------------------------------------
    async def list_nodes(self, request: web.Request) -> web.Response:
        state = request.query.get("state") or None
        if state is not None and state not in STATES:
            raise _error(web.HTTPBadRequest, f"state must be one of {', '.join(STATES)}")
        label = request.query.get("label") or None
        nodes = await self.registry.list(state=state, profile=request.query.get("profile") or None,
                                         label=label)
        return _json({"nodes": [self._out(n) for n in nodes],
                      "counts": self.registry.counts_by_state()})

    async def show_node(self, request: web.Request) -> web.Response:
        uuid = self._uuid(request)
        node = self._node(uuid)
        return _json({**self._out(node), "events": await self.registry.events(uuid)})

    async def patch_node(self, request: web.Request) -> web.Response:
        self._admin_auth(request)
        uuid = self._uuid(request)
        body: PatchBody = await self._body(request, PatchBody)
        self._node(uuid)
        node = await self.registry.patch(uuid, rearm=body.rearm, labels=body.labels,
                                         profile=body.profile, hostname=body.hostname,
                                         source=request.remote or "admin")
        return _json(self._out(node))

    async def delete_node(self, request: web.Request) -> web.Response:
        self._admin_auth(request)
        uuid = self._uuid(request)
        if not await self.registry.forget(uuid):
            raise _error(web.HTTPNotFound, f"no node {uuid}")
        return _json({"deleted": uuid})

    # -- node --------------------------------------------------------------------
    async def node_profile(self, request: web.Request) -> web.Response:
        uuid = self._node_auth(request)
        node = self._node(uuid)
        prof = None
        if self.profiles is not None and node.profile:
            prof = self.profiles().get(node.profile)
            if hasattr(prof, "model_dump"):
                prof = prof.model_dump(mode="json")
        return _json({"uuid": uuid, "name": node.profile, "profile": prof})

    async def node_detail(self, request: web.Request) -> web.Response:
        uuid = self._node_auth(request)
        node = self._node(uuid)
        return _json({"uuid": uuid, "address": node.address, "hostname": node.hostname,
                      "labels": node.labels})

    async def node_register(self, request: web.Request) -> web.Response:
        uuid = self._node_auth(request)
        body: RegisterBody = await self._body(request, RegisterBody)
        node = await self.registry.observe(uuid, address=request.remote, source="api",
                                           **body.model_dump())
        return _json(self._out(node))

    async def node_installed(self, request: web.Request) -> web.Response:
        uuid = self._node_auth(request)
        node = await self.registry.transition(uuid, "installed", source="api",
                                              address=request.remote)
        return _json(self._out(node))

    async def node_failed(self, request: web.Request) -> web.Response:
        uuid = self._node_auth(request)
        body: FailedBody = await self._body(request, FailedBody)
        node = await self.registry.transition(uuid, "error", source="api",
                                              address=request.remote, reason=body.reason)
        return _json(self._out(node))

    # -- meta and dashboard ---------------------------------------------------------
    async def openapi(self, request: web.Request) -> web.Response:
        if self._openapi is None:
            self._openapi = openapi_document()
        return _json(self._openapi)

    async def metrics(self, request: web.Request) -> web.Response:
        text = self.counters.render() + self.registry.render_metrics()
        return web.Response(body=text.encode(), headers={
            "Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def dashboard_index(self, request: web.Request) -> web.Response:
        return await self.dashboard.index(request)

    async def dashboard_node(self, request: web.Request) -> web.Response:
        return await self.dashboard.node(request, self._uuid(request))


def setup_api(app: web.Application, *, registry: Registry, counters: Counters,
              admin_token: str | None,
              profiles: Callable[[], dict[str, Any]] | None = None) -> None:
    """Add the node, admin, metrics, OpenAPI and dashboard routes (and /static/)."""
    api = _Api(registry, counters, admin_token, profiles)
    for r in ROUTES:
        app.router.add_route(r.method, r.path, getattr(api, r.handler))
    api.dashboard.add_static(app)


# -- OpenAPI ----------------------------------------------------------------------------

def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.1 from ``ROUTES`` and the pydantic models (JSON Schema 2020-12)."""
    bodies = {r.body for r in ROUTES if r.body}
    responses = {r.response for r in ROUTES if r.response} | {Error}
    keyed = [(m, "validation") for m in bodies] + [(m, "serialization") for m in responses]
    refs, top = models_json_schema(keyed, ref_template="#/components/schemas/{model}",
                                   by_alias=True)
    schemas: dict[str, Any] = dict(top.get("$defs", {}))

    def ref(model: type[BaseModel], mode: str) -> dict[str, Any]:
        return refs[(model, mode)]  # type: ignore[index]

    err = {"content": {"application/json": {"schema": ref(Error, "serialization")}}}
    paths: dict[str, dict[str, Any]] = {}
    for r in ROUTES:
        op: dict[str, Any] = {"summary": r.summary, "operationId": r.handler, "tags": [r.tag],
                              "responses": {}}
        params: list[dict[str, Any]] = []
        if "{uuid}" in r.path:
            params.append({"name": "uuid", "in": "path", "required": True,
                           "description": "SMBIOS UUID", "schema": {"type": "string"}})
        for q in r.query:
            desc = {"state": f"one of {', '.join(STATES)}", "profile": "profile name",
                    "label": "key=value, or key alone for 'has label'"}[q]
            params.append({"name": q, "in": "query", "required": False, "description": desc,
                           "schema": {"type": "string"}})
        if params:
            op["parameters"] = params
        ok: dict[str, Any] = {"description": "OK"}
        if r.response is not None:
            ok["content"] = {"application/json": {"schema": ref(r.response, "serialization")}}
        else:
            ok["content"] = {r.content_type.split(";")[0]: {"schema": {"type": "string"} if
                             r.content_type != "application/json" else {"type": "object"}}}
        op["responses"]["200"] = ok
        if r.body is not None:
            schema = ref(r.body, "validation")
            content = {"application/json": {"schema": schema}}
            if r.tag == "node":
                content["application/x-www-form-urlencoded"] = {"schema": schema}
            op["requestBody"] = {"required": False, "content": content}
            op["responses"]["400"] = {"description": "invalid body", **err}
        if "{uuid}" in r.path:
            op["responses"]["404"] = {"description": "no such node", **err}
        if r.auth == "admin":
            op["security"] = [{"adminBearer": []}]
            op["responses"]["401"] = {"description": "missing or wrong admin token", **err}
        elif r.auth == "node":
            op["security"] = [{"nodeTokenHeader": []}, {"nodeTokenQuery": []}]
            op["responses"]["401"] = {"description": "no node token", **err}
            op["responses"]["403"] = {"description": "token is for another node", **err}
        paths.setdefault(r.path, {})[r.method.lower()] = op
    paths["/static/{path}"] = {"get": {
        "summary": "Dashboard stylesheet and assets", "operationId": "static",
        "tags": ["dashboard"],
        "parameters": [{"name": "path", "in": "path", "required": True,
                        "schema": {"type": "string"}}],
        "responses": {"200": {"description": "file"}, "404": {"description": "no such file"}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "netboot registry API", "version": "1",
                 "description": "Node inventory of netboot. Node endpoints take the node's own "
                                "token; changing admin requests a bearer token."},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {
            "adminBearer": {"type": "http", "scheme": "bearer"},
            "nodeTokenHeader": {"type": "apiKey", "in": "header", "name": "X-Node-Token"},
            "nodeTokenQuery": {"type": "apiKey", "in": "query", "name": "token"},
        }},
    }
