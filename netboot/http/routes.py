"""The route table: every HTTP route once, with who may call it and what it returns.

:func:`netboot.http.app.make_app` registers the table, :mod:`.openapi` documents
it, and :func:`guard` wraps each handler so that the declared ``auth`` is
enforced and a declared ``response`` model serialises what the handler returns:
no handler checks a token by hand, and no documented model is a mere comment.

- ``none``: anyone on the network (boot paths, health, metrics);
- ``node``: the node's own token (``?token=`` or ``X-Node-Token``), for ``{uuid}``;
- ``viewer``, ``operator``, ``admin``: ``Authorization: Bearer <token>`` of at least
  that role (:mod:`.auth`); ``viewer`` routes are open when ``api.open_reads`` is on.

No token: 401. A token whose role is too low: 403. Every changing request (any
method but GET and HEAD) writes an audit row: who, what, which node, and how it
ended.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel

from ..identity import IdentityError, normalise_uuid
from ..storage.registry import RegistryError
from .auth import ANONYMOUS, Caller, Role
from .context import ctx_of

Auth = Literal["none", "node", "viewer", "operator", "admin"]
Handler = Callable[[web.Request], Awaitable[Any]]

TOKEN_HINT = ("API tokens are not set up: set api.admin_token (or api.tokens) in netboot.yaml or "
              "$NETBOOT_ADMIN_TOKEN, and send 'Authorization: Bearer <token>'")


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    auth: Auth = "none"
    body: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    content_type: str = "application/json"
    query: tuple[str, ...] = ()
    tag: str = "boot"
    #: needs the registry; answered 503 with the reason when it is not open
    registry: bool = False

    @property
    def name(self) -> str:
        return self.handler.__name__


def error(status: type[web.HTTPException], message: str, **headers: str) -> web.HTTPException:
    return status(text=json.dumps({"error": message}), content_type="application/json",
                  headers=headers or None)


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda o: json.dumps(o, default=str))


def path_uuid(request: web.Request) -> str:
    try:
        return normalise_uuid(request.match_info["uuid"])
    except IdentityError as exc:
        raise error(web.HTTPBadRequest, str(exc)) from None


def _bearer(request: web.Request, needed: Role) -> Caller:
    ctx = ctx_of(request)
    header = request.headers.get("Authorization", "")
    if not header and needed == "viewer" and ctx.tokens.open_reads:
        return ANONYMOUS
    if ctx.tokens.empty:
        raise error(web.HTTPUnauthorized, TOKEN_HINT)
    caller = ctx.tokens.caller(header)
    if caller is None:
        raise error(web.HTTPUnauthorized, f"{needed} token required: Authorization: Bearer ...",
                    **{"WWW-Authenticate": 'Bearer realm="netboot"'})
    request[CALLER] = caller  # known: a refusal for its role is audited under its name
    if not caller.may(needed):
        ctx.counters.inc("api_forbidden_total")
        raise error(web.HTTPForbidden, f"token {caller.name!r} is a {caller.role}; this needs "
                    f"{needed} or above")
    return caller


def _node(request: web.Request) -> Caller:
    ctx = ctx_of(request)
    uuid = path_uuid(request)
    token = request.headers.get("X-Node-Token") or request.query.get("token")
    if not token:
        raise error(web.HTTPUnauthorized, "node token required: ?token= or X-Node-Token")
    assert ctx.registry is not None  # node routes need the registry (checked first)
    if not ctx.registry.check_node_token(uuid, token):
        ctx.counters.inc("api_forbidden_total")
        raise error(web.HTTPForbidden, "this token is not valid for this node")
    return Caller(f"node:{uuid}", "node")


def caller_of(request: web.Request) -> Caller:
    """Who is calling (set by the guard)."""
    return request.get(CALLER, ANONYMOUS)  # type: ignore[no-any-return]


CALLER = web.RequestKey("netboot.caller", Caller)


def guard(route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The handler behind ``route``'s auth, with its result serialised by ``response``."""
    audited = route.method not in ("GET", "HEAD")

    async def guarded(request: web.Request) -> web.StreamResponse:
        ctx = ctx_of(request)
        if route.registry and ctx.registry is None:
            raise error(web.HTTPServiceUnavailable,
                        f"the registry is not available: {ctx.lifecycle.problem or 'not open'}")
        if audited:
            return await _audited(request, route)
        _authenticate(request, route)
        return await _run(request, route)

    guarded.__name__ = route.name
    return guarded


async def _run(request: web.Request, route: Route) -> web.StreamResponse:
    try:
        result = await route.handler(request)
    except RegistryError as exc:  # a full or read-only data dir: say so, not a 500
        raise error(web.HTTPServiceUnavailable, f"the registry cannot record this: {exc}; "
                    "see /health") from None
    if isinstance(result, web.StreamResponse):
        return result
    if route.response is not None:
        result = route.response.model_validate(result).model_dump(mode="json", by_alias=True)
    return json_response(result)


def _authenticate(request: web.Request, route: Route) -> None:
    if route.auth == "node":
        request[CALLER] = _node(request)
    elif route.auth != "none":
        request[CALLER] = _bearer(request, route.auth)


async def _audited(request: web.Request, route: Route) -> web.StreamResponse:
    """Run a changing request and record who did it and how it ended (refusals too)."""
    ctx = ctx_of(request)
    target = request.match_info.get("uuid")
    result, detail = "ok", None
    try:
        _authenticate(request, route)
        return await _run(request, route)
    except web.HTTPException as exc:
        result, detail = str(exc.status), (exc.text or "")[:500]
        raise
    except Exception as exc:
        result, detail = "500", type(exc).__name__
        raise
    finally:
        caller = caller_of(request)
        # A node's own reports are its events; a request with no valid token names nobody
        # (counted, not recorded: a flood of them must not grow the audit log).
        if ctx.registry is not None and route.auth != "node" and caller is not ANONYMOUS:
            ctx.registry.add_audit(actor=caller.name, role=caller.role, action=route.name,
                                   target=target, result=result, detail=detail)
            ctx.lifecycle.queue_commit()
