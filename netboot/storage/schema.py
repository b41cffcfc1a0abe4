"""The registry's schema: tables, columns and migrations (append only)."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiosqlite

log = logging.getLogger("netboot.registry")


class RegistryError(RuntimeError):
    """A write could not be committed, or the file cannot be used."""


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


async def _m2_bmc_inventory_audit(db: aiosqlite.Connection) -> None:
    """BMC credentials (the password sealed with the server secret), the last inventory a
    commissioning OS reported, and who did what (kept when a node is forgotten)."""
    await _script(db, """
        ALTER TABLE nodes ADD COLUMN assigned_profile TEXT;
        CREATE TABLE bmcs (
            uuid TEXT PRIMARY KEY, driver TEXT NOT NULL, address TEXT NOT NULL, port INTEGER,
            username TEXT NOT NULL DEFAULT '', secret BLOB, system TEXT,
            source TEXT NOT NULL, updated REAL NOT NULL,
            verify_tls INTEGER NOT NULL DEFAULT 0
        );
        CREATE TABLE inventory (
            uuid TEXT PRIMARY KEY, time REAL NOT NULL, data TEXT NOT NULL
        );
        CREATE TABLE audit (
            id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, actor TEXT NOT NULL,
            role TEXT, action TEXT NOT NULL, target TEXT, result TEXT NOT NULL, detail TEXT
        );
        CREATE INDEX audit_target ON audit(target, id);
    """)


async def _m3_node_pages(db: aiosqlite.Connection) -> None:
    """Keyset pages of the node list: ``search`` (serial, hostname and MACs, lower case, tab
    separated; written with every node row) and indexes in list order, (first_seen, uuid).
    ``nodes_page`` covers the ``q=`` substring scan, so it reads no table rows."""
    await _script(db, """
        ALTER TABLE nodes ADD COLUMN search TEXT NOT NULL DEFAULT '';
        UPDATE nodes SET search = lower(coalesce(serial, '') || char(9) ||
            coalesce(hostname, '') || coalesce((SELECT char(9) || group_concat(
                mac || char(9) || replace(mac, ':', ''), char(9))
            FROM macs WHERE macs.uuid = nodes.uuid), ''));
        CREATE INDEX nodes_page ON nodes(first_seen, uuid, search);
        CREATE INDEX nodes_state ON nodes(state, first_seen, uuid);
        CREATE INDEX nodes_profile ON nodes(profile, first_seen, uuid);
    """)


async def _m4_secure_boot(db: aiosqlite.Connection) -> None:
    """Whether the node last booted with Secure Boot on, as its OS read the SecureBoot EFI
    variable: 1, 0, or NULL (not reported: BIOS, or an OS that does not say)."""
    await db.execute("ALTER TABLE nodes ADD COLUMN secure_boot INTEGER")


async def _m5_arch(db: aiosqlite.Connection) -> None:
    """The CPU architecture the node last booted a kernel for (``amd64``, ``arm64``),
    from the loader that asked; NULL before its first boot."""
    await db.execute("ALTER TABLE nodes ADD COLUMN arch TEXT")


# Ordered; migration i+1 brings the schema from user_version i to i+1. Append only.
MIGRATIONS: list[Callable[[aiosqlite.Connection], Awaitable[None]]] = [
    _m1_initial, _m2_bmc_inventory_audit, _m3_node_pages, _m4_secure_boot, _m5_arch]

NODE_COLS = ("uuid", "serial", "vendor", "product", "asset", "address", "hostname", "profile",
             "labels", "boot_count", "first_seen", "last_seen", "state", "state_since",
             "reason", "armed", "cycle_start", "assigned_profile", "secure_boot", "arch")
#: what a node row is written with: its columns, then ``search`` (see _m3_node_pages)
UPSERT_NODE = (f"INSERT OR REPLACE INTO nodes ({', '.join(NODE_COLS)}, search) "
               f"VALUES ({', '.join('?' * (len(NODE_COLS) + 1))})")
UPSERT_MAC = ("INSERT INTO macs (mac, uuid, first_seen) VALUES (?, ?, ?) "
              "ON CONFLICT(mac) DO UPDATE SET uuid = excluded.uuid")
INSERT_EVENT = ("INSERT INTO events (uuid, time, kind, state, prev, source, address, detail) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
EVENT_COLS = ("id", "time", "kind", "state", "from", "source", "address", "detail")
BMC_COLS = ("uuid", "driver", "address", "port", "username", "secret", "system", "source",
            "updated", "verify_tls")
UPSERT_BMC = (f"INSERT OR REPLACE INTO bmcs ({', '.join(BMC_COLS)}) "
              f"VALUES ({', '.join('?' * len(BMC_COLS))})")
UPSERT_INVENTORY = "INSERT OR REPLACE INTO inventory (uuid, time, data) VALUES (?, ?, ?)"
AUDIT_COLS = ("id", "time", "actor", "role", "action", "target", "result", "detail")
INSERT_AUDIT = ("INSERT INTO audit (time, actor, role, action, target, result, detail) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)")

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


def row_to_fields(row: tuple[Any, ...]) -> dict[str, Any]:
    d = dict(zip(NODE_COLS, row))
    d["labels"] = json.loads(d["labels"])
    d["armed"] = bool(d["armed"])
    d["secure_boot"] = None if d["secure_boot"] is None else bool(d["secure_boot"])
    return d
