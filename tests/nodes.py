"""Registry writes made durable in one call, for setting up a test's nodes; a clock.

The registry's write methods change its index and return at once; these wait for
the commit as well, like an acknowledged API call does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from netboot.storage.registry import MIGRATIONS, Node, Registry


class Clock:
    """A clock the test moves by hand (``clock.t += 61``)."""

    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


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


async def old_registry(data_dir: Path, version: int,
                       *rows: tuple[str, tuple[Any, ...]]) -> None:
    """A registry file at schema ``version`` holding ``rows`` (SQL, parameters), as an
    older netboot left it: the next Registry.open() migrates it."""
    import aiosqlite

    async with aiosqlite.connect(data_dir / "registry.sqlite3", isolation_level=None) as db:
        for m in MIGRATIONS[:version]:
            await m(db)
        await db.execute(f"PRAGMA user_version = {version}")
        for sql, params in rows:
            await db.execute(sql, params)
