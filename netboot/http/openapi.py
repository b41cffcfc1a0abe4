"""OpenAPI 3.1 for every route in the table, with the pydantic models' JSON Schema."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from ..storage.registry import STATES
from .nodes import Error
from .routes import Route

QUERY_HELP = {
    "state": f"one of {', '.join(STATES)}",
    "profile": "profile name",
    "label": "key=value, or key alone for 'has label'",
    "uuid": "the SMBIOS UUID iPXE reports (${uuid})",
    "mac": "the booting NIC's MAC",
    "serial": "SMBIOS serial", "manufacturer": "SMBIOS vendor", "product": "SMBIOS product",
    "asset": "SMBIOS asset tag", "exp": "expiry of a signed URL (Unix time)",
    "sig": "signature of a signed URL",
    "format": "sh: answer as shell-safe KEY=value lines (for a busybox OS)",
    "node": "only this node's rows (UUID)",
    "limit": "at most this many rows (default 100; nodes: at most 1000)",
    "cursor": "where the page starts: next_cursor or prev_cursor of the page before",
    "q": "a substring of the serial, hostname or a MAC (aa:bb or aabb), any case",
}

PATH_HELP = {"uuid": "SMBIOS UUID", "path": "a path under images_dir",
             "name": "a loader file name", "job": "a bulk job id"}
_PATH_VAR = re.compile(r"\{(\w+)(?::[^}]*)?\}")

_document: dict[str, Any] | None = None


async def openapi(request: web.Request) -> dict[str, Any]:
    global _document
    if _document is None:
        _document = openapi_document()
    return _document


ROUTES = (Route("GET", "/api/v1/openapi.json", openapi, "This document", tag="meta"),)


def all_routes() -> tuple[Route, ...]:
    from .app import all_routes as routes

    return routes()


def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.1 from ``ROUTES`` and the pydantic models (JSON Schema 2020-12)."""
    routes = all_routes()
    bodies = {r.body for r in routes if r.body}
    responses = {r.response for r in routes if r.response} | {Error}
    keyed = [(m, "validation") for m in bodies] + [(m, "serialization") for m in responses]
    refs, top = models_json_schema(keyed, ref_template="#/components/schemas/{model}",
                                   by_alias=True)
    schemas: dict[str, Any] = dict(top.get("$defs", {}))

    def ref(model: type[BaseModel], mode: str) -> dict[str, Any]:
        return refs[(model, mode)]  # type: ignore[index]

    err = {"content": {"application/json": {"schema": ref(Error, "serialization")}}}
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        op: dict[str, Any] = {"summary": r.summary, "operationId": r.name, "tags": [r.tag],
                              "responses": {}}
        params: list[dict[str, Any]] = []
        for name in _PATH_VAR.findall(r.path):
            params.append({"name": name, "in": "path", "required": True,
                           "description": PATH_HELP.get(name, name),
                           "schema": {"type": "string"}})
        for q in r.query:
            desc = QUERY_HELP.get(q, q)
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
        if r.registry and "{uuid}" in r.path:
            op["responses"]["404"] = {"description": "no such node", **err}
        if r.registry:
            op["responses"]["503"] = {"description": "the registry is not available", **err}
        if r.auth in ("viewer", "operator", "admin"):
            op["security"] = [{"bearer": []}]
            op["description"] = f"Needs a bearer token of role {r.auth} or above" + (
                " (unless api.open_reads)." if r.auth == "viewer" else ".")
            op["responses"]["401"] = {"description": "missing or unknown token", **err}
            op["responses"]["403"] = {"description": f"the token's role is below {r.auth}",
                                      **err}
        elif r.auth == "node":
            op["security"] = [{"nodeTokenHeader": []}, {"nodeTokenQuery": []}]
            op["responses"]["401"] = {"description": "no node token", **err}
            op["responses"]["403"] = {"description": "token is for another node", **err}
        paths.setdefault(_PATH_VAR.sub(r"{\1}", r.path), {})[r.method.lower()] = op
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
            "bearer": {"type": "http", "scheme": "bearer"},
            "nodeTokenHeader": {"type": "apiKey", "in": "header", "name": "X-Node-Token"},
            "nodeTokenQuery": {"type": "apiKey", "in": "query", "name": "token"},
        }},
    }
