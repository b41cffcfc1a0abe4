"""The route table: every HTTP route once, with who may call it and what it returns.

:func:`netboot.http.app.make_app` registers the table, :mod:`.openapi` documents
it, and :func:`guard` wraps each handler so that the declared ``auth`` is
enforced and a declared ``response`` model serialises what the handler returns:
no handler checks a token by hand, and no documented model is a mere comment.

- ``none``: anyone on the network (boot paths, reads, the dashboard);
- ``node``: the node's own token (``?token=`` or ``X-Node-Token``), for ``{uuid}``;
- ``admin``: ``Authorization: Bearer <api.admin_token>``.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel

from ..identity import IdentityError, normalise_uuid
from ..storage.registry import RegistryError
from .context import ctx_of

Auth = Literal["none", "node", "admin"]
Handler = Callable[[web.Request], Awaitable[Any]]

ADMIN_HINT = ("admin API disabled: set api.admin_token in netboot.yaml or $NETBOOT_ADMIN_TOKEN "
              "and send 'Authorization: Bearer <token>'")


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


def _admin(request: web.Request) -> None:
    token = ctx_of(request).admin_token
    if token is None:
        raise error(web.HTTPUnauthorized, ADMIN_HINT)
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), token.encode()):
        raise error(web.HTTPUnauthorized, "admin token required: Authorization: Bearer ...",
                    **{"WWW-Authenticate": 'Bearer realm="netboot"'})


def _node(request: web.Request) -> None:
    ctx = ctx_of(request)
    uuid = path_uuid(request)
    token = request.headers.get("X-Node-Token") or request.query.get("token")
    if not token:
        raise error(web.HTTPUnauthorized, "node token required: ?token= or X-Node-Token")
    assert ctx.registry is not None  # node routes need the registry (checked first)
    if not ctx.registry.check_node_token(uuid, token):
        ctx.counters.inc("api_forbidden_total")
        raise error(web.HTTPForbidden, "this token is not valid for this node")


def guard(route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The handler behind ``route``'s auth, with its result serialised by ``response``."""
    handler, model = route.handler, route.response

    async def guarded(request: web.Request) -> web.StreamResponse:
        ctx = ctx_of(request)
        if route.registry and ctx.registry is None:
            raise error(web.HTTPServiceUnavailable,
                        f"the registry is not available: {ctx.lifecycle.problem or 'not open'}")
        if route.auth == "admin":
            _admin(request)
        elif route.auth == "node":
            _node(request)
        try:
            result = await handler(request)
        except RegistryError as exc:  # a full or read-only data dir: say so, not a 500
            raise error(web.HTTPServiceUnavailable, f"the registry cannot record this: {exc}; "
                        "see /health") from None
        if isinstance(result, web.StreamResponse):
            return result
        if model is not None:
            result = model.model_validate(result).model_dump(mode="json", by_alias=True)
        return json_response(result)

    guarded.__name__ = route.name
    return guarded
