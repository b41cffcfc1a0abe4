#!/usr/bin/env python3
"""`make bench`: every benchmark, each against its peer in the same run.

Each script prints its own table (netboot beside dnsmasq, tftpd-hpa, nginx or
the dnsmasq+nginx stack, with the ratio); this runs them in turn and ends with
which ran and which failed. Figures and the commands that made them are kept in
docs/BENCHMARKS.md. Run on a quiet machine: the figures are wall-clock.

    python bench/run_all.py                # all
    python bench/run_all.py --only tftp    # one (dhcp, dhcp-l2, tftp, http, render, storm, nodes)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES: dict[str, list[str]] = {
    "dhcp": ["dhcp_bench.py", "--duration", "3", "--start", "5000", "--ceiling", "80000"],
    "dhcp-l2": ["dhcp_load.py", "--duration", "3", "--start", "4000", "--ceiling", "60000"],
    "tftp": ["tftp_bench.py", "--reps", "5", "--clients", "200", "--pin", "1"],
    "http": ["http_bench.py", "--rounds", "2"],
    "render": ["render_bench.py", "--machines", "1000", "--repeats", "1000"],
    "storm": ["storm.py", "-n", "100", "-n", "1000"],
    "nodes": ["nodes_api.py"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=sorted(BENCHES),
                        help="run only this benchmark (repeatable)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces, ports 67 and 69)", file=sys.stderr)
        return 1
    results: list[tuple[str, int, float]] = []
    for name in args.only or list(BENCHES):
        script, *rest = BENCHES[name]
        cmd = [sys.executable, str(HERE / script), *rest]
        print(f"\n=== {name}: {' '.join(cmd[1:])}  (load {os.getloadavg()[0]:.1f})", flush=True)
        t = time.monotonic()
        rc = subprocess.call(cmd)
        results.append((name, rc, time.monotonic() - t))
    print("\n=== summary")
    for name, rc, took in results:
        print(f"  {name:8} {'ok' if rc == 0 else f'FAILED (exit {rc})':18} {took:6.0f} s")
    return 0 if all(rc == 0 for _, rc, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
