"""Two real ``netboot serve`` processes on one PostgreSQL registry (issue 15), HTTP only:
registrations through both, every node in both APIs, live updates across them, and
kill -9 of one while it acknowledges registrations."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp

from netboot.storage.registry import make_node_token
from tests.served import write_config
from tests.test_registry_load import _free_port, _mac, _register, _start, _uuid

ROOT = Path(__file__).resolve().parent.parent
SECRET = "fleet-shared-secret"


async def _serve(root: Path, name: str, url: str, port: int) -> asyncio.subprocess.Process:
    return await _start(root / name, port, None, env={"NETBOOT_SECRET": SECRET},
                        registry=url, instance=name)


async def _all_nodes(base: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    query = {"limit": "1000"}
    async with aiohttp.ClientSession() as s:
        while True:
            async with s.get(f"{base}/api/v1/nodes", params=query) as r:
                assert r.status == 200, await r.text()
                body = await r.json()
            out += body["nodes"]
            if body["next_cursor"] is None:
                return out
            query["cursor"] = body["next_cursor"]


async def _stop(*procs: asyncio.subprocess.Process) -> None:
    for p in procs:
        if p.returncode is None:
            p.terminate()
    for p in procs:
        await p.wait()


async def test_two_instances_one_registry_and_a_kill_9(postgres, tmp_path: Path) -> None:
    url = await postgres.fresh_database()
    pa, pb = _free_port(), _free_port()
    a, b = await asyncio.gather(_serve(tmp_path, "rack1-a", url, pa),
                                _serve(tmp_path, "rack1-b", url, pb))
    base_a, base_b = f"http://127.0.0.1:{pa}", f"http://127.0.0.1:{pb}"
    procs = [a, b]
    try:
        # B's dashboard stream sees a node A registers
        async with aiohttp.ClientSession() as s, s.get(f"{base_b}/api/v1/events") as stream:
            assert await _register(s, base_a, SECRET.encode(), 0) == 200
            event = None
            async with asyncio.timeout(10):
                async for raw in stream.content:
                    if raw.startswith(b"data: ") and b"uuid" in raw:
                        event = json.loads(raw[6:])
                        break
        assert event is not None and event["uuid"] == _uuid(0)
        assert event["instance"] == "rack1-a"

        # 2,000 registrations, alternating between the two; A is killed mid-way
        acked: set[int] = set()
        killed = asyncio.Event()

        async def one(s: aiohttp.ClientSession, i: int) -> None:
            base = base_a if i % 2 else base_b
            try:
                if await _register(s, base, SECRET.encode(), i) == 200:
                    acked.add(i)
                    if len(acked) >= 600 and not killed.is_set():
                        killed.set()
                        os.kill(a.pid, signal.SIGKILL)
            except (TimeoutError, aiohttp.ClientError, OSError):
                pass

        conn = aiohttp.TCPConnector(limit=200)
        async with aiohttp.ClientSession(connector=conn,
                                         timeout=aiohttp.ClientTimeout(total=60)) as s:
            await asyncio.gather(*(one(s, i) for i in range(1, 2001)))
        assert killed.is_set() and await a.wait() == -signal.SIGKILL
        assert any(i % 2 for i in acked) and any(i % 2 == 0 for i in acked)

        # B shows every acknowledged node once, whichever instance took it
        nodes = await _all_nodes(base_b)
        uuids = [n["uuid"] for n in nodes]
        assert len(uuids) == len(set(uuids)), "a node is listed twice"
        missing = sorted(i for i in acked | {0} if _uuid(i) not in set(uuids))
        assert not missing, f"{len(missing)} acknowledged registrations lost: {missing[:5]}"
        by = {n["uuid"]: n for n in nodes}
        assert by[_uuid(0)]["instance"] == "rack1-a" and by[_uuid(2)]["instance"] == "rack1-b"
        assert by[_uuid(3)]["macs"] == [_mac(3)]

        # A comes back on the same registry and lists the same nodes; a token A makes
        # works on B (one shared secret)
        a = await _serve(tmp_path, "rack1-a", url, pa)
        procs.append(a)
        again = {n["uuid"] for n in await _all_nodes(base_a)}
        assert again == set(uuids)
        token = make_node_token(SECRET.encode(), _uuid(5000))
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{base_b}/api/v1/nodes/{_uuid(5000)}/register",
                              headers={"X-Node-Token": token}, json={"serial": "X"}) as r:
                assert r.status == 200
    finally:
        await _stop(*procs)


async def test_a_fleet_instance_without_a_shared_secret_refuses_to_start(
        postgres, tmp_path: Path) -> None:
    url = await postgres.fresh_database()
    config = write_config(tmp_path / "c", tmp_path / "data", http_host="127.0.0.1",
                          http_port=_free_port(), dhcp={"enabled": False},
                          tftp={"enabled": False}, registry=url)
    env = {k: v for k, v in os.environ.items() if k != "NETBOOT_SECRET"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "netboot", "serve", "--config", str(config), cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode != 0
    assert b"NETBOOT_SECRET" in out and b"api.secret_file" in out, out.decode()
