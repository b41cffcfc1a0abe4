"""Webhooks against a real local aiohttp receiver."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from netboot.boot.spec import BootSpec, Client, Offer
from netboot.config import WebhookSettings
from netboot.metrics import Counters
from netboot.storage.registry import Node
from netboot.webhooks import WebhookDispatcher
from tests.served import Served, serving, write_config

U1 = "4c4c4544-0042-3510-8052-b4c04f384d32"


@dataclass
class Receiver:
    url: str
    fail_first: int = 0
    got: list[tuple[str, Any]] = field(default_factory=list)  # (path, json) of accepted posts
    attempts: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_for(self, n: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while len(self.got) < n:
            self.arrived.clear()
            left = deadline - time.monotonic()
            assert left > 0, f"only {len(self.got)} of {n} webhooks arrived: {self.got}"
            try:
                await asyncio.wait_for(self.arrived.wait(), left)
            except TimeoutError:
                pass


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver(url="")

    async def hook(request: web.Request) -> web.Response:
        rec.attempts += 1
        if rec.attempts <= rec.fail_first:
            return web.Response(status=503, text="try later")
        rec.got.append((request.path, await request.json()))
        rec.arrived.set()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/{name}", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    rec.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield rec
    await runner.cleanup()


def _node(**kw: Any) -> Node:
    base: dict[str, Any] = {
        "uuid": U1, "serial": "SN1", "vendor": "Dell Inc.", "product": "R640",
        "macs": ["52:54:00:00:00:01"], "address": "10.0.0.7", "hostname": "db1",
        "profile": "coreos", "labels": {"rack": "r1"}, "state": "error", "reason": "disk missing"}
    return Node(**{**base, **kw})


async def test_retried_with_backoff_until_accepted(receiver: Receiver) -> None:
    receiver.fail_first = 2
    counters = Counters()
    d = WebhookDispatcher([WebhookSettings(url=receiver.url + "/json")], counters=counters,
                          base_delay=0.05)
    d.start()
    try:
        assert d.emit("error", _node(), source="api", time=1_700_000_000.0) == 1
        assert receiver.attempts == 0  # emit only queues: it never waits for the network
        await receiver.wait_for(1)
    finally:
        await d.close()
    assert receiver.attempts == 3
    assert counters.get("webhook_deliveries_total", result="retry") == 2
    assert counters.get("webhook_deliveries_total", result="ok") == 1
    path, body = receiver.got[0]
    assert path == "/json"
    assert body["event"] == "error" and body["reason"] == "disk missing"
    assert body["node"]["uuid"] == U1 and body["node"]["serial"] == "SN1"
    assert body["address"] == "10.0.0.7" and body["time"] == "2023-11-14T22:13:20Z"


async def test_gives_up_after_attempts(receiver: Receiver) -> None:
    receiver.fail_first = 100
    counters = Counters()
    d = WebhookDispatcher([WebhookSettings(url=receiver.url + "/json")], counters=counters,
                          attempts=3, base_delay=0.01)
    d.start()
    d.emit("error", _node(), source="api", time=time.time())
    for _ in range(200):
        if counters.get("webhook_deliveries_total", result="failed"):
            break
        await asyncio.sleep(0.01)
    await d.close()
    assert receiver.attempts == 3 and receiver.got == []
    assert counters.get("webhook_deliveries_total", result="failed") == 1


async def test_bounded_queue_drops_instead_of_blocking() -> None:
    counters = Counters()
    d = WebhookDispatcher([WebhookSettings(url="http://127.0.0.1:9/x")], counters=counters,
                          queue_size=5)  # not started: nothing drains the queue
    queued = sum(d.emit("installed", _node(state="installed"), source="t", time=0)
                 for _ in range(20))
    assert queued == 5 and counters.get("webhook_deliveries_total", result="dropped") == 15


async def test_formats_and_event_filter(receiver: Receiver) -> None:
    hooks = [WebhookSettings(url=receiver.url + "/slack", format="slack"),
             WebhookSettings(url=receiver.url + "/am", format="alertmanager",
                             events=["error", "installed"]),
             WebhookSettings(url=receiver.url + "/only-stuck", events=["stuck"])]
    d = WebhookDispatcher(hooks)
    d.start()
    try:
        assert d.emit("error", _node(), source="api", time=1_700_000_000.0) == 2
        await receiver.wait_for(2)
    finally:
        await d.close()
    got = dict(receiver.got)
    assert set(got) == {"/slack", "/am"}
    assert got["/slack"]["text"].startswith(":x: netboot: node db1 [serial SN1")
    assert "failed: disk missing" in got["/slack"]["text"]
    alerts = got["/am"]
    assert isinstance(alerts, list)
    firing = alerts[0]
    assert firing["labels"] == {"alertname": "NetbootNodeError", "severity": "warning",
                                "service": "netboot", "uuid": U1}
    assert firing["annotations"]["reason"] == "disk missing" and "endsAt" not in firing
    assert firing["startsAt"] == "2023-11-14T22:13:20Z"
    # an error resolves an earlier stuck alert for the same node
    assert alerts[1]["labels"]["alertname"] == "NetbootNodeStuck"
    assert alerts[1]["endsAt"] == firing["startsAt"]


@asynccontextmanager
async def _netboot(tmp_path: Path, hooks: list[dict[str, Any]],
                   stuck_after: float | None = None) -> AsyncIterator[Served]:
    """A real netboot whose netboot.yaml subscribes ``hooks``: lifecycle events reach
    webhooks through the listener netboot.server wires, as in ``serve``."""
    config = write_config(tmp_path / "config", tmp_path / "data", api={"webhooks": hooks})
    async with serving(config, stuck_after=stuck_after) as served:
        yield served


async def test_lifecycle_sends_installed_error_and_stuck(tmp_path: Path,
                                                         receiver: Receiver) -> None:
    spec = BootSpec(U1, None, "default", "n1", "k", (), "")
    async with _netboot(tmp_path, [{"url": receiver.url + "/json"}], stuck_after=0.3) as srv:
        life = srv.lifecycle
        life.served(spec, "10.0.0.7", "ipxe")  # booting: not subscribed by default
        life.fetched("10.0.0.7", "http")  # deploying: not subscribed either
        await receiver.wait_for(1)  # stuck, found by the periodic check
        await life.reported(U1, "failed", address=None, reason="no disk")
        life.served(spec, "10.0.0.7", "ipxe")
        await life.reported(U1, "installed", address=None)
        await receiver.wait_for(3)
        kinds = [e["kind"] for e in await srv.registry.events(U1)]
    events = [body["event"] for _, body in receiver.got]
    assert events == ["stuck", "error", "installed"]
    assert receiver.got[1][1]["reason"] == "no disk"
    assert kinds.count("stuck") == 1


async def test_dhcp_first_contact_sends_discovered(tmp_path: Path,
                                                   receiver: Receiver) -> None:
    hooks = [{"url": receiver.url + "/json", "events": ["discovered"]}]
    async with _netboot(tmp_path, hooks) as srv:
        client = Client("52:54:00:00:00:01", U1)
        srv.lifecycle.offered(client, Offer("undionly.kpxe", profile="default"))
        await receiver.wait_for(1)
        srv.lifecycle.offered(client, Offer("undionly.kpxe", profile="default"))  # known now
        await asyncio.sleep(0.1)
    assert [body["event"] for _, body in receiver.got] == ["discovered"]
    assert receiver.got[0][1]["source"] == "dhcp"
    assert receiver.got[0][1]["node"]["macs"] == ["52:54:00:00:00:01"]
