"""What every HTTP handler may use, built once by :func:`netboot.server.build`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .auth import TokenTable

if TYPE_CHECKING:
    from ..boot.booter import Booter
    from ..boot.lifecycle import Lifecycle
    from ..ignition.artifacts import Artifacts
    from ..loaders import LoaderTable
    from ..metrics import Counters, NodeMetrics
    from ..storage.registry import Registry
    from .events import EventHub


@dataclass
class HttpContext:
    booter: Booter
    lifecycle: Lifecycle
    counters: Counters
    node_metrics: NodeMetrics
    images_dir: Path
    loaders: LoaderTable
    #: None when the data dir could not be opened: boots are served, not recorded
    registry: Registry | None = None
    artifacts: Artifacts | None = None
    tokens: TokenTable = field(default_factory=TokenTable)
    #: live updates for dashboards (Server-Sent Events)
    events: EventHub = field(default_factory=lambda: _event_hub())
    #: bulk power jobs by id (the newest few, in memory)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    #: the Booter whose URLs name this server's IPv6 address, for clients that came
    #: over IPv6 (None: no IPv6)
    booter6: Booter | None = None

    def booter_for(self, remote: str | None) -> Booter:
        """The Booter whose base URL a client at ``remote`` reached us by."""
        if self.booter6 is not None and remote is not None and ":" in remote:
            return self.booter6
        return self.booter


def _event_hub() -> EventHub:
    from .events import EventHub  # events.py imports the route table, which imports this

    return EventHub()


CTX = web.AppKey("netboot", HttpContext)


def ctx_of(request: web.Request) -> HttpContext:
    return request.app[CTX]
