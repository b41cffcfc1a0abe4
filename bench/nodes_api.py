"""The nodes API at 100,000 nodes: latency of one page of ``GET /api/v1/nodes``.

Fills a registry through its own API (``Registry.observe`` and ``set_state``, one
commit), starts ``netboot serve`` on it (DHCP and TFTP off) and measures, from
this process (an aiohttp client, one keep-alive connection, requests one after
another), the first page, a page in the middle (by the cursor of the 50,000th
node), ``q=`` (one serial: the worst case, a scan of the whole covering index;
and a common substring: the page fills at once), ``state=`` and both. Prints
p50 / p99 / max per query and whether p99 stays under the target.

    PYTHONPATH=. .venv/bin/python bench/nodes_api.py [--nodes 100000] [--requests 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.http_bench import free_port, wait_http  # noqa: E402
from netboot.storage.registry import Registry  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TARGET_P99_MS = 50.0


def uuid_of(i: int) -> str:
    return f"30000000-0000-0000-0000-{i:012x}"


async def fill(data_dir: Path, n: int) -> float:
    """``n`` nodes: a quarter installed, one in a thousand in error; seconds it took."""
    t0 = time.perf_counter()
    reg = await Registry.open(data_dir, secret=b"bench")
    try:
        for i in range(n):
            reg.observe(uuid_of(i), mac=f"52:54:{i >> 24 & 255:02x}:{i >> 16 & 255:02x}:"
                        f"{i >> 8 & 255:02x}:{i & 255:02x}", address=f"10.{i >> 16 & 255}."
                        f"{i >> 8 & 255}.{i & 255}", source="bench", serial=f"SN-{i:07d}",
                        hostname=f"node{i:06d}.rack{i // 40:04d}.lab", vendor="Dell Inc.",
                        product="PowerEdge R640", profile="coreos" if i % 3 else "flatcar")
            if i % 1000 == 7:
                reg.set_state(uuid_of(i), "error", source="bench", reason="disk not found")
            elif i % 4 == 0:
                reg.set_state(uuid_of(i), "installed", source="bench")
        await reg.commit()
    finally:
        await reg.close()
    return time.perf_counter() - t0


def start(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    for d in ("profiles", "machines"):
        (tmp / d).mkdir(exist_ok=True)
    cfg = tmp / "netboot.yaml"
    cfg.write_text("profiles_dir: profiles\nmachines_dir: machines\ndata_dir: data\n"
                   "images_dir: images\ndefault_profile: null\nlog_level: warning\n"
                   "dhcp: {enabled: false}\ntftp: {enabled: false}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this tree's netboot, not an installed one
    cmd = [sys.executable, "-m", "netboot", "serve", "--config", str(cfg), "--interface", "lo",
           "--address", "127.0.0.1", "--http-port", str(port)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env,
                            stderr=open(tmp / "netboot.log", "wb"))


async def measure(base: str, requests: int, nodes: int) -> list[tuple[str, list[float], int]]:
    url = f"{base}/api/v1/nodes"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
        async def get(params: dict[str, str]) -> dict[str, object]:
            async with s.get(url, params=params) as r:
                if r.status != 200:
                    raise SystemExit(f"GET {url} {params}: HTTP {r.status}: {await r.text()}")
                return await r.json()  # type: ignore[no-any-return]

        middle: dict[str, str] = {"limit": "1000"}  # walk to the middle by cursors
        for _ in range(nodes // 2000):
            middle["cursor"] = str((await get(middle))["next_cursor"])
        rare = f"SN-{nodes - 3:07d}"  # near the end: the scan reads nearly every entry
        queries = [
            ("first page", {"limit": "50"}),
            ("middle page (cursor)", {"limit": "50", "cursor": middle["cursor"]}),
            (f"q={rare} (one match)", {"limit": "50", "q": rare}),
            ("q=rack0042 (40 matches)", {"limit": "50", "q": "rack0042"}),
            ("q=node0 (many matches)", {"limit": "50", "q": "node0"}),
            ("state=error", {"limit": "50", "state": "error"}),
            ("state=installed, middle", {"limit": "50", "state": "installed",
                                         "cursor": middle["cursor"]}),
            ("state=error&q=SN-00", {"limit": "50", "state": "error", "q": "SN-00"}),
        ]
        results = []
        for name, params in queries:
            for _ in range(20):  # warm up
                await get(params)
            times = []
            rows = 0
            for _ in range(requests):
                t0 = time.perf_counter()
                body = await get(params)
                times.append((time.perf_counter() - t0) * 1000)
                rows = len(body["nodes"])  # type: ignore[arg-type]
            results.append((name, times, rows))
        return results


def pct(times: list[float], p: float) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=100_000)
    ap.add_argument("--requests", type=int, default=1000, help="per query")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="netboot-nodes-bench-") as d:
        tmp = Path(d)
        took = asyncio.run(fill(tmp / "data", args.nodes))
        print(f"registry: {args.nodes:,} nodes written in {took:.1f} s "
              f"({(tmp / 'data' / 'registry.sqlite3').stat().st_size / 1e6:.0f} MB)")
        port = free_port()
        proc = start(tmp, port)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_http(f"{base}/health", proc, "netboot serve", timeout=120)
            results = asyncio.run(measure(base, args.requests, args.nodes))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"\nGET /api/v1/nodes, {args.requests} requests each, one connection, "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"{'query':<30} {'rows':>5} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    worst = 0.0
    for name, times, rows in results:
        p99 = pct(times, 0.99)
        worst = max(worst, p99)
        print(f"{name:<30} {rows:>5} {statistics.median(times):>8.2f} {p99:>8.2f} "
              f"{max(times):>8.2f}")
    ok = worst < TARGET_P99_MS
    print(f"\nworst p99 {worst:.1f} ms: {'under' if ok else 'OVER'} the {TARGET_P99_MS:.0f} ms "
          "target")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
