"""PowerService: BMC drivers behind an asyncio facade.

The drivers are synchronous (ipmitool processes, sushy's blocking HTTP), so
every call runs in a bounded thread pool, never on the event loop. The rules:

- At most one call per BMC key at a time (a per-key gate), whether it comes
  from `act`, `status`, `bulk` or the poller; a BMC is better served one
  request at a time, and a Redfish session is not safe to share between
  threads.
- At most `workers` calls at once in all. A call holds its BMC's gate and a
  worker slot until its thread really ends.
- Each call is bounded by `timeout`. When it passes, the caller gets a
  `BmcError(kind="timeout")` at once and the event loop goes on; the thread
  cannot be killed, so it runs until the driver gives up by itself (the IPMI
  driver kills its ipmitool one second later; sushy stops at its read/connect
  timeout, which is set to this same timeout). Until then that BMC answers
  `busy` and one worker slot stays taken; its driver (a Redfish session) is
  thrown away when the thread ends. Other BMCs are unaffected unless every worker
  is stuck.
- The poller never takes more than `poll_workers` slots, so an operator's
  power action finds a free worker even while a thousand BMCs are polled.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from netboot.power.bmc import BmcConfig
from netboot.power.driver import (
    DEFAULT_TIMEOUT,
    BmcError,
    BootDevice,
    PowerDriver,
    PowerState,
    open_driver,
    scrub,
)

log = logging.getLogger("netboot.power")

ACTIONS = ("on", "off", "soft", "cycle")
T = TypeVar("T")
Key = Hashable
Opener = Callable[..., PowerDriver]


@dataclass(frozen=True)
class PowerStatus:
    """What a BMC said last. `checked` is the service clock (time.time) when
    the answer (or the failure) came; `reason` says why the state is unknown."""

    state: PowerState
    checked: float
    reason: str | None = None


@dataclass(frozen=True)
class BulkResult:
    """One item of `bulk`: `started`/`finished` are service clock times."""

    key: Key
    ok: bool
    reason: str | None
    started: float
    finished: float


@dataclass(frozen=True)
class PowerStats:
    """Counters since the service started, for tests, metrics and /health.

    `max_running_per_bmc` is the most driver calls ever running at once for
    one key: 1 unless the one-call-per-BMC rule is broken. `stuck` counts
    threads whose caller timed out and that have not ended yet."""

    workers: int
    running: int
    max_running: int
    max_running_per_bmc: int
    calls: int
    errors: int
    timeouts: int
    stuck: int
    polls_skipped: int
    rounds: int


class _Busy(Exception):
    pass


class PowerService:
    """Async power control of many BMCs; see the module docstring for the rules.

    `clock` stamps statuses and bulk results; `sleep` paces the poller and
    bulk starts; `opener(cfg, timeout=)` makes drivers (tests may pass their
    own). Create it anywhere; use it from one event loop; `await close()`.
    """

    def __init__(self, *, workers: int = 16, timeout: float = DEFAULT_TIMEOUT,
                 poll_workers: int | None = None,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                 opener: Opener = open_driver) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.workers = workers
        self.timeout = timeout
        self.poll_workers = poll_workers or max(1, workers - max(1, workers // 4))
        if not 1 <= self.poll_workers <= workers:
            raise ValueError("poll_workers must be from 1 to workers")
        self._clock = clock
        self._sleep = sleep
        self._opener = opener
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bmc")
        self._slots = asyncio.Semaphore(workers)
        self._poll_slots = asyncio.Semaphore(self.poll_workers)
        self._gates: dict[Key, asyncio.Lock] = {}
        self._last: dict[Key, PowerStatus] = {}
        self._polled: set[Key] = set()
        self._closed = False
        # Shared with the worker threads, under _lock:
        self._lock = threading.Lock()
        self._drivers: dict[Key, tuple[BmcConfig, PowerDriver]] = {}
        self._stale: set[Key] = set()
        self._per_key: dict[Key, int] = {}
        self._running = self._max_running = self._max_per_key = 0
        self._calls = self._errors = self._timeouts = 0
        self._stuck: set[Key] = set()
        self._skipped = self._rounds = 0

    # -- public API --------------------------------------------------------

    async def act(self, key: Key, cfg: BmcConfig, action: str,
                  boot: BootDevice | str | None = None, *, persistent: bool = False) -> None:
        """Power `action` (on, off, soft, cycle), after setting the next boot to
        `boot` if given (once, or every boot from now on with `persistent`).
        Returns when the BMC accepted it, not when the machine got there.
        Raises BmcError; waits at most `timeout` for a busy BMC or worker, then
        at most `timeout` for the call."""
        if action not in ACTIONS:
            raise ValueError(f"power action must be one of {', '.join(ACTIONS)}, "
                             f"not {action!r}")
        dev = BootDevice(boot) if boot is not None else None

        def job(d: PowerDriver) -> None:
            if dev is not None:
                d.set_boot(dev, persistent)
            getattr(d, action)()

        what = f"power {action}" + (f" ({'boot' if persistent else 'next boot'} {dev})"
                                    if dev else "")
        log.info("%s: %s via %s", key, what, cfg.endpoint)
        await self._run(key, cfg, what, job)

    async def status(self, key: Key, cfg: BmcConfig) -> PowerStatus:
        """Read the power state now. Never raises BmcError: a failure is
        `unknown` with the reason. The answer is also kept for `last(key)`."""
        return await self._status(key, cfg)

    def last(self, key: Key) -> PowerStatus | None:
        """The latest status read for `key` (by `status` or the poller)."""
        return self._last.get(key)

    def statuses(self) -> dict[Key, PowerStatus]:
        return dict(self._last)

    def stats(self) -> PowerStats:
        with self._lock:
            return PowerStats(self.workers, self._running, self._max_running,
                              self._max_per_key, self._calls, self._errors,
                              self._timeouts, len(self._stuck), self._skipped, self._rounds)

    async def poll_forever(self, targets: Callable[[], dict[Key, BmcConfig]],
                           interval: float, *,
                           on_round: Callable[[int, int], Any] | None = None) -> None:
        """Poll every target's power state, round after round, `interval`
        seconds apart (from the end of one round to the start of the next).

        `targets()` is asked afresh each round; keys that left it are
        forgotten. A key whose BMC is busy (an action, or a timed-out call
        still running) is skipped for that round. `on_round(n, polled)` is
        called after each round. Runs until cancelled."""
        while True:
            try:
                current = dict(targets())
                for gone in self._polled - current.keys():
                    self.forget(gone)
                self._polled = set(current)
                polled = await self._poll_round(current)
                with self._lock:
                    self._rounds += 1
                    n = self._rounds
                if on_round is not None:
                    on_round(n, polled)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the poller must outlive a bad round
                log.exception("power poll round failed")
            await self._sleep(interval)

    async def bulk(self, items: Iterable[tuple[Key, BmcConfig]], action: str,
                   boot: BootDevice | str | None = None, *, concurrency: int = 4,
                   delay: float = 1.0,
                   progress: Callable[[BulkResult], Any] | None = None,
                   ) -> dict[Key, BulkResult]:
        """`act` on many BMCs, staggered: at most `concurrency` in flight and at
        least `delay` seconds between two starts (power inrush, DHCP floods).
        `progress(result)` is called as each item ends. Returns the results by
        key in the order given; never raises BmcError."""
        items = list(items)
        if action not in ACTIONS:
            raise ValueError(f"power action must be one of {', '.join(ACTIONS)}")
        if boot is not None:
            boot = BootDevice(boot)
        if concurrency < 1 or delay < 0:
            raise ValueError("bulk needs concurrency >= 1 and delay >= 0")
        keys = [k for k, _ in items]
        if len(set(keys)) != len(keys):
            raise ValueError("bulk: a key appears twice")
        sem = asyncio.Semaphore(concurrency)
        results: dict[Key, BulkResult] = {}

        async def one(key: Key, cfg: BmcConfig, started: float) -> None:
            try:
                await self.act(key, cfg, action, boot)
                ok, reason = True, None
            except BmcError as e:
                ok, reason = False, str(e)
            finally:
                sem.release()
            results[key] = r = BulkResult(key, ok, reason, started, self._clock())
            if progress is not None:
                try:
                    progress(r)
                except Exception:  # noqa: BLE001 - a broken listener must not stop a bulk
                    log.exception("bulk progress callback failed")

        tasks: list[asyncio.Task[None]] = []
        try:
            for i, (key, cfg) in enumerate(items):
                if i and delay:
                    await self._sleep(delay)
                await sem.acquire()
                tasks.append(asyncio.create_task(one(key, cfg, self._clock())))
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
        return {k: results[k] for k in keys}

    def forget(self, key: Key) -> None:
        """Drop what is kept for `key` (status, session). Safe while busy."""
        self._last.pop(key, None)
        with self._lock:
            if self._per_key.get(key):
                self._stale.add(key)  # the running call closes it when it ends
                return
            entry = self._drivers.pop(key, None)
        if entry is not None and not self._closed:
            self._pool.submit(entry[1].close)

    async def close(self) -> None:
        """Log out of every idle session (bounded by `timeout`) and stop the
        pool. Threads still stuck in a BMC call close their session when they
        end."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            idle = [k for k in self._drivers if not self._per_key.get(k)]
            drivers = [self._drivers.pop(k)[1] for k in idle]
            self._stale.update(self._drivers)
        loop = asyncio.get_running_loop()
        closing = [loop.run_in_executor(self._pool, d.close) for d in drivers]
        if closing:
            await asyncio.wait(closing, timeout=self.timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- internals ---------------------------------------------------------

    async def _status(self, key: Key, cfg: BmcConfig, *, poll: bool = False) -> PowerStatus:
        try:
            state = await self._run(key, cfg, "reading the power state",
                                    lambda d: d.state(), poll=poll)
            st = PowerStatus(state, self._clock(), None)
        except BmcError as e:
            st = PowerStatus(PowerState.UNKNOWN, self._clock(), str(e))
        before = self._last.get(key)
        if before is None or (before.state, before.reason) != (st.state, st.reason):
            log.info("%s: power %s%s", key, st.state, f" ({st.reason})" if st.reason else "")
        self._last[key] = st
        return st

    async def _poll_round(self, current: dict[Key, BmcConfig]) -> int:
        async def one(key: Key, cfg: BmcConfig) -> bool:
            try:
                await self._status(key, cfg, poll=True)
                return True
            except _Busy:
                with self._lock:
                    self._skipped += 1
                return False

        done = await asyncio.gather(*(one(k, c) for k, c in current.items()))
        return sum(done)

    async def _run(self, key: Key, cfg: BmcConfig, what: str,
                   job: Callable[[PowerDriver], T], *, poll: bool = False) -> T:
        """Run `job(driver)` in a worker. Holds, until the thread ends: the key's
        gate, a worker slot and (for the poller) a poll slot. The poller waits
        for a poll slot as long as it takes and skips a busy key (_Busy);
        others wait for the gate and a worker at most `timeout` together."""
        if self._closed:
            raise RuntimeError("PowerService is closed")
        loop = asyncio.get_running_loop()
        gate = self._gates.setdefault(key, asyncio.Lock())
        held: list[asyncio.Semaphore | asyncio.Lock] = []

        def release() -> None:
            for h in reversed(held):
                h.release()
            held.clear()

        try:
            if poll:
                await self._poll_slots.acquire()
                held.append(self._poll_slots)
                if gate.locked():
                    raise _Busy
            deadline = loop.time() + self.timeout
            try:
                await asyncio.wait_for(gate.acquire(), self.timeout)
            except TimeoutError:
                raise BmcError(f"{cfg.endpoint}: busy: a previous call to this BMC is "
                               f"still running after {self.timeout:g} s; try again later",
                               kind="busy") from None
            held.append(gate)
            try:
                await asyncio.wait_for(self._slots.acquire(),
                                       max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise BmcError(f"{cfg.endpoint}: all {self.workers} BMC workers are busy "
                               "(stuck BMCs?); try again later", kind="busy") from None
            held.append(self._slots)
            cf = self._pool.submit(self._in_thread, key, cfg, what, job)
        except BaseException:
            release()
            raise

        def ended(_: Future[T]) -> None:
            try:
                loop.call_soon_threadsafe(release)
            except RuntimeError:  # the loop is gone: nobody is waiting any more
                pass

        cf.add_done_callback(ended)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(cf), self.timeout)
        except TimeoutError:
            with self._lock:
                self._timeouts += 1
                if self._per_key.get(key):
                    self._stale.add(key)  # its session is suspect: drop it at the end
                    self._stuck.add(key)
            raise BmcError(f"{cfg.endpoint}: no answer within {self.timeout:g} s "
                           f"({what}); check that the BMC is up and reachable",
                           kind="timeout") from None

    def _in_thread(self, key: Key, cfg: BmcConfig, what: str,
                   job: Callable[[PowerDriver], T]) -> T:
        with self._lock:
            self._calls += 1
            self._running += 1
            self._max_running = max(self._max_running, self._running)
            n = self._per_key[key] = self._per_key.get(key, 0) + 1
            self._max_per_key = max(self._max_per_key, n)
        try:
            return job(self._driver(key, cfg))
        except BmcError:
            self._count_error()
            raise
        except Exception as e:  # noqa: BLE001 - a library bug must still read as a BmcError
            self._count_error()
            raise BmcError(f"{cfg.endpoint}: {what} failed: {type(e).__name__}: "
                           f"{scrub(e, cfg)}", kind="protocol") from None
        finally:
            with self._lock:
                self._running -= 1
                self._per_key[key] -= 1
                if not self._per_key[key]:
                    del self._per_key[key]
                stale = key in self._stale
                self._stale.discard(key)
                self._stuck.discard(key)
            if stale:
                self._drop(key)

    def _driver(self, key: Key, cfg: BmcConfig) -> PowerDriver:
        with self._lock:
            entry = self._drivers.get(key)
            if entry is not None and entry[0] == cfg:
                return entry[1]
            self._drivers.pop(key, None)
        if entry is not None:
            entry[1].close()  # the BMC's settings changed
        driver = self._opener(cfg, timeout=self.timeout)
        with self._lock:
            self._drivers[key] = (cfg, driver)
        return driver

    def _count_error(self) -> None:
        with self._lock:
            self._errors += 1

    def _drop(self, key: Key) -> None:
        with self._lock:
            entry = self._drivers.pop(key, None)
        if entry is not None:
            entry[1].close()
