"""Live updates for the dashboard: Server-Sent Events from the lifecycle and the
power poller, at ``GET /api/v1/events``.

Each client gets a bounded queue; a client too slow to keep up loses the oldest
updates and is told to reload (``event: resync``), so a stalled browser never
holds memory or the loop. The number of clients is bounded too.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .context import ctx_of
from .routes import Route, error

if TYPE_CHECKING:
    from ..boot.lifecycle import LifecycleEvent
    from ..power.service import PowerStatus

log = logging.getLogger("netboot.http")

QUEUE = 256
MAX_CLIENTS = 64
KEEPALIVE = 15.0
MAX_STREAM = 600.0  # a stream ends after this; the browser reconnects (no idle hoarding)
_CLOSE = "\0close"


class EventHub:
    def __init__(self, *, max_clients: int = MAX_CLIENTS, queue: int = QUEUE):
        self.max_clients = max_clients
        self.queue = queue
        self._clients: set[asyncio.Queue[tuple[str, str]]] = set()
        self._power: dict[str, tuple[str, str | None]] = {}

    def __repr__(self) -> str:
        return f"EventHub({len(self._clients)} clients)"

    @property
    def clients(self) -> int:
        return len(self._clients)

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        if not self._clients:  # nobody watching: a storm's events cost no JSON
            return
        text = json.dumps(data, default=str)
        for q in self._clients:
            if q.full():  # too slow: drop what it has not read, and say so
                while not q.empty():
                    q.get_nowait()
                q.put_nowait(("resync", "{}"))
            else:
                q.put_nowait((kind, text))

    def close(self) -> None:
        """End every stream (at shutdown), so the server need not wait for open tabs."""
        for q in self._clients:
            while not q.empty():
                q.get_nowait()
            q.put_nowait((_CLOSE, ""))

    def on_lifecycle(self, e: LifecycleEvent) -> None:
        """A lifecycle listener: a node entered a state (or got stuck)."""
        n = e.node
        self.publish("node", {"uuid": n.uuid, "event": e.kind, "state": n.state,
                              "reason": n.reason, "address": n.address,
                              "hostname": n.hostname, "instance": n.instance, "time": e.time})

    def on_power(self, statuses: dict[Any, PowerStatus]) -> None:
        """After a poll round or an action: publish the power states that changed."""
        for key, st in statuses.items():
            now = (str(st.state), st.reason)
            if self._power.get(key) != now:
                self._power[key] = now
                self.publish("power", {"uuid": key, "state": now[0], "reason": now[1],
                                       "checked": st.checked})

    async def stream(self, request: web.Request) -> web.StreamResponse:
        if len(self._clients) >= self.max_clients:
            raise error(web.HTTPServiceUnavailable, f"{self.max_clients} live clients "
                        "already; reload later")
        q: asyncio.Queue[tuple[str, str]] = asyncio.Queue(self.queue)
        self._clients.add(q)  # counted before the first await: the cap holds
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
        try:
            await resp.prepare(request)
            await resp.write(b"retry: 3000\n\n")
            deadline = asyncio.get_running_loop().time() + MAX_STREAM
            while asyncio.get_running_loop().time() < deadline:  # browsers reconnect
                try:
                    kind, text = await asyncio.wait_for(q.get(), KEEPALIVE)
                except TimeoutError:
                    await resp.write(b": keepalive\n\n")
                    continue
                if kind == _CLOSE:
                    break
                await resp.write(f"event: {kind}\ndata: {text}\n\n".encode())
        except ConnectionResetError:  # the browser went away
            pass
        finally:
            self._clients.discard(q)
        return resp


async def events(request: web.Request) -> web.StreamResponse:
    return await ctx_of(request).events.stream(request)


ROUTES = (
    Route("GET", "/api/v1/events", events, "Live node and power changes (Server-Sent "
          "Events: node, power, resync)", "viewer", content_type="text/event-stream",
          tag="dashboard"),
)
