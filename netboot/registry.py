"""Node registry: every machine netboot has seen, its lifecycle and history.

Reads (``get``, ``by_mac``, ``counts_by_state``) come from an in-memory index
loaded at open, so the DHCP/TFTP/HTTP hot paths never touch the disk. Writes
change the index synchronously (one event loop, so no locks and no lost
updates) and then wait for a single writer task that group-commits everything
pending in one SQLite transaction: a thousand concurrent callers cost a handful
of commits, and a call returns only after its change is committed.

Durability: WAL with ``synchronous=NORMAL``. A commit is in the WAL file (in
the OS page cache) before the call returns, so it survives ``kill -9`` of the
process; only a power loss or kernel crash may lose the last commits (the
database itself stays consistent). Pass ``synchronous="FULL"`` to ``open`` to
fsync every commit if that matters more than throughput.

Lifecycle: ``discovered`` -> ``booting`` -> ``deploying`` -> ``installed``, or
``error`` with a reason. ``armed`` goes False on ``installed`` and back to True
when an admin re-arms the node; the Booter decides what a ``boot: once``
profile does with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import aiosqlite

from .identity import IdentityError, normalise_mac, normalise_uuid
from .metrics import Counters

if TYPE_CHECKING:
    from .config import WebhookSettings
    from .webhooks import WebhookDispatcher

log = logging.getLogger("netboot.registry")

STATES: tuple[str, ...] = ("discovered", "booting", "deploying", "installed", "error")
DB_NAME = "registry.sqlite3"
NOTE_QUEUE_SIZE = 10_000
NOTE_BATCH = 1_000
# Boot duration buckets (seconds): PXE + kernel + an OS install is minutes, not seconds.
BOOT_BUCKETS: tuple[float, ...] = (30, 60, 120, 300, 600, 900, 1200, 1800, 2700, 3600, 7200)


class RegistryError(RuntimeError):
    """A write could not be committed; the in-memory index was reloaded from disk."""


@dataclass
class Node:
    """One machine, keyed by SMBIOS UUID. Instances are snapshots: writes replace them."""

    uuid: str
    serial: str | None = None
    vendor: str | None = None
    product: str | None = None
    asset: str | None = None
    macs: list[str] = field(default_factory=list)
    address: str | None = None
    hostname: str | None = None
    profile: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    boot_count: int = 0
    first_seen: float = 0.0
    last_seen: float = 0.0
    state: str = "discovered"
    state_since: float = 0.0
    reason: str | None = None
    armed: bool = True
    # When the current boot cycle began (first contact or last boot), for the
    # boot-duration histogram; None once the cycle ended in 'installed'.
    cycle_start: float | None = None

    def to_json(self, now: float | None = None) -> dict[str, Any]:
        d = asdict(self)
        d.pop("cycle_start")
        d["time_in_state"] = round((time.time() if now is None else now) - self.state_since, 3)
        return d


def make_node_token(secret: bytes, uuid: str) -> str:
    """HMAC-SHA256(secret, uuid), 32 hex chars: proves a caller speaks for that node only."""
    return hmac.new(secret, uuid.encode(), hashlib.sha256).hexdigest()[:32]


# -- schema ---------------------------------------------------------------------

async def _script(db: aiosqlite.Connection, script: str) -> None:
    """Statement by statement: executescript() would COMMIT the migration's transaction."""
    for stmt in script.split(";"):
        if stmt.strip():
            await db.execute(stmt)


