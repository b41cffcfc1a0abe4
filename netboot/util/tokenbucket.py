"""One token bucket, and a bounded table of them keyed by who asks.

A bucket holds up to ``burst`` tokens and refills at ``rate`` tokens a second; an
action that takes a token may happen now, one that finds the bucket empty must
wait :meth:`TokenBucket.wait` seconds. Time is passed in by the caller (``now``),
from a clock it was given, so tests drive time by hand. A clock that steps back
refills nothing.

:class:`Buckets` keeps one bucket per key (a client address, a DHCP segment) in
an LRU (:mod:`.lru`): the table never holds more than ``limit`` keys, and a key
it forgot starts again with a full bucket.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from .lru import Lru


@dataclass(slots=True)
class TokenBucket:
    rate: float
    burst: float
    #: tokens now (full when made), and when they were counted
    tokens: float = field(default=-1.0)
    stamp: float = 0.0

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst < 1:
            raise ValueError("a token bucket needs a positive rate and a burst of at least 1")
        if self.tokens < 0:
            self.tokens = float(self.burst)

    def refill(self, now: float) -> float:
        """The tokens at ``now`` (kept)."""
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return self.tokens

    def take(self, now: float, n: float = 1.0) -> bool:
        """Take ``n`` tokens if there are; False (and nothing taken) if not."""
        if self.refill(now) >= n:
            self.tokens -= n
            return True
        return False

    def wait(self, now: float, n: float = 1.0) -> float:
        """Seconds until ``n`` tokens are there (0: now); takes nothing."""
        return max(0.0, n - self.refill(now)) / self.rate


class Buckets:
    """A bucket per key, each ``rate``/``burst``, at most ``limit`` keys (LRU)."""

    __slots__ = ("_clock", "_table", "burst", "rate")

    def __init__(self, rate: float, burst: float, limit: int, *,
                 clock: Callable[[], float] = time.monotonic):
        TokenBucket(rate, burst)  # the same checks, once
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._table: Lru[Hashable, TokenBucket] = Lru(limit)

    def bucket(self, key: Hashable) -> TokenBucket:
        """``key``'s bucket, marked recently used (made full if the table had none)."""
        b = self._table.touch(key)
        if b is None:
            b = TokenBucket(self.rate, self.burst, stamp=self._clock())
            self._table.put(key, b)
        return b

    def __len__(self) -> int:
        return len(self._table)

    def __repr__(self) -> str:
        return f"Buckets({len(self._table)}/{self._table.limit}, {self.rate:g}/s, {self.burst:g})"
