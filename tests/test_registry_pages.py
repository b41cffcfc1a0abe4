"""Pages of the node list (keyset cursors, filters, search) and the events' retention,
each against both engines (a real SQLite file, a real PostgreSQL database: ``regdb``)."""

from __future__ import annotations

import pytest

from netboot.storage.pages import Cursor, CursorError
from netboot.storage.registry import EventRetention, NodeFilter, Registry
from tests.nodes import (
    Clock,
    RegistryPlace,
    forget,
    observe,
    old_registry,
    patch,
    populate,
    uuid_of,
)

SECRET = b"test-secret"


async def _walk(reg: Registry, where: NodeFilter, limit: int) -> tuple[list[str], list[str]]:
    """Every page forwards, then back again from the last one: the UUIDs seen each way."""
    forward: list[str] = []
    page = await reg.page(where, limit=limit)
    pages = [page]
    while True:
        forward += [n.uuid for n in page.nodes]
        if page.next_cursor is None:
            break
        page = await reg.page(where, limit=limit, cursor=page.next_cursor)
        pages.append(page)
    backward: list[str] = [n.uuid for n in page.nodes]
    while page.prev_cursor is not None:
        page = await reg.page(where, limit=limit, cursor=page.prev_cursor)
        backward = [n.uuid for n in page.nodes] + backward
    assert pages[0].prev_cursor is None
    return forward, backward


async def test_pages_walk_every_node_once_both_ways(regdb: RegistryPlace) -> None:
    clock = Clock()
    reg = await regdb.open(secret=SECRET, clock=clock)
    try:
        everyone = await populate(reg, clock=clock, n=250)
        forward, backward = await _walk(reg, NodeFilter(), 100)
        assert forward == everyone and backward == everyone
        first = await reg.page(limit=100)
        assert [n.uuid for n in first.nodes] == everyone[:100]
        # a node that turns up later goes at the end: the second page is the same
        clock.t += 100
        await observe(reg, uuid_of(9999), mac=None, address=None)
        second = await reg.page(limit=100, cursor=first.next_cursor)
        assert [n.uuid for n in second.nodes] == everyone[100:200]
        # a node forgotten before the cursor shifts nothing after it either
        await forget(reg, everyone[0])
        again = await reg.page(limit=100, cursor=first.next_cursor)
        assert [n.uuid for n in again.nodes] == everyone[100:200]
        last = await reg.page(limit=100, cursor=again.next_cursor)
        assert [n.uuid for n in last.nodes] == [*everyone[200:], uuid_of(9999)]
        assert last.next_cursor is None and last.prev_cursor is not None
        # back from the second page, with a node gone from the first: the full first page
        back = await reg.page(limit=100, cursor=again.prev_cursor)
        assert [n.uuid for n in back.nodes] == everyone[1:101]
        assert back.prev_cursor is None
    finally:
        await reg.close()


async def test_filters_and_search(regdb: RegistryPlace) -> None:
    clock = Clock()
    reg = await regdb.open(secret=SECRET, clock=clock)
    try:
        everyone = await populate(reg, clock=clock, n=120)
        reg.set_state(uuid_of(7), "error", source="test", reason="disk")
        reg.set_state(uuid_of(77), "error", source="test", reason="disk")
        await patch(reg, uuid_of(8), labels={"rack": "r1"})
        await patch(reg, uuid_of(9), labels={"rack": "r2"}, hostname="db_1%.lab")

        async def uuids(limit: int = 1000, **kw: str) -> list[str]:
            return [n.uuid for n in (await reg.page(NodeFilter(**kw), limit=limit)).nodes]

        assert await uuids(state="error") == [uuid_of(7), uuid_of(77)]
        assert await uuids(profile="flatcar") == everyone[::3]
        assert await uuids(label="rack") == [uuid_of(8), uuid_of(9)]
        assert await uuids(label="rack=r2") == [uuid_of(9)]
        assert await uuids(q="sn-00077") == [uuid_of(77)]  # serial, any case
        assert await uuids(q="NODE11") == [uuid_of(11), *everyone[110:120]]  # hostname
        assert await uuids(q="52:54:00:00:00:4d") == [uuid_of(77)]  # a MAC...
        assert await uuids(q="52540000004D") == [uuid_of(77)]  # ... without colons
        assert await uuids(q="_1%") == [uuid_of(9)]  # % and _ are literal
        assert await uuids(q="nothing like it") == []
        assert await uuids(state="error", q="0007") == [uuid_of(7), uuid_of(77)]
        forward, backward = await _walk(reg, NodeFilter(profile="coreos"), 7)
        assert forward == backward == [u for i, u in enumerate(everyone) if i % 3]
    finally:
        await reg.close()


