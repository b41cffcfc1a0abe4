"""The lifecycle: the one module that moves nodes between states, against a real
registry (SQLite in tmp_path). Reports from the reply paths never wait for a commit
and make one registry write per step; API reports wait for it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from netboot.boot import lifecycle as lifecycle_mod
from netboot.boot.lifecycle import Lifecycle, LifecycleEvent
from netboot.boot.sightings import Sightings
from netboot.boot.spec import BootSpec, Client, LocalBoot, Offer, Refusal
from netboot.metrics import Counters, NodeMetrics
from netboot.storage.registry import Registry
from tests.nodes import Clock, transition

U1 = "4c4c4544-0042-3510-8052-b4c04f384d32"
U2 = "00000000-0000-0000-0000-0000000000a2"
M1 = "52:54:00:00:00:01"


@dataclass
class World:
    registry: Registry
    lifecycle: Lifecycle
    counters: Counters
    clock: Clock
    events: list[LifecycleEvent]
    metrics: NodeMetrics


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    clock = Clock()
    reg = await Registry.open(tmp_path, secret=b"s", clock=clock)
    counters = Counters()
    life = Lifecycle(reg, Sightings(), counters, stuck_after=60, clock=clock)
    events: list[LifecycleEvent] = []
    life.subscribe(events.append)
    metrics = NodeMetrics()
    life.subscribe(metrics)
    task = asyncio.create_task(life.run())
    try:
        yield World(reg, life, counters, clock, events, metrics)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await life.drain()
        await reg.close()


def _spec(uuid: str = U1, mac: str = M1) -> BootSpec:
    return BootSpec(uuid, mac, "default", "n1", "demo/vmlinuz", ("demo/initrd",), "quiet")


async def test_a_boot_is_recorded_without_waiting_one_write_a_step(world: World) -> None:
    reg, life = world.registry, world.lifecycle
    commits = reg.stats.commits
    life.served(_spec(), "10.0.0.5", "ipxe", {"serial": "SN1", "vendor": "QEMU"})
    node = reg.get(U1)  # in the index at once; the commit is only queued
    assert node is not None and node.state == "booting" and node.boot_count == 1
    assert node.serial == "SN1" and node.hostname == "n1" and node.profile == "default"
    assert reg.stats.commits == commits
    life.fetched("10.0.0.5", "http")
    assert reg.get(U1).state == "deploying"
    life.fetched("10.0.0.5", "http")  # only from booting: no second move
    await reg.commit()
    assert reg.stats.commits - commits <= 2
    # first contact through iPXE (no DHCP sighting): discovered, then the boot
    assert [e.kind for e in world.events] == ["discovered", "booting", "deploying"]
    kinds = [(e["kind"], e["state"]) for e in await reg.events(U1)]
    assert kinds == [("discovered", "discovered"), ("boot", "discovered"),
                     ("state", "booting"), ("state", "deploying")]


async def test_fetch_from_an_unknown_address_moves_nothing(world: World) -> None:
    world.lifecycle.served(_spec(), "10.0.0.5", "ipxe")
    world.lifecycle.fetched("10.0.0.99", "tftp")
    assert world.registry.get(U1).state == "booting"


async def test_local_boot_is_not_a_boot(world: World) -> None:
    world.lifecycle.served(LocalBoot(U1, M1, "default", "n1"), "10.0.0.5", "ipxe")
    assert world.registry.get(U1) is None and world.events == []


async def test_broken_config_is_an_error_with_the_reason(world: World) -> None:
    why = "profile broken: cmdline template: 'x' is undefined"
    world.lifecycle.served(Refusal(U1, M1, why, failed=True, profile="broken"), "10.0.0.5",
                           "tftp")
    node = world.registry.get(U1)
    assert node.state == "error" and node.reason == why
    assert world.counters.get("node_failures_total") == 1
    # not served at all (no profile): nothing recorded
    world.lifecycle.served(Refusal(U2, None, "machine has netboot: false"), "10.0.0.6", "ipxe")
    assert world.registry.get(U2) is None


async def test_reports_wait_for_the_commit_and_end_the_boot_cycle(world: World) -> None:
    life, clock = world.lifecycle, world.clock
    life.served(_spec(), "10.0.0.5", "ipxe")
    clock.t += 305
    node = await life.reported(U1, "installed", address="10.0.0.9")
    assert node.state == "installed" and not node.armed and node.address == "10.0.0.9"
    assert world.registry.stats.commits >= 1
    assert world.metrics.boot_durations.count == 1 and world.metrics.boot_durations.sum == 305
    node = await life.reported(U1, "failed", address=None, reason="disk not found")
    assert node.state == "error" and node.reason == "disk not found"
    node = await life.reported(U1, "register", address=None,
                               identity={"serial": "SN9", "mac": "52:54:00:00:00:02"})
    assert node.serial == "SN9" and node.macs == [M1, "52:54:00:00:00:02"]
    assert [e.kind for e in world.events] == ["discovered", "booting", "installed", "error"]


async def test_dhcp_first_contacts_are_batched_and_bounded(world: World) -> None:
    life, reg = world.lifecycle, world.registry
    offer = Offer("undionly.kpxe", profile="default")
    for i in range(50):
        life.offered(Client(f"52:54:00:00:01:{i:02x}", f"00000000-0000-0000-0000-{i:012x}"),
                     offer)
    life.offered(Client(M1), offer)  # no UUID: nothing to record
    for _ in range(200):
        if reg.counts_by_state()["discovered"] == 50:
            break
        await asyncio.sleep(0.01)
    assert reg.counts_by_state()["discovered"] == 50
    assert [e.kind for e in world.events] == ["discovered"] * 50
    assert world.lifecycle.sightings.uuid_for_mac("52:54:00:00:01:07") == (
        "00000000-0000-0000-0000-000000000007")
    for _ in range(100):  # one machine's repeated DISCOVERs: one note
        life.offered(Client(M1, U1), offer)
    assert life._notes.qsize() == 1
    for i in range(lifecycle_mod.NOTE_QUEUE_SIZE + 5):
        life.offered(Client(M1, f"00000000-0000-0000-0001-{i:012x}"), offer)
    assert world.counters.get("registry_notes_dropped_total") >= 5
    await life.drain()
    assert reg.get(U1) is not None


async def test_stuck_is_reported_once(world: World) -> None:
    reg, life = world.registry, world.lifecycle
    await transition(reg, U1, "deploying")
    await transition(reg, U2, "booting")
    assert life.stuck() == [] and life.check_stuck() == []
    world.clock.t += 61
    assert [n.uuid for n in life.stuck()] == [U1]
    assert [n.uuid for n in life.check_stuck()] == [U1]
    assert life.check_stuck() == []  # reported once
    assert (await reg.events(U1))[-1]["kind"] == "stuck"
    assert [e.kind for e in world.events] == ["stuck"]
    assert "netboot_nodes_stuck 1" in world.metrics.render(reg, life)


async def test_a_failing_commit_never_reaches_the_reply_path(world: World) -> None:
    reg, life = world.registry, world.lifecycle
    # Fault injection: no public path makes SQLite refuse writes (see test_registry).
    await reg._db.execute("PRAGMA query_only = 1")
    life.served(_spec(), "10.0.0.5", "ipxe")  # returns; the failure arrives later
    for _ in range(200):
        if life.problem:
            break
        await asyncio.sleep(0.01)
    assert life.problem and "write failed" in life.problem
    assert str(reg.path.parent) in life.problem  # where to free space
    assert world.counters.get("registry_write_errors_total") >= 1
    await reg._db.execute("PRAGMA query_only = 0")
