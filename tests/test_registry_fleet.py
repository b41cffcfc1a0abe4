"""Several instances on one PostgreSQL registry (issue 15): each keeps its own index, the
database stays the truth. Real PostgreSQL (tests/pgsql.py), several Registry objects in one
process standing for the instances (each with its own connections, as separate processes
would have)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from netboot.storage.registry import Change, Registry
from tests.nodes import RegistryPlace

SECRET = b"fleet-secret"
U1 = "4c4c4544-0042-3510-8052-b4c04f384d32"


async def _until(what: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for another instance's NOTIFY to arrive (a deadline, not a speed claim)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not what():
        assert loop.time() < end, "the other instance never saw the change"
        await asyncio.sleep(0.02)


async def _fleet(postgres, n: int, tmp_path) -> tuple[RegistryPlace, list[Registry]]:
    place = RegistryPlace("postgresql", tmp_path, await postgres.fresh_database())
    # opened at once: the migrations run under the advisory lock, once
    regs = await asyncio.gather(*(place.open(secret=SECRET, instance=f"i{k}")
                                  for k in range(n)))
    return place, list(regs)


async def test_instances_starting_at_once_migrate_once_and_see_each_others_nodes(
        postgres, tmp_path) -> None:
    place, (a, b, c) = await _fleet(postgres, 3, tmp_path)
    try:
        assert await place.rows("SELECT version FROM netboot_schema") == [(6,)]
        seen: list[Change] = []
        c.on_remote = seen.append
        a.observe(U1, mac="52:54:00:aa:bb:01", address="10.0.0.5", source="dhcp", serial="SN1")
        await a.commit()
        await _until(lambda: b.get(U1) is not None and c.get(U1) is not None)
        for other in (b, c):
            node = other.get(U1)
            assert node.serial == "SN1" and node.macs == ["52:54:00:aa:bb:01"]
            assert node.instance == "i0"  # who served it last
            assert other.by_mac("52:54:00:aa:bb:01") is node
        assert [ch.node.uuid for ch in seen] == [U1] and seen[0].old is None
        # B moves it on; A and C follow, and the row says B served it last
        b.set_state(U1, "booting", source="http", address="10.0.0.5")
        await b.commit()
        await _until(lambda: a.get(U1).state == "booting" and c.get(U1).state == "booting")
        assert a.get(U1).instance == "i1"
        assert await place.rows("SELECT state, instance FROM nodes") == [("booting", "i1")]
        # a forget on one instance reaches the others
        c.forget(U1)
        await c.commit()
        await _until(lambda: a.get(U1) is None and b.get(U1) is None)
        assert a.by_mac("52:54:00:aa:bb:01") is None
    finally:
        for r in (a, b, c):
            await r.close()


async def test_racing_transitions_lose_nothing_and_keep_one_row(postgres, tmp_path) -> None:
    """Two instances move the same node from the same version at once: one writes first,
    the other's write is not put over it; it reloads the row and applies its own change
    on top, so the history holds both, in the order they committed."""
    place, (a, b) = await _fleet(postgres, 2, tmp_path)
    try:
        a.observe(U1, mac=None, address=None, source="dhcp")
        await a.commit()
        await _until(lambda: b.get(U1) is not None)
        a.set_state(U1, "booting", source="http")
        b.set_state(U1, "installed", source="callback")
        await asyncio.gather(a.commit(), b.commit())
        assert a.stats.conflicts + b.stats.conflicts == 1
        rows = await place.rows("SELECT state, version FROM nodes")
        assert len(rows) == 1
        events = await a.events(U1)
        moves = [(e["from"], e["state"]) for e in events if e["kind"] == "state"]
        assert moves in ([("discovered", "booting"), ("booting", "installed")],
                         [("discovered", "installed"), ("installed", "booting")]), moves
        final = moves[-1][1]
        assert rows[0][0] == final
        await _until(lambda: a.get(U1).state == final and b.get(U1).state == final)
    finally:
        await a.close()
        await b.close()


async def test_a_rack_seen_by_both_halves_of_an_ha_pair_is_one_row_per_node(
        postgres, tmp_path) -> None:
    """Both instances of an HA pair answer every DHCP client: each records the same 300
    new machines at the same time. One row per node and per MAC, every sighting's event
    kept, and both indexes end equal to the database."""
    place, (a, c) = await _fleet(postgres, 2, tmp_path)
    uuids = [f"00000000-0000-0000-0000-{i:012x}" for i in range(300)]
    try:
        async def sight(reg: Registry) -> None:
            for i, u in enumerate(uuids):
                reg.observe(u, mac=f"02:00:00:00:{i >> 8:02x}:{i & 255:02x}", address=None,
                            source="dhcp", boot=True)
                if i % 25 == 0:
                    await asyncio.sleep(0)  # interleave with the other instance's commits
            await reg.commit()

        await asyncio.gather(sight(a), sight(c))
        assert await place.rows("SELECT count(*), count(DISTINCT uuid) FROM nodes") == [(300, 300)]
        assert await place.rows("SELECT count(*) FROM macs") == [(300,)]
        # 'discovered' once per node (whoever created it), and both instances' boots
        kinds = dict(await place.rows("SELECT kind, count(*) FROM events GROUP BY kind"))
        assert kinds == {"discovered": 300, "boot": 600}, kinds
        boots = dict(await place.rows("SELECT uuid, boot_count FROM nodes"))
        assert set(boots.values()) == {2}
        for reg in (a, c):
            await _until(lambda reg=reg: all(
                (n := reg.get(u)) is not None and n.boot_count == 2 for u in uuids))
    finally:
        await a.close()
        await c.close()


#: one instance in its own process: the same 1,000 nodes renamed 20 times and moved
#: through three states, a commit each time, started together with the other process's
#: (argv: url, name)
WRITER = r"""
import asyncio, json, sys
from pathlib import Path
from netboot.storage.registry import Registry

