"""Node registry: every machine netboot has seen, its lifecycle state and history.

Storage only: which changes to make is decided by :mod:`netboot.boot.lifecycle`
(the one caller of the write methods below); this module keeps them.

Reads (``get``, ``by_mac``, ``counts_by_state``) come from an in-memory index
loaded at open, so the DHCP/TFTP/HTTP hot paths never touch the disk. Writes
change the index synchronously and return at once (one event loop: no locks, no
lost updates); ``commit()`` returns a future that a single writer task resolves
once everything pending is in one SQLite transaction. A thousand writes cost a
handful of commits, and a caller decides whether to wait for durability (an
acknowledged callback does) or not (a boot reply never does).

Durability: WAL with ``synchronous=NORMAL``. A committed change is in the WAL
file (the OS page cache) and survives ``kill -9`` of the process; only a power
loss or kernel crash may lose the last commits (the database stays consistent).
Pass ``synchronous="FULL"`` to ``open`` to fsync every commit.

A failed commit reloads the index from disk, so memory never claims what the
file does not hold; the futures of everything since fail with RegistryError.

Lists are read from disk a page at a time (``page``, keyset cursors: see
:mod:`.pages`); the writer also keeps the events table within its retention limits
(``EventRetention``), a bounded batch at a time between commits.

**A fleet on PostgreSQL** (``registry: postgresql://...``; engines in :mod:`.db`).
Each instance keeps the same index, and the database stays the truth:

- every commit NOTIFYs the UUIDs it wrote on :data:`CHANNEL`, and the other
  instances reload those rows (cost: the rows changed, never a scan);
- a node row carries a ``version``; an instance writes a row only over the version
  its change was made on, in one conditional upsert for the whole batch. A row that
  another instance moved first is not overwritten: it is reloaded, and the writes
  this instance made to that node since it last read it are applied again, in order,
  on top of the fresh row, as the row lock of ``SELECT ... FOR UPDATE`` would have
  had them; callers waiting on ``commit()`` wait for that second write;
- ``nodes.instance`` is the instance that served the node last.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

from ..identity import (
    IdentityError,
    normal_mac_shape,
    normal_uuid_shape,
    normalise_mac,
    normalise_uuid,
)
from .db import (
    ENGINE_ERRORS,
    TRANSIENT_ERRORS,
    Db,
    PgPool,
    SqliteDb,
    is_postgresql,
    pg_connect,
    pg_listen,
    redact,
)
from .pages import DEFAULT_LIMIT, Cursor, NodeFilter, page_sql, search_text
from .schema import (
    AUDIT_COLS,
    BMC_COLS,
    EVENT_COLS,
    INSERT_AUDIT,
    INSERT_EVENT,
    MIGRATIONS,
    NODE_COLS,
    UPSERT_BMC,
    UPSERT_INVENTORY,
    UPSERT_MAC,
    UPSERT_NODE,
    UPSERT_NODES_PG,
    EventRow,
    RegistryError,
    migrate,
    row_to_fields,
)

__all__ = ["DB_NAME", "MIGRATIONS", "STATES", "BmcRecord", "Change", "EventRetention", "Node",
           "NodeFilter", "NodePage", "Registry", "RegistryError", "make_node_token"]

log = logging.getLogger("netboot.registry")

#: Lifecycle states; what moves a node between them is in netboot/boot/lifecycle.py.
STATES: tuple[str, ...] = ("discovered", "commissioning", "ready", "booting", "deploying",
                           "installed", "error")
DB_NAME = "registry.sqlite3"
#: the NOTIFY channel of a PostgreSQL registry: "<instance id> <uuid> <uuid>..."
CHANNEL = "netboot_nodes"
#: a NOTIFY payload stays under PostgreSQL's 8,000 bytes: this many UUIDs per message
NOTIFY_UUIDS = 200
#: how many times a commit the database aborted (deadlock, serialization) is tried
TRANSIENT_TRIES = 5
_T = TypeVar("_T")
#: a write method and its arguments, kept to apply again after a lost race (PostgreSQL)
_Op = tuple[str, tuple[Any, ...], dict[str, Any]]


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
    #: the profile an operator chose (netboot nodes deploy); wins over machine files
    assigned_profile: str | None = None
    #: Secure Boot was on (True) or off (False) in its last report; None: never said (BIOS)
    secure_boot: bool | None = None
    #: the CPU architecture of its last boot (amd64, arm64); None before one
    arch: str | None = None
    #: the netboot instance that served it last (``instance:`` in netboot.yaml)
    instance: str | None = None

    def to_json(self, now: float | None = None) -> dict[str, Any]:
        d = asdict(self)
        d.pop("cycle_start")
        d["time_in_state"] = round((time.time() if now is None else now) - self.state_since, 3)
        return d


@dataclass(frozen=True, slots=True)
class BmcRecord:
    """How to reach a node's BMC. ``secret`` is the password sealed by the caller
    (netboot.util.secretbox): storage never holds it in clear."""

    driver: str
    address: str
    port: int | None = None
    username: str = ""
    secret: bytes | None = field(default=None, repr=False)
    system: str | None = None
    source: str = "file"  # file (a machine file), commissioning, api
    updated: float = 0.0
    verify_tls: bool = False


@dataclass(frozen=True, slots=True)
class Change:
    """What a write did: the node after it, the node before (None if created)."""

    node: Node
    old: Node | None

    @property
    def created(self) -> bool:
        return self.old is None

    @property
    def moved(self) -> bool:
        """The state changed (a new node counts as moved into 'discovered')."""
        return self.old is None or self.old.state != self.node.state


@dataclass(frozen=True, slots=True)
class NodePage:
    """One page of the node list, and the cursors of its neighbours (None: no such page)."""

    nodes: list[Node]
    next_cursor: str | None
    prev_cursor: str | None


@dataclass(frozen=True, slots=True)
class EventRetention:
    """How long the events table keeps history: rows older than ``max_age`` seconds go, and
    so do rows more than ``max_rows`` ids below the newest (the table never holds more).
    The writer prunes every ``every`` seconds, ``batch`` rows per transaction, with commits
    in between, so neither a boot nor an API call ever waits behind a big delete."""

    max_age: float = 30 * 86400.0
    max_rows: int = 1_000_000
    every: float = 60.0
    batch: int = 5000
    #: the audit table (who changed what through the API) is kept longer: a year
    audit_max_age: float = 365 * 86400.0
    audit_max_rows: int = 1_000_000


@dataclass
class RegistryStats:
    """Plain numbers for whoever exports metrics (storage knows no exposition format)."""

    commits: int = 0
    commit_failures: int = 0
    events_pruned: int = 0
    audit_pruned: int = 0
    prune_batches: int = 0
    #: node writes another instance had overtaken (reloaded and applied again)
    conflicts: int = 0
    #: node rows reloaded because another instance changed them
    remote_reloads: int = 0
    #: commits the database aborted (deadlock, serialization) and that were tried again
    retries: int = 0
    #: times the LISTEN connection was made again, and the index resynced in whole
    relistens: int = 0
    resyncs: int = 0


#: how many of a node's events its detail (API, dashboard page) shows: the latest
EVENTS_SHOWN = 200


def make_node_token(secret: bytes, uuid: str) -> str:
    """HMAC-SHA256(secret, uuid), 32 hex chars: proves a caller speaks for that node only."""
    return hmac.new(secret, uuid.encode(), hashlib.sha256).hexdigest()[:32]


def _lookup(index: dict[str, Any], key: str, normalise: Callable[[str], str],
            normal: Callable[[str], bool]) -> Any:
    """``index[key]``, else under the key's normal form (callers mostly pass that form,
    and a miss on a key already ``normal`` in shape is a miss: an unknown DHCP client
    costs no parse)."""
    hit = index.get(key)
    if hit is None and not normal(key):
        try:
            hit = index.get(normalise(key))
        except IdentityError:
            return None
    return hit


def _bmc_record(r: tuple[Any, ...]) -> tuple[str, BmcRecord]:
    d = dict(zip(BMC_COLS, r))
    uuid = d.pop("uuid")
    d["verify_tls"] = bool(d["verify_tls"])
    if d["secret"] is not None:
        d["secret"] = bytes(d["secret"])
    return uuid, BmcRecord(**d)


def _bmc_row(uuid: str, b: BmcRecord | None) -> tuple[Any, ...]:
    if b is None:
        return (uuid, None)
    return (uuid, b.driver, b.address, b.port, b.username, b.secret, b.system, b.source,
            b.updated, int(b.verify_tls))


def _node_row(n: Node, version: int) -> tuple[Any, ...]:
    return (n.uuid, n.serial, n.vendor, n.product, n.asset, n.address, n.hostname, n.profile,
            json.dumps(n.labels, sort_keys=True), n.boot_count, n.first_seen, n.last_seen,
            n.state, n.state_since, n.reason, int(n.armed), n.cycle_start, n.assigned_profile,
            None if n.secure_boot is None else int(n.secure_boot), n.arch, n.instance,
            search_text(n.serial, n.hostname, n.macs), version)


@dataclass
class _Batch:
    nodes: list[tuple[Any, ...]]
    macs_set: list[tuple[str, str, float]]
    macs_del: list[tuple[str]]
    events: list[EventRow]
    deleted: list[tuple[str]]

    bmcs: list[tuple[Any, ...]] = field(default_factory=list)
    inventory: list[tuple[str, float, str]] = field(default_factory=list)
    audit: list[tuple[Any, ...]] = field(default_factory=list)
    #: the write methods behind each node's change (PostgreSQL: to apply again)
    ops: dict[str, list[_Op]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.nodes or self.macs_set or self.macs_del or self.events or self.deleted
                    or self.bmcs or self.inventory or self.audit)


class Registry:
    """The node inventory. Open with ``await Registry.open(...)``; close when done."""

    def __init__(self, db: Db, reader: SqliteDb | PgPool, *, secret: bytes,
                 clock: Callable[[], float], path: Path | None, location: str,
                 instance: str | None = None, retention: EventRetention = EventRetention()):
        #: the database file (its directory is the data dir); None for PostgreSQL
        self.path = path
        #: where the registry lives, for messages (a file, or a URL without its password)
        self.location = location
        #: this instance's name, written into the rows of the nodes it serves
        self.instance = instance
        #: "<instance>-<random>": tells this process's NOTIFYs from another's of that name
        self._me = f"{instance or '-'}-{secrets.token_hex(4)}"
        self._db = db
        self._reader = reader
        self._listener: Any = None
        self._url: str | None = None  # PostgreSQL: to LISTEN again after a break
        self._relisten_task: asyncio.Task[None] | None = None
        #: the index may not match the database (a reload failed, or NOTIFYs were missed
        #: while the LISTEN connection was down): resynced before the next commit
        self._stale = False
        self._fleet = db.dialect == "postgresql"
        #: called with each change another instance made (lifecycle: to the dashboards)
        self.on_remote: Callable[[Change], None] | None = None
        self._secret = secret
        self._clock = clock
        self.stats = RegistryStats()
        self._nodes: dict[str, Node] = {}
        self._mac_index: dict[str, str] = {}
        self._by_state: dict[str, set[str]] = {s: set() for s in STATES}
        # pending writes, taken whole by the writer
        self._dirty: set[str] = set()
        self._dirty_macs: dict[str, tuple[str, float] | None] = {}
        self._events: list[EventRow] = []
        self._deleted: set[str] = set()
        self._bmcs: dict[str, BmcRecord] = {}
        self._dirty_bmcs: set[str] = set()
        self._inventory: list[tuple[str, float, str]] = []
        self._audit: list[tuple[Any, ...]] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._writer_task: asyncio.Task[None] | None = None
        self.loads = 0
        self.retention = retention
        self._prune_waiters: list[asyncio.Future[int]] = []
        self._pruned = 0  # rows removed by the pass under way
        #: each node's row version as this instance last wrote or read it
        self._versions: dict[str, int] = {}
        #: PostgreSQL: the write methods behind each pending change, in order
        self._ops: dict[str, list[_Op]] = {}
        self._remote: set[str] = set()  # UUIDs another instance wrote, to reload
        self._loading = False  # the index is being (re)built: NOTIFYs wait in _remote
        self._deleting: set[str] = set()  # deletes in the batch being committed
        self._bmcs_writing: set[str] = set()  # BMC rows in the batch being committed
        self._remote_task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:  # never the secret
        return f"Registry({len(self._nodes)} nodes)"

    # -- open and close -------------------------------------------------------
    @classmethod
    async def open(cls, data_dir: Path, *, secret: bytes, clock: Callable[[], float] = time.time,
                   synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
                   retention: EventRetention = EventRetention(), url: str | None = None,
                   instance: str | None = None) -> Registry:
        """The registry in ``data_dir`` (SQLite), or at ``url`` (``postgresql://...``)."""
        if is_postgresql(url):
            assert url is not None
            return await cls._open_pg(url, secret=secret, clock=clock, retention=retention,
                                      instance=instance)
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / DB_NAME
        db = await SqliteDb.connect(path)
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute(f"PRAGMA synchronous={synchronous}")
            await migrate(db)
            reader = await SqliteDb.connect(path)
        except BaseException:
            await db.close()
            raise
        self = cls(db, reader, secret=secret, clock=clock, path=path, location=str(path),
                   instance=instance, retention=retention)
        await self._load()
        self._writer_task = asyncio.create_task(self._writer(), name="registry-writer")
        return self

    @classmethod
    async def _open_pg(cls, url: str, *, secret: bytes, clock: Callable[[], float],
                       retention: EventRetention, instance: str | None) -> Registry:
        writer, reader = await pg_connect(url)
        self = cls(writer, reader, secret=secret, clock=clock, path=None,
                   location=redact(url), instance=instance, retention=retention)
        self._url = url
        try:
            await migrate(writer)
            # LISTEN before the load: nothing committed in between is missed
            self._listener = await pg_listen(url, CHANNEL, self._on_notify, self._listener_lost)
            await self._load()
        except BaseException:
            self._closing = True  # a listener ending now is no break to recover from
            if self._listener is not None:
                await self._listener.close()
            await reader.close()
            await writer.close()
            raise
        self._writer_task = asyncio.create_task(self._writer(), name="registry-writer")
        return self

    async def close(self) -> None:
        """Commit what is pending, stop the writer and close the database."""
        if self._closing:
            return
        with contextlib.suppress(RegistryError):
            await self.commit()
        self._closing = True
        self._wake.set()
        if self._writer_task is not None:
            await asyncio.gather(self._writer_task, return_exceptions=True)
        for w in self._prune_waiters:
            if not w.done():
                w.set_exception(RegistryError("registry is closed"))
        for task in (self._remote_task, self._relisten_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._listener is not None:
            with contextlib.suppress(*ENGINE_ERRORS, OSError):
                await self._listener.close()
        await self._reader.close()
        await self._db.close()

    async def _read(self, uuids: list[str] | None = None
                    ) -> tuple[dict[str, tuple[Node, int]], dict[str, BmcRecord]]:
        """The committed nodes (each with its MACs and row version) and BMCs: all of
        them, or those of ``uuids``; from one snapshot on PostgreSQL."""
        where = "" if uuids is None else " WHERE uuid = ANY(?::text[])"
        queries = [f"SELECT {', '.join(NODE_COLS)}, version FROM nodes{where}",
                   f"SELECT mac, uuid FROM macs{where} {self._mac_order}",
                   f"SELECT {', '.join(BMC_COLS)} FROM bmcs{where}"]
        if isinstance(self._reader, PgPool):
            node_rows, mac_rows, bmc_rows = await self._reader.snapshot(
                queries, () if uuids is None else (uuids,))  # type: ignore[arg-type]
        else:  # SQLite: one process, the whole file (uuids is PostgreSQL's alone)
            node_rows, mac_rows, bmc_rows = [await self._db.fetchall(q) for q in queries]
        nodes = {r[0]: (Node(**row_to_fields(r)), r[-1]) for r in node_rows}
        for mac, uuid in mac_rows:
            if uuid in nodes:
                nodes[uuid][0].macs.append(mac)
        bmcs = {}
        for r in bmc_rows:
            uuid, bmc = _bmc_record(r)
            if uuid in nodes:
                bmcs[uuid] = bmc
        return nodes, bmcs

    async def _load(self) -> None:
        """Build the index from disk, then swap it in whole: readers never see it half-built.
        Another instance's NOTIFYs that arrive meanwhile are applied after it."""
        self._loading = True
        try:
            rows, bmcs = await self._read()
        finally:
            self._loading = False
        nodes: dict[str, Node] = {}
        mac_index: dict[str, str] = {}
        by_state: dict[str, set[str]] = {s: set() for s in STATES}
        versions: dict[str, int] = {}
        for uuid, (node, version) in rows.items():
            nodes[uuid] = node
            versions[uuid] = version
            by_state.setdefault(node.state, set()).add(uuid)
            for mac in node.macs:
                mac_index[mac] = uuid
        self._nodes, self._mac_index, self._by_state = nodes, mac_index, by_state
        self._bmcs, self._versions = bmcs, versions
        #: how many times the index was (re)built from disk (a failed commit reloads it)
        self.loads += 1
        self._start_remote()

    # -- hot path reads -------------------------------------------------------
    def get(self, uuid: str) -> Node | None:
        return _lookup(self._nodes, uuid, normalise_uuid, normal_uuid_shape)

    def by_mac(self, mac: str) -> Node | None:
        uuid = _lookup(self._mac_index, mac, normalise_mac, normal_mac_shape)
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

    def in_state(self, state: str) -> list[Node]:
        """The nodes in one state (cost: those nodes only)."""
        return [self._nodes[u] for u in self._by_state.get(state, ())]

    def now(self) -> float:
        return self._clock()

    # -- writes: synchronous on the index; commit() makes them durable ----------
    def observe(self, uuid: str, *, mac: str | None, address: str | None, source: str,
                boot: bool = False, **identity: str | bool | None) -> Change:
        """A sighting: create in 'discovered' if new, update the given fields, count a boot.

        ``identity``: serial, vendor, product, asset, hostname, profile, secure_boot,
        arch (None: unchanged).
        """
        uuid = normalise_uuid(uuid)
        mac = normalise_mac(mac) if mac else None
        self._record(uuid, "observe", (uuid,), dict(mac=mac, address=address, source=source,
                                                    boot=boot, **identity))
        now = self._clock()
        old = self._nodes.get(uuid)
        if self.instance is not None:
            identity["instance"] = self.instance
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
                self._drop_mac(owner, mac)
            self._mac_index[mac] = uuid
            self._dirty_macs[mac] = (uuid, now)
        if boot:
            node.boot_count += 1
            node.cycle_start = now
            self._events.append((uuid, now, "boot", node.state, None, source, address, None))
        self._put(node, old)
        return Change(node, old)

    def _drop_mac(self, uuid: str, mac: str) -> None:
        """``mac`` moved to another node: no longer in ``uuid``'s list (an op of its own,
        so a lost race applies it again to the fresh row)."""
        prev = self._nodes.get(uuid)
        if prev is not None and mac in prev.macs:
            self._record(uuid, "_drop_mac", (uuid, mac), {})
            self._put(replace(prev, macs=[m for m in prev.macs if m != mac]))

    def set_state(self, uuid: str, state: str, *, source: str, address: str | None = None,
                  reason: str | None = None) -> Change:
        """Put a node in ``state`` with an event; the same state again only keeps the address.

        An unknown node is created first (in 'discovered', then moved).
        """
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}; states: {', '.join(STATES)}")
        uuid = normalise_uuid(uuid)
        now = self._clock()
        old = self._nodes.get(uuid)
        if old is None:
            old = self.observe(uuid, mac=None, address=address, source=source).node
        self._record(uuid, "set_state", (uuid, state), dict(source=source, address=address,
                                                            reason=reason))
        if old.state == state and (state != "error" or reason == old.reason):
            node = old
            if address and address != old.address:
                node = replace(old, address=address, last_seen=now)
                self._put(node, old)
            return Change(node, node)
        node = replace(old, state=state, state_since=now, last_seen=now,
                       reason=reason if state == "error" else None,
                       address=address or old.address, instance=self.instance or old.instance)
        if state == "installed":
            node.armed = False
            node.cycle_start = None
        self._put(node, old)
        self._events.append((uuid, now, "state", state, old.state, source, address,
                             reason if state == "error" else None))
        return Change(node, old)

    def patch(self, uuid: str, *, rearm: bool = False,
              labels: dict[str, str | None] | None = None, profile: str | None = None,
              hostname: str | None = None, assign: str | None = None,
              source: str = "admin") -> Change:
        """Admin changes. ``labels`` merges (a None value removes the key); ``assign`` sets
        the profile the node boots next ('' clears it). KeyError if unknown."""
        uuid = normalise_uuid(uuid)
        old = self._nodes.get(uuid)
        if old is None:
            raise KeyError(uuid)
        self._record(uuid, "patch", (uuid,), dict(rearm=rearm, labels=labels, profile=profile,
                                                  hostname=hostname, assign=assign,
                                                  source=source))
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
        if assign is not None and (assign or None) != old.assigned_profile:
            node.assigned_profile = assign or None
            changed.append(f"assigned profile {assign or '-'}")
        if not changed:
            return Change(old, old)
        self._put(node, old)
        kind = "rearm" if changed == ["rearm"] else "patch"
        self._events.append((uuid, now, kind, node.state, None, source, None, "; ".join(changed)))
        return Change(node, old)

    def add_event(self, uuid: str, kind: str, detail: str, *, source: str) -> None:
        """An event that changes no field (e.g. 'stuck')."""
        node = self._nodes.get(uuid)
        if node is not None:
            self._record(uuid, "add_event", (uuid, kind, detail), dict(source=source))
            self._events.append((uuid, self._clock(), kind, node.state, None, source, None,
                                 detail))

    def forget(self, uuid: str) -> Node | None:
        """Delete a node, its MACs and its history; the node as it was, or None."""
        uuid = normalise_uuid(uuid)
        node = self._nodes.pop(uuid, None)
        if node is None:
            return None
        self._by_state.get(node.state, set()).discard(uuid)
        for mac in node.macs:
            if self._mac_index.get(mac) == uuid:
                del self._mac_index[mac]
                self._dirty_macs[mac] = None
        self._dirty.discard(uuid)
        self._ops.pop(uuid, None)
        self._bmcs.pop(uuid, None)
        self._dirty_bmcs.discard(uuid)
        self._inventory = [i for i in self._inventory if i[0] != uuid]
        self._events = [e for e in self._events if e[0] != uuid]
        self._deleted.add(uuid)
        return node

    def set_bmc(self, uuid: str, bmc: BmcRecord | None) -> None:
        """A node's BMC (None: forget it). The node must exist."""
        uuid = normalise_uuid(uuid)
        if uuid not in self._nodes:
            raise KeyError(uuid)
        if bmc is None:
            self._bmcs.pop(uuid, None)
        else:
            self._bmcs[uuid] = replace(bmc, updated=bmc.updated or self._clock())
        self._dirty_bmcs.add(uuid)

    def bmc(self, uuid: str) -> BmcRecord | None:
        return _lookup(self._bmcs, uuid, normalise_uuid, normal_uuid_shape)

    def bmcs(self) -> dict[str, BmcRecord]:
        """Every node with a BMC (cost: those nodes only), uuid -> record."""
        return dict(self._bmcs)

    def set_inventory(self, uuid: str, data: dict[str, Any]) -> None:
        """What a commissioning OS reported (kept on disk only; read with inventory())."""
        uuid = normalise_uuid(uuid)
        self._inventory.append((uuid, self._clock(), json.dumps(data, sort_keys=True)))

    def add_audit(self, *, actor: str, role: str | None, action: str, target: str | None,
                  result: str, detail: str | None = None) -> None:
        """Who did what to which node, and how it ended (kept when a node is forgotten)."""
        self._audit.append((self._clock(), actor, role, action, target, result, detail))

    def commit(self) -> asyncio.Future[None]:
        """A future resolved once everything written so far is committed.

        Fails with RegistryError when the commit fails (the index is then reloaded).
        """
        return self._ask_writer(self._waiters)

    def _ask_writer(self, waiters: list[asyncio.Future[_T]]) -> asyncio.Future[_T]:
        """A future in ``waiters`` for the writer to resolve, and the writer woken."""
        fut: asyncio.Future[_T] = asyncio.get_running_loop().create_future()
        if self._closing:
            fut.set_exception(RegistryError("registry is closed"))
            return fut
        waiters.append(fut)
        self._wake.set()
        return fut

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

    async def page(self, where: NodeFilter | None = None, *, limit: int = DEFAULT_LIMIT,
                   cursor: str | None = None) -> NodePage:
        """A page of the nodes ``where`` picks, in list order (first sighting, then UUID),
        from ``cursor`` (a ``next_cursor`` or ``prev_cursor`` of an earlier page; None: the
        first page). CursorError (a ValueError) for a cursor this code did not make.

        What is pending is committed first; the nodes are the index's (newest) snapshots."""
        at = Cursor.decode(cursor) if cursor else None
        with contextlib.suppress(RegistryError):
            await self.commit()
        sql, args = page_sql(where or NodeFilter(), at, limit, self._db.dialect)
        rows = await self._reader.fetchall(sql, args)
        more = len(rows) > limit
        rows = rows[:limit]
        if at is not None and at.direction == "prev":
            rows.reverse()
            if not more and len(rows) < limit:  # back at the start: the full first page
                return await self.page(where, limit=limit)
            has_prev, has_next = more, True
        else:
            has_prev, has_next = at is not None, more
        return NodePage(
            nodes=[self._nodes[u] for u, _ in rows if u in self._nodes],
            next_cursor=Cursor(rows[-1][1], rows[-1][0]).encode() if has_next and rows else None,
            prev_cursor=(Cursor(rows[0][1], rows[0][0], "prev").encode()
                         if has_prev and rows else None))

    async def events(self, uuid: str, limit: int = EVENTS_SHOWN) -> list[dict[str, Any]]:
        """A node's latest ``limit`` events, oldest first (committed first, so nothing
        pending is missed). A node that boots in a loop has a long history; the answer
        stays a page (the events_uuid index, newest first)."""
        uuid = normalise_uuid(uuid)
        with contextlib.suppress(RegistryError):
            await self.commit()
        rows = await self._reader.fetchall(
            "SELECT id, time, kind, state, prev, source, address, detail FROM events "
            "WHERE uuid = ? ORDER BY id DESC LIMIT ?", (uuid, limit))
        return [dict(zip(EVENT_COLS, r)) for r in reversed(rows)]

    async def inventory(self, uuid: str) -> tuple[float, dict[str, Any]] | None:
        """(when, inventory) last reported for the node, or None."""
        uuid = normalise_uuid(uuid)
        with contextlib.suppress(RegistryError):
            await self.commit()
        rows = await self._reader.fetchall("SELECT time, data FROM inventory WHERE uuid = ?",
                                           (uuid,))
        return (rows[0][0], json.loads(rows[0][1])) if rows else None

    async def audit(self, *, target: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """The newest audit rows first, for one node (``target``) or all."""
        with contextlib.suppress(RegistryError):
            await self.commit()
        where, args = ("WHERE target = ?", (target,)) if target else ("", ())
        rows = await self._reader.fetchall(
            f"SELECT {', '.join(AUDIT_COLS)} FROM audit {where} ORDER BY id DESC LIMIT ?",
            (*args, max(1, min(limit, 10_000))))
        return [dict(zip(AUDIT_COLS, r)) for r in rows]

    # -- internals ------------------------------------------------------------
    def _put(self, node: Node, old: Node | None = None) -> None:
        if old is not None and old.state != node.state:
            self._by_state[old.state].discard(node.uuid)
        self._by_state.setdefault(node.state, set()).add(node.uuid)
        self._nodes[node.uuid] = node
        self._dirty.add(node.uuid)

    def _record(self, uuid: str, method: str, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> None:
        """Keep a write (PostgreSQL) to apply again should another instance win the row."""
        if self._fleet:
            self._ops.setdefault(uuid, []).append((method, args, kwargs))

    def _take(self) -> _Batch:
        """Everything pending, as rows. On PostgreSQL the rows that lock (nodes, MACs,
        BMCs, deletes, inventory) go in key order: instances sharing the registry then
        take their row locks in the same order and cannot deadlock on each other's
        batches (sorted stably: of two inventory reports, the later still wins). SQLite
        has one writer, and keeps the order things happened in (a node's MACs come back
        in the order it was seen with them)."""
        order: Callable[..., Any] = (lambda rows, key=None: sorted(rows, key=key)) \
            if self._fleet else (lambda rows, key=None: list(rows))
        batch = _Batch(
            nodes=[_node_row(self._nodes[u], self._versions.get(u, 0) + 1)
                   for u in order(self._dirty) if u in self._nodes],
            macs_set=order((m, v[0], v[1]) for m, v in self._dirty_macs.items()
                           if v is not None),
            macs_del=order((m,) for m, v in self._dirty_macs.items() if v is None),
            events=self._events, deleted=order((u,) for u in self._deleted),
            bmcs=[_bmc_row(u, self._bmcs.get(u)) for u in order(self._dirty_bmcs)],
            inventory=order(self._inventory, key=lambda i: i[0]), audit=self._audit)
        batch.ops, self._ops = self._ops, {}
        self._dirty, self._dirty_macs, self._events, self._deleted = set(), {}, [], set()
        self._dirty_bmcs, self._inventory, self._audit = set(), [], []
        return batch

    @property
    def _mac_order(self) -> str:
        """A node's MACs in the order it was seen with them."""
        return "ORDER BY rowid" if self._db.dialect == "sqlite" else "ORDER BY first_seen, mac"

    async def _upsert_nodes(self, db: Db, rows: list[tuple[Any, ...]]) -> set[str]:
        """Write the node rows; the UUIDs of those another instance had moved on (not
        written: PostgreSQL only)."""
        if not rows:
            return set()
        if db.dialect == "sqlite":
            await db.executemany(UPSERT_NODE, rows)
            return set()
        written = await db.fetchall(UPSERT_NODES_PG, [list(col) for col in zip(*rows)])
        return {r[0] for r in rows} - {r[0] for r in written}

    async def _write(self, b: _Batch) -> set[str]:
        """Commit a batch; the UUIDs whose write lost a race (to apply again). A
        transaction PostgreSQL aborted to break a deadlock or a serialization conflict
        with another instance is tried again, a few times, before it counts as failed."""
        for attempt in range(TRANSIENT_TRIES):
            try:
                return await self._write_once(b)
            except TRANSIENT_ERRORS as exc:
                if attempt == TRANSIENT_TRIES - 1:
                    raise
                self.stats.retries += 1
                log.debug("registry commit aborted by the database (%s); trying again", exc)
                await asyncio.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _write_once(self, b: _Batch) -> set[str]:
        async with self._db.transaction() as db:
            if b.deleted:  # in the order upserts lock: nodes, MACs, BMCs (then the rest)
                await db.executemany("DELETE FROM nodes WHERE uuid = ?", b.deleted)
                await db.executemany("DELETE FROM macs WHERE uuid = ?", b.deleted)
                await db.executemany("DELETE FROM bmcs WHERE uuid = ?", b.deleted)
                await db.executemany("DELETE FROM inventory WHERE uuid = ?", b.deleted)
                await db.executemany("DELETE FROM events WHERE uuid = ?", b.deleted)
            if b.macs_del:
                await db.executemany("DELETE FROM macs WHERE mac = ?", b.macs_del)
            lost = await self._upsert_nodes(db, b.nodes)
            if b.macs_set:
                await db.executemany(UPSERT_MAC, [m for m in b.macs_set if m[1] not in lost])
            if b.events:
                await db.executemany(INSERT_EVENT, [e for e in b.events if e[0] not in lost])
            for row in b.bmcs:
                if row[1] is None:
                    await db.execute("DELETE FROM bmcs WHERE uuid = ?", (row[0],))
                else:
                    await db.execute(UPSERT_BMC, row)
            if b.inventory:
                await db.executemany(UPSERT_INVENTORY, b.inventory)
            if b.audit:
                await db.executemany(INSERT_AUDIT, b.audit)
            if self._fleet:
                changed = sorted({r[0] for r in b.nodes} - lost | {d[0] for d in b.deleted}
                                 | {r[0] for r in b.bmcs})
                for i in range(0, len(changed), NOTIFY_UUIDS):  # delivered at COMMIT
                    await db.execute("SELECT pg_notify(?, ?)", (CHANNEL, " ".join(
                        [self._me, *changed[i:i + NOTIFY_UUIDS]])))
        self.stats.commits += 1
        for r in b.nodes:
            if r[0] not in lost:
                self._versions[r[0]] = r[-1]
        for (u,) in b.deleted:
            self._versions.pop(u, None)
        return lost

    # -- a fleet: other instances' commits (PostgreSQL) --------------------------
    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self._notified(payload)

    def _listener_lost(self, _conn: Any) -> None:
        """The LISTEN connection ended (the server restarted, the link broke): connect
        again, and resync, since what was committed meanwhile was not heard of."""
        if self._closing:
            return
        log.warning("registry: lost the LISTEN connection to %s; reconnecting (changes "
                    "other instances make meanwhile are read once it is back)", self.location)
        if self._relisten_task is None or self._relisten_task.done():
            self._relisten_task = asyncio.get_running_loop().create_task(
                self._relisten(), name="registry-relisten")

    async def _relisten(self) -> None:
        assert self._url is not None
        delay = 0.5
        while not self._closing:
            try:
                self._listener = await pg_listen(self._url, CHANNEL, self._on_notify,
                                                 self._listener_lost)
            except (OSError, TimeoutError, *ENGINE_ERRORS) as exc:
                log.debug("registry: LISTEN again failed: %s; next try in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            self.stats.relistens += 1
            log.warning("registry: listening to %s again; resyncing the index",
                        self.location)
            self._stale = True
            self._wake.set()  # the writer resyncs before its next commit
            return

    async def _resync(self) -> None:
        """Every row from the database in place of the index's, the writes still pending
        applied again on top (a scan: only after a break, never per request)."""
        self._loading = True
        try:
            fresh, bmcs = await self._read()
        finally:
            self._loading = False
        for u in sorted(set(fresh) | set(self._nodes)):
            change = self._swap(u, fresh.get(u), bmcs.get(u), force=True)
            if change is not None and change.moved:
                self._tell_remote(change)
        self._stale = False
        self.stats.resyncs += 1
        self._start_remote()

    def _notified(self, payload: str) -> None:
        """A NOTIFY on CHANNEL: another instance committed these nodes; reload them."""
        sender, *uuids = payload.split()
        if sender == self._me or self._closing:
            return
        self._remote.update(uuids)
        self._start_remote()

    def _start_remote(self) -> None:
        """Reload what other instances changed, unless the index is being rebuilt (then
        after it: a rebuild's snapshot may predate the change)."""
        if self._remote and not self._loading and not self._closing and (
                self._remote_task is None or self._remote_task.done()):
            self._remote_task = asyncio.get_running_loop().create_task(
                self._reload_remote(), name="registry-remote")

    async def _reload_remote(self) -> None:
        while self._remote and not self._closing and not self._loading:
            uuids, self._remote = sorted(self._remote), set()
            try:
                fresh, bmcs = await self._read(uuids)
            except Exception as exc:
                log.warning("reloading %d node(s) another instance changed failed: %s; "
                            "resyncing before the next commit", len(uuids), exc)
                self._stale = True
                self._wake.set()
                return
            if self._loading:  # a rebuild began meanwhile: these go after it
                self._remote.update(uuids)
                return
            for u in uuids:
                change = self._swap(u, fresh.get(u), bmcs.get(u))
                self.stats.remote_reloads += 1
                if change is not None:
                    self._tell_remote(change)
            if self._has_pending():
                self._wake.set()

    def _has_pending(self) -> bool:
        """Anything written to the index and not yet handed to the writer."""
        return bool(self._dirty or self._dirty_macs or self._events or self._deleted
                    or self._dirty_bmcs or self._inventory or self._audit)

    async def _rebase(self, lost: set[str], ops: dict[str, list[_Op]]) -> None:
        """Writes another instance overtook: the fresh rows, then the writes again."""
        self.stats.conflicts += len(lost)
        log.debug("%d node write(s) overtaken by another instance; applying them again",
                  len(lost))
        fresh, bmcs = await self._read(sorted(lost))
        for u in sorted(lost):
            self._swap(u, fresh.get(u), bmcs.get(u), ops.get(u, []), force=True)

    def _tell_remote(self, change: Change) -> None:
        """Another instance's change, to ``on_remote`` (a failing listener is logged)."""
        if self.on_remote is not None:
            try:
                self.on_remote(change)
            except Exception:
                log.exception("registry on_remote listener failed")

    def _swap(self, uuid: str, fresh: tuple[Node, int] | None, bmc: BmcRecord | None,
              replay: list[_Op] | None = None, *, force: bool = False) -> Change | None:
        """Put a node's committed row in the index in place of this instance's view, then
        apply this instance's writes not yet in that row on top: ``replay`` (a batch that
        lost its race) and what is pending. A row no newer than the one this instance last
        wrote or read is stale news, and only its BMC is taken (a BMC change does not
        move the node's version); ``force`` takes it anyway (a resync). A node this
        instance is deleting is left alone."""
        if uuid in self._deleted or uuid in self._deleting:
            return None
        # a BMC row is as new as the fetch that read it, unless this instance's own change
        # to it is pending or being committed
        if uuid not in self._dirty_bmcs and uuid not in self._bmcs_writing:
            if bmc is None:
                self._bmcs.pop(uuid, None)
            elif uuid in self._nodes or fresh is not None:
                self._bmcs[uuid] = bmc
        version = fresh[1] if fresh is not None else None
        known = self._versions.get(uuid)
        mine = self._nodes.get(uuid)
        if (not force and not replay and version is not None and known is not None
                and version <= known and mine is not None
                and mine.first_seen == fresh[0].first_seen):  # type: ignore[index]
            return None  # (a node forgotten and seen again starts at version 1 again)
        replay = [*(replay or []), *self._ops.pop(uuid, [])]
        old = self._nodes.pop(uuid, None)
        if old is not None:
            self._by_state.get(old.state, set()).discard(uuid)
            for mac in old.macs:
                if self._mac_index.get(mac) == uuid:
                    del self._mac_index[mac]
        self._dirty.discard(uuid)
        if replay:  # the replay makes them again
            self._events = [e for e in self._events if e[0] != uuid]
        if fresh is None:
            self._versions.pop(uuid, None)
        else:
            node, self._versions[uuid] = fresh
            self._nodes[uuid] = node
            self._by_state.setdefault(node.state, set()).add(uuid)
            for mac in node.macs:
                self._mac_index[mac] = uuid
        for method, args, kwargs in replay:
            try:
                getattr(self, method)(*args, **kwargs)
            except (KeyError, ValueError, IdentityError) as exc:  # e.g. patch of a node gone
                log.info("registry: %s of %s not applied again after another instance's "
                         "change: %s", method, uuid, exc)
        node = self._nodes.get(uuid)
        return None if node is None else Change(node, old)

    def prune_events(self) -> asyncio.Future[int]:
        """Run a retention pass now (the writer runs one every ``retention.every`` s); the
        future gives the number of rows it removed (events and audit)."""
        return self._ask_writer(self._prune_waiters)

    async def _prune_batch(self) -> int:
        """Delete up to ``retention.batch`` rows in one transaction: events first, then
        audit rows with what is left of the batch (each table by its own limits)."""
        r = self.retention
        async with self._db.transaction() as db:
            events = await self._prune_table(db, "events", r.max_rows, r.max_age, r.batch)
            audit = 0
            if events < r.batch:
                audit = await self._prune_table(db, "audit", r.audit_max_rows, r.audit_max_age,
                                                r.batch - events)
        self.stats.prune_batches += 1
        self.stats.events_pruned += events
        self.stats.audit_pruned += audit
        return events + audit

    async def _prune_table(self, db: Db, table: str, max_rows: int,
                           max_age: float, budget: int) -> int:
        """Delete up to ``budget`` rows of ``table`` (events or audit), oldest ids first:
        beyond ``max_rows`` below the newest id, then older than ``max_age`` (by the
        injected clock). Ids grow with time, so the age check looks only at the oldest
        rows: the scan is bounded."""
        row = (await db.fetchall(f"SELECT max(id) FROM {table}"))[0]  # noqa: S608
        if row[0] is None:
            return 0
        removed = await db.execute(
            f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE id <= ? "  # noqa: S608
            "ORDER BY id LIMIT ?)", (row[0] - max_rows, budget))
        if removed < budget:
            removed += await db.execute(
                f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} ORDER BY id "  # noqa: S608
                "LIMIT ?) AND time < ?", (budget - removed, self._clock() - max_age))
        return removed

    async def _prune_step(self) -> bool:
        """One batch of the pass under way; True while there is more to remove."""
        try:
            removed = await self._prune_batch()
        except Exception as exc:
            log.warning("pruning old events and audit rows failed: %s; next try in %.0f s", exc,
                        self.retention.every)
            removed, failed = 0, exc
        else:
            failed = None
        self._pruned += removed
        if failed is None and removed >= self.retention.batch:
            return True
        waiters, self._prune_waiters, total, self._pruned = self._prune_waiters, [], self._pruned, 0
        for w in waiters:
            if w.done():
                continue
            if failed is not None:
                w.set_exception(RegistryError(f"pruning events failed: {failed}"))
            else:
                w.set_result(total)
        return False

    async def _writer(self) -> None:
        """The one task that writes: takes everything pending, commits it, wakes the callers;
        between commits, the retention pass (one bounded batch at a time)."""
        loop = asyncio.get_running_loop()
        prune_at = loop.time() + self.retention.every
        pruning = False
        while True:
            if not pruning:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), max(0.0, prune_at - loop.time()))
            self._wake.clear()
            if self._stale and self._fleet:
                try:
                    await self._resync()
                except Exception as exc:
                    log.debug("registry resync failed: %s; trying again later", exc)
            waiters, self._waiters = self._waiters, []
            batch = self._take()
            self._deleting = {u for (u,) in batch.deleted}
            self._bmcs_writing = {row[0] for row in batch.bmcs}
            try:
                try:
                    lost = await self._write(batch) if batch else set()
                finally:
                    self._deleting, self._bmcs_writing = set(), set()
                if lost:
                    await self._rebase(lost, batch.ops)
                    if self._has_pending():  # the writes applied again: callers wait for them
                        self._waiters = waiters + self._waiters
                        self._wake.set()
                        continue
            except Exception as exc:
                self.stats.commit_failures += 1
                log.debug("registry commit failed: %s; reloading the index from disk", exc)
                try:
                    await self._load()
                except Exception as reload_exc:
                    self._stale = True  # PostgreSQL: resynced once the database answers
                    log.error("registry reload failed: %s", reload_exc)
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
            if pruning or self._prune_waiters or loop.time() >= prune_at:
                pruning = await self._prune_step()
                if not pruning:
                    prune_at = loop.time() + self.retention.every
