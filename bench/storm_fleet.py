"""A boot storm across a fleet (issue 15): three netboot instances on one PostgreSQL
registry, against one instance on SQLite, the same machines in one run.

    sudo .venv/bin/python bench/storm_fleet.py -n 3000            # fleet, then one on SQLite
    sudo .venv/bin/python bench/storm_fleet.py -n 3000 --rounds 2 # alternating, twice

The fleet: bench/storm_lab.py's lab with ``servers=3``: three server namespaces on a
bridge (10.79.0.2, .4, .5), each running ``netboot serve`` with ``registry:
postgresql://...`` (tests/pgsql.py's server: initdb + pg_ctl in a temp dir, a unix
socket reached from every namespace) and one shared ``$NETBOOT_SECRET``. The
machines (bench/storm_client.py, the usual mix) are the same as bench/storm.py's:
relayed ones send each DISCOVER to all three (a relay with three helper addresses),
direct ones broadcast on the bridge; every machine boots from whichever instance
answered first, and every instance sees every DHCP client, so the three write the same
new nodes at the same time (the registry's race path, at scale). After the storm the
registry must hold exactly N nodes, every one installed, with no duplicate.

Both stacks get the same labelled raise of ``limits.new_nodes`` (a segment's and the
total burst to N: the defaults let 500 new machines behind one relay in at once, and
refuse the rest until they retry) and power the machines on over ``--spread`` seconds.

The comparison: one instance (bench/storm.py's netboot stack) on SQLite in data_dir,
same N, same mix, same seed. CPU is every instance's (main process and TFTP worker)
plus PostgreSQL's (postmaster and backends) for the fleet.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.storm import (  # noqa: E402
    DEFAULT_MIX,
    limits,
    netboot_counters,
    one_run,
    parse_size,
    pxelinux_machines,
    table,
)
from bench.storm_client import make_machines  # noqa: E402
from bench.storm_lab import NetbootServer, Sampler, StormLab, children, run_storm  # noqa: E402
from tests.pgsql import PgServer  # noqa: E402

SECRET = "storm-fleet-secret"
INSTANCES = 3


def pg_pids(server: PgServer) -> list[int]:
    pid_file = server.root / "data" / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return []
    return [pid, *children(pid)]


def fleet_run(n: int, work: Path, a: argparse.Namespace, pg: PgServer) -> dict[str, Any]:
    machines = make_machines(n, a.seed, a.mix)
    url = asyncio.run(pg.fresh_database())
    with StormLab(work / "lab", machines=n, servers=INSTANCES) as lab:
        servers: list[NetbootServer] = []
        for k in range(INSTANCES):
            s = NetbootServer(lab, work / f"netboot{k}", index=k,
                              env={"NETBOOT_SECRET": SECRET}, kernel_size=a.kernel_size,
                              initrd_size=a.initrd_size,
                              extra_yaml=f"registry: {url}\ninstance: i{k}\n"
                              f"tftp:\n  max_transfers: {limits(n)[0]}\n" + a.extra_yaml)
            pxelinux_machines(s, machines)
            servers.append(s)
        for s in servers:  # one at a time: the first migrates (the others would wait)
            s.start(timeout=120)

        def pids() -> list[int]:
            out = pg_pids(pg)
            for s in servers:
                if s.alive():
                    out += [s.proc.pid, *children(s.proc.pid)]  # type: ignore[union-attr]
            return out

        time.sleep(0.5)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        with Sampler(pids) as sampler:
            result = run_storm(lab, work / "storm.json", "-n", str(n), "--seed", str(a.seed),
                               "--mix", a.mix, "--require-callback", "--interface", "br0",
                               "--spread", str(a.spread),
                               "--server", ",".join(s.addr for s in servers))
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        result["client_cpu_s"] = round(after.ru_utime + after.ru_stime - before.ru_utime
                                       - before.ru_stime, 2)
        result["server"] = {"cpu_s": round(sampler.cpu_seconds, 2),
                            "peak_cpu_pct": round(sampler.peak_cpu_pct),
                            "peak_rss_mib": round(sampler.peak_rss_kib / 1024, 1),
                            "alive": all(s.alive() for s in servers)}
        result["per_instance"] = {f"i{k}": netboot_counters(s) for k, s in enumerate(servers)}
        result["registry"] = registry_check(url, n, servers)
    result.pop("acked", None)
    result.pop("uuids", None)
    if result["failed"] == 0:
        shutil.rmtree(work, ignore_errors=True)
    return result


def registry_check(url: str, n: int, servers: list[NetbootServer]) -> dict[str, Any]:
    """What the database holds after the storm, and what each instance's API counts."""
    def psql(sql: str) -> list[list[str]]:
        out = subprocess.run(["psql", url, "-XAtqc", sql], check=True, capture_output=True,
                             text=True).stdout
        return [line.split("|") for line in out.splitlines() if line]

    rows, distinct = map(int, psql("SELECT count(*), count(DISTINCT uuid) FROM nodes")[0])
    states = {s: int(c) for s, c in psql("SELECT state, count(*) FROM nodes GROUP BY state")}
    served = {i: int(c) for i, c in psql("SELECT instance, count(*) FROM nodes GROUP BY 1")}
    # each instance's own index (its API's counts), once the last NOTIFYs are in
    deadline = time.monotonic() + 15
    while True:
        api = {f"i{k}": {st: c for st, c in s.json("/api/v1/nodes?limit=1")["counts"].items()
                         if c} for k, s in enumerate(servers)}
        if all(c == {"installed": n} for c in api.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    ok = rows == distinct == n and states == {"installed": n} \
        and all(c == {"installed": n} for c in api.values())
    return {"rows": rows, "distinct": distinct, "states": states, "installed_by": served,
            "index_counts": api, "ok": ok}


def summary(name: str, r: dict[str, Any]) -> str:
    return (f"{name}: {r['completed']}/{r['n']} completed, {r['failed']} failed, last "
            f"completion {r['t_last_s']:.2f} s, server CPU {r['server']['cpu_s']} s, peak RSS "
            f"{r['server']['peak_rss_mib']} MiB, client CPU {r.get('client_cpu_s')} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=3000, help="machines (default 3000)")
    ap.add_argument("--mix", default=DEFAULT_MIX)
    ap.add_argument("--rounds", type=int, default=1, help="pairs, fleet and SQLite alternating")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--kernel-size", type=parse_size, default=None,
                    help="stand-in kernel bytes (default: the demo OS's)")
    ap.add_argument("--initrd-size", type=parse_size, default=None)
    ap.add_argument("--spread", type=float, default=30.0,
                    help="power-on spread in seconds (default 30: a BMC bulk power-on)")
    ap.add_argument("--json", type=Path, help="write all results here")
    a = ap.parse_args()
    # Labelled raise, on both stacks: limits.new_nodes lets a segment create 500 nodes at
    # once and 5/s after (total 1,000, 10/s); a rack of N new machines behind one relay
    # needs N at once, as a site says before it powers a new rack on.
    a.extra_yaml = (f"limits:\n  new_nodes:\n    per_segment: {{rate: 5, burst: {a.n}}}\n"
                    f"    total: {{rate: 10, burst: {a.n}}}\n")
    a.src = None
    a.tftp_workers = None
    pg = PgServer.start()
    results: list[dict[str, Any]] = []
    failed = False
    try:
        for r in range(a.rounds):
            order = ("fleet", "sqlite") if r % 2 == 0 else ("sqlite", "fleet")
            pair: dict[str, dict[str, Any]] = {}
            for stack in order:
                work = Path(tempfile.mkdtemp(prefix=f"storm-{stack}-"))
                if stack == "fleet":
                    res = fleet_run(a.n, work, a, pg)
                else:
                    res = one_run("netboot", a.n, work, a)
                pair[stack] = res
                print(summary(stack, res), flush=True)
                if stack == "fleet":
                    print("  registry:", json.dumps(res["registry"]), flush=True)
                    failed |= not res["registry"]["ok"]
                else:
                    print(table("one instance, SQLite", res), flush=True)
                failed |= res["failed"] > 0
            f, s = pair["fleet"], pair["sqlite"]
            print(f"round {r + 1}: fleet / one instance on SQLite: time "
                  f"{f['t_last_s'] / s['t_last_s']:.2f}x ({f['t_last_s']:.2f} s / "
                  f"{s['t_last_s']:.2f} s), server CPU "
                  f"{f['server']['cpu_s'] / s['server']['cpu_s']:.2f}x", flush=True)
            results.append(pair)
    finally:
        pg.stop()
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