async def main(url, name):
    reg = await Registry.open(Path("/nonexistent"), secret=b"s", url=url, instance=name)
    uuids = [f"00000000-0000-0000-0000-{i:012x}" for i in range(1000)]
    for u in uuids:
        reg.observe(u, mac=None, address=None, source=name)
    await reg.commit()
    print("ready", flush=True)
    sys.stdin.readline()  # both start the storm together
    for r in range(20):
        for u in uuids:
            reg.patch(u, hostname=f"{name}{r}", source=name)
        await reg.commit()
    for state in ("booting", "deploying", "installed"):
        for u in uuids:
            reg.set_state(u, state, source=name)
        await reg.commit()
    print(json.dumps({"retries": reg.stats.retries, "failures": reg.stats.commit_failures,
                      "conflicts": reg.stats.conflicts}), flush=True)
    await reg.close()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_two_instances_writing_the_same_rows_at_once_do_not_deadlock(
        postgres, tmp_path) -> None:
    """Both halves of a pair commit big batches over the same 1,000 nodes at the same
    time, each in its own process (so each walks its pending set in its own hash order).
    Rows are written in key order, so the two never wait on each other in a cycle
    (PostgreSQL would abort one: 'deadlock detected')."""
    import json
    import os
    import sys

    place = RegistryPlace("postgresql", tmp_path, await postgres.fresh_database())
    await (await place.open(secret=SECRET)).close()  # migrated once, before the two
    procs = []
    for name, seed in (("a", "1"), ("b", "2")):
        procs.append(await asyncio.create_subprocess_exec(
            sys.executable, "-c", WRITER, place.url, name, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONHASHSEED": seed,
                 "PYTHONPATH": str(Path(__file__).resolve().parents[1])}))
    for p in procs:
        assert (await asyncio.wait_for(p.stdout.readline(), 60)).strip() == b"ready"
    for p in procs:
        p.stdin.write(b"go\n")
        await p.stdin.drain()
    stats = [json.loads(await asyncio.wait_for(p.stdout.readline(), 120)) for p in procs]
    for p in procs:
        await p.wait()
    assert [s["retries"] for s in stats] == [0, 0], stats
    assert [s["failures"] for s in stats] == [0, 0], stats
    assert await place.rows("SELECT state, count(*) FROM nodes GROUP BY state") == [
        ("installed", 1000)]


