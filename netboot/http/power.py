"""Power from the screen: one node's power and next boot, bulk power by label or state
(staggered), deploying a profile, and each node's BMC (admin)."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from ..config import MachineBmc
from ..identity import IdentityError, normalise_uuid
from ..power.driver import BmcError
from ..storage.registry import STATES
from .context import HttpContext, ctx_of
from .nodes import Error, read_body
from .routes import Route, caller_of, error, path_uuid


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class PowerBody(_Body):
    action: Literal["on", "off", "soft", "cycle"]
    boot: Literal["network", "disk"] | None = Field(
        None, description="boot device, set before the action: the next boot only, or every "
        "boot with persistent")
    persistent: bool = False


class BulkBody(PowerBody):
    """Which nodes: ``uuids``, or every node with ``label`` (key=value) and/or in ``state``."""

    uuids: list[str] | None = Field(None, max_length=10_000)
    label: str | None = Field(None, max_length=256)
    state: Literal[STATES] | None = None  # type: ignore[valid-type]
    concurrency: int | None = Field(None, ge=1, le=256)
    delay: float | None = Field(None, ge=0, le=600)


class DeployBody(_Body):
    profile: str = Field(min_length=1, max_length=256)


class PowerOut(BaseModel):
    state: Literal["on", "off", "unknown"]
    checked: float | None = Field(description="when the BMC last answered (Unix time)")
    reason: str | None = Field(description="why the state is unknown")


class PowerResult(BaseModel):
    uuid: str
    action: str
    boot: str | None
    power: PowerOut


class BulkItem(BaseModel):
    uuid: str
    ok: bool | None = Field(description="null while it has not run yet")
    reason: str | None = None


class BulkJob(BaseModel):
    id: str
    action: str
    boot: str | None
    total: int
    done: int
    failed: int
    finished: bool
    items: list[BulkItem]


def power_out(ctx: HttpContext, uuid: str) -> dict[str, Any]:
    """The node's power as last polled (``unknown`` with the reason when not known)."""
    if ctx.lifecycle.bmcs is None or ctx.lifecycle.bmcs.registry.bmc(uuid) is None:
        return {"state": "unknown", "checked": None, "reason": "no BMC known for this node"}
    last = ctx.lifecycle.last_power(uuid)
    if last is None:
        return {"state": "unknown", "checked": None, "reason": "not polled yet"}
    return {"state": str(last.state), "checked": last.checked, "reason": last.reason}


def _bmc_error(exc: BmcError) -> web.HTTPException:
    """No BMC set up for the node: 409 (fix the config); the BMC failed: 502 (its answer)."""
    return error(web.HTTPConflict if exc.kind == "config" else web.HTTPBadGateway, str(exc))


def _known(ctx: HttpContext, uuid: str) -> None:
    assert ctx.registry is not None
    if ctx.registry.get(uuid) is None:
        raise error(web.HTTPNotFound, f"no node {uuid}")


async def node_power(request: web.Request) -> dict[str, Any]:
    ctx = ctx_of(request)
    uuid = path_uuid(request)
    body: PowerBody = await read_body(request, PowerBody)
    _known(ctx, uuid)
    try:
        await ctx.lifecycle.power_action(uuid, body.action, body.boot,
                                         persistent=body.persistent)
        status = await ctx.lifecycle.power_status(uuid)
    except BmcError as exc:
        raise _bmc_error(exc) from None
    ctx.events.on_power({uuid: status})
    return {"uuid": uuid, "action": body.action, "boot": body.boot,
            "power": {"state": str(status.state), "checked": status.checked,
                      "reason": status.reason}}


async def deploy(request: web.Request) -> dict[str, Any]:
    from .nodes import node_out

    ctx = ctx_of(request)
    uuid = path_uuid(request)
    body: DeployBody = await read_body(request, DeployBody)
    _known(ctx, uuid)
    if body.profile not in ctx.booter.config.snapshot.profiles:
        raise error(web.HTTPBadRequest, f"no profile {body.profile!r}; profiles: "
                    f"{', '.join(sorted(ctx.booter.config.snapshot.profiles))}")
    try:
        node = await ctx.lifecycle.deploy(uuid, body.profile, actor=caller_of(request).name)
    except BmcError as exc:
        raise _bmc_error(exc) from None
    return node_out(ctx, node)


# -- bulk: a background job, polled by the CLI and the dashboard --------------------------

_job_ids = itertools.count(1)
MAX_JOBS = 100