async def _m1_initial(db: aiosqlite.Connection) -> None:
    await _script(db, """
        CREATE TABLE nodes (
            uuid TEXT PRIMARY KEY, serial TEXT, vendor TEXT, product TEXT, asset TEXT,
            address TEXT, hostname TEXT, profile TEXT, labels TEXT NOT NULL DEFAULT '{}',
            boot_count INTEGER NOT NULL DEFAULT 0, first_seen REAL NOT NULL,
            last_seen REAL NOT NULL, state TEXT NOT NULL, state_since REAL NOT NULL,
            reason TEXT, armed INTEGER NOT NULL DEFAULT 1, cycle_start REAL
        );
        CREATE TABLE macs (
            mac TEXT PRIMARY KEY, uuid TEXT NOT NULL, first_seen REAL NOT NULL
        );
        CREATE INDEX macs_uuid ON macs(uuid);
        CREATE TABLE events (
            id INTEGER PRIMARY KEY AUTOINCREMENT, uuid TEXT NOT NULL, time REAL NOT NULL,
            kind TEXT NOT NULL, state TEXT, prev TEXT, source TEXT, address TEXT, detail TEXT
        );
        CREATE INDEX events_uuid ON events(uuid, id);
    """)


# Ordered; migration i+1 brings the schema from user_version i to i+1. Append only.
MIGRATIONS: list[Callable[[aiosqlite.Connection], Awaitable[None]]] = [_m1_initial]

_NODE_COLS = ("uuid", "serial", "vendor", "product", "asset", "address", "hostname", "profile",
              "labels", "boot_count", "first_seen", "last_seen", "state", "state_since",
              "reason", "armed", "cycle_start")
_UPSERT_NODE = (f"INSERT OR REPLACE INTO nodes ({', '.join(_NODE_COLS)}) "
                f"VALUES ({', '.join('?' * len(_NODE_COLS))})")
_UPSERT_MAC = ("INSERT INTO macs (mac, uuid, first_seen) VALUES (?, ?, ?) "
               "ON CONFLICT(mac) DO UPDATE SET uuid = excluded.uuid")
