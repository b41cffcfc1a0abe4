"""ProxyDHCP throughput and latency: netboot against dnsmasq in proxy mode, on
the same lab, under ISC's perfdhcp.

    ns <tag>-rtr  10.77.0.1  dnsmasq --dhcp-range=10.77.0.0,proxy --pxe-service=x86PC,...
    ns <tag>-boot 10.77.0.2  netboot serve (uvloop)
    ns <tag>-pd   10.77.0.50 perfdhcp -4 -i (a relay: giaddr = its address, unicast replies)

Both servers run at once (perfdhcp unicasts to one address, so the other idles),
and the measurements alternate between them: warm-up, latency at a moderate rate,
then each server's search for the highest rate answered with under 0.1% drops
(stepping up by 25% until a run fails, then bisecting), one step of each in turn,
so a change in the host's speed hits both alike.

perfdhcp keeps its own default socket buffers (208 kB: 166 replies), as a relay
does. ``--shim-row`` adds a second, labelled pass in which an LD_PRELOAD shim
gives perfdhcp 4 MB, which shows the servers' own ceiling. Run as root:

    .venv/bin/python bench/dhcp_bench.py [--duration 3] [--pin] [--clients 100000] [--shim-row]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.lab import REPO, VENV_BIN, Lab  # noqa: E402

VENDOR = b"PXEClient:Arch:00000:UNDI:002001"
UUID = uuidlib.UUID("8dc30e79-5115-44b3-a5e3-4e5cbc62d3a2")
MAX_DROP_PCT = 0.1


@dataclass
class Run:
    rate: int
    sent: int
    received: int
    drop_pct: float
    achieved: float
    avg_ms: float
    max_ms: float
    client_rcvbuf_errors: int = 0  # replies the load client's own socket dropped

    @property
    def ok(self) -> bool:
        # perfdhcp can fall short of the asked rate on a busy host; that is a fail too
        return self.drop_pct < MAX_DROP_PCT and self.achieved >= 0.95 * self.rate


def write_config(root: Path, log_level: str, pacing: bool = True) -> Path:
    cfg = root / "configs"
    (cfg / "machines").mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "configs" / "profiles", cfg / "profiles", dirs_exist_ok=True)
    (cfg / "netboot.yaml").write_text(
        f"data_dir: {root / 'data'}\nimages_dir: {REPO / 'images'}\n"
        f"default_profile: default\nlog_level: {log_level}\n"
        f"dhcp:\n  pacing: {'true' if pacing else 'false'}\n")
    return cfg / "netboot.yaml"


# perfdhcp keeps the kernel's default 208 kB receive buffer, as a relay does; a server
# that answers a queued burst at full speed (after the host descheduled it) overflows
# it, and those drops are perfdhcp's (UDP RcvbufErrors in its namespace). The labelled
# second row preloads this shim into perfdhcp only: its UDP sockets get 4 MB
# (SO_RCVBUFFORCE, root), which shows what the servers themselves can answer.
_SHIM_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <sys/socket.h>
int socket(int domain, int type, int protocol) {
    static int (*real)(int, int, int);
    if (!real) real = (int (*)(int, int, int))dlsym(RTLD_NEXT, "socket");
    int fd = real(domain, type, protocol);
    if (fd >= 0 && domain == AF_INET && (type & 0xff) == SOCK_DGRAM) {
        int size = 4 << 20;
        setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size);
    }
    return fd;
}
"""


def rcvbuf_shim(workdir: Path) -> Path | None:
    """Compile the LD_PRELOAD shim with cc; None (and default buffers) without a compiler."""
    if shutil.which("cc") is None:
        return None
    src, lib = workdir / "rcvbuf_shim.c", workdir / "rcvbuf_shim.so"
    src.write_text(_SHIM_C)
    r = subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(lib), str(src), "-ldl"],
                       capture_output=True, text=True)
    return lib if r.returncode == 0 else None


def perfdhcp_cmd(server: str, local: str, rate: int, duration: float, clients: int,
                 cpu: int | None, shim: Path | None = None) -> list[str]:
    cmd = ["perfdhcp", "-4", "-i", "-r", str(rate), "-p", f"{duration:g}",
           "-R", str(clients), "-W", "500000",
           "-o", f"60,{VENDOR.hex()}", "-o", "93,0000", "-o", f"97,00{UUID.bytes_le.hex()}",
           "-l", local, server]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    if shim is not None:
        cmd = ["env", f"LD_PRELOAD={shim}", *cmd]
    return cmd


