"""One rate-limited logger: a flood of events becomes a few lines that count it.

Every user has the same shape: something may happen thousands of times a second
(refused requests, malformed packets, new DHCP clients) and each occurrence
must be counted, but the log must stay readable and cheap. A token bucket
bounds the lines: ``burst`` at once, refilled at ``burst`` per ``every``
seconds. What is held back is counted by reason and said in one summary line
(with the latest occurrence's details) once the budget allows: on a later
occurrence, on a timer when the flood stops (inside a running event loop), or
by :meth:`RateLimitedLog.flush`.

Two ways to use it:

* :meth:`~RateLimitedLog.record` when every line is a summary (refusals,
  malformed requests): the first occurrence is logged at once, later ones at most
  one line per ``every`` seconds (with ``burst=1``) counting all since the last.
* :meth:`~RateLimitedLog.allow` when the caller writes its own line per event
  (the DHCP boot decisions) and only needs to know whether it may; a ``quiet``
  period per key also keeps a client's repeated packets to one line.

The clock is injectable, so tests drive time by hand.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from .lru import Lru
from .tokenbucket import TokenBucket


@dataclass(slots=True, eq=False, repr=False)
class RateLimitedLog:
    """Bounded lines on ``logger`` with a ``summary`` of what was held back.

    ``summary`` is a %-format taking ``(total, counts, *latest)``: how many
    occurrences since the last line, ``"reason=n, ..."`` sorted by reason, and the
    ``latest`` arguments of the newest occurrence (never pass secrets: they are
    logged as given). ``on_held(reason)`` is called for each occurrence
    :meth:`allow` holds back (e.g. to count it in a metric).
    """

    logger: logging.Logger
    summary: str
    every: float = 60.0
    burst: int = 1
    clock: Callable[[], float] = time.monotonic
    level: int = logging.WARNING
    quiet: float | None = None
    keys: int = 50_000
    on_held: Callable[[str], Any] | None = None
    _bucket: TokenBucket = field(init=False)
    _threshold: float = field(init=False)
    _counts: dict[str, int] = field(init=False, default_factory=dict)
    _latest: tuple[Any, ...] = field(init=False, default=())
    _recent: Lru[Hashable, float] | None = field(init=False)
    _timer: asyncio.TimerHandle | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.every <= 0 or self.burst < 1:
            raise ValueError("a rate limit needs a positive interval and burst")
        self._bucket = TokenBucket(self.burst / self.every, self.burst, stamp=self.clock())
        # a held-back summary waits until the bucket is half full again, so a
        # sustained flood does not turn into one summary line per refilled token
        self._threshold = max(1.0, self.burst / 2)
        self._recent = Lru(self.keys) if self.quiet is not None else None

    # -- the two entry points -----------------------------------------------------------
    def record(self, reason: str, *latest: Any) -> None:
        """Count one occurrence; log the summary now if the budget allows, else later."""
        self._hold(reason, latest)
        if self._bucket.refill(self.clock()) >= 1:
            self._emit()
        else:
            self._arm()

    def allow(self, key: Hashable | None = None, reason: str = "held", *latest: Any) -> bool:
        """May the caller log its own line for this occurrence now?

        False without counting if ``key`` was allowed less than ``quiet`` seconds
        ago (a repeat is not news); False and counted for the summary if the budget
        is spent.
        """
        now = self.clock()
        recent = self._recent
        if recent is not None and key is not None:
            last = recent.get(key)
            if last is not None and now - last < self.quiet:  # type: ignore[operator]
                return False
            recent.put(key, now)
        bucket = self._bucket
        tokens = bucket.refill(now)
        if self._counts and tokens >= self._threshold:
            self._emit()
            tokens = bucket.tokens
        if tokens >= 1:
            bucket.tokens = tokens - 1
            return True
        counts = self._counts  # _hold() inline: this is the flood's path
        counts[reason] = counts.get(reason, 0) + 1
        self._latest = latest
        if self.on_held is not None:
            self.on_held(reason)
        if self._timer is None:
            self._arm()
        return False

    def flush(self) -> None:
        """Log what is held back now, whatever the budget (on shutdown, from the timer)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._counts:
            self._bucket.refill(self.clock())
            self._emit()

    # -- for tests and /health-like callers ---------------------------------------------
    @property
    def pending(self) -> dict[str, int]:
        """Occurrences counted but not yet in a line, by reason (a copy)."""
        return dict(self._counts)

    # -- internals ----------------------------------------------------------------------
    def _hold(self, reason: str, latest: tuple[Any, ...]) -> None:
        counts = self._counts
        counts[reason] = counts.get(reason, 0) + 1
        self._latest = latest

    def _emit(self) -> None:
        counts = self._counts
        text = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
        self.logger.log(self.level, self.summary, sum(counts.values()), text, *self._latest)
        self._counts = {}
        self._latest = ()
        bucket = self._bucket  # a summary is a line like any other
        bucket.tokens = max(0.0, bucket.tokens - 1)

    def _arm(self) -> None:
        """Say the rest once the flood stops, even if nothing else happens."""
        if self._timer is not None:
            return
        # the non-raising form: a flood outside a loop must not cost an exception each
        loop = asyncio._get_running_loop()
        if loop is None:  # no loop (tests, tools): the next occurrence or flush() says it
            return
        wait = self._bucket.wait(self.clock(), self._threshold)
        self._timer = loop.call_later(max(0.0, wait), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.flush()
