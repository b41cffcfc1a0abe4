"""Reply pacing per destination, without I/O: time in, what to send and when out.

A relay (a switch, dhcrelay, ISC perfdhcp) takes replies into a socket or a
queue of fixed size; Linux's default 208 kB receive buffer holds 166 of them.
When the server stalls (the host descheduled it) and then answers its queue at
full speed, the relay receives a burst far above the rate it sends at, and the
tail of the burst is lost there, silently for the server.

So each destination (a relay's address, or the broadcast address of this link)
gets a token bucket: ``burst`` replies at once, refilled at ``headroom`` times
the rate its replies were asked for in the last two windows of 25 ms (never below
``floor``). In a steady flow nothing waits; after a stall the backlog leaves at
``headroom`` times the usual rate instead of in one burst (a stall shorter than
the window, as a descheduled process's few milliseconds are, only delays demand
within it, so it does not raise the estimate). A new flow faster than ``floor``
waits during its first window only. A reply that cannot
leave is held (in order) until its token is due; one held longer than
``max_age`` is dropped and counted: its client has retried by then.

The caller, per reply: :meth:`Pacer.offer` (True: send it now). After a batch:
:meth:`Pacer.deadline` for when to call :meth:`Pacer.due`, which returns the
held replies whose time has come.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..util.lru import Lru
from ..util.tokenbucket import TokenBucket

#: replies one destination may receive back to back: well under a default socket's 166
BURST = 64
#: the bucket's rate, as a multiple of the destination's recent demand
HEADROOM = 1.5
#: the least rate a destination is paced at (replies/s): a new relay's first burst
#: (a rack of 1,000 behind one relay leaves within 0.1 s, under the default max_age)
FLOOR = 10_000.0
#: the demand estimate's window (seconds): longer than a deschedule's stall
WINDOW = 0.025


@dataclass(slots=True)
class _Lane:
    #: its rate and cap are set from the demand on each refill (:meth:`Pacer._refill`)
    bucket: TokenBucket
    window_start: float
    count: int = 0
    rate: float = 0.0  # the demand estimate
    previous: float = 0.0  # the last window's demand
    held: deque[tuple[float, bytes]] = field(default_factory=deque)


class Pacer:
    def __init__(self, *, burst: int = BURST, headroom: float = HEADROOM,
                 floor: float = FLOOR, max_age: float = 0.25, lanes: int = 4096):
        self.burst = burst
        self.headroom = headroom
        self.floor = floor
        self.max_age = max_age
        self._lanes: Lru[tuple[str, int], _Lane] = Lru(lanes)
        #: destinations with held replies
        self._waiting: dict[tuple[str, int], _Lane] = {}
        self.dropped = 0  # held past max_age

    def __repr__(self) -> str:
        return f"Pacer(lanes={len(self._lanes)}, waiting={len(self._waiting)})"

    def _lane(self, dest: tuple[str, int], now: float) -> _Lane:
        lane = self._lanes.get(dest)
        if lane is None:
            lane = _Lane(TokenBucket(self.floor, self.burst, stamp=now), now)
            self._lanes.put(dest, lane)
        return lane

    def _refill(self, lane: _Lane, now: float) -> None:
        elapsed = now - lane.window_start
        if elapsed >= WINDOW:
            # the demand: the higher of the last two windows', so a stall that left one
            # window short does not slow the backlog it made
            last = lane.count / elapsed
            lane.rate, lane.previous = max(last, lane.previous), last
            lane.window_start, lane.count = now, 0
        bucket = lane.bucket
        bucket.rate = max(self.floor, self.headroom * lane.rate)
        # The cap bounds what an idle lane saves up. While replies are held they leave
        # at the lane's rate however the timer's wake-ups fall (a busy loop runs it late).
        bucket.burst = self.burst + len(lane.held)
        bucket.refill(now)

    def offer(self, dest: tuple[str, int], data: bytes, now: float) -> bool:
        """One reply for ``dest``: True to send it now, else it is held."""
        lane = self._lane(dest, now)
        lane.count += 1
        self._refill(lane, now)
        if not lane.held and lane.bucket.take(now):
            return True
        lane.held.append((now, data))
        self._waiting[dest] = lane
        return False

    def deadline(self) -> float | None:
        """When the next held reply may leave; None when nothing is held."""
        best: float | None = None
        for lane in self._waiting.values():
            bucket = lane.bucket  # as of its last refill: its stamp and rate
            at = bucket.stamp + bucket.wait(bucket.stamp)
            best = at if best is None or at < best else best
        return best

    def due(self, now: float) -> list[tuple[tuple[str, int], bytes]]:
        """The held replies that may leave at ``now``, in order per destination."""
        out: list[tuple[tuple[str, int], bytes]] = []
        for dest, lane in list(self._waiting.items()):
            self._refill(lane, now)
            while lane.held and now - lane.held[0][0] > self.max_age:
                lane.held.popleft()
                self.dropped += 1
            while lane.held and lane.bucket.take(now):
                out.append((dest, lane.held.popleft()[1]))
            if not lane.held:
                del self._waiting[dest]
        return out

    @property
    def held(self) -> int:
        return sum(len(lane.held) for lane in self._waiting.values())
