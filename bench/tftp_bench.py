"""TFTP throughput and concurrency: netboot vs tftpd-hpa vs dnsmasq, same files, one run.

    sudo .venv/bin/python bench/tftp_bench.py [--reps 3] [--clients 200] [--pin CPU] [--write]

Needs tftpd-hpa (in.tftpd), dnsmasq-base, curl and atftp; root, because dnsmasq's TFTP
port is always 69 (bound on 127.0.0.1 only). Every server runs in turn on 127.0.0.1; the
clients are curl (lock-step, windowsize 1) and atftp (windowsize 4). Lock-step on loopback
is dominated by wake-up latency, so by default every server and stream client is pinned
to one CPU (--pin -1 to disable); the herd's 200 clients stand for other machines and run
on the remaining CPUs. Each figure is the median of --reps runs.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BIG = 64 * 1024 * 1024
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Server:
    name: str
    argv: list[str]
    port: int
    windowsize: bool
    proc: subprocess.Popen[bytes] | None = None
    cpu: CpuMeter | None = None
    results: dict[str, Any] = field(default_factory=dict)


def netboot_argv(root: Path, port: int, *extra: str) -> list[str]:
    """The standalone netboot TFTP server on 127.0.0.1:port, limits out of the way."""
    return [sys.executable, "-m", "netboot.tftp", "--root", str(root), "--host",
            "127.0.0.1", "--port", str(port), "--max-per-client", "10000",
            "--max-transfers", "10000", *extra]


def pin(argv: list[str], cpu: int) -> list[str]:
    return argv if cpu < 0 else ["taskset", "-c", str(cpu), *argv]


def start(s: Server) -> None:
    s.proc = subprocess.Popen(s.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    s.cpu = CpuMeter(s.name, s.proc.pid)
    time.sleep(1.0)
    if s.proc.poll() is not None:
        raise SystemExit(f"{s.name} did not start: {' '.join(s.argv)}")


def stop(s: Server) -> None:
    if s.proc is not None:
        s.proc.terminate()
        try:
            s.proc.wait(10)
        except subprocess.TimeoutExpired:
            s.proc.kill()
            s.proc.wait()
    if s.cpu is not None:
        s.cpu.close()


def timed(argv: list[str], out: Path, want: bytes | None, timeout: float = 300) -> float | None:
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    r = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=timeout, check=False)
    dt = time.perf_counter() - t0
    if r.returncode != 0 or (want is not None and out.read_bytes() != want):
        return None
    return dt


def stream(s: Server, client: str, root: Path, tmp: Path, reps: int, cpu: int) -> float | None:
    want = (root / "big").read_bytes()
    out = tmp / f"{s.name}-{client}"
    if client == "curl":
        argv = ["curl", "-s", "--tftp-blksize", "1468", "-o", str(out),
                f"tftp://127.0.0.1:{s.port}/big"]
    else:
        argv = ["atftp", "--option", "blksize 1468", "--option", "windowsize 4", "-g", "-r",
                "big", "-l", str(out), "127.0.0.1", str(s.port)]
    times = [timed(pin(argv, cpu), out, want) for _ in range(reps)]
    ok = [t for t in times if t is not None]
    if len(ok) < len(times):
        print(f"  {s.name} {client}: {len(times) - len(ok)} failed runs", file=sys.stderr)
    return BIG / statistics.median(ok) / 1e6 if ok else None


class CpuMeter:
    """CPU seconds used by a server and every process it forks (tftpd-hpa forks one per
    transfer and lets the kernel reap them, so /proc's cutime never sees their time):
    the server is moved into a cgroup of its own (v2, or v1 cpuacct). Without cgroups,
    `read()` is None."""

    def __init__(self, name: str, pid: int):
        self.usage: Path | None = None
        self.dir: Path | None = None
        tag = f"netboot-bench-{os.getpid()}-{re.sub(r'[^a-z0-9]+', '-', name.lower())}"
        for root, procs, usage in ((Path("/sys/fs/cgroup"), "cgroup.procs", "cpu.stat"),
                                   (Path("/sys/fs/cgroup/cpuacct"), "tasks", "cpuacct.usage")):
            if not (root / procs).exists():
                continue
            try:
                (root / tag).mkdir(exist_ok=True)
                (root / tag / procs).write_text(str(pid))
            except OSError:
                continue
            self.dir, self.usage = root / tag, root / tag / usage
            return

    def read(self) -> float | None:
        if self.usage is None:
            return None
        text = self.usage.read_text()
        if self.usage.name == "cpu.stat":  # "usage_usec N" on the first line
            return int(text.split()[1]) / 1e6
        return int(text) / 1e9

    def close(self) -> None:
        if self.dir is not None:
            try:
                self.dir.rmdir()  # succeeds once the server and its forks have exited
            except OSError:
                pass


def other_cpus(cpu: int) -> str | None:
    """The CPUs the herd's clients may use: all but the server's (None: no pinning)."""
    if cpu < 0:
        return None
    rest = sorted(os.sched_getaffinity(0) - {cpu})
    return ",".join(map(str, rest)) if rest else None


def herd(s: Server, root: Path, tmp: Path, n: int,
         client_cpus: str | None) -> tuple[float, int, float | None]:
    """n concurrent curl fetches: seconds, failures, the server's CPU seconds for them.

    The clients stand for n other machines, so they run off the server's CPU: sharing it,
    they would compete with the server for its own core (CFS gives one event-loop process
    one share against every woken curl, while tftpd-hpa's 200 forks get 200 shares).
    """
    want = (root / "small").read_bytes()
    assert s.cpu is not None
    d = tmp / f"herd-{s.name}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    argv = ["curl", "-s", "--tftp-blksize", "1468"]
    if client_cpus is not None:
        argv = ["taskset", "-c", client_cpus, *argv]
    c0 = s.cpu.read()
    t0 = time.perf_counter()
    procs = [subprocess.Popen([*argv, "-o", str(d / str(i)), f"tftp://127.0.0.1:{s.port}/small"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for i in range(n)]
    codes = [p.wait(600) for p in procs]
    dt = time.perf_counter() - t0
    c1 = s.cpu.read()
    failed = sum(1 for i, c in enumerate(codes)
                 if c != 0 or not (d / str(i)).exists() or (d / str(i)).read_bytes() != want)
    shutil.rmtree(d, ignore_errors=True)
    return dt, failed, None if c0 is None or c1 is None else c1 - c0


def herds(servers: list[Server], root: Path, tmp: Path, n: int, reps: int,
          client_cpus: str | None) -> None:
    """The herd, rounds alternating between the servers (all running, each on its own
    port), so a drift in the host's speed hits every server alike; medians into results."""
    runs: dict[str, list[tuple[float, int, float | None]]] = {s.name: [] for s in servers}
    for s in servers:
        start(s)
    try:
        for _ in range(reps):
            for s in servers:
                runs[s.name].append(herd(s, root, tmp, n, client_cpus))
    finally:
        for s in servers:
            stop(s)
    for s in servers:
        rs = runs[s.name]
        used = [u for _, _, u in rs if u is not None]
        s.results["herd_s"] = statistics.median(dt for dt, _, _ in rs)
        s.results["herd_failed"] = sum(f for _, f, _ in rs)
        s.results["herd_cpu"] = statistics.median(used) if used else None
        s.results["herd_rounds"] = [dt for dt, _, _ in rs]
        print(f"   {s.name} herd: {[round(dt, 2) for dt, _, _ in rs]} s", file=sys.stderr)


def fmt(v: float | None, unit: str) -> str:
    return "n/a" if v is None else f"{v:.2f} {unit}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3, help="runs of each stream and herd; medians")
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--pin", type=int, default=1,
                    help="CPU of the servers and stream clients (herd clients: the others); "
                         "-1: no pinning")
    ap.add_argument("--write", action="store_true", help="write docs/BENCHMARKS.md ## TFTP")
    args = ap.parse_args()
    for tool in ("in.tftpd", "dnsmasq", "curl", "atftp"):
        if shutil.which(tool) is None:
            raise SystemExit(f"missing {tool}: apt-get install tftpd-hpa dnsmasq-base curl atftp")
    cpu = args.pin
    with tempfile.TemporaryDirectory(prefix="tftpbench-") as tmpd:
        tmp = Path(tmpd)
        root = tmp / "root"
        root.mkdir()
        os.chmod(tmp, 0o755)
        (root / "big").write_bytes(os.urandom(BIG))
        ipxe = Path("/usr/lib/ipxe/ipxe.efi")
        small = ipxe.read_bytes() if ipxe.exists() else os.urandom(1024 * 1024)
        (root / "small").write_bytes(small)
        for f in root.iterdir():
            f.chmod(0o644)
        servers = [
            Server("netboot (asyncio)", pin(netboot_argv(root, 16901), cpu), 16901, True),
            Server("netboot (uvloop)", pin(netboot_argv(root, 16902, "--uvloop"), cpu), 16902,
                   True),
            Server("tftpd-hpa 5.2", pin(["in.tftpd", "-L", "-s", str(root), "-a",
                                         "127.0.0.1:16903"], cpu), 16903, False),
            Server("dnsmasq 2.90", pin(["dnsmasq", "--no-daemon", "--port=0", "--enable-tftp",
                                        f"--tftp-root={root}", "--listen-address=127.0.0.1",
                                        "--bind-interfaces", "--quiet-tftp", "--tftp-max=10000",
                                        "--user=root", "--log-facility=/dev/null",
                                        "--pid-file="], cpu), 69, False),
        ]
        for s in servers:
            print(f"== {s.name}", file=sys.stderr)
            start(s)
            try:
                s.results["ws1"] = stream(s, "curl", root, tmp, args.reps, cpu) or 0.0
                s.results["ws4"] = stream(s, "atftp", root, tmp, args.reps, cpu) or 0.0
            finally:
                stop(s)
            print(f"   {s.results}", file=sys.stderr)
        print("== herd", file=sys.stderr)
        herds(servers, root, tmp, args.clients, args.reps, other_cpus(cpu))
    hpa = servers[2].results
    # Peers have no windowsize, so both of their columns are lock-step figures.
    best_peer_ws1 = max(p.results[k] for p in servers[2:] for k in ("ws1", "ws4"))
    lines = [
        ("| server | lock-step MB/s (curl, blksize 1468) | windowsize 4 MB/s (atftp) | "
         f"{args.clients} concurrent fetches of {len(small) / 1e6:.2f} MB: time, failures | "
         "server CPU for them |"),
        "| --- | --- | --- | --- | --- |",
    ]
    for s in servers:
        r = s.results
        lines.append(f"| {s.name} | {r['ws1']:.1f} | {r['ws4']:.1f}"
                     f"{'' if s.windowsize else ' (no windowsize: lock-step)'} | "
                     f"{r['herd_s']:.2f} s, {int(r['herd_failed'])} failed | "
                     f"{fmt(r['herd_cpu'], 's')} |")
    lines.append("")
    for s in servers[:2]:
        r = s.results
        lines.append(
            f"- {s.name}: lock-step {r['ws1'] / hpa['ws1']:.2f}x tftpd-hpa (target >= 0.7); "
            f"windowsize 4 {r['ws4'] / best_peer_ws1:.2f}x the best peer's lock-step (target > 1); "
            f"{args.clients}-client time {r['herd_s'] / hpa['herd_s']:.2f}x tftpd-hpa's "
            "(target <= 1, zero failures)"
            + (f", using {r['herd_cpu'] / hpa['herd_cpu']:.2f}x its CPU for them"
               if r["herd_cpu"] and hpa["herd_cpu"] else ""))
    lines.append("")
    lines.append("Herd rounds in order (s; rounds alternate between the servers): " + "; ".join(
        f"{s.name} " + ", ".join(f"{dt:.2f}" for dt in s.results["herd_rounds"])
        for s in servers))
    table = "\n".join(lines)
    print(table)
    if args.write:
        cmd = ("sudo .venv/bin/python bench/tftp_bench.py --reps "
               f"{args.reps} --clients {args.clients} --pin {args.pin} --write")
        write_section(table, cmd, cpu)


def write_section(table: str, cmd: str, cpu: int) -> None:
    path = REPO / "docs" / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pinning = (f"servers and stream clients pinned to CPU {cpu}, the herd's clients to the "
               f"other CPUs (taskset)" if cpu >= 0 else "no CPU pinning")
    section = (
        "## TFTP\n\n"
        f"Command: `{cmd}` (run {time.strftime('%Y-%m-%d')}, 2-core VM, 127.0.0.1, "
        f"64 MiB file, {pinning}; median of the repetitions).\n\n"
        f"{table}\n\n"
        "Run-to-run spread on this shared 2-core VM is large (repeat runs moved single figures "
        "by 10-25%, the 200-client time by up to 30%): treat a ratio near a target as a tie.\n"
    )
    pattern = re.compile(r"^## TFTP\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)


if __name__ == "__main__":
    main()
