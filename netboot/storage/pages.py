"""Pages of the node list: keyset pagination in list order, (first_seen, uuid).

A cursor is the key of the row a page ended (or began) at and the direction to go
from it, base64url-encoded JSON: opaque to clients, stable while nodes come and
go (no OFFSET: a page never skips or repeats a row because one was added before
it), and independent of the filters. The SQL walks an index in that order and
stops after ``limit + 1`` rows, so a page costs what it returns; the ``q=``
substring scan reads the covering index ``nodes_page`` (schema v3) and nothing
else, and stops as soon as the page is full.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from .db import Dialect
from .schema import RegistryError

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_QUERY = 256

Direction = Literal["next", "prev"]
_DIRECTIONS: dict[str, Direction] = {"n": "next", "p": "prev"}


class CursorError(ValueError):
    """A cursor this server did not hand out (or one mangled on the way)."""


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a page starts: after (``next``) or before (``prev``) the key."""

    first_seen: float
    uuid: str
    direction: Direction = "next"

    def encode(self) -> str:
        raw = json.dumps([self.direction[0], self.first_seen, self.uuid], separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        bad = CursorError("cursor is not one this server handed out; start from the first "
                          "page (no cursor=) and follow next_cursor / prev_cursor")
        if len(text) > 400:
            raise bad
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            d, first_seen, uuid = json.loads(raw)
        except (binascii.Error, ValueError, TypeError):
            raise bad from None
        if (d not in _DIRECTIONS or not isinstance(uuid, str) or len(uuid) > 64
                or isinstance(first_seen, bool) or not isinstance(first_seen, int | float)
                or not math.isfinite(first_seen)):
            raise bad
        return cls(float(first_seen), uuid, _DIRECTIONS[d])


@dataclass(frozen=True, slots=True)
class NodeFilter:
    """Which nodes a list shows. ``q``: a substring of the serial, hostname or a MAC (with
    or without colons), any case. ``label``: ``key=value``, or ``key`` (has the key)."""

    state: str | None = None
    profile: str | None = None
    label: str | None = None
    q: str | None = None


def search_text(serial: str | None, hostname: str | None, macs: list[str]) -> str:
    """The ``search`` column of a node row: what ``q=`` matches (see schema._m3_node_pages)."""
    parts = [serial or "", hostname or ""]
    for mac in macs:
        parts += [mac, mac.replace(":", "")]
    return "\t".join(parts).lower()


def _like(text: str) -> str:
    escaped = text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def page_sql(f: NodeFilter, cursor: Cursor | None, limit: int,
             dialect: Dialect = "sqlite") -> tuple[str, list[Any]]:
    """SELECT uuid, first_seen of up to ``limit + 1`` rows from ``cursor`` in its direction
    (one more than the page: whether another page follows)."""
    if not 1 <= limit <= MAX_LIMIT:
        raise RegistryError(f"limit {limit} is outside 1..{MAX_LIMIT}")  # callers check first
    where: list[str] = []
    args: list[Any] = []
    back = cursor is not None and cursor.direction == "prev"
    if cursor is not None:
        where.append(f"(first_seen, uuid) {'<' if back else '>'} (?, ?)")
        args += [cursor.first_seen, cursor.uuid]
    if f.state is not None:
        where.append("state = ?")
        args.append(f.state)
    if f.profile is not None:
        where.append("profile = ?")
        args.append(f.profile)
    if f.q:
        where.append("search LIKE ? ESCAPE '\\'")
        args.append(_like(f.q))
    if f.label is not None:
        key, sep, value = f.label.partition("=")
        if dialect == "postgresql":  # labels is JSON text (one schema for both engines)
            where.append("(nodes.labels::jsonb ->> ?) = ?" if sep
                         else "jsonb_exists(nodes.labels::jsonb, ?)")
            args += [key, value] if sep else [key]
        elif sep:
            where.append("EXISTS (SELECT 1 FROM json_each(nodes.labels) "
                         "WHERE key = ? AND value = ?)")
            args += [key, value]
        else:
            where.append("EXISTS (SELECT 1 FROM json_each(nodes.labels) WHERE key = ?)")
            args.append(key)
    order = "DESC" if back else "ASC"
    sql = (f"SELECT uuid, first_seen FROM nodes {'WHERE ' + ' AND '.join(where) if where else ''}"
           f" ORDER BY first_seen {order}, uuid {order} LIMIT ?")
    return sql, [*args, limit + 1]
