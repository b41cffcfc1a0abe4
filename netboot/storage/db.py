"""The two database engines behind the registry, as one small interface.

The registry writes one SQL text for both engines: ``?`` placeholders (turned into
``$1, $2, ...`` for PostgreSQL) and the syntax both understand (``INSERT ... ON
CONFLICT DO UPDATE``, row values, ``LIMIT``). What differs is kept here and in
:mod:`.schema`'s dialect tokens, nowhere else:

- **SQLite** (the embedded default): ``aiosqlite``, one connection that writes and
  one that reads, WAL. One process per file.
- **PostgreSQL** (a fleet of instances sharing one registry): ``asyncpg``, a
  connection that writes, a small pool that reads, and a connection that LISTENs
  for other instances' commits (:mod:`.registry` keeps its index current with them).

asyncpg rather than psycopg 3: it is asyncio-native (no libpq, no thread hop per
query), ``add_listener`` delivers NOTIFY on the event loop, and it binds arrays
(``unnest``), which lets one statement upsert a whole batch and say which rows it
wrote. Both are well kept; this is the one the registry's shape wants.
"""

from __future__ import annotations

import contextlib
import functools
import re
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

import aiosqlite

Dialect = Literal["sqlite", "postgresql"]


class Db(Protocol):
    """One connection's worth of what the registry asks of an engine."""

    dialect: Dialect

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run one statement; the number of rows it changed."""

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    async def fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    def transaction(self) -> contextlib.AbstractAsyncContextManager[Db]:
        """BEGIN (a write lock for SQLite); COMMIT, or ROLLBACK on any error."""

    async def close(self) -> None: ...


#: what a failing engine raises (besides RegistryError and OSError)
ENGINE_ERRORS: tuple[type[BaseException], ...] = (sqlite3.Error,)
#: what the database aborts a transaction with that a second try may pass
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = ()
try:  # asyncpg is a dependency; the guard keeps SQLite usable if a site removed it
    import asyncpg

    ENGINE_ERRORS = (sqlite3.Error, asyncpg.PostgresError, asyncpg.InterfaceError)
    TRANSIENT_ERRORS = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
except ImportError:  # pragma: no cover
    asyncpg = None  # type: ignore[assignment]


class SqliteDb:
    """aiosqlite, autocommit off (``isolation_level=None``: the registry says BEGIN)."""

    dialect: Dialect = "sqlite"

    def __init__(self, conn: aiosqlite.Connection):
        self.conn = conn

    @classmethod
    async def connect(cls, path: Path) -> SqliteDb:
        conn = await aiosqlite.connect(path, isolation_level=None)
        try:
            await conn.execute("PRAGMA busy_timeout=5000")
        except BaseException:
            await conn.close()
            raise
        return cls(conn)

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        cur = await self.conn.execute(sql, args)
        return max(0, cur.rowcount)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self.conn.executemany(sql, rows)

    async def fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        async with self.conn.execute(sql, args) as cur:
            return [tuple(r) for r in await cur.fetchall()]

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqliteDb]:
        await self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self
            await self.conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):  # keep the first error, not this one
                await self.conn.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        await self.conn.close()


_PLACEHOLDER = re.compile(r"\?")


@functools.lru_cache(maxsize=256)
def pg_sql(sql: str) -> str:
    """``?`` placeholders as ``$1, $2, ...`` (the registry's SQL has no ``?`` in literals)."""
    n = 0

    def number(_: re.Match[str]) -> str:
        nonlocal n
        n += 1
        return f"${n}"

    return _PLACEHOLDER.sub(number, sql)


class PgDb:
    """One asyncpg connection (the writer, or the migration's). With ``url``, a
    connection found closed (the server restarted, the link broke) is replaced on its
    next use: the statement that met the break fails, the next one reconnects."""

    dialect: Dialect = "postgresql"

    def __init__(self, conn: Any, url: str | None = None):
        self.conn = conn
        self.url = url
        self.reconnects = 0
        self._in_tx = False

    async def _c(self) -> Any:
        """The connection; a closed one replaced, but never inside a transaction (the
        rest of it must not run, autocommitted, on a new connection)."""
        if self.url is not None and not self._in_tx and self.conn.is_closed():
            self.conn = await asyncpg.connect(self.url, timeout=10)
            self.reconnects += 1
        return self.conn

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        status = await (await self._c()).execute(pg_sql(sql), *args)
        tail = status.rsplit(" ", 1)[-1] if isinstance(status, str) else ""
        return int(tail) if tail.isdigit() else 0

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = list(rows)
        if rows:
            await (await self._c()).executemany(pg_sql(sql), rows)

    async def fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in await (await self._c()).fetch(pg_sql(sql), *args)]

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[PgDb]:
        async with (await self._c()).transaction():
            self._in_tx = True
            try:
                yield self
            finally:
                self._in_tx = False

    async def close(self) -> None:
        await self.conn.close()


class PgPool:
    """Reads from a small pool, so a slow page never waits behind the writer."""

    dialect: Dialect = "postgresql"

    def __init__(self, pool: Any):
        self.pool = pool

    async def fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        async with self.pool.acquire() as conn:
            return [tuple(r) for r in await conn.fetch(pg_sql(sql), *args)]

    async def snapshot(self, queries: list[str | tuple[str, Sequence[Any]]],
                       args: Sequence[Any] = ()) -> list[list[tuple[Any, ...]]]:
        """Several SELECTs from one snapshot (REPEATABLE READ); a query without its own
        arguments takes ``args``."""
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read",
                                                                 readonly=True):
            out = []
            for q in queries:
                sql, a = q if isinstance(q, tuple) else (q, args)
                out.append([tuple(r) for r in await conn.fetch(pg_sql(sql), *a)])
            return out

    async def close(self) -> None:
        await self.pool.close()


def is_postgresql(url: str | None) -> bool:
    return bool(url) and urlsplit(str(url)).scheme in ("postgresql", "postgres")


_URL_PASSWORD = re.compile(r"(://[^:/@?#]*):[^@/?#]*@")
_QUERY_PASSWORD = re.compile(r"([?&](?:password|passfile)=)[^&#]*", re.IGNORECASE)


def redact(url: str) -> str:
    """The URL without its password (``user:password@`` or ``?password=``), for logs,
    errors and /health. Text only: a URL with several hosts (h1:5432,h2:5433) is fine."""
    return _QUERY_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1:***@", url))


async def pg_connect(url: str) -> tuple[PgDb, PgPool]:
    """The writer (reconnecting) and the reader pool (asyncpg's pool replaces a broken
    connection by itself)."""
    if asyncpg is None:  # pragma: no cover
        raise RuntimeError("a postgresql:// registry needs asyncpg (pip install asyncpg)")
    writer = PgDb(await asyncpg.connect(url, timeout=10), url)
    try:
        pool = await asyncpg.create_pool(url, min_size=1, max_size=4, timeout=10)
    except BaseException:
        await writer.close()
        raise
    return writer, PgPool(pool)


async def pg_listen(url: str, channel: str, on_notify: Callable[..., Any],
                    on_lost: Callable[[Any], None]) -> Any:
    """A connection LISTENing on ``channel``; ``on_lost`` is called if it terminates."""
    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.add_listener(channel, on_notify)
        conn.add_termination_listener(on_lost)
    except BaseException:
        await conn.close()
        raise
    return conn