async def test_a_lost_listen_connection_reconnects_and_catches_up(tmp_path) -> None:
    """What another instance commits while this one's LISTEN connection is down is not
    heard of: the connection comes back by itself and the index is resynced. A server
    restart cuts every connection: writes fail while it is down, and work after it
    (the writer reconnects). A private server: the restart must not cut other tests."""
    from tests.pgsql import PgServer

    server = PgServer.start()
    a = b = None
    try:
        place = RegistryPlace("postgresql", tmp_path, await server.fresh_database())
        a = await place.open(secret=SECRET, instance="a")
        b = await place.open(secret=SECRET, instance="b")
        # cut B's LISTEN connection only and keep it from coming back (no new connections
        # to the database) while A writes a node: only B's resync can find it
        import asyncpg

        admin = await asyncpg.connect(server.url())
        from urllib.parse import urlsplit

        db = urlsplit(place.url).path.lstrip("/")
        try:
            await admin.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS false')
            await admin.execute("SELECT pg_terminate_backend($1)", b._listener.get_server_pid())
            await _until(lambda: b._listener.is_closed(), timeout=10)
            a.observe(U1, mac="52:54:00:aa:bb:01", address=None, source="dhcp", serial="SN1")
            await a.commit()  # A's writer connection is still up
            await asyncio.sleep(0.5)
            assert b.get(U1) is None and b.stats.relistens == 0  # B cannot know yet
        finally:
            await admin.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS true')
            await admin.close()
        await _until(lambda: b.get(U1) is not None, timeout=40)
        assert b.stats.relistens == 1 and b.stats.resyncs == 1
        assert b.by_mac("52:54:00:aa:bb:01") is b.get(U1)

        await asyncio.get_running_loop().run_in_executor(None, server.restart)
        u2 = "00000000-0000-0000-0000-0000000000b2"
        for _ in range(20):  # the first commit may meet the cut connection
            a.observe(u2, mac=None, address=None, source="dhcp")
            try:
                await a.commit()
                break
            except Exception:
                await asyncio.sleep(0.2)
        await _until(lambda: b.get(u2) is not None, timeout=30)
        b.set_state(u2, "booting", source="http")
        await b.commit()
        await _until(lambda: a.get(u2) is not None and a.get(u2).state == "booting",
                     timeout=30)
        assert await place.rows("SELECT count(*) FROM nodes") == [(2,)]
    finally:
        for r in (a, b):
            if r is not None:
                await r.close()
        server.stop()


async def test_a_bmc_set_on_one_instance_reaches_the_others(postgres, tmp_path) -> None:
    """A BMC change does not move the node's version: the others still take it."""
    from netboot.storage.registry import BmcRecord

    _, (a, b) = await _fleet(postgres, 2, tmp_path)
    try:
        a.observe(U1, mac=None, address=None, source="dhcp")
        await a.commit()
        await _until(lambda: b.get(U1) is not None)
        a.set_bmc(U1, BmcRecord("ipmi", "10.0.1.7", 623, "admin", b"sealed", source="api"))
        await a.commit()
        await _until(lambda: b.bmc(U1) is not None)
        assert b.bmc(U1).address == "10.0.1.7" and b.bmc(U1).secret == b"sealed"
        a.set_bmc(U1, None)
        await a.commit()
        await _until(lambda: b.bmc(U1) is None)
    finally:
        await a.close()
        await b.close()


async def test_a_node_forgotten_while_another_instance_moves_it_stays_forgotten(
        postgres, tmp_path) -> None:
    """A forgets a node; before A commits, B moves it and A hears of B's commit. A's
    index must not take the node back (it would answer for it, and by its MAC, after
    the delete), and once A commits, no instance and no row has it."""
    place, (a, b) = await _fleet(postgres, 2, tmp_path)
    try:
        a.observe(U1, mac="52:54:00:aa:bb:01", address=None, source="dhcp")
        await a.commit()
        await _until(lambda: b.get(U1) is not None)
        a.forget(U1)  # pending
        b.set_state(U1, "booting", source="http")
        await b.commit()
        await _until(lambda: a.stats.remote_reloads >= 1)
        assert a.get(U1) is None and a.by_mac("52:54:00:aa:bb:01") is None
        await a.commit()
        await _until(lambda: b.get(U1) is None)
        assert await place.rows("SELECT count(*) FROM nodes") == [(0,)]
        assert a.get(U1) is None
    finally:
        await a.close()
        await b.close()
