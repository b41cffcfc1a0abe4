"""Webhooks: tell chat or Alertmanager when nodes finish, fail or get stuck.

``emit`` only formats and enqueues (bounded; overflow is dropped and counted),
so a slow or dead receiver can never hold up a boot. A background task posts
each delivery, retrying failures with exponential backoff and jitter.

Formats: ``json`` (the event as-is), ``slack`` (``{"text": ...}``, also what
Mattermost and most chat incoming-webhooks take) and ``alertmanager`` (a list
of alerts for ``POST /api/v2/alerts``; an ``installed`` or new boot resolves
that node's earlier error/stuck alerts by sending them with ``endsAt``).
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aiohttp

from .metrics import Counters
from .util.ratelimit import RateLimitedLog

if TYPE_CHECKING:
    from .boot.lifecycle import LifecycleEvent
    from .config import WebhookSettings
    from .storage.registry import Node

log = logging.getLogger("netboot.webhooks")

INFO_ALERT_SECONDS = 300  # informational alerts (installed, ...) resolve themselves after this

_ALERTS: dict[str, tuple[str, str]] = {  # event -> (alertname, severity)
    "installed": ("NetbootNodeInstalled", "info"),
    "error": ("NetbootNodeError", "warning"),
    "stuck": ("NetbootNodeStuck", "warning"),
    "discovered": ("NetbootNodeDiscovered", "info"),
    "booting": ("NetbootNodeBooting", "info"),
    "deploying": ("NetbootNodeDeploying", "info"),
    "commissioning": ("NetbootNodeCommissioning", "info"),
    "ready": ("NetbootNodeReady", "info"),
}
_RESOLVES: dict[str, tuple[str, ...]] = {"installed": ("error", "stuck"),
                                         "booting": ("error", "stuck"), "error": ("stuck",),
                                         "commissioning": ("error", "stuck"),
                                         "ready": ("error", "stuck")}
_FIRING = {"error", "stuck"}  # stay active until resolved; the rest are informational
_SLACK_ICON = {"installed": ":white_check_mark:", "error": ":x:", "stuck": ":hourglass:"}


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Delivery:
    url: str
    payload: Any
    event: str
    uuid: str


def event_payload(event: str, node: Node, *, source: str, time: float) -> dict[str, Any]:
    """The ``json`` format: what happened, to which machine, from where, when."""
    return {
        "event": event, "time": _iso(time), "timestamp": time, "state": node.state,
        "reason": node.reason, "address": node.address, "source": source,
        "node": {"uuid": node.uuid, "serial": node.serial, "vendor": node.vendor,
                 "product": node.product, "asset": node.asset, "macs": list(node.macs),
                 "hostname": node.hostname, "profile": node.profile,
                 "labels": dict(node.labels)},
    }


def _describe(event: str, node: Node) -> str:
    name = node.hostname or node.uuid
    ident = ", ".join(x for x in (f"serial {node.serial}" if node.serial else "",
                                  node.vendor or "", node.product or "") if x)
    where = f" at {node.address}" if node.address else ""
    what = {"installed": "installed", "error": f"failed: {node.reason or 'no reason given'}",
            "stuck": f"is stuck in {node.state}"}.get(event, f"is {event}")
    prof = f" (profile {node.profile})" if node.profile else ""
    return f"node {name}{f' [{ident}]' if ident else ''}{where}{prof} {what}"


def slack_payload(event: str, node: Node, *, source: str, time: float) -> dict[str, Any]:
    icon = _SLACK_ICON.get(event, ":information_source:")
    return {"text": f"{icon} netboot: {_describe(event, node)}"}


def alertmanager_payload(event: str, node: Node, *, source: str,
                         time: float) -> list[dict[str, Any]]:
    """Alertmanager v2 alerts. Labels are only what identifies the alert (name, node), so
    a later resolution matches; everything that may change goes in annotations."""

    def alert(ev: str, ends: float | None) -> dict[str, Any]:
        name, severity = _ALERTS.get(ev, (f"NetbootNode{ev.title()}", "info"))
        a: dict[str, Any] = {
            "labels": {"alertname": name, "severity": severity, "service": "netboot",
                       "uuid": node.uuid},
            "annotations": {k: v for k, v in {
                "summary": _describe(ev, node), "serial": node.serial,
                "hostname": node.hostname, "address": node.address, "profile": node.profile,
                "reason": node.reason, "state": node.state}.items() if v},
            "startsAt": _iso(time),
        }
        if ends is not None:
            a["endsAt"] = _iso(ends)
        return a

    out = [alert(event, None if event in _FIRING else time + INFO_ALERT_SECONDS)]
    out += [alert(ev, time) for ev in _RESOLVES.get(event, ())]
    return out


_FORMATS = {"json": event_payload, "slack": slack_payload, "alertmanager": alertmanager_payload}


class WebhookDispatcher:
    """Bounded queue + background sender with retries; never blocks the caller."""

    def __init__(self, hooks: list[WebhookSettings], *, counters: Counters | None = None,
                 queue_size: int = 1000, attempts: int = 6, base_delay: float = 1.0,
                 max_delay: float = 60.0, timeout: float = 10.0, concurrency: int = 8):
        self.hooks = list(hooks)
        self.counters = counters if counters is not None else Counters()
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.timeout = timeout
        self._queue: asyncio.Queue[Delivery] = asyncio.Queue(queue_size)
        self._slots = asyncio.Semaphore(concurrency)
        self._inflight: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        #: a full queue (a hook down during a boot storm) is one line a minute, not one a drop
        self.dropped = RateLimitedLog(
            log, "webhook queue full: dropped %d deliveries since the last report (%s); "
            "latest: %s for %s")
        self.counters.describe("webhook_deliveries_total",
                               "Webhook posts by result: ok, retry, failed, dropped")

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="webhooks")

    def emit(self, event: str, node: Node, *, source: str, time: float) -> int:
        """Queue ``event`` for every hook subscribed to it; returns how many were queued."""
        queued = 0
        for hook in self.hooks:
            if event not in hook.events:
                continue
            payload = _FORMATS[hook.format](event, node, source=source, time=time)
            try:
                self._queue.put_nowait(Delivery(hook.url, payload, event, node.uuid))
                queued += 1
            except asyncio.QueueFull:
                self.counters.inc("webhook_deliveries_total", result="dropped")
                self.dropped.record(event, event, node.uuid)
        return queued

    def on_event(self, event: LifecycleEvent) -> None:
        """A lifecycle listener (wired in netboot.server)."""
        self.emit(event.kind, event.node, source=event.source, time=event.time)

    async def close(self, timeout: float = 5.0) -> None:
        """Give queued deliveries ``timeout`` seconds, then stop."""
        self.dropped.flush()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except TimeoutError:
            log.warning("webhooks: %d deliveries abandoned at shutdown",
                        self._queue.qsize() + len(self._inflight))
        self._task.cancel()
        for t in list(self._inflight):
            t.cancel()
        await asyncio.gather(self._task, *self._inflight, return_exceptions=True)
        self._task = None
        if self._session is not None:
            await self._session.close()

    async def _run(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            headers={"User-Agent": "netboot-webhooks"})
        while True:
            delivery = await self._queue.get()
            await self._slots.acquire()
            task = asyncio.create_task(self._deliver(delivery))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _deliver(self, d: Delivery) -> None:
        try:
            for attempt in range(self.attempts):
                problem = await self._post(d)
                if problem is None:
                    self.counters.inc("webhook_deliveries_total", result="ok")
                    return
                if attempt + 1 == self.attempts:
                    self.counters.inc("webhook_deliveries_total", result="failed")
                    log.error("webhook %s for %s to %s: giving up after %d attempts: %s",
                              d.event, d.uuid, _host(d.url), self.attempts, problem)
                    return
                self.counters.inc("webhook_deliveries_total", result="retry")
                delay = min(self.max_delay, self.base_delay * 2 ** attempt)
                delay *= random.uniform(0.75, 1.0)  # jitter: don't retry in lockstep
                log.warning("webhook %s to %s failed (%s); retry in %.1fs", d.event,
                            _host(d.url), problem, delay)
                await asyncio.sleep(delay)
        finally:
            self._slots.release()
            self._queue.task_done()

    async def _post(self, d: Delivery) -> str | None:
        assert self._session is not None
        try:
            async with self._session.post(d.url, json=d.payload) as r:
                if 200 <= r.status < 300:
                    return None
                return f"HTTP {r.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"


def _host(url: str) -> str:
    """What a log may say of a webhook URL: a Slack URL's path is its secret."""
    from urllib.parse import urlsplit

    return urlsplit(url).hostname or "?"
