"""Boot scripts against a PostgreSQL registry of 1,000 and of 100,000 nodes (issue 15).

Two PostgreSQL databases on one server (tests/pgsql.py: initdb + pg_ctl in a temp dir,
unix socket only, Debian's defaults except ``fsync=off``, as the tests run it) are filled
through the registry's own writes: N_SMALL and N_LARGE nodes, a quarter installed. Two
``netboot serve`` processes (HTTP only), one per database, start on them; then this
process asks both, alternating request by request (so a change in the host's speed hits
both alike), for the boot script of a random node each knows (``GET /ipxe/node?uuid=
&mac=``: the hot path, which reads the in-memory index and queues a 'booting' write to
PostgreSQL, NOTIFY included). One keep-alive connection per server, requests one after
another. Prints p50 / p99 / max for each and the ratio of the p99s (target: <= 1.2).

    sudo .venv/bin/python bench/fleet_scale.py [--small 1000] [--large 100000] [--requests 5000]

Needs Debian's postgresql (the server binaries; no cluster of its own is used).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.http_bench import free_port, wait_http  # noqa: E402
from bench.nodes_api import pct  # noqa: E402
from netboot.storage.registry import Registry  # noqa: E402
from tests.pgsql import PgServer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TARGET_RATIO = 1.2
PROFILE = """\
kernel: demo/vmlinuz
initrds: [demo/initrd.cpio.gz]
cmdline: "console=ttyS0 host={{ hostname }} cb={{ base_url }}"
"""


def uuid_of(i: int) -> str:
    return f"40000000-0000-0000-0000-{i:012x}"


def mac_of(i: int) -> str:
    return f"52:54:{i >> 24 & 255:02x}:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}"


async def fill(url: str, n: int) -> float:
    t0 = time.perf_counter()
    reg = await Registry.open(Path("/nonexistent"), secret=b"bench", url=url, instance="fill")
    try:
        for i in range(n):
            reg.observe(uuid_of(i), mac=mac_of(i), address=None, source="bench",
                        serial=f"SN-{i:07d}", hostname=f"node{i:06d}.lab", vendor="Dell Inc.",
                        product="PowerEdge R640", profile="bench")
            if i % 4 == 0:
                reg.set_state(uuid_of(i), "installed", source="bench")
            if i % 10_000 == 9_999:
                await reg.commit()
        await reg.commit()
    finally:
        await reg.close()
    return time.perf_counter() - t0


def start(tmp: Path, name: str, url: str, port: int) -> subprocess.Popen[bytes]:
    d = tmp / name
    for sub in ("profiles", "machines"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    (d / "profiles" / "bench.yaml").write_text(PROFILE)
    cfg = d / "netboot.yaml"
    cfg.write_text(f"profiles_dir: profiles\nmachines_dir: machines\ndata_dir: data\n"
                   f"images_dir: {ROOT / 'images'}\ndefault_profile: bench\nlog_level: warning\n"
                   f"dhcp: {{enabled: false}}\ntftp: {{enabled: false}}\n"
                   f"registry: {url}\ninstance: {name}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NETBOOT_SECRET": "bench-secret"}
    cmd = [sys.executable, "-m", "netboot", "serve", "--config", str(cfg), "--interface", "lo",
           "--address", "127.0.0.1", "--http-port", str(port)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env,
                            stderr=open(d / "netboot.log", "wb"))


async def measure(bases: dict[str, tuple[str, int]], requests: int,
                  seed: int) -> dict[str, list[float]]:
    rng = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in bases}
    sessions = {name: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
                for name in bases}
    try:
        async def one(name: str) -> float:
            base, n = bases[name]
            i = rng.randrange(n)
            t0 = time.perf_counter()
            async with sessions[name].get(f"{base}/ipxe/node",
                                          params={"uuid": uuid_of(i), "mac": mac_of(i)}) as r:
                body = await r.read()
                if r.status != 200 or not body.startswith(b"#!ipxe\nkernel"):
                    raise SystemExit(f"{name}: HTTP {r.status}: {body[:300]!r}")
            return (time.perf_counter() - t0) * 1000

        for _ in range(200):  # warm up both
            for name in bases:
                await one(name)
        for k in range(requests):
            order = list(bases) if k % 2 == 0 else list(reversed(bases))
            for name in order:
                times[name].append(await one(name))
    finally:
        for s in sessions.values():
            await s.close()
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=1000)
    ap.add_argument("--large", type=int, default=100_000)
    ap.add_argument("--requests", type=int, default=5000, help="per registry")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    server = PgServer.start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="netboot-fleet-bench-") as d:
            tmp = Path(d)
            bases: dict[str, tuple[str, int]] = {}
            for n in (args.small, args.large):
                url = asyncio.run(server.fresh_database())
                took = asyncio.run(fill(url, n))
                print(f"registry of {n:,} nodes written in {took:.1f} s", flush=True)
                port = free_port()
                name = f"n{n}"
                procs.append(start(tmp, name, url, port))
                bases[name] = (f"http://127.0.0.1:{port}", n)
            for p, (base, _) in zip(procs, bases.values()):
                wait_http(f"{base}/health", p, "netboot serve", timeout=180)
            times = asyncio.run(measure(bases, args.requests, args.seed))
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=30)
        server.stop()
    print(f"\nGET /ipxe/node for a random known node, {args.requests} requests each, "
          f"alternating, one connection each; load average {os.getloadavg()[0]:.2f} on "
          f"{os.cpu_count()} CPUs")
    print(f"{'registry':<16} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    p99 = {}
    for name, t in times.items():
        p99[name] = pct(t, 0.99)
        print(f"{bases[name][1]:>10,} nodes {statistics.median(t):>8.2f} {p99[name]:>8.2f} "
              f"{max(t):>8.2f}")
    small, large = p99[f"n{args.small}"], p99[f"n{args.large}"]
    ratio = large / small
    ok = ratio <= TARGET_RATIO
    print(f"\np99 ratio {args.large:,} / {args.small:,} nodes: {ratio:.2f} "
          f"({'within' if ok else 'OVER'} the {TARGET_RATIO}x target)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