def parse_perfdhcp(out: str, rate: int, duration: float) -> Run:
    def num(pattern: str, default: float = 0.0) -> float:
        m = re.search(pattern, out)
        return float(m.group(1)) if m else default

    sent = int(num(r"sent packets: (\d+)"))
    received = int(num(r"received packets: (\d+)"))
    drop = 100.0 * (sent - received) / sent if sent else 100.0
    # perfdhcp's own "Rate:" divides by the run plus the -W wait; sent/duration does not
    return Run(rate, sent, received, drop, sent / duration,
               num(r"avg delay: ([\d.]+) ms"), num(r"max delay: ([\d.]+) ms"))


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root = Path(tempfile.mkdtemp(prefix="dhcpbench-"))
        self.lab = Lab(self.root)
        self.client_ns = ""
        self.local = f"{self.lab.net}.50"
        self.shim: Path | None = None  # set for the --shim-row pass
        self.procs: dict[str, tuple[subprocess.Popen, str]] = {}

    def __enter__(self) -> Bench:
        try:
            self.lab.up()
            self.client_ns = self.lab.add_client("pd", addr=self.local)
        except BaseException:
            self.lab.down_all()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for name in list(self.procs):
            self.stop(name)
        self.lab.down_all()

    #: the servers can run side by side: the load is unicast to one of them
    exclusive = False

    def server(self, name: str) -> str:
        """The address of ``name``, started if need be (alone, when ``exclusive``)."""
        if name not in self.procs:
            if self.exclusive:
                for other in list(self.procs):
                    self.stop(other)
            self.procs[name] = self.start(name)
            # warm-up: ARP, caches, the first clients' log lines
            self.measure(self.procs[name][1], 1000)
        return self.procs[name][1]

    def stop(self, name: str) -> None:
        proc, _ = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)

    def _pin(self, cmd: list[str]) -> list[str]:
        return ["taskset", "-c", "1", *cmd] if self.args.pin else cmd

    def start(self, name: str) -> tuple[subprocess.Popen, str]:
        lab = self.lab
        if name == "netboot":
            cfg = write_config(self.root / "netboot", self.args.log_level,
                               pacing=not self.args.no_pacing)
            log = self.root / "netboot.log"
            proc = lab.spawn(lab.ns_boot, *self._pin(
                [str(VENV_BIN / "netboot"), "serve", "--config", str(cfg), "--interface",
                 "eth0", "--log-level", self.args.log_level]), log=log)
            _wait_for(log, "ProxyDHCP listening", proc)
            return proc, lab.boot_addr
        log = self.root / "dnsmasq-proxy.log"
        proc = lab.spawn(lab.ns_router, *self._pin(
            ["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0",
             "--interface=eth0", "--bind-interfaces", f"--dhcp-range={lab.net}.0,proxy",
             "--pxe-service=x86PC,boot,undionly", "--pxe-prompt=boot,0",
             f"--dhcp-leasefile={self.root / 'dnsmasq.leases'}"]), log=log)
        _wait_for(log, "started", proc)
        time.sleep(0.3)
        return proc, lab.router_addr

    def measure(self, server: str, rate: int) -> Run:
        cmd = perfdhcp_cmd(server, self.local, rate, self.args.duration, self.args.clients,
                           0 if self.args.pin else None, self.shim)
        before = self.rcvbuf_errors()
        r = self.lab.ns(self.client_ns, *cmd, check=False)
        run = parse_perfdhcp(r.stdout, rate, self.args.duration)
        run.client_rcvbuf_errors = self.rcvbuf_errors() - before
        print(f"    rate {rate:>6}/s: sent {run.sent:>7} received {run.received:>7} "
              f"drops {run.drop_pct:6.3f}% (client rcvbuf {run.client_rcvbuf_errors}) "
              f"achieved {run.achieved:8.0f}/s avg {run.avg_ms:.3f} ms max {run.max_ms:.1f} ms "
              f"{'ok' if run.ok else 'FAIL'}", flush=True)
        return run

    def rcvbuf_errors(self) -> int:
        """UDP RcvbufErrors in the client namespace: drops the load client caused."""
        lines = [x for x in self.lab.ns(self.client_ns, "cat", "/proc/net/snmp").stdout
                 .splitlines() if x.startswith("Udp:")]
        return dict(zip(lines[0].split()[1:], map(int, lines[1].split()[1:])))["RcvbufErrors"]

    def try_rate(self, server: str, rate: int) -> Run:
        """A rate passes if one of two runs does: on a shared host a neighbour's burst
        drops packets for either server; a server that cannot keep up fails both."""
        run = self.measure(server, rate)
        return run if run.ok else self.measure(server, rate)

    def search(self) -> Generator[int, Run, Run | None]:
        """Rates to try, each sent a result: step up by 25% from --start until a rate
        fails, then bisect 4 times. Returns the best passing run."""
        best: Run | None = None
        rate = self.args.start
        fail = None
        while rate <= self.args.ceiling:
            run = yield rate
            if not run.ok:
                fail = rate
                break
            best = run
            rate = int(rate * 1.25)
        lo = best.rate if best else self.args.start // 2
        hi = fail or self.args.ceiling
        for _ in range(4):
            mid = (lo + hi) // 2
            if hi - lo < 250:
                break
            run = yield mid
            if run.ok:
                best, lo = run, mid
            else:
                hi = mid
        return best

    def bench(self, names: list[str]) -> dict[str, dict]:
        """Both servers' warm-up, latency and search, one step of each in turn."""
        results: dict[str, dict] = {name: {} for name in names}
        for name in names:
            print(f"== {name}: latency", flush=True)
            results[name]["latency"] = self.measure(self.server(name), self.args.latency_rate)
        searches = {name: self.search() for name in names}
        pending = {name: next(gen) for name, gen in searches.items()}
        while pending:
            for name in list(pending):
                print(f"== {name}", flush=True)
                run = self.try_rate(self.server(name), pending[name])
                try:
                    pending[name] = searches[name].send(run)
                except StopIteration as done:
                    results[name]["max"] = done.value
                    del pending[name]
        return results