async def test_a_bad_cursor_is_refused(regdb: RegistryPlace) -> None:
    reg = await regdb.open(secret=SECRET)
    try:
        for bad in ("nonsense", "!!!", Cursor(1.0, "x").encode()[:-3], "W10",
                    "WyJ4IiwxLCJ1Il0"):  # [], ["x",1,"u"]
            with pytest.raises(CursorError, match="first page"):
                await reg.page(cursor=bad)
        assert Cursor.decode(Cursor(1.5, "u", "prev").encode()) == Cursor(1.5, "u", "prev")
    finally:
        await reg.close()


async def test_v2_registry_gets_searchable_on_upgrade(regdb: RegistryPlace) -> None:
    """Migration 3 fills ``search`` for the nodes already there."""
    await old_registry(
        regdb, 2,
        ("INSERT INTO nodes (uuid, serial, hostname, first_seen, last_seen, state, "
         "state_since) VALUES (?, 'ABC-1', 'Old.Lab', 1, 1, 'installed', 1)", (uuid_of(1),)),
        ("INSERT INTO macs VALUES ('52:54:00:0a:0b:0c', ?, 1)", (uuid_of(1),)))
    reg = await regdb.open(secret=SECRET)
    try:
        for q in ("abc-1", "old.lab", "0a:0b", "0a0b0c"):
            assert [n.uuid for n in (await reg.page(NodeFilter(q=q))).nodes] == [uuid_of(1)], q
    finally:
        await reg.close()
    if regdb.backend == "sqlite":  # PostgreSQL plans by its statistics: a scan at this size
        plan = " ".join(str(r) for r in await regdb.rows(
            "EXPLAIN QUERY PLAN SELECT uuid FROM nodes WHERE search LIKE '%x%' "
            "ORDER BY first_seen, uuid LIMIT 5"))
        assert "COVERING INDEX nodes_page" in plan, plan


async def _event_times(regdb: RegistryPlace, table: str = "events") -> list[float]:
    """The time of every row of ``table`` (events or audit), oldest id first."""
    return [r[0] for r in await regdb.rows(f"SELECT time FROM {table} ORDER BY id")]


async def test_retention_removes_old_and_excess_events_in_batches(regdb: RegistryPlace) -> None:
    clock = Clock(1_000_000.0)
    retention = EventRetention(max_age=3600, max_rows=30, every=3600, batch=4)
    reg = await regdb.open(secret=SECRET, clock=clock, retention=retention)
    try:
        for i in range(10):  # ten old events (the 'discovered' of ten nodes)
            reg.observe(uuid_of(i), mac=None, address=None, source="test")
        await reg.commit()
        clock.t += 7200  # two hours later, past max_age
        for i in range(5):
            reg.observe(uuid_of(i), mac=None, address=None, source="test", boot=True)
        await reg.commit()
        assert await reg.prune_events() == 10
        assert await _event_times(regdb) == [1_007_200.0] * 5
        assert reg.stats.prune_batches == 3  # 4 + 4 + 2: bounded transactions
        # beyond max_rows: the oldest go, however recent they are
        for _ in range(8):
            for i in range(5):
                reg.observe(uuid_of(i), mac=None, address=None, source="test", boot=True)
            clock.t += 1
        await reg.commit()
        assert len(await _event_times(regdb)) == 45
        assert await reg.prune_events() == 15
        times = await _event_times(regdb)
        assert len(times) == 30 and times[0] == 1_007_200.0 + 2 and times[-1] == 1_007_207.0
        assert await reg.prune_events() == 0  # nothing left to do: recent ones stay
        assert len(await _event_times(regdb)) == 30
        assert (await reg.events(uuid_of(0)))[-1]["time"] == 1_007_207.0
    finally:
        await reg.close()


async def test_retention_prunes_the_audit_trail_by_its_own_limits(regdb: RegistryPlace) -> None:
    clock = Clock(1_000_000.0)
    retention = EventRetention(max_age=10 * 86400, max_rows=1000, every=3600, batch=4,
                               audit_max_age=86400, audit_max_rows=5)
    reg = await regdb.open(secret=SECRET, clock=clock, retention=retention)
    try:
        reg.observe(uuid_of(0), mac=None, address=None, source="test")
        for i in range(3):  # three old audit rows
            reg.add_audit(actor="admin", role="admin", action="node_power", target=uuid_of(0),
                          result="ok", detail=f"old {i}")
        await reg.commit()
        clock.t += 2 * 86400  # two days: past the audit's limit, within the events'
        for i in range(7):
            reg.add_audit(actor="admin", role="admin", action="deploy", target=uuid_of(0),
                          result="ok", detail=f"new {i}")
        await reg.commit()
        # 3 too old, then 2 beyond the 5 newest: in batches of 4 (3+1, then 1)
        assert await reg.prune_events() == 5
        assert await _event_times(regdb, "audit") == [1_000_000.0 + 2 * 86400] * 5
        assert reg.stats.audit_pruned == 5 and reg.stats.events_pruned == 0
        assert len(await _event_times(regdb)) == 1  # the event is within its own limits
        assert [a["detail"] for a in await reg.audit(limit=10)][-1] == "new 2"
    finally:
        await reg.close()