async def bulk_power(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    body: BulkBody = await read_body(request, BulkBody)
    assert ctx.registry is not None
    if body.uuids is None and body.label is None and body.state is None:
        raise error(web.HTTPBadRequest, "say which nodes: uuids, label or state")
    if body.persistent:
        raise error(web.HTTPBadRequest, "a persistent boot device is set node by node "
                    "(POST /api/v1/nodes/{uuid}/power); bulk sets the next boot only")
    if body.uuids is not None:
        try:
            wanted = list(dict.fromkeys(normalise_uuid(u) for u in body.uuids))
        except IdentityError as exc:
            raise error(web.HTTPBadRequest, str(exc)) from None
        uuids = [u for u in wanted if ctx.registry.get(u) is not None]
    else:
        nodes = await ctx.registry.list(state=body.state, label=body.label)
        uuids = [n.uuid for n in nodes]
    bmcs = ctx.lifecycle.bmcs
    items = [(u, bmcs.config_for(u) if bmcs is not None else None) for u in uuids]
    settings = ctx.booter.config.snapshot.server.bmc
    job_id = f"{next(_job_ids)}-{int(time.time())}"
    job: dict[str, Any] = {
        "id": job_id, "action": body.action, "boot": body.boot, "total": len(items),
        "done": 0, "failed": 0, "finished": False,
        "items": [{"uuid": u, "ok": None if cfg else False,
                   "reason": None if cfg else "no BMC known for this node"} for u, cfg in items]}
    job["failed"] = job["done"] = sum(1 for _, cfg in items if cfg is None)
    by_uuid = {i["uuid"]: i for i in job["items"]}

    def progress(result: Any) -> None:
        item = by_uuid[result.key]
        item["ok"], item["reason"] = result.ok, result.reason
        job["done"] += 1
        job["failed"] += 0 if result.ok else 1

    async def run() -> None:
        try:
            power = ctx.lifecycle.power
            todo = [(u, cfg) for u, cfg in items if cfg is not None]
            if power is not None and todo:
                await power.bulk(todo, body.action, body.boot,
                                 concurrency=body.concurrency or settings.stagger_concurrency,
                                 delay=settings.stagger_delay if body.delay is None
                                 else body.delay, progress=progress)
        except Exception as exc:  # say so on every item that did not run
            for item in job["items"]:
                if item["ok"] is None:
                    item["ok"], item["reason"] = False, f"bulk job failed: {exc}"
                    job["done"] += 1
                    job["failed"] += 1
        finally:
            job["finished"] = True

    jobs = ctx.jobs
    jobs[job_id] = job
    for old_id in [k for k, j in jobs.items() if j["finished"]][:max(0, len(jobs) - MAX_JOBS)]:
        jobs.pop(old_id)  # only finished jobs are forgotten
    job["_task"] = asyncio.get_running_loop().create_task(run())  # kept alive while it runs
    return web.json_response(BulkJob.model_validate(_public(job)).model_dump(mode="json"),
                             status=202)


def _public(job: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in job.items() if not k.startswith("_")}


async def bulk_job(request: web.Request) -> dict[str, Any]:
    job = ctx_of(request).jobs.get(request.match_info["job"])
    if job is None:
        raise error(web.HTTPNotFound, "no such job (jobs are kept in memory, the last "
                    f"{MAX_JOBS})")
    return _public(job)


# -- a node's BMC (admin) -------------------------------------------------------------------

async def set_bmc(request: web.Request) -> dict[str, Any]:
    ctx = ctx_of(request)
    uuid = path_uuid(request)
    body: MachineBmc = await read_body(request, MachineBmc)
    _known(ctx, uuid)
    if ctx.lifecycle.bmcs is None:
        raise error(web.HTTPServiceUnavailable, "BMC control needs the registry")
    if body.password_file is not None:
        raise error(web.HTTPBadRequest, "password_file is for machine files; send password")
    if not body.password:
        raise error(web.HTTPBadRequest, "a BMC needs a password")
    try:
        ctx.lifecycle.bmcs.learn(uuid, body.address, source="api", credentials=body)
    except ValueError as exc:
        raise error(web.HTTPBadRequest, str(exc)) from None
    ctx.lifecycle.queue_commit()
    return {"uuid": uuid, "bmc": ctx.lifecycle.bmcs.describe(uuid)}


class BmcOut(BaseModel):
    uuid: str
    bmc: dict[str, Any] | None


_N = "/api/v1/nodes/{uuid}"
ROUTES = (
    Route("POST", _N + "/power", node_power, "Power a node on, off, soft-off or cycle, "
          "optionally setting its next boot", "operator", PowerBody, PowerResult,
          tag="power", registry=True),
    Route("POST", _N + "/deploy", deploy, "Boot a profile now: assign it, re-arm, next boot "
          "network, power on", "operator", DeployBody, tag="power", registry=True),
    Route("POST", "/api/v1/power", bulk_power, "Power many nodes (by uuids, label or state), "
          "staggered; answers 202 with a job to poll", "operator", BulkBody, BulkJob,
          tag="power", registry=True),
    Route("GET", "/api/v1/power/jobs/{job}", bulk_job, "Progress of a bulk power job",
          "viewer", response=BulkJob, tag="power", registry=True),
    Route("PUT", _N + "/bmc", set_bmc, "Set a node's BMC address and credentials "
          "(the password is sealed at rest, never shown)", "admin", MachineBmc, BmcOut,
          tag="power", registry=True),
)

__all__ = ["ROUTES", "Error", "power_out"]
