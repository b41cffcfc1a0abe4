"""How fast machines the registry does not know may become nodes (``limits.new_nodes``).

Anyone on the segment can invent UUIDs: without a limit, a loop over random
ones grows the registry without bound. The lifecycle asks this limiter before it
creates a node (and only then: a known node is never limited). Two token buckets
must both have a token, and one is taken from each:

- the source's own (:class:`Source`): the client address for boot scripts and
  pxelinux configs (HTTP's address is the TCP peer; by TFTP time a machine has its
  own address), or, for DHCP, the segment the packet came in on: the local link, or
  a relay (giaddr) and its circuit (option 82, as received) when the relay adds
  one. A DISCOVER has no address of its own, and its MAC and UUID are the client's
  claims, so they cannot be a source. A segment is a whole rack, so segments have
  their own, larger buckets (``per_segment``);
- everyone's (``total``).

A source whose bucket is empty never takes from the total one, so one flooding
address cannot starve the others. DHCP is UDP: a sender on the link can forge
giaddr and option 82 and so invent segments, and then only ``total`` holds it. So
DHCP first contacts never take the last half of ``total``: that half is kept for
boot scripts and pxelinux configs, which a machine needs to boot (a DHCP record is
only an early 'discovered'; a machine not recorded at DHCP is recorded at its
script). The per-source table is an LRU (``sources``).
A refusal is counted (``new_nodes_refused_total{path, limit}``) and summed up in
one log line a minute.
"""

from __future__ import annotations

import logging
import math
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..config import NewNodeLimits
from ..metrics import Counters
from ..util.ratelimit import RateLimitedLog
from ..util.tokenbucket import Buckets, TokenBucket

log = logging.getLogger("netboot.lifecycle")

#: a refused boot script asks again after this many seconds at least, at most
RETRY_MIN = 5.0
RETRY_MAX = 60.0


def retry_after(wait: float) -> int:
    """Whole seconds a refused client waits before it asks again."""
    return math.ceil(min(RETRY_MAX, max(RETRY_MIN, wait)))


@dataclass(frozen=True, slots=True)
class Source:
    """Who asks for a new node, as far as netboot can tell (see the module)."""

    key: str
    segment: bool = False

    @classmethod
    def address(cls, address: str | None) -> Source:
        return cls(address or "-")

    @classmethod
    def dhcp(cls, giaddr: bytes, agent: bytes | None) -> Source:
        """The segment of a DHCP request: this link (giaddr zeros), or the relay at
        giaddr and, if it added one, its option 82 (a circuit: a switch port). Option 82
        counts only from a relay: on this link any client could make one up."""
        if giaddr == b"\0\0\0\0":
            return cls("dhcp on this link", segment=True)
        return cls(f"dhcp relay {socket.inet_ntoa(giaddr)}"
                   + (f" option 82 {agent.hex()}" if agent else ""), segment=True)


class NewNodeLimiter:
    def __init__(self, limits: NewNodeLimits, counters: Counters, *,
                 clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self.counters = counters
        self._clock = clock
        self._total = TokenBucket(limits.total.rate, limits.total.burst, stamp=clock())
        #: total tokens DHCP leaves for boot scripts (see the module)
        self._reserve = limits.total.burst // 2
        self._sources = Buckets(limits.per_source.rate, limits.per_source.burst,
                                limits.sources, clock=clock)
        self._segments = Buckets(limits.per_segment.rate, limits.per_segment.burst,
                                 limits.sources, clock=clock)
        self._log = RateLimitedLog(
            log, "refused %d new node(s) over limits.new_nodes (%s); latest: %s from %s "
            "(%s); known nodes are not limited; raise limits.new_nodes in netboot.yaml if "
            "these are real machines", clock=clock)
        counters.describe("new_nodes_refused_total", "Requests that would have created a "
                          "node, refused: over limits.new_nodes (path, which limit)")

    def __repr__(self) -> str:
        return f"NewNodeLimiter(sources={self._sources!r}, segments={self._segments!r})"

    def flush(self) -> None:
        """Log the refusals not yet in a line (shutdown)."""
        self._log.flush()

    def check(self, source: Source, path: str, uuid: str | None) -> float | None:
        """None if a new node from ``source`` may be created now (nothing taken), else
        the seconds to wait (the refusal is counted and logged)."""
        return self._admit(source, path, uuid, take=False)

    def take(self, source: Source, path: str, uuid: str | None) -> float | None:
        """As :meth:`check`, and takes the tokens when it may."""
        return self._admit(source, path, uuid, take=True)

    def _admit(self, source: Source, path: str, uuid: str | None, *,
               take: bool) -> float | None:
        now = self._clock()
        own = (self._segments if source.segment else self._sources).bucket(source.key)
        wait = own.wait(now)
        limit = "segment" if source.segment else "source"
        if wait == 0:
            wait = self._total.wait(now, 1 + (self._reserve if source.segment else 0))
            limit = "total"
        if wait == 0:
            if take:
                own.take(now)
                self._total.take(now)
            return None
        self.counters.inc("new_nodes_refused_total", path=path, limit=limit)
        self._log.record(f"{path}/{limit}", uuid or "-", source.key, path)
        return wait
