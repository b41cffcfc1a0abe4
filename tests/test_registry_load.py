"""Registry under load through real HTTP: 1,000 concurrent registrations, and kill -9."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import sys
from pathlib import Path
from typing import Any

import aiohttp

from netboot.storage.registry import make_node_token
from tests.nodes import RegistryPlace
from tests.served import write_config
from tests.test_api import SECRET, serve_registry

ROOT = Path(__file__).resolve().parent.parent


def _uuid(i: int) -> str:
    return f"10000000-0000-4000-8000-{i:012x}"


def _mac(i: int) -> str:
    return f"02:00:00:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}"


async def _register(session: aiohttp.ClientSession, base: str, secret: bytes, i: int) -> int:
    u = _uuid(i)
    async with session.post(f"{base}/api/v1/nodes/{u}/register",
                            headers={"X-Node-Token": make_node_token(secret, u)},
                            json={"serial": f"SN{i:06d}", "vendor": "QEMU", "mac": _mac(i)}) as r:
        await r.read()
        return r.status


async def test_thousand_concurrent_registrations(regdb: RegistryPlace) -> None:
    """Through real HTTP, on either engine (``regdb``): every registration one row."""
    n = 1000
    tmp_path = regdb.data_dir
    async with serve_registry(tmp_path, settings={"registry": regdb.url} if regdb.url
                              else None) as srv:
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn) as s:
            statuses = await asyncio.gather(*(_register(s, srv.url, SECRET, i) for i in range(n)))
        assert statuses == [200] * n
        assert srv.registry.counts_by_state()["discovered"] == n
        assert len(await srv.registry.list()) == n
        commits = srv.registry.stats.commits
        assert commits < n / 2, f"{commits} commits for {n} writes: not group-committed"
    assert await regdb.rows("SELECT count(*), count(DISTINCT uuid) FROM nodes") == [(n, n)]
    assert await regdb.rows("SELECT count(*) FROM macs") == [(n,)]
    assert await regdb.rows("SELECT count(*) FROM events WHERE kind='discovered'") == [(n,)]
    got = {r[0] for r in await regdb.rows("SELECT uuid FROM nodes")}
    assert got == {_uuid(i) for i in range(n)}
    assert await regdb.rows(f"SELECT serial FROM nodes WHERE uuid='{_uuid(7)}'") == [
        ("SN000007",)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _start(data_dir: Path, port: int, secret: str | None, *,
                 env: dict[str, str] | None = None, **settings: Any
                 ) -> asyncio.subprocess.Process:
    """The real ``netboot serve``, HTTP only, on 127.0.0.1:port with its data in data_dir
    (``settings``: more of netboot.yaml; ``env``: added to the environment)."""
    config = write_config(data_dir / "config", data_dir, http_host="127.0.0.1", http_port=port,
                          dhcp={"enabled": False}, tftp={"enabled": False},
                          **({"api": {"secret": secret}} if secret else {}), **settings)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "netboot", "serve", "--config", str(config), cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert proc.stdout is not None
    lines: list[bytes] = []
    while True:  # serve logs "dashboard: ..." once every listener is up
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line, f"netboot serve exited before it was ready: {b''.join(lines).decode()}"
        lines.append(line)
        if b"dashboard:" in line:
            break
    asyncio.get_running_loop().create_task(_drain(proc.stdout))
    return proc


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


async def test_kill_9_keeps_every_acknowledged_registration(tmp_path: Path) -> None:
    secret = "kill-test-secret"
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = await _start(tmp_path, port, secret)
    acked: set[int] = set()
    failed = 0
    killed = asyncio.Event()

    async def one(s: aiohttp.ClientSession, i: int) -> None:
        nonlocal failed
        try:
            if await _register(s, base, secret.encode(), i) == 200:
                acked.add(i)
                if len(acked) >= 600 and not killed.is_set():
                    killed.set()
                    os.kill(proc.pid, signal.SIGKILL)
            else:
                failed += 1
        except (TimeoutError, aiohttp.ClientError, OSError):
            failed += 1

    try:
        conn = aiohttp.TCPConnector(limit=300)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:
            await asyncio.gather(*(one(s, i) for i in range(5000)))
        assert killed.is_set(), "the load finished before 600 acknowledgements"
        assert await proc.wait() == -signal.SIGKILL
        assert failed > 0, "the kill landed after the load: nothing was in flight"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    proc = await _start(tmp_path, port, secret)  # restart on the same data
    try:
        present: set[str] = set()
        query = {"limit": "1000"}
        async with aiohttp.ClientSession() as s:
            while True:  # every page
                async with s.get(f"{base}/api/v1/nodes", params=query) as r:
                    assert r.status == 200
                    body = await r.json()
                present |= {n["uuid"] for n in body["nodes"]}
                if body["next_cursor"] is None:
                    break
                query["cursor"] = body["next_cursor"]
    finally:
        proc.terminate()
        await proc.wait()
    missing = sorted(i for i in acked if _uuid(i) not in present)
    assert not missing, f"{len(missing)} acknowledged registrations lost, e.g. {missing[:5]}"
    assert len(present) >= len(acked)
    db = sqlite3.connect(tmp_path / "registry.sqlite3")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        db.close()
