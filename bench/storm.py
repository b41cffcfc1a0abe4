"""Boot storm: N simulated PXE machines powered on at once, against netboot and, in
the same run, against a peer stack doing the same job (dnsmasq as ProxyDHCP,
tftpd-hpa for TFTP, nginx for scripts, images and the callback; --peer-tftp dnsmasq
gives the TFTP share to dnsmasq's own server instead, as runs before 2026-12-03 did).

    .venv/bin/python bench/storm.py -n 100 -n 1000            # both stacks, tables, ratio
    .venv/bin/python bench/storm.py -n 1000 --ref HEAD        # netboot as committed
    .venv/bin/python bench/storm.py -n 1000 --kernel-size 1M  # a 1 MB stand-in kernel
    .venv/bin/python bench/storm.py -n 1000 --mix bios=1      # the old all-BIOS storm

The machines are a mix (--mix, default bios=40,uefi=40,pxelinux=10,direct=10; kinds in
bench/storm_client.py): the peers are told which are which the way a site would tell
them (dnsmasq tags the pxelinux machines by a MAC pattern and gets a
pxelinux.cfg/01-<mac> file for each; netboot gets a machine file for each, naming a
pxelinux profile). --rounds R runs the pair R times, alternating the stacks.

Every run gets fresh namespaces (bench/storm_lab.py, 10.79.0.0/16 only); the
machines are bench/storm_client.py in the client namespace. Server CPU is each
stack's cgroup (cpuacct: every process it runs, tftpd-hpa's children per transfer
too), peak RSS is sampled from /proc every 0.1 s (netboot and its TFTP worker;
dnsmasq, tftpd-hpa and its children, the nginx master and worker). Needs root,
dnsmasq, tftpd-hpa and nginx-light (make bench installs them).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.storm_client import DEFAULT_MIX, PHASES, Machine, make_machines  # noqa: E402
from bench.storm_lab import (  # noqa: E402
    REPO,
    SERVER_ADDR,
    CpuGroup,
    NetbootServer,
    Sampler,
    StormLab,
    can_run,
    children,
    run_storm,
    stage_images,
)
from netboot.boot.ipxe import NODE_QUERY  # noqa: E402

# what netboot serves as /boot.ipxe (netboot.boot.ipxe.chain_script), as a static file
BOOT_IPXE = ("#!ipxe\nchain --autofree http://{addr}:8080/ipxe/node?" + NODE_QUERY
             + " || goto failed\nexit\n:failed\n"
             "echo no boot script for this machine; retrying in 10s\nsleep 10\nreboot\n")
# the per-node script, as nginx's return string (nginx turns \\n into a newline)
NODE_SCRIPT = (
    "#!ipxe\\nkernel http://{addr}:8080/images/{kernel} initrd={initrd_name} console=ttyS0 "
    "panic=-1 quiet netboot.profile=storm netboot.host=node netboot.callback="
    "http://{addr}:8080/api/v1/nodes/$arg_uuid/installed?token=peer\\n"
    "initrd http://{addr}:8080/images/{initrd}\\nboot\\n")

NGINX_CONF = """\
worker_processes 1;
daemon off;
user root;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65;
    send_timeout 300s;  # default 60 s cut 13 of 1,000 kernels short under load
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    default_type application/octet-stream;
    server {{
        listen {addr}:8080 backlog=4096;
        root {root};
        location = /boot.ipxe {{ default_type text/plain; }}
        # the per-node script: one static template, the UUID put in by nginx
        location = /ipxe/node {{
            default_type text/plain;
            return 200 "{node_script}";
        }}
        location /images/ {{ }}
        location /api/ {{ return 200; }}
        location /loader/ {{ root {tftp}; }}
    }}
}}
"""


PXELINUX_CFG = ("DEFAULT netboot\nPROMPT 0\nTIMEOUT 0\nLABEL netboot\n  KERNEL images/{kernel}\n"
                "  INITRD images/{initrd}\n  APPEND console=ttyS0 panic=-1 quiet "
                "netboot.profile=storm-pxelinux netboot.host=node netboot.callback="
                "http://{addr}:8080/api/v1/nodes/{uuid}/installed?token=peer\n")
STORM_PXELINUX_PROFILE = "storm-pxelinux"
PEER_LABEL = {"tftpd-hpa": "dnsmasq+tftpd-hpa+nginx", "dnsmasq": "dnsmasq+nginx"}
LOADERS = {"undionly.kpxe": "/usr/lib/ipxe/undionly.kpxe", "ipxe.efi": "/usr/lib/ipxe/ipxe.efi",
           "pxelinux.0": "/usr/lib/PXELINUX/pxelinux.0",
           "ldlinux.c32": "/usr/lib/syslinux/modules/bios/ldlinux.c32"}


def limits(n: int) -> tuple[int, int]:
    """(TFTP transfers at once, nginx connections) for N machines: the defaults the
    earlier storms used (dnsmasq --tftp-max=5000, nginx 8192; netboot's own default is
    1,000), raised to N when N is larger so no stack refuses the rack."""
    return max(5000, n), max(8192, 2 * n)


class PeerStack:
    """dnsmasq (ProxyDHCP), tftpd-hpa (TFTP; or dnsmasq's own) and nginx in the server
    namespace, each with its defaults but for the labelled settings in NGINX_CONF and
    dnsmasq's --tftp-max."""

    def __init__(self, lab: StormLab, root: Path, a: argparse.Namespace, n: int,
                 machines: list[Machine]):
        self.lab = lab
        self.root = root
        self.n = n
        root.mkdir(parents=True, exist_ok=True)
        self.tftp = root / "tftp"
        self.tftp.mkdir(exist_ok=True)
        self.peer_tftp = getattr(a, "peer_tftp", "tftpd-hpa")
        for name, src in LOADERS.items():
            shutil.copyfile(src, self.tftp / name)
        self.www = root / "www"
        kernel, initrd = stage_images(self.www / "images", a.kernel_size, a.initrd_size)
        stage_images(self.tftp / "images", a.kernel_size, a.initrd_size)  # for pxelinux
        cfg = self.tftp / "pxelinux.cfg"
        cfg.mkdir(exist_ok=True)
        for m in machines:
            if m.kind == "pxelinux":
                (cfg / ("01-" + m.mac_text.replace(":", "-"))).write_text(PXELINUX_CFG.format(
                    kernel=kernel, initrd=initrd, addr=SERVER_ADDR, uuid=m.uuid))
        # tftpd-hpa (--secure) enters its root as root and then serves as nobody: the
        # root and its files must be readable by others whatever the umask
        for d, _dirs, files in os.walk(self.tftp):
            os.chmod(d, 0o755)
            for f in files:
                os.chmod(os.path.join(d, f), 0o644)
        (self.www / "boot.ipxe").write_text(BOOT_IPXE.replace("{addr}", SERVER_ADDR))
        for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (root / d).mkdir(exist_ok=True)
        self.conf = root / "nginx.conf"
        node = NODE_SCRIPT.format(addr=SERVER_ADDR, kernel=kernel, initrd=initrd,
                                  initrd_name=initrd.rsplit("/", 1)[-1])
        self.conf.write_text(NGINX_CONF.format(work=root, addr=SERVER_ADDR, root=self.www,
                                               node_script=node, tftp=self.tftp,
                                               connections=limits(n)[1]))
        self.dnsmasq: subprocess.Popen | None = None
        self.tftpd: subprocess.Popen | None = None
        self.nginx: subprocess.Popen | None = None

    def start(self) -> None:
        script = f"http://{SERVER_ADDR}:8080/boot.ipxe"
        self.dnsmasq = self.lab.spawn(
            self.lab.ns_srv, "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0",
            "--interface=eth0", "--bind-interfaces", "--dhcp-range=10.79.0.0,proxy,255.255.0.0",
            "--dhcp-userclass=set:ipxe,iPXE", "--dhcp-mac=set:pxl,52:54:7a:*:*:*",
            "--pxe-service=tag:!ipxe,tag:!pxl,x86PC,netboot,undionly.kpxe",
            "--pxe-service=tag:!ipxe,tag:pxl,x86PC,netboot,pxelinux",
            "--pxe-service=tag:!ipxe,X86-64_EFI,netboot,ipxe.efi",
            f"--pxe-service=tag:ipxe,x86PC,netboot,{script}",
            f"--pxe-service=tag:ipxe,X86-64_EFI,netboot,{script}",
            *(["--enable-tftp", f"--tftp-root={self.tftp}", f"--tftp-max={limits(self.n)[0]}"]
              if self.peer_tftp == "dnsmasq" else []),
            f"--dhcp-leasefile={self.root / 'leases'}", f"--pid-file={self.root / 'dnsmasq.pid'}",
            log=self.root / "dnsmasq.log")
        if self.peer_tftp == "tftpd-hpa":
            # --listen: standalone, one child per transfer; --secure: paths relative to
            # the root, as dnsmasq's; everything else (timeouts, block sizes) its default
            self.tftpd = self.lab.spawn(
                self.lab.ns_srv, "in.tftpd", "--foreground", "--listen",
                f"--address={SERVER_ADDR}:69", "--secure", str(self.tftp),
                log=self.root / "tftpd.log")
        self.nginx = self.lab.spawn(self.lab.ns_srv, "nginx", "-c", str(self.conf),
                                    "-p", str(self.root), log=self.root / "nginx.log")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            up = self.lab.ns(self.lab.ns_srv, "ss", "-lntu", check=False).stdout
            if f"{SERVER_ADDR}:8080" in up and (self.tftpd is None or f"{SERVER_ADDR}:69 " in up):
                return
            if self.tftpd is not None and self.tftpd.poll() is not None:
                break  # it logs to syslog only: its exit status is what there is
            time.sleep(0.1)
        exited = self.tftpd.returncode if self.tftpd is not None else None
        raise RuntimeError("nginx or tftpd-hpa did not start"
                           + (f" (in.tftpd exited {exited})" if exited is not None else "")
                           + ":\n"
                           + (self.root / "nginx.log").read_text()
                           + ((self.root / "tftpd.log").read_text()
                              if (self.root / "tftpd.log").exists() else "")
                           + (self.root / "nginx-error.log").read_text(errors="replace"))

    def pids(self) -> list[int]:
        out = []
        for p in (self.dnsmasq, self.tftpd, self.nginx):
            if p is not None and p.poll() is None:
                out.append(p.pid)
                out.extend(children(p.pid))
        return out


def netboot_stack(lab: StormLab, root: Path, a: argparse.Namespace, n: int,
                  machines: list[Machine]) -> NetbootServer:
    """netboot serve with the storm profile, a pxelinux profile and a machine file for
    each pxelinux machine (as a site would tell it which machines boot pxelinux)."""
    transfers = limits(n)[0]
    # limits.new_nodes.total admits 1,000 new machines at once by default (then 10/s, a
    # bound on a flood from many addresses); a rack larger than that, all new, is let in
    # at once here (labelled, as the TFTP and nginx limits are): every machine becomes a
    # node, the registry work the peers do not do
    extra = getattr(a, "extra_yaml", "")
    new_nodes = (f"limits:\n  new_nodes:\n    total: {{rate: 10, burst: {n}}}\n"
                 if n > 1000 and "limits:" not in extra else "")  # the fleet bench sets its own
    server = NetbootServer(lab, root, kernel_size=a.kernel_size, initrd_size=a.initrd_size,
                           src=a.src, extra_yaml=f"tftp:\n  max_transfers: {transfers}\n"
                           + (f"  workers: {a.tftp_workers}\n" if a.tftp_workers is not None
                              else "") + new_nodes + extra)
    pxelinux_machines(server, machines)
    server.start(timeout=120)
    return server


def pxelinux_machines(server: NetbootServer, machines: list[Machine]) -> None:
    """The pxelinux profile, and a machine file naming it for each pxelinux machine."""
    profile = server.profile_path.read_text().replace("loader: ipxe", "loader: pxelinux")
    (server.cfg / "profiles" / f"{STORM_PXELINUX_PROFILE}.yaml").write_text(profile)
    for m in machines:
        if m.kind == "pxelinux":
            (server.cfg / "machines" / f"storm-{m.index:05d}.yaml").write_text(
                f'mac: "{m.mac_text}"\nprofile: {STORM_PXELINUX_PROFILE}\n')


#: netboot's own counters worth keeping beside a storm's figures
COUNTERS = ("tftp_handed_off", "tftp_hand_off_skipped", "tftp_transfers_completed",
            "tftp_transfers_failed", "tftp_size_probes", "tftp_retransmits",
            "tftp_refused", "dhcp_offers_total", "dhcp_acks_total",
            "dhcp_overload_dropped_total", "dhcp_delayed_dropped_total",
            "dhcp_paced_dropped_total", "dhcp_send_dropped_total", "new_nodes_refused_total",
            "registry_write_errors_total")


def netboot_counters(server: NetbootServer) -> dict[str, float]:
    """Totals of COUNTERS from /metrics (labels summed), or {} if it does not answer."""
    try:
        status, body = server.http("GET", "/metrics",
                                   headers={"Authorization": "Bearer storm-admin-token"})
    except OSError:
        return {}
    if status != 200:
        return {}
    out: dict[str, float] = {}
    for line in body.decode(errors="replace").splitlines():
        name, _, value = line.partition(" ")
        base = name.split("{", 1)[0].removeprefix("netboot_")
        if base in COUNTERS and not line.startswith("#"):
            try:
                out[base] = out.get(base, 0) + float(value.split()[-1])
            except (ValueError, IndexError):
                pass
    return out


#: what one_run assumes when a caller's namespace lacks an option (tests/test_faults.py
#: passes only a few): the earlier all-BIOS storm
RUN_DEFAULTS: dict[str, Any] = {"mix": "bios=1", "initrd_size": None, "spread": 0.0,
                                "reboots": 0, "tftp_workers": None, "kernel_size": None,
                                "src": None, "seed": 1, "hash": False,
                                "peer_tftp": "tftpd-hpa"}


def one_run(stack: str, n: int, work: Path, a: argparse.Namespace) -> dict[str, Any]:
    a = argparse.Namespace(**{**RUN_DEFAULTS, **vars(a)})
    machines = make_machines(n, a.seed, a.mix)
    group = CpuGroup(f"storm-{os.getpid()}-{time.monotonic_ns()}")
    try:
        return _one_run(stack, n, work, a, machines, group)
    finally:
        group.close()  # after the lab is down: no process is left in it


def _one_run(stack: str, n: int, work: Path, a: argparse.Namespace, machines: list[Machine],
             group: CpuGroup) -> dict[str, Any]:
    with StormLab(work / "lab", machines=n) as lab:
        if stack == "netboot":
            server = netboot_stack(lab, work / "netboot", a, n, machines)

            def pids() -> list[int]:
                return [server.proc.pid] + children(server.proc.pid) \
                    if server.alive() else []  # type: ignore[union-attr]
        else:
            peer = PeerStack(lab, work / "peer", a, n, machines)
            peer.start()
            pids = peer.pids
        time.sleep(0.5)
        group.add(pids())
        cpu0 = group.seconds()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        with Sampler(pids) as sampler:
            result = run_storm(lab, work / "storm.json", "-n", str(n), "--seed", str(a.seed),
                               "--mix", a.mix, "--require-callback",
                               "--spread", str(a.spread), "--reboots", str(a.reboots),
                               *(["--hash"] if a.hash else []))
        after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the client, waited for
        result["client_cpu_s"] = round(after.ru_utime + after.ru_stime - before.ru_utime
                                       - before.ru_stime, 2)
        cpu1 = group.seconds()
        # the cgroup's count where there is one (it sees short-lived children); the
        # /proc samples' otherwise
        counted = cpu0 is not None and cpu1 is not None
        cpu = cpu1 - cpu0 if counted else sampler.cpu_seconds  # type: ignore[operator]
        result["server"] = {"cpu_s": round(cpu, 2),
                            "cpu_from": "cgroup" if counted else "sampled",
                            "sampled_cpu_s": round(sampler.cpu_seconds, 2),
                            "peak_cpu_pct": round(sampler.peak_cpu_pct),
                            "peak_rss_mib": round(sampler.peak_rss_kib / 1024, 1)}
        if stack == "netboot":
            result["server"]["alive"] = server.alive()
            result["server"]["counters"] = netboot_counters(server)
    result.pop("acked", None)
    result.pop("uuids", None)
    if result["failed"] == 0:
        shutil.rmtree(work, ignore_errors=True)  # else keep the logs to look at
    return result


def table(name: str, r: dict[str, Any]) -> str:
    s = r["server"]
    rows = [f"{name}: N={r['n']} completed {r['completed']}, failed {r['failed']}"
            + (f" {r['final_failures']}" if r["failed"] else "")
            + f", last completion {r['t_last_s']:.2f} s; server CPU {s['cpu_s']} s "
              f"({s.get('cpu_from', 'sampled')}; peak {s['peak_cpu_pct']}% sampled), "
              f"peak RSS {s['peak_rss_mib']} MiB; client CPU {r.get('client_cpu_s')} s",
            "| phase | p50 ms | p99 ms | max ms |", "|---|---:|---:|---:|"]
    for p in PHASES:
        ph = r["phases"][p]
        rows.append(f"| {p} | {ph['p50_ms']} | {ph['p99_ms']} | {ph['max_ms']} |")
    if r["attempt_failures"]:
        rows.append(f"(failed attempts, retried: {r['attempt_failures']})")
    if s.get("counters"):
        rows.append("netboot counters: " + ", ".join(f"{k} {v:g}"
                                                    for k, v in s["counters"].items()))
    for kind, k in r.get("kinds", {}).items():
        rows.append(f"- {kind}: {k['completed']}/{k['n']} completed, last {k['t_last_s']} s, "
                    f"median {k['p50_s']} s")
    return "\n".join(rows)


def ratios(n: int, nb: dict[str, Any], pe: dict[str, Any]) -> str:
    t = nb["t_last_s"] / pe["t_last_s"] if pe["t_last_s"] else float("nan")
    cpu = nb["server"]["cpu_s"] / pe["server"]["cpu_s"] if pe["server"]["cpu_s"] else float("nan")
    return (f"N={n}: time to last completion netboot/peers = {t:.2f} "
            f"({nb['t_last_s']:.2f} s / {pe['t_last_s']:.2f} s); server CPU netboot/peers = "
            f"{cpu:.2f} ({nb['server']['cpu_s']} s / {pe['server']['cpu_s']} s); failures "
            f"{nb['failed']} / {pe['failed']}; netboot peak RSS "
            f"{nb['server']['peak_rss_mib']} MiB")


def parse_size(text: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * mult[text[-1].upper()]) if text[-1].upper() in mult \
        else int(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, action="append", help="machines (repeat); default 100, 1000")
    ap.add_argument("--kernel-size", type=parse_size, default=None,
                    help="a generated kernel stand-in of this size (default: the demo kernel)")
    ap.add_argument("--initrd-size", type=parse_size, default=None,
                    help="a generated initrd stand-in of this size (default: the demo initrd)")
    ap.add_argument("--mix", default=DEFAULT_MIX, help=f"machine kinds (default {DEFAULT_MIX})")
    ap.add_argument("--rounds", type=int, default=1, help="pairs per N, stacks alternating")
    ap.add_argument("--spread", type=float, default=0.0,
                    help="machines power on uniformly over this many seconds (0: at once)")
    ap.add_argument("--reboots", type=int, default=0,
                    help="a failed machine starts over this many times")
    ap.add_argument("--ref", help="run netboot as committed at this git ref (git archive)")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--peers-only", action="store_true", help="the peer stack alone")
    ap.add_argument("--tftp-workers", type=int, choices=(0, 1), default=None,
                    help="netboot's tftp.workers (default: netboot's own default)")
    ap.add_argument("--peer-tftp", choices=("tftpd-hpa", "dnsmasq"), default="tftpd-hpa",
                    help="the peers' TFTP server (default tftpd-hpa; dnsmasq: its own "
                         "--enable-tftp, as runs before 2026-12-03)")
    ap.add_argument("--hash", action="store_true", help="sha256 every file on the client")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path, help="write all results here")
    a = ap.parse_args(argv)
    reason = can_run()
    for tool in ("dnsmasq", "nginx") + (("in.tftpd",) if a.peer_tftp == "tftpd-hpa" else ()):
        if not a.no_peers and shutil.which(tool) is None:
            reason = reason or (f"{tool} is not installed (make bench installs the peers: "
                                "dnsmasq-base, tftpd-hpa, nginx-light)")
    if reason:
        print(f"storm: {reason}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="netboot-storm-"))
    a.src = None
    if a.ref:
        a.src = work / "src"
        a.src.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", a.ref, "netboot"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(a.src)], input=archive, check=True)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", a.ref or "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    dirty = "" if a.ref else " + working tree"
    print(f"netboot {commit}{dirty}; kernel "
          f"{a.kernel_size or os.path.getsize(REPO / 'images/demo/vmlinuz')} bytes; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    results: dict[str, Any] = {"commit": commit + dirty, "runs": []}
    try:
        for n in a.n or [100, 1000]:
            for rnd in range(a.rounds):
                stacks = ["peers"] if a.peers_only else \
                    ["netboot"] + ([] if a.no_peers else ["peers"])
                if rnd % 2:
                    stacks.reverse()  # alternate who goes first
                pair = {}
                for stack in stacks:
                    load = os.getloadavg()
                    r = one_run(stack, n, work / f"{stack}-{n}-{rnd}", a)
                    r["load_before"] = [round(x, 2) for x in load]
                    r["round"] = rnd
                    pair[stack] = r
                    results["runs"].append({"stack": stack, **r})
                    label = "netboot" if stack == "netboot" else PEER_LABEL[a.peer_tftp]
                    print(table(label, r) + "\n(load average before: "
                          + ", ".join(f"{x:.2f}" for x in load) + ")\n", flush=True)
                if "peers" in pair and "netboot" in pair:
                    print(ratios(n, pair["netboot"], pair["peers"]) + "\n", flush=True)
    finally:
        if a.json:
            a.json.write_text(json.dumps(results, indent=1))
        if all(r["failed"] == 0 for r in results["runs"]):
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"logs of the runs with failures are kept in {work}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
