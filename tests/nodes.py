"""Registry writes made durable in one call, for setting up a test's nodes; a clock.

The registry's write methods change its index and return at once; these wait for
the commit as well, like an acknowledged API call does."""

from __future__ import annotations

from typing import Any

from netboot.storage.registry import Node, Registry


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