_INSERT_EVENT = ("INSERT INTO events (uuid, time, kind, state, prev, source, address, detail) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
_EVENT_COLS = ("id", "time", "kind", "state", "from", "source", "address", "detail")

EventRow = tuple[str, float, str, str | None, str | None, str | None, str | None, str | None]


async def migrate(db: aiosqlite.Connection) -> int:
    """Run the migrations the file has not seen yet, each in its own transaction."""
    async with db.execute("PRAGMA user_version") as cur:
        row = await cur.fetchone()
    version = int(row[0]) if row else 0
    if version > len(MIGRATIONS):
        raise RegistryError(f"registry schema v{version} is newer than this netboot "
                            f"(knows v{len(MIGRATIONS)}); refusing to open")
    for i in range(version, len(MIGRATIONS)):
        await db.execute("BEGIN IMMEDIATE")
        try:
            await MIGRATIONS[i](db)
            await db.execute(f"PRAGMA user_version = {i + 1}")
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise
        log.info("registry schema migrated to v%d", i + 1)
    return len(MIGRATIONS)


def _node_row(n: Node) -> tuple[Any, ...]:
    return (n.uuid, n.serial, n.vendor, n.product, n.asset, n.address, n.hostname, n.profile,
            json.dumps(n.labels, sort_keys=True), n.boot_count, n.first_seen, n.last_seen,
            n.state, n.state_since, n.reason, int(n.armed), n.cycle_start)


class _Histogram:
    """A Prometheus histogram kept in memory (resets with the process, as counters do)."""

    def __init__(self, buckets: Iterable[float]):
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, upper in enumerate(self.buckets):
            if value <= upper:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def render(self, name: str, help_text: str) -> list[str]:
        out = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        for upper, n in zip(self.buckets, self.counts):
            out.append(f'{name}_bucket{{le="{upper:g}"}} {n}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:g}",
                f"{name}_count {self.count}"]
        return out


@dataclass
class _Batch:
    nodes: list[tuple[Any, ...]]
    macs_set: list[tuple[str, str, float]]
    macs_del: list[tuple[str]]
    events: list[EventRow]
    deleted: list[tuple[str]]

    def __bool__(self) -> bool:
        return bool(self.nodes or self.macs_set or self.macs_del or self.events or self.deleted)


class Registry:
    """The node inventory. Open with ``await Registry.open(...)``; close when done."""

    def __init__(self, db: aiosqlite.Connection, reader: aiosqlite.Connection, *, secret: bytes,
                 counters: Counters, stuck_after: float, clock: Callable[[], float],
                 hooks: WebhookDispatcher | None):
        self._db = db
        self._reader = reader
        self._secret = secret
        self.counters = counters
        self.stuck_after = stuck_after
        self._clock = clock
        self._hooks = hooks
        self._nodes: dict[str, Node] = {}
        self._mac_index: dict[str, str] = {}
        self._by_state: dict[str, set[str]] = {s: set() for s in STATES}
        self._stuck: set[str] = set()
        self.boot_durations = _Histogram(BOOT_BUCKETS)
        # pending writes, taken whole by the writer
        self._dirty: set[str] = set()
        self._dirty_macs: dict[str, tuple[str, float] | None] = {}
        self._events: list[EventRow] = []
        self._deleted: set[str] = set()
        self._waiters: list[asyncio.Future[None]] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._notes: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue(NOTE_QUEUE_SIZE)
        self._tasks: list[asyncio.Task[None]] = []
        counters.describe("node_boots_total", "Boots counted by the registry (loader fetched)")
        counters.describe("node_failures_total", "Nodes that reported a failed install")
        counters.describe("node_stuck_total", "Nodes found stuck in 'deploying'")
        counters.describe("registry_notes_dropped_total", "DHCP sightings dropped: queue full")
        counters.describe("registry_commits_total", "Registry write transactions committed")

    # -- lifecycle ----------------------------------------------------------
    @classmethod
    async def open(cls, data_dir: Path, *, secret: bytes, counters: Counters | None = None,
                   webhooks: Iterable[WebhookSettings] = (), stuck_after: float = 1800,
                   clock: Callable[[], float] = time.time,
                   synchronous: Literal["NORMAL", "FULL"] = "NORMAL") -> Registry:
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / DB_NAME
        db = await aiosqlite.connect(path, isolation_level=None)
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute(f"PRAGMA synchronous={synchronous}")
            await db.execute("PRAGMA busy_timeout=5000")
            await migrate(db)
            reader = await aiosqlite.connect(path, isolation_level=None)
        except BaseException:
            await db.close()
            raise
        await reader.execute("PRAGMA busy_timeout=5000")
        counters = counters if counters is not None else Counters()
        hooks = None
        hook_list = list(webhooks)
        if hook_list:
            from .webhooks import WebhookDispatcher
            hooks = WebhookDispatcher(hook_list, counters=counters)
            hooks.start()
        self = cls(db, reader, secret=secret, counters=counters, stuck_after=stuck_after,
                   clock=clock, hooks=hooks)
        await self._load()
        self._tasks = [asyncio.create_task(self._writer(), name="registry-writer"),
                       asyncio.create_task(self._note_consumer(), name="registry-notes"),
                       asyncio.create_task(self._stuck_loop(), name="registry-stuck")]
        return self

    async def close(self) -> None:
        """Write what was noted, commit, stop the tasks and close the database."""
        if self._closing:
            return
        for t in self._tasks[1:]:
            t.cancel()
        await asyncio.gather(*self._tasks[1:], return_exceptions=True)
        self._drain_notes()
        await self._commit()
        self._closing = True
        self._wake.set()
        await asyncio.gather(self._tasks[0], return_exceptions=True)
        if self._hooks is not None:
            await self._hooks.close()
        await self._reader.close()
        await self._db.close()

    async def _load(self) -> None:
        """Build the index from disk, then swap it in whole: readers never see it half-built."""
        nodes: dict[str, Node] = {}
        mac_index: dict[str, str] = {}
        by_state: dict[str, set[str]] = {s: set() for s in STATES}
        async with self._db.execute(f"SELECT {', '.join(_NODE_COLS)} FROM nodes") as cur:
            async for r in cur:
                d = dict(zip(_NODE_COLS, r))
                d["labels"] = json.loads(d["labels"])
                d["armed"] = bool(d["armed"])
                node = Node(**d)
                nodes[node.uuid] = node
                by_state.setdefault(node.state, set()).add(node.uuid)
        async with self._db.execute("SELECT mac, uuid FROM macs ORDER BY rowid") as cur:
            async for mac, uuid in cur:
                node = nodes.get(uuid)
                if node is not None:
                    node.macs.append(mac)
                    mac_index[mac] = uuid
        self._nodes, self._mac_index, self._by_state = nodes, mac_index, by_state
        self._stuck &= set(nodes)

    # -- hot path reads -------------------------------------------------------
    def get(self, uuid: str) -> Node | None:
        node = self._nodes.get(uuid)
        if node is None:
            try:
                node = self._nodes.get(normalise_uuid(uuid))
            except IdentityError:
                return None
        return node

    def by_mac(self, mac: str) -> Node | None:
        uuid = self._mac_index.get(mac)
        if uuid is None:
            try:
                uuid = self._mac_index.get(normalise_mac(mac))
            except IdentityError:
                return None
        return self._nodes.get(uuid) if uuid else None

    def node_token(self, uuid: str) -> str:
        return make_node_token(self._secret, normalise_uuid(uuid))

    def check_node_token(self, uuid: str, token: str) -> bool:
        try:
            expected = self.node_token(uuid)
        except IdentityError:
            return False
        return hmac.compare_digest(expected.encode(), token.encode())

    def counts_by_state(self) -> dict[str, int]:
        return {s: len(self._by_state.get(s, ())) for s in STATES}

    def stuck(self) -> list[Node]:
        """Nodes in 'deploying' for longer than stuck_after (cost: deploying nodes only)."""
        limit = self._clock() - self.stuck_after
        nodes = (self._nodes[u] for u in self._by_state["deploying"])
        return [n for n in nodes if n.state_since < limit]

    def is_stuck(self, node: Node) -> bool:
        return node.state == "deploying" and node.state_since < self._clock() - self.stuck_after

    def now(self) -> float:
        return self._clock()

    # -- writes ---------------------------------------------------------------
    async def observe(self, uuid: str, *, mac: str | None, address: str | None, source: str,
                      serial: str | None = None, vendor: str | None = None,
                      product: str | None = None, asset: str | None = None,
                      hostname: str | None = None, profile: str | None = None,
                      boot: bool = False) -> Node:
        """Record a sighting: create in 'discovered' if new, update given fields, count boots."""
        node, created = self._observe(uuid, mac=mac, address=address, source=source,
                                      serial=serial, vendor=vendor, product=product, asset=asset,
                                      hostname=hostname, profile=profile, boot=boot)
        await self._commit()
        if created and self._hooks is not None:
            self._hooks.emit("discovered", node, source=source, time=node.first_seen)
        return self._nodes.get(node.uuid, node)

    def note(self, uuid: str, **kw: Any) -> None:
        """Fire-and-forget ``observe`` for the DHCP path; dropped (and counted) when full."""
        try:
            self._notes.put_nowait((uuid, kw))
        except asyncio.QueueFull:
            self.counters.inc("registry_notes_dropped_total")

    async def transition(self, uuid: str, state: str, *, source: str,
                         address: str | None = None, reason: str | None = None) -> Node:
        """Move a node to ``state`` with an event; same state is a no-op (address still kept).

        An unknown node is created first: a node calling back with a valid token was
        known when its token was issued, and its report must not be lost.
        """
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}; states: {', '.join(STATES)}")
        uuid = normalise_uuid(uuid)
        now = self._clock()
        old = self._nodes.get(uuid)
        created = old is None
        if old is None:
            old, _ = self._observe(uuid, mac=None, address=address, source=source)
        if old.state == state and (state != "error" or reason == old.reason):
            if address and address != old.address:
                self._put(replace(old, address=address, last_seen=now))
            if created or uuid in self._dirty:
                await self._commit()
            return self._nodes.get(uuid, old)
        node = replace(old, state=state, state_since=now, last_seen=now,
                       reason=reason if state == "error" else None,
                       address=address or old.address)
        if state == "installed":
            node.armed = False
            if old.cycle_start is not None:
                self.boot_durations.observe(max(0.0, now - old.cycle_start))
            node.cycle_start = None
        elif state == "error":
            self.counters.inc("node_failures_total")
        self._put(node, old)
        self._stuck.discard(uuid)
        self._events.append((uuid, now, "state", state, old.state, source, address,
                             reason if state == "error" else None))
        await self._commit()
        if self._hooks is not None:
            self._hooks.emit(state, node, source=source, time=now)
        return self._nodes.get(uuid, node)

    async def patch(self, uuid: str, *, rearm: bool = False,
                    labels: dict[str, str | None] | None = None, profile: str | None = None,
                    hostname: str | None = None, source: str = "admin") -> Node:
        """Admin changes. ``labels`` merges (a None value removes the key)."""
        uuid = normalise_uuid(uuid)
        old = self._nodes.get(uuid)
        if old is None:
            raise KeyError(uuid)
        now = self._clock()
        node = replace(old, labels=dict(old.labels))
        changed: list[str] = []
        if rearm:
            node.armed = True
            changed.append("rearm")
        if labels:
            for k, v in labels.items():
                if v is None:
                    node.labels.pop(k, None)
                else:
                    node.labels[k] = str(v)
            changed.append("labels " + json.dumps(labels, sort_keys=True))
        if profile is not None and profile != old.profile:
            node.profile = profile or None
            changed.append(f"profile {profile or '-'}")
        if hostname is not None and hostname != old.hostname:
            node.hostname = hostname or None
            changed.append(f"hostname {hostname or '-'}")
        if not changed:
            return old
        self._put(node, old)
        kind = "rearm" if changed == ["rearm"] else "patch"
        self._events.append((uuid, now, kind, node.state, None, source, None, "; ".join(changed)))
        await self._commit()
        return self._nodes.get(uuid, node)

    async def forget(self, uuid: str) -> bool:
        """Delete a node, its MACs and its history."""
        uuid = normalise_uuid(uuid)
        node = self._nodes.pop(uuid, None)
        if node is None:
            return False
        self._by_state.get(node.state, set()).discard(uuid)
        self._stuck.discard(uuid)
        for mac in node.macs:
            if self._mac_index.get(mac) == uuid:
                del self._mac_index[mac]
                self._dirty_macs[mac] = None
        self._dirty.discard(uuid)
        self._events = [e for e in self._events if e[0] != uuid]
        self._deleted.add(uuid)
        await self._commit()
        return True

    # -- queries --------------------------------------------------------------
    async def list(self, *, state: str | None = None, profile: str | None = None,
                   label: str | None = None) -> list[Node]:
        """Nodes by first sighting; ``label`` is ``"key=value"`` (or ``"key"``: has the key)."""
        if state is not None:
            nodes: Iterable[Node] = (self._nodes[u] for u in self._by_state.get(state, ()))
        else:
            nodes = self._nodes.values()
        if profile is not None:
            nodes = (n for n in nodes if n.profile == profile)
        if label is not None:
            key, sep, value = label.partition("=")
            nodes = (n for n in nodes if key in n.labels and (not sep or n.labels[key] == value))
        return sorted(nodes, key=lambda n: (n.first_seen, n.uuid))

    async def events(self, uuid: str) -> list[dict[str, Any]]:
        """A node's history, oldest first (committed first, so nothing pending is missed)."""
        uuid = normalise_uuid(uuid)
        await self._commit()
        async with self._reader.execute(
                "SELECT id, time, kind, state, prev, source, address, detail FROM events "
                "WHERE uuid = ? ORDER BY id", (uuid,)) as cur:
            rows = await cur.fetchall()
        return [dict(zip(_EVENT_COLS, r)) for r in rows]

    def render_metrics(self) -> str:
        """Gauges per state, stuck nodes and the boot-duration histogram (Prometheus text)."""
        out = ["# HELP netboot_nodes Nodes in the registry by lifecycle state",
               "# TYPE netboot_nodes gauge"]
        out += [f'netboot_nodes{{state="{s}"}} {n}' for s, n in self.counts_by_state().items()]
        out += ["# HELP netboot_nodes_stuck Nodes in 'deploying' for longer than stuck_after",
                "# TYPE netboot_nodes_stuck gauge", f"netboot_nodes_stuck {len(self.stuck())}"]
        out += self.boot_durations.render(
            "netboot_boot_duration_seconds",
            "Seconds from first contact or last boot to 'installed'")
        return "\n".join(out) + "\n"

    # -- internals ------------------------------------------------------------
    def _put(self, node: Node, old: Node | None = None) -> None:
        if old is not None and old.state != node.state:
            self._by_state[old.state].discard(node.uuid)
        self._by_state.setdefault(node.state, set()).add(node.uuid)
        self._nodes[node.uuid] = node
        self._dirty.add(node.uuid)

    def _observe(self, uuid: str, *, mac: str | None, address: str | None, source: str,
                 boot: bool = False, **identity: str | None) -> tuple[Node, bool]:
        uuid = normalise_uuid(uuid)
        mac = normalise_mac(mac) if mac else None
        now = self._clock()
        old = self._nodes.get(uuid)
        if old is None:
            node = Node(uuid=uuid, first_seen=now, last_seen=now, state_since=now,
                        cycle_start=now, address=address,
                        **{k: v for k, v in identity.items() if v is not None})
            self._events.append((uuid, now, "discovered", "discovered", None, source, address,
                                 None))
        else:
            changes = {k: v for k, v in identity.items()
                       if v is not None and getattr(old, k) != v}
            node = replace(old, last_seen=now, address=address or old.address, **changes)
        if mac and mac not in node.macs:
            node.macs = [*node.macs, mac]
            owner = self._mac_index.get(mac)
            if owner is not None and owner != uuid and owner in self._nodes:
                prev = self._nodes[owner]
                self._put(replace(prev, macs=[m for m in prev.macs if m != mac]))
            self._mac_index[mac] = uuid
            self._dirty_macs[mac] = (uuid, now)
        if boot:
            node.boot_count += 1
            node.cycle_start = now
            self.counters.inc("node_boots_total")
            self._events.append((uuid, now, "boot", node.state, None, source, address, None))
        self._put(node, old)
        return node, old is None

    def _commit(self) -> asyncio.Future[None]:
        """A future resolved once everything written so far is committed."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._closing:
            fut.set_exception(RegistryError("registry is closed"))
            return fut
        self._waiters.append(fut)
        self._wake.set()
        return fut

    def _take(self) -> _Batch:
        batch = _Batch(
            nodes=[_node_row(self._nodes[u]) for u in self._dirty if u in self._nodes],
            macs_set=[(m, v[0], v[1]) for m, v in self._dirty_macs.items() if v is not None],
            macs_del=[(m,) for m, v in self._dirty_macs.items() if v is None],
            events=self._events, deleted=[(u,) for u in self._deleted])
        self._dirty, self._dirty_macs, self._events, self._deleted = set(), {}, [], set()
        return batch

    async def _write(self, b: _Batch) -> None:
        db = self._db
        await db.execute("BEGIN IMMEDIATE")
        try:
            if b.deleted:
                await db.executemany("DELETE FROM events WHERE uuid = ?", b.deleted)
                await db.executemany("DELETE FROM macs WHERE uuid = ?", b.deleted)
                await db.executemany("DELETE FROM nodes WHERE uuid = ?", b.deleted)
            if b.macs_del:
                await db.executemany("DELETE FROM macs WHERE mac = ?", b.macs_del)
            if b.nodes:
                await db.executemany(_UPSERT_NODE, b.nodes)
            if b.macs_set:
                await db.executemany(_UPSERT_MAC, b.macs_set)
            if b.events:
                await db.executemany(_INSERT_EVENT, b.events)
            await db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):  # keep the first error, not this one
                await db.execute("ROLLBACK")
            raise
        self.counters.inc("registry_commits_total")

    async def _writer(self) -> None:
        """The one task that writes: takes everything pending, commits it, wakes the callers."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            waiters, self._waiters = self._waiters, []
            batch = self._take()
            try:
                if batch:
                    await self._write(batch)
            except Exception as exc:
                log.exception("registry commit failed; reloading the index from disk")
                try:
                    await self._load()
                except Exception:
                    log.exception("registry reload failed")
                # everything changed in memory since is undone by the reload: fail it too
                waiters += self._waiters
                self._waiters = []
                self._take()
                for w in waiters:
                    if not w.done():
                        w.set_exception(RegistryError(f"registry write failed: {exc}"))
                continue
            for w in waiters:
                if not w.done():
                    w.set_result(None)
            if self._closing and not self._waiters:
                return

    def _drain_notes(self, limit: int | None = None,
                     first: tuple[str, dict[str, Any]] | None = None) -> list[Node]:
        """Apply queued sightings to the index; returns the nodes they created."""
        n = 0
        created: list[Node] = []
        while limit is None or n < limit:
            if first is not None:
                (uuid, kw), first = first, None
            else:
                try:
                    uuid, kw = self._notes.get_nowait()
                except asyncio.QueueEmpty:
                    break
            n += 1
            try:
                kw.setdefault("mac", None)
                kw.setdefault("address", None)
                kw.setdefault("source", "dhcp")
                node, new = self._observe(uuid, **kw)
            except (IdentityError, TypeError) as exc:
                log.warning("dropping registry note for %r: %s", uuid, exc)
                continue
            if new:
                created.append(node)
        return created

    async def _note_consumer(self) -> None:
        while True:
            created = self._drain_notes(NOTE_BATCH, first=await self._notes.get())
            try:
                await self._commit()
            except RegistryError:
                continue  # logged by the writer
            if self._hooks is not None:
                for node in created:
                    self._hooks.emit("discovered", node, source="dhcp", time=node.first_seen)

    async def _stuck_loop(self) -> None:
        """Every few seconds: newly stuck deploying nodes get an event and a webhook, once."""
        interval = max(0.2, min(30.0, self.stuck_after / 10))
        while True:
            await asyncio.sleep(interval)
            try:
                await self._check_stuck()
            except Exception:
                log.exception("stuck check failed")

    async def _check_stuck(self) -> list[Node]:
        fresh = [n for n in self.stuck() if n.uuid not in self._stuck]
        if not fresh:
            return []
        now = self._clock()
        for n in fresh:
            self._stuck.add(n.uuid)
            self.counters.inc("node_stuck_total")
            self._events.append((n.uuid, now, "stuck", n.state, None, "netboot", None,
                                 f"in deploying for {now - n.state_since:.0f}s"))
        await self._commit()
        if self._hooks is not None:
            for n in fresh:
                self._hooks.emit("stuck", n, source="netboot", time=now)
        return fresh


# -- a small standalone server, used by the kill -9 test and for poking at the API ---------

def _main(argv: list[str] | None = None) -> int:
    import argparse

    from aiohttp import web

    ap = argparse.ArgumentParser(prog="python -m netboot.registry",
                                 description="Serve the registry API and dashboard alone.")
    ap.add_argument("--serve", action="store_true", required=True)
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--secret", required=True, help="node-token HMAC key")
    ap.add_argument("--admin-token")
    ap.add_argument("--stuck-after", type=float, default=1800)
    args = ap.parse_args(argv)

    async def serve() -> None:
        from .http.api import setup_api

        counters = Counters()
        secret = args.secret.encode()
        reg = await Registry.open(args.data_dir, secret=secret, counters=counters,
                                  stuck_after=args.stuck_after)
        app = web.Application()
        setup_api(app, registry=reg, counters=counters, admin_token=args.admin_token)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, args.host, args.port, backlog=4096).start()
        print(f"serving on http://{args.host}:{args.port}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()
            await reg.close()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    from netboot.registry import _main as main

    raise SystemExit(main())
