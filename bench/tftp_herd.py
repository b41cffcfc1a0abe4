"""The 200-client TFTP herd alone, netboot (uvloop) and tftpd-hpa alternating, by placement.

    sudo .venv/bin/python bench/tftp_herd.py [--reps 5] [--clients 200]
        [--placement apart|shared|free] [--nice N]

apart: servers on CPU 1, curl clients on the other CPUs (what bench/tftp_bench.py does);
shared: servers on CPU 1, clients anywhere; free: nothing pinned. --nice runs netboot
at that niceness (negative needs root). Prints each run and the medians: wall time and the
servers' CPU seconds (cgroup, forks included). docs/BENCHMARKS.md, "TFTP herd", says why.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.tftp_bench import (  # noqa: E402
    Server,
    herd,
    netboot_argv,
    other_cpus,
    pin,
    start,
    stop,
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--placement", choices=("apart", "shared", "free"), default="apart")
    ap.add_argument("--nice", type=int, default=0, help="niceness for netboot")
    args = ap.parse_args()
    cpu = -1 if args.placement == "free" else 1
    clients = other_cpus(cpu) if args.placement == "apart" else None
    with tempfile.TemporaryDirectory(prefix="tftpherd-") as tmpd:
        tmp = Path(tmpd)
        os.chmod(tmp, 0o755)
        root = tmp / "root"
        root.mkdir()
        ipxe = Path("/usr/lib/ipxe/ipxe.efi")
        (root / "small").write_bytes(ipxe.read_bytes() if ipxe.exists() else os.urandom(1 << 20))
        (root / "small").chmod(0o644)
        nb = pin(netboot_argv(root, 16902, "--uvloop"), cpu)
        if args.nice:
            nb = ["nice", "-n", str(args.nice), *nb]
        servers = [Server("netboot (uvloop)", nb, 16902, True),
                   Server("tftpd-hpa", pin(["in.tftpd", "-L", "-s", str(root), "-a",
                                            "127.0.0.1:16903"], cpu), 16903, False)]
        runs: dict[str, list[tuple[float, float | None]]] = {s.name: [] for s in servers}
        for s in servers:
            start(s)
        try:
            for rep in range(args.reps):
                for s in servers:
                    dt, failed, used = herd(s, root, tmp, args.clients, clients)
                    runs[s.name].append((dt, used))
                    cpu_s = "n/a" if used is None else f"{used:.2f} s CPU"
                    print(f"run {rep + 1}: {s.name}: {dt:.2f} s, {failed} failed, {cpu_s}",
                          flush=True)
        finally:
            for s in servers:
                stop(s)
    print(f"placement {args.placement}, {args.clients} clients, median of {args.reps}:")
    for name, rs in runs.items():
        used = [u for _, u in rs if u is not None]
        cpu_s = f", {statistics.median(used):.2f} s CPU" if used else ""
        print(f"  {name}: {statistics.median(d for d, _ in rs):.2f} s{cpu_s}")


if __name__ == "__main__":
    main()
