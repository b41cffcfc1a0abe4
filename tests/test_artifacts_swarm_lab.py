"""Swarm facts for the boot path from a real manager's Docker socket (``-m lab``, root):
read at startup, refreshed in the background, a rotated token re-renders the config,
a dead socket keeps the last good facts, and no token reaches the log."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import pytest

from netboot.config import SwarmConfig
from netboot.ignition.artifacts import SwarmSource
from tests.test_artifacts import M1, U1, make_booter, script_for, write_tree
from tests.test_swarm_lab import MANAGER_IP, Lab, env_file, lab, nodes, wait_for  # noqa: F401  (lab: a fixture)

pytestmark = pytest.mark.lab


async def test_socket_facts_refresh_and_rotation(lab: Lab, tmp_path: Path,  # noqa: F811
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    m = lab.manager
    if m.docker("info", "--format", "{{.Swarm.LocalNodeState}}").stdout.strip() != "active":
        m.docker("swarm", "init", "--advertise-addr", MANAGER_IP)
    config = write_tree(tmp_path, swarm=f"swarm:\n  docker_socket: {m.sock}\n")
    booter, artifacts = make_booter(config)
    source = artifacts.swarm
    assert source.facts is None  # nothing read yet: a swarm template must not render
    _, r = script_for(booter, M1, U1)
    assert r.ignition_error is not None and "swarm facts unavailable" in r.ignition_error

    await source.refresh()  # what serve does once at startup
    token = m.docker("swarm", "join-token", "-q", "worker").stdout.strip()
    assert source.facts is not None and source.facts.worker_token == token
    _, r = script_for(booter, M1, U1)
    assert r.artifacts is not None and r.artifacts.config is not None
    env = env_file(json.loads(r.artifacts.config), "/etc/netboot/swarm.env")
    assert env == {"SWARM_MANAGER": f"{MANAGER_IP}:2377", "SWARM_TOKEN": token}

    # the background loop picks up a rotated token; the next boot gets a fresh render
    source.interval = 0.2
    task = asyncio.create_task(source.run())
    try:
        m.docker("swarm", "join-token", "--rotate", "worker")
        rotated = m.docker("swarm", "join-token", "-q", "worker").stdout.strip()
        assert rotated != token
        for _ in range(50):
            if source.facts.worker_token == rotated:
                break
            await asyncio.sleep(0.1)
        assert source.facts.worker_token == rotated
        _, r2 = script_for(booter, M1, U1)
        assert r2.artifacts is not None and r2.artifacts.config is not None
        assert rotated.encode() in r2.artifacts.config and token.encode() not in r2.artifacts.config

        # the socket goes away: the error is kept, the last good facts still serve
        source.socket = str(tmp_path / "gone.sock")
        for _ in range(50):
            if source.error and "gone.sock" in source.error:
                break
            await asyncio.sleep(0.1)
        assert source.error and "gone.sock" in source.error
        assert source.facts.worker_token == rotated
        _, r3 = script_for(booter, M1, U1)
        assert r3.artifacts is r2.artifacts  # same inputs: a cache hit
    finally:
        task.cancel()
    for secret in (token, rotated):
        assert secret not in caplog.text


def test_sweep_needs_the_socket() -> None:
    assert SwarmSource(SwarmConfig(sweep_down_nodes=True)).sweep is False
    assert SwarmSource(SwarmConfig(docker_socket="/x", sweep_down_nodes=True)).sweep is True


async def test_sweep_keeps_a_rebooted_host_until_its_new_node_is_ready(lab: Lab) -> None:  # noqa: F811
    """A netbooted node is Ready minutes after its boot script, later than the next
    sweep: the hostname must stay a candidate, or its old Down entry is never removed
    (it was forgotten after one sweep)."""
    m, w = lab.manager, lab.worker
    if m.docker("info", "--format", "{{.Swarm.LocalNodeState}}").stdout.strip() != "active":
        m.docker("swarm", "init", "--advertise-addr", MANAGER_IP)
    token = m.docker("swarm", "join-token", "-q", "worker").stdout.strip()
    if w.docker("info", "--format", "{{.Swarm.LocalNodeState}}").stdout.strip() != "active":
        w.docker("swarm", "join", "--token", token, f"{MANAGER_IP}:2377")
    old_id = w.docker("info", "--format", "{{.Swarm.NodeID}}").stdout.strip()
    w.docker("swarm", "leave", "--force")  # powered off: the manager lists it Down
    wait_for(lambda: any(n["ID"] == old_id and n["Status"] == "Down" for n in nodes(m)),
             "the worker down")

    source = SwarmSource(SwarmConfig(docker_socket=str(m.sock), sweep_down_nodes=True,
                                     refresh_seconds=1))
    source.rebooted[w.name] = time.monotonic()  # what issue() notes at its boot script
    task = asyncio.create_task(source.run())
    try:
        await asyncio.sleep(3.5)  # sweeps while the node is still booting: nothing to do
        assert old_id in {n["ID"] for n in nodes(m)}
        assert w.name in source.rebooted
        w.docker("swarm", "join", "--token", token, f"{MANAGER_IP}:2377")  # up again
        for _ in range(100):
            if old_id not in {n["ID"] for n in nodes(m)}:
                break
            await asyncio.sleep(0.2)
        assert [n["Status"] for n in nodes(m) if n["Hostname"] == w.name] == ["Ready"]
    finally:
        task.cancel()
        w.docker("swarm", "leave", "--force", check=False)
