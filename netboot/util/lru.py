"""One bounded mapping that forgets the least recently used entry."""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Lru(Generic[K, V]):
    """A dict bounded to ``limit`` entries; ``put`` and ``touch`` mark an entry recent.

    An OrderedDict underneath: evicting the oldest entry of a plain dict slows
    down as deletions pile up, OrderedDict's ``popitem(last=False)`` does not.
    ``get`` does not reorder (the hot paths read far more than they write).
    """

    __slots__ = ("_d", "limit")

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError("an LRU needs room for at least one entry")
        self.limit = limit
        self._d: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K, default: V | None = None) -> V | None:
        return self._d.get(key, default)

    def touch(self, key: K) -> V | None:
        """The value, marked as recently used."""
        value = self._d.get(key)
        if value is not None:
            self._d.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        d = self._d
        d[key] = value
        d.move_to_end(key)
        if len(d) > self.limit:
            d.popitem(last=False)

    def pop(self, key: K, default: V | None = None) -> V | None:
        return self._d.pop(key, default)

    def clear(self) -> None:
        self._d.clear()

    def __contains__(self, key: object) -> bool:
        return key in self._d

    def __len__(self) -> int:
        return len(self._d)

    def __repr__(self) -> str:  # sizes only: values may hold secrets
        return f"Lru({len(self._d)}/{self.limit})"
