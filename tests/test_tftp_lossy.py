"""Real clients through a lossy, reordering, duplicating relay (no root needed).

The kernel of some CI machines has no netem; this relay gives the same kind of
damage in user space, in both directions. tests/test_tftp_lab.py does it with
network namespaces where it can.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from netboot.tftp.provider import RootResolver
from netboot.tftp.server import start_tftp
from tests.tftp_helpers import LossyRelay


async def fetch_all(tmp_path: Path, clients: set[str], seed: int) -> None:
    content = os.urandom(300 * 1024 + 5)
    exact = os.urandom(1468 * 150)
    (tmp_path / "f").write_bytes(content)
    (tmp_path / "x").write_bytes(exact)
    srv = await start_tftp(RootResolver([tmp_path]), "127.0.0.1", 0, timeout=0.1, retries=10)
    relay = LossyRelay(("127.0.0.1", srv.port), loss=0.10, reorder=0.25, dup=0.02, seed=seed)
    p = relay.port
    jobs = [
        (["curl", "-sS", "--tftp-blksize", "1468", "-o", "c1", f"tftp://127.0.0.1:{p}/f"], "c1",
         content),
        (["curl", "-sS", "-o", "c2", f"tftp://127.0.0.1:{p}/x"], "c2", exact),
        (["atftp", "--option", "blksize 1468", "--option", "windowsize 4", "-g", "-r", "f",
          "-l", "a4", "127.0.0.1", str(p)], "a4", content),
        (["atftp", "--option", "blksize 1468", "--option", "windowsize 8", "-g", "-r", "x",
          "-l", "a8", "127.0.0.1", str(p)], "a8", exact),
        (["tftp", "127.0.0.1", str(p), "-m", "binary", "-c", "get", "f", "h"], "h", content),
    ]
    jobs = [j for j in jobs if j[0][0] in clients]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    try:
        async def one(argv: list[str]) -> tuple[int, bytes]:
            proc = await asyncio.create_subprocess_exec(*argv, cwd=out_dir,
                                                        stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.STDOUT)
            log, _ = await asyncio.wait_for(proc.communicate(), 240)
            return proc.returncode or 0, log

        results = await asyncio.gather(*(one(argv) for argv, _, _ in jobs))
        for (argv, name, want), (rc, log) in zip(jobs, results, strict=True):
            assert rc == 0, f"{argv}: {log.decode(errors='replace')}"
            assert (out_dir / name).read_bytes() == want, argv
        assert relay.dropped > 10  # the link really was lossy
        for _ in range(100):
            if srv.active == 0:
                break
            await asyncio.sleep(0.05)
        assert srv.counters.get("tftp_retransmits") > 0
        # A lost final ACK leaves the server retrying after the client is done, so a
        # transfer may end as a timeout on our side although the client has every byte;
        # with the retransmit backoff (1+2+4+8+8 s) that takes up to ~23 s.
        for _ in range(400):
            if srv.active == 0:
                break
            await asyncio.sleep(0.1)
        assert srv.active == 0, "a transfer never ended"
        ctr = srv.counters
        assert ctr.get("tftp_transfers_completed") + ctr.total("tftp_transfers_failed") == len(jobs)
    finally:
        relay.close()
        await srv.close()


@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("tftp")),
                    reason="needs curl and tftp-hpa")
async def test_lockstep_clients_through_loss_reorder_dup(tmp_path: Path) -> None:
    await fetch_all(tmp_path, {"curl", "tftp"}, seed=7)


@pytest.mark.skipif(not shutil.which("atftp"), reason="needs atftp")
@pytest.mark.xfail(strict=False, reason=(
    "open: under 10% loss + reordering atftp 0.8 (windowsize 4) now and then stalls: it "
    "ignores re-sent old blocks without re-ACKing, and our retries run out first"))
async def test_atftp_windowed_through_loss_reorder_dup(tmp_path: Path) -> None:
    await fetch_all(tmp_path, {"atftp"}, seed=7)
