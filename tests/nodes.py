"""Registry writes made durable in one call, for setting up a test's nodes; a clock.

The registry's write methods change its index and return at once; these wait for
the commit as well, like an acknowledged API call does."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netboot.storage.registry import DB_NAME, MIGRATIONS, Node, Registry


class Clock:
    """A clock the test moves by hand (``clock.t += 61``)."""

    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@dataclass
class RegistryPlace:
    """Where a test's registry lives, on either engine (the ``regdb`` fixture): the same
    place on every ``open()``, so a test can close and reopen it."""

    backend: str  # sqlite | postgresql
    data_dir: Path
    url: str | None = None

    async def open(self, *, secret: bytes = b"test-secret", **kw: Any) -> Registry:
        return await Registry.open(self.data_dir, secret=secret, url=self.url, **kw)

    async def rows(self, sql: str) -> list[tuple[Any, ...]]:
        """A query straight to the database, past the registry (what is really stored)."""
        if self.url is None:
            import sqlite3

            db = sqlite3.connect(self.data_dir / DB_NAME)
            try:
                return [tuple(r) for r in db.execute(sql)]
            finally:
                db.close()
        import asyncpg

        conn = await asyncpg.connect(self.url)
        try:
            return [tuple(r) for r in await conn.fetch(sql)]
        finally:
            await conn.close()

    async def refuse_writes(self, reg: Registry, refuse: bool) -> None:
        """Fault injection: make every write of ``reg`` fail (no public path makes either
        engine refuse writes; root ignores file modes)."""
        if self.url is None:
            await reg._db.execute(f"PRAGMA query_only = {int(refuse)}")
        else:
            await reg._db.execute(
                f"SET default_transaction_read_only = {'on' if refuse else 'off'}")


async def observe(reg: Registry, uuid: str, **kw: Any) -> Node:
    kw.setdefault("mac", None)
    kw.setdefault("address", None)
    kw.setdefault("source", "test")
    change = reg.observe(uuid, **kw)
    await reg.commit()
    return reg.get(change.node.uuid) or change.node


async def transition(reg: Registry, uuid: str, state: str, **kw: Any) -> Node:
    kw.setdefault("source", "test")
    change = reg.set_state(uuid, state, **kw)
    await reg.commit()
    return reg.get(change.node.uuid) or change.node


async def patch(reg: Registry, uuid: str, **kw: Any) -> Node:
    change = reg.patch(uuid, **kw)
    await reg.commit()
    return reg.get(change.node.uuid) or change.node


async def forget(reg: Registry, uuid: str) -> bool:
    node = reg.forget(uuid)
    await reg.commit()
    return node is not None


def uuid_of(i: int) -> str:
    """The UUID of ``populate``'s node ``i``."""
    return f"10000000-0000-0000-0000-{i:012x}"


async def populate(reg: Registry, n: int, *, clock: Clock | None = None) -> list[str]:
    """``n`` nodes in one commit, through the registry's own writes: node ``i`` has serial
    ``SN-{i:05d}``, hostname ``node{i}.lab``, MAC ``52:54:00:00:<i>`` and profile flatcar
    (every third) or coreos. With ``clock``, two nodes per tick (so the UUID breaks ties).
    Returns their UUIDs in list order."""
    for i in range(n):
        if clock is not None and i % 2 == 0:
            clock.t += 1
        reg.observe(uuid_of(i), mac=f"52:54:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:"
                    f"{i & 255:02x}", address=None, source="test", serial=f"SN-{i:05d}",
                    hostname=f"node{i}.lab", profile="coreos" if i % 3 else "flatcar")
    await reg.commit()
    return [uuid_of(i) for i in range(n)]


async def old_registry(place: Path | RegistryPlace, version: int,
                       *rows: tuple[str, tuple[Any, ...]]) -> None:
    """A registry at schema ``version`` holding ``rows`` (SQL, parameters), as an older
    netboot left it: the next Registry.open() migrates it. ``place``: a data dir (SQLite)
    or a RegistryPlace on either engine."""
    from netboot.storage.db import Db, PgDb, SqliteDb

    url = place.url if isinstance(place, RegistryPlace) else None
    data_dir = place.data_dir if isinstance(place, RegistryPlace) else place
    db: Db
    if url is None:
        db = await SqliteDb.connect(data_dir / "registry.sqlite3")
    else:
        import asyncpg

        db = PgDb(await asyncpg.connect(url))
    try:
        for m in MIGRATIONS[:version]:
            await m(db)
        if url is None:
            await db.execute(f"PRAGMA user_version = {version}")
        else:
            await db.execute("CREATE TABLE netboot_schema (version INTEGER NOT NULL)")
            await db.execute("INSERT INTO netboot_schema (version) VALUES (?)", (version,))
        for sql, params in rows:
            await db.execute(sql, params)
    finally:
        await db.close()
