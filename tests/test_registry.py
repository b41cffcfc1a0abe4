"""Registry unit tests, each against both engines: a real SQLite file in tmp_path and a
real PostgreSQL database (the ``regdb`` fixture)."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from netboot.storage.registry import EVENTS_SHOWN, MIGRATIONS, STATES, RegistryError
from tests.nodes import (
    Clock,
    RegistryPlace,
    forget,
    observe,
    old_registry,
    patch,
    transition,
)

SECRET = b"test-secret"
U1 = "4c4c4544-0042-3510-8052-b4c04f384d32"
U2 = "00000000-0000-0000-0000-0000000000a2"


async def test_migrates_from_empty_and_reopens(regdb: RegistryPlace) -> None:
    reg = await regdb.open(secret=SECRET, instance="rack1-a")
    await observe(reg, U1.upper(), mac="52-54-00-AA-BB-01", address="10.0.0.5", source="dhcp",
                      serial="SN1", vendor="Dell", product="R640")
    await reg.close()
    if regdb.backend == "sqlite":
        assert (await regdb.rows("PRAGMA user_version"))[0][0] == len(MIGRATIONS)
        assert (await regdb.rows("PRAGMA journal_mode"))[0][0] == "wal"
        tables = {r[0] for r in await regdb.rows(
            "SELECT name FROM sqlite_master WHERE type='table'")}
    else:
        assert await regdb.rows("SELECT version FROM netboot_schema") == [(len(MIGRATIONS),)]
        tables = {r[0] for r in await regdb.rows(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {"nodes", "macs", "events", "bmcs", "inventory", "audit"} <= tables
    assert await regdb.rows("SELECT instance, version FROM nodes") == [("rack1-a", 1)]

    reg = await regdb.open(secret=SECRET)
    try:
        n = reg.get(U1)
        assert n is not None and n.serial == "SN1" and n.vendor == "Dell"
        assert n.macs == ["52:54:00:aa:bb:01"] and n.address == "10.0.0.5"
        assert reg.by_mac("52:54:00:AA:BB:01") is n
        assert n.state == "discovered" and n.armed
    finally:
        await reg.close()


async def test_refuses_newer_schema(regdb: RegistryPlace) -> None:
    if regdb.backend == "sqlite":
        db = sqlite3.connect(regdb.data_dir / "registry.sqlite3")
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
        db.close()
    else:
        await (await regdb.open(secret=SECRET)).close()
        await regdb.rows(f"UPDATE netboot_schema SET version = {len(MIGRATIONS) + 1}")
    with pytest.raises(RegistryError, match="newer"):
        await regdb.open(secret=SECRET)


async def test_events_in_order_and_lifecycle(regdb: RegistryPlace) -> None:
    clock = Clock()
    reg = await regdb.open(secret=SECRET, clock=clock)
    try:
        await observe(reg, U1, mac="52:54:00:aa:bb:01", address="10.0.0.5", source="dhcp")
        clock.t += 1
        await observe(reg, U1, mac=None, address="10.0.0.5", source="http", boot=True)
        await transition(reg, U1, "booting", source="http")
        clock.t += 5
        await transition(reg, U1, "deploying", source="http")
        await transition(reg, U1, "deploying", source="http")  # same state: no event
        clock.t += 300
        n = await transition(reg, U1, "installed", source="api", address="10.0.0.9")
        assert n.state == "installed" and n.address == "10.0.0.9" and not n.armed
        assert n.boot_count == 1 and n.state_since == clock.t
        ev = await reg.events(U1)
        assert [(e["kind"], e["state"]) for e in ev] == [
            ("discovered", "discovered"), ("boot", "discovered"), ("state", "booting"),
            ("state", "deploying"), ("state", "installed")]
        assert [e["id"] for e in ev] == sorted(e["id"] for e in ev)
        assert ev[-1]["from"] == "deploying" and ev[-1]["address"] == "10.0.0.9"
        assert reg.counts_by_state() == {**dict.fromkeys(STATES, 0), "installed": 1}

        n = await transition(reg, U1, "error", source="api", reason="disk not found")
        assert n.reason == "disk not found"
        n = await patch(reg, U1, rearm=True, labels={"rack": "r1", "row": "3"}, hostname="db1")
        assert n.armed and n.labels == {"rack": "r1", "row": "3"} and n.hostname == "db1"
        n = await patch(reg, U1, labels={"row": None})
        assert n.labels == {"rack": "r1"}
        kinds = [e["kind"] for e in await reg.events(U1)]
        assert kinds[-3:] == ["state", "patch", "patch"]
        with pytest.raises(ValueError, match="unknown state"):
            await transition(reg, U1, "exploded", source="x")
    finally:
        await reg.close()


async def test_filters(regdb: RegistryPlace) -> None:
    reg = await regdb.open(secret=SECRET)
    try:
        await observe(reg, U1, mac=None, address=None, source="t", profile="coreos")
        await observe(reg, U2, mac=None, address=None, source="t", profile="debian")
        await transition(reg, U2, "deploying", source="t")
        await patch(reg, U1, labels={"rack": "r1"})
        await patch(reg, U2, labels={"rack": "r2"})
        assert [n.uuid for n in await reg.list()] == [U1, U2]
        assert [n.uuid for n in await reg.list(state="deploying")] == [U2]
        assert [n.uuid for n in await reg.list(profile="coreos")] == [U1]
        assert [n.uuid for n in await reg.list(label="rack=r2")] == [U2]
        assert [n.uuid for n in await reg.list(label="rack")] == [U1, U2]
        assert await reg.list(state="installed") == []
        assert await reg.list(state="deploying", label="rack=r1") == []
    finally:
        await reg.close()


async def test_tokens(regdb: RegistryPlace) -> None:
    reg = await regdb.open(secret=SECRET)
    try:
        t1 = reg.node_token(U1)
        assert len(t1) == 32 and t1 == reg.node_token(U1.upper())
        assert reg.check_node_token(U1, t1)
        assert not reg.check_node_token(U2, t1)
        assert not reg.check_node_token("not-a-uuid", t1)
        assert not reg.check_node_token(U1, "")
    finally:
        await reg.close()
    other = await regdb.open(secret=b"another")
    try:
        assert not other.check_node_token(U1, t1)
    finally:
        await other.close()


async def test_mac_moves_and_forget(regdb: RegistryPlace) -> None:
    reg = await regdb.open(secret=SECRET)
    try:
        await observe(reg, U1, mac="52:54:00:00:00:01", address=None, source="t")
        await observe(reg, U2, mac="52:54:00:00:00:01", address=None, source="t")
        assert reg.by_mac("52:54:00:00:00:01").uuid == U2
        assert reg.get(U1).macs == []
        assert await forget(reg, U2) is True
        assert await forget(reg, U2) is False
        assert reg.get(U2) is None and reg.by_mac("52:54:00:00:00:01") is None
        assert await reg.events(U2) == []
    finally:
        await reg.close()
    reg = await regdb.open(secret=SECRET)
    try:
        assert reg.get(U2) is None and reg.by_mac("52:54:00:00:00:01") is None
        assert reg.get(U1) is not None
    finally:
        await reg.close()


async def test_concurrent_writes_are_group_committed(regdb: RegistryPlace) -> None:
    reg = await regdb.open(secret=SECRET)
    uuids = [f"00000000-0000-0000-0000-{i:012x}" for i in range(1000)]
    try:
        await asyncio.gather(*(observe(reg, u, mac=f"02:00:00:00:{i >> 8:02x}:{i & 255:02x}",
                                       address=None, source="t", boot=True)
                               for i, u in enumerate(uuids)))
        assert reg.counts_by_state()["discovered"] == 1000
        assert reg.stats.commits < 100
    finally:
        await reg.close()
    assert await regdb.rows("SELECT count(*) FROM nodes") == [(1000,)]
    assert await regdb.rows("SELECT count(*) FROM macs") == [(1000,)]
    assert await regdb.rows("SELECT count(*) FROM events") == [(2000,)]


async def test_failed_commit_raises_and_reloads(regdb: RegistryPlace) -> None:
    reg = await regdb.open(secret=SECRET)
    try:
        await observe(reg, U1, mac=None, address=None, source="t")
        # test_faults fills a real data dir for the whole-server version of this
        await regdb.refuse_writes(reg, True)  # every write now fails
        with pytest.raises(RegistryError, match="write failed"):
            await observe(reg, U2, mac="52:54:00:00:00:02", address=None, source="t")
        # memory was reloaded from disk: it does not claim what was not committed
        assert reg.get(U2) is None and reg.by_mac("52:54:00:00:00:02") is None
        assert reg.get(U1) is not None
        await regdb.refuse_writes(reg, False)
        await observe(reg, U2, mac=None, address=None, source="t")
        assert reg.get(U2) is not None
    finally:
        await reg.close()


async def test_bmc_inventory_and_audit_persist_and_forget(regdb: RegistryPlace) -> None:
    from netboot.storage.registry import BmcRecord

    reg = await regdb.open(secret=SECRET)
    try:
        await observe(reg, U1)
        with pytest.raises(KeyError):
            reg.set_bmc(U2, BmcRecord("ipmi", "10.0.1.9"))  # unknown node
        reg.set_bmc(U1, BmcRecord("ipmi", "10.0.1.7", 623, "admin", b"sealed", source="file"))
        reg.set_inventory(U1, {"memory_bytes": 512 << 20, "nics": [{"mac": "52:54:00:00:00:01"}]})
        reg.add_audit(actor="ops", role="operator", action="power", target=U1, result="ok",
                      detail="on")
        await reg.commit()
        assert "sealed" not in repr(reg.bmc(U1))
    finally:
        await reg.close()
    reg = await regdb.open(secret=SECRET)
    try:
        bmc = reg.bmc(U1)
        assert bmc is not None and bmc.address == "10.0.1.7" and bmc.secret == b"sealed"
        assert list(reg.bmcs()) == [U1]
        when, inv = await reg.inventory(U1)
        assert inv["memory_bytes"] == 512 << 20 and when > 0
        assert [r["action"] for r in await reg.audit(target=U1)] == ["power"]
        assert await forget(reg, U1)
        assert reg.bmc(U1) is None and await reg.inventory(U1) is None
        assert len(await reg.audit(target=U1)) == 1  # who did what outlives the node
    finally:
        await reg.close()


async def test_lookups_accept_any_spelling_and_miss_cheaply(regdb: RegistryPlace) -> None:
    """get/by_mac take any spelling of a UUID or MAC; a key already in normal form that
    is not indexed is a plain miss (the DHCP path asks for every unknown client)."""
    reg = await regdb.open(secret=SECRET)
    try:
        await observe(reg, U1, mac="52:54:00:aa:bb:01", address="10.0.0.5", source="dhcp")
        node = reg.get(U1)
        assert node is not None
        for spelling in (U1.upper(), "{" + U1 + "}", U1.replace("-", ""), f"urn:uuid:{U1}"):
            assert reg.get(spelling) is node, spelling
        for spelling in ("52-54-00-AA-BB-01", "525400aabb01", "52:54:00:AA:BB:01"):
            assert reg.by_mac(spelling) is node, spelling
        assert reg.get(U2) is None and reg.get("not-a-uuid") is None
        assert reg.by_mac("52:54:00:aa:bb:02") is None and reg.by_mac("zz:zz") is None
    finally:
        await reg.close()


async def test_a_nodes_history_is_read_as_its_latest_page(regdb: RegistryPlace) -> None:
    """A node with a long history (one that boots in a loop) shows its latest
    EVENTS_SHOWN events, oldest first, not all of them."""
    reg = await regdb.open(secret=SECRET)
    try:
        await observe(reg, U1, mac="52:54:00:aa:bb:01", address="10.0.0.5", source="dhcp")
        for i in range(EVENTS_SHOWN + 50):
            reg.patch(U1, hostname=f"h{i}")
        await reg.commit()
        events = await reg.events(U1)
        assert len(events) == EVENTS_SHOWN
        ids = [e["id"] for e in events]
        assert ids == sorted(ids)
        assert events[-1]["kind"] == "patch" and "h249" in (events[-1]["detail"] or "")
        assert all(e["kind"] == "patch" for e in events)  # the oldest ('discovered') left out
        assert len(await reg.events(U1, limit=5)) == 5
    finally:
        await reg.close()


async def test_v3_registry_gets_secure_boot_unknown_on_upgrade(regdb: RegistryPlace) -> None:
    """Migration 4 adds ``secure_boot``: the nodes already there have never said (None)."""
    await old_registry(regdb, 3, (
        "INSERT INTO nodes (uuid, first_seen, last_seen, state, state_since) "
        "VALUES ('5db34dac-6aee-4034-9d7c-0037a2950003', 1, 1, 'installed', 1)", ()))
    reg = await regdb.open(secret=b"s" * 32)
    try:
        node = reg.get("5db34dac-6aee-4034-9d7c-0037a2950003")
        assert node is not None and node.secure_boot is None and node.state == "installed"
    finally:
        await reg.close()


async def test_v4_registry_gets_arch_unknown_then_records_a_boot(regdb: RegistryPlace) -> None:
    """Migration 5 adds ``arch``: None for the nodes already there, set by a boot and
    kept across a reopen."""
    uuid = "5db34dac-6aee-4034-9d7c-0037a2950004"
    await old_registry(regdb, 4, (
        "INSERT INTO nodes (uuid, first_seen, last_seen, state, state_since) "
        f"VALUES ('{uuid}', 1, 1, 'installed', 1)", ()))
    reg = await regdb.open(secret=b"s" * 32)
    try:
        node = reg.get(uuid)
        assert node is not None and node.arch is None and node.state == "installed"
        reg.observe(uuid, mac=None, address=None, source="test", boot=True, arch="arm64")
        await reg.commit()
    finally:
        await reg.close()
    reg = await regdb.open(secret=b"s" * 32)
    try:
        node = reg.get(uuid)
        assert node is not None and node.arch == "arm64"
    finally:
        await reg.close()