def _wait_for(log: Path, marker: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if marker in text:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{text}")
        time.sleep(0.2)
    raise RuntimeError(f"server did not start:\n{log.read_text(errors='replace')}")


def main(argv: list[str] | None = None, bench_class: type[Bench] = Bench,
         title: str = "") -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=3.0, help="seconds per perfdhcp run")
    p.add_argument("--start", type=int, default=4000, help="first rate of the search")
    p.add_argument("--ceiling", type=int, default=80000)
    p.add_argument("--latency-rate", type=int, default=5000)
    p.add_argument("--clients", type=int, default=100000, help="perfdhcp -R")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning"],
                   help="netboot's log level (info logs one line per new client)")
    p.add_argument("--pin", action="store_true",
                   help="server on CPU 1, load client on CPU 0 (taskset); perfdhcp's two "
                   "threads then share a CPU and its socket overflows sooner")
    p.add_argument("--servers", default="netboot,dnsmasq")
    p.add_argument("--no-pacing", action="store_true",
                   help="run netboot with dhcp.pacing: false (an A/B row; label it)")
    p.add_argument("--shim-row", action="store_true",
                   help="a second pass with the load client's receive buffer raised to 4 MB "
                   "(an LD_PRELOAD shim; needs cc): the servers' own ceiling")
    args = p.parse_args(argv)
    if os.geteuid() != 0 or shutil.which("perfdhcp") is None:
        print("needs root and perfdhcp (apt-get install kea-admin)", file=sys.stderr)
        return 2
    names = args.servers.split(",")
    title = title or (f"perfdhcp -4 -i, relay mode, -R {args.clients}, "
                      f"drops < {MAX_DROP_PCT}%")
    with bench_class(args) as b:
        rows = [("client's default receive buffer", b.bench(names))]
        if args.shim_row:
            b.shim = rcvbuf_shim(b.root)
            if b.shim is None:
                print("--shim-row: no C compiler (cc), skipped", file=sys.stderr)
            else:
                rows.append(("client receive buffer 4 MB (shim)", b.bench(names)))
    print(f"\n== summary ({title}, {args.duration:g} s per run, alternating, netboot log "
          f"level {args.log_level}{', pinned' if args.pin else ''}"
          f"{', netboot dhcp.pacing: false' if args.no_pacing else ''}; load average "
          f"{os.getloadavg()[0]:.1f})")
    for label, results in rows:
        print(f"-- {label}")
        for name, r in results.items():
            best, lat = r["max"], r["latency"]
            print(f"{name:8} max rate {best.rate if best else 0:>6}/s  "
                  f"latency at {lat.rate}/s: avg {lat.avg_ms:.3f} ms, max {lat.max_ms:.1f} ms, "
                  f"drops {lat.drop_pct:.3f}%")
        if "netboot" in results and "dnsmasq" in results:
            nb, dm = results["netboot"]["max"], results["dnsmasq"]["max"]
            if nb and dm:
                print(f"ratio netboot/dnsmasq: {nb.rate / dm.rate:.2f}x "
                      f"(target >= 1.0x, aim 1.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
