"""Real TFTP clients (curl, tftp-hpa, atftp) fetch files that cross the 65535-block rollover.

Needs the Debian packages curl, tftp-hpa and atftp; each test skips if its client is missing.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from netboot.tftp.provider import RootResolver
from netboot.tftp.server import TftpServer, start_tftp

ROLL_512 = 65536 * 512 + 1000  # > 65535 blocks at the default blksize
ROLL_1468 = 65536 * 1468 + 777  # > 65535 blocks at blksize 1468


def need(binary: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(shutil.which(binary) is None,
                              reason=f"{binary} not installed (apt-get install the client)")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tftproot")
    (root / "roll512").write_bytes(os.urandom(ROLL_512))
    (root / "roll1468").write_bytes(os.urandom(ROLL_1468))
    (root / "exact").write_bytes(os.urandom(1468 * 100))  # ends with a zero-length block
    return root


@pytest.fixture
async def server(files: Path) -> AsyncIterator[TftpServer]:
    srv = await start_tftp(RootResolver([files]), "127.0.0.1", 0)
    yield srv
    await srv.close()


async def run(*argv: str, cwd: Path | None = None, timeout: float = 180) -> None:
    proc = await asyncio.create_subprocess_exec(*argv, cwd=cwd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode == 0, f"{argv} -> {proc.returncode}: {out.decode(errors='replace')}"


def same(a: Path, b: Path) -> bool:
    return a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes()


async def settle(srv: TftpServer) -> None:
    for _ in range(200):
        if srv.active == 0:
            return
        await asyncio.sleep(0.01)


@need("curl")
@pytest.mark.parametrize(("name", "args"), [
    ("roll512", ()),
    ("roll1468", ("--tftp-blksize", "1468")),
    ("exact", ("--tftp-blksize", "1468")),
])
async def test_curl(server: TftpServer, files: Path, tmp_path: Path, name: str,
                    args: tuple[str, ...]) -> None:
    out = tmp_path / "out"
    await run("curl", "-sS", *args, "-o", str(out), f"tftp://127.0.0.1:{server.port}/{name}")
    assert same(out, files / name)
    await settle(server)
    assert server.counters.get("tftp_transfers_completed") == 1
    assert server.counters.total("tftp_transfers_failed") == 0


@need("tftp")
async def test_tftp_hpa(server: TftpServer, files: Path, tmp_path: Path) -> None:
    await run("tftp", "127.0.0.1", str(server.port), "-m", "binary", "-c", "get", "roll512", "out",
              cwd=tmp_path)
    assert same(tmp_path / "out", files / "roll512")


@need("atftp")
@pytest.mark.parametrize(("name", "ws"), [("roll1468", "4"), ("exact", "4"), ("roll1468", "1")])
async def test_atftp_windowsize(server: TftpServer, files: Path, tmp_path: Path, name: str,
                                ws: str) -> None:
    out = tmp_path / "out"
    await run("atftp", "--option", "blksize 1468", "--option", f"windowsize {ws}", "-g", "-r",
              name, "-l", str(out), "127.0.0.1", str(server.port))
    assert same(out, files / name)


@need("curl")
async def test_curl_single_port(files: Path, tmp_path: Path) -> None:
    srv = await start_tftp(RootResolver([files]), "127.0.0.1", 0, single_port=True)
    try:
        out = tmp_path / "out"
        await run("curl", "-sS", "--tftp-blksize", "1468", "-o", str(out),
                  f"tftp://127.0.0.1:{srv.port}/exact")
        assert same(out, files / "exact")
    finally:
        await srv.close()


@need("curl")
async def test_parallel_curls(files: Path, tmp_path: Path) -> None:
    n = 24  # all from 127.0.0.1, so above the default per-client limit of 16
    srv = await start_tftp(RootResolver([files]), "127.0.0.1", 0, max_per_client=n)
    try:
        await asyncio.gather(*(
            run("curl", "-sS", "--tftp-blksize", "1468", "-o", str(tmp_path / f"o{i}"),
                f"tftp://127.0.0.1:{srv.port}/exact") for i in range(n)))
        for i in range(n):
            assert same(tmp_path / f"o{i}", files / "exact")
        await settle(srv)
        assert srv.counters.get("tftp_transfers_completed") == n
    finally:
        await srv.close()
