"""Boot storm: N simulated PXE machines powered on at once, against netboot and, in
the same run, against a peer stack doing the same job (dnsmasq ProxyDHCP + TFTP,
nginx for scripts, images and the callback).

    .venv/bin/python bench/storm.py -n 100 -n 1000            # both stacks, tables, ratio
    .venv/bin/python bench/storm.py -n 1000 --ref HEAD        # netboot as committed
    .venv/bin/python bench/storm.py -n 1000 --kernel-size 1M  # a 1 MB stand-in kernel

Every run gets fresh namespaces (bench/storm_lab.py, 10.79.0.0/16 only); the
machines are bench/storm_client.py in the client namespace. Server CPU and
peak RSS are sampled from /proc every 0.1 s (for the peers: dnsmasq plus the
nginx master and worker). Needs root, dnsmasq and nginx-light.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.storm_client import PHASES  # noqa: E402
from bench.storm_lab import (  # noqa: E402
    REPO,
    SERVER_ADDR,
    NetbootServer,
    Sampler,
    StormLab,
    can_run,
    children,
    run_storm,
    stage_images,
)

_QUERY = "uuid=${uuid}&mac=${netX/mac}&" + "&".join(
    f"{k}=${{{k}:uristring}}" for k in ("serial", "manufacturer", "product", "asset",
                                       "platform", "buildarch"))
# what netboot serves as /boot.ipxe (netboot.boot.ipxe.chain_script), as a static file
BOOT_IPXE = ("#!ipxe\nchain --autofree http://{addr}:8080/ipxe/node?" + _QUERY
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
    }}
}}
"""


class PeerStack:
    """dnsmasq (ProxyDHCP + TFTP) and nginx in the server namespace."""

    def __init__(self, lab: StormLab, root: Path, kernel_size: int | None):
        self.lab = lab
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.tftp = root / "tftp"
        self.tftp.mkdir(exist_ok=True)
        shutil.copyfile("/usr/lib/ipxe/undionly.kpxe", self.tftp / "undionly.kpxe")
        self.www = root / "www"
        kernel, initrd = stage_images(self.www / "images", kernel_size)
        (self.www / "boot.ipxe").write_text(BOOT_IPXE.replace("{addr}", SERVER_ADDR))
        for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (root / d).mkdir(exist_ok=True)
        self.conf = root / "nginx.conf"
        node = NODE_SCRIPT.format(addr=SERVER_ADDR, kernel=kernel, initrd=initrd,
                                  initrd_name=initrd.rsplit("/", 1)[-1])
        self.conf.write_text(NGINX_CONF.format(work=root, addr=SERVER_ADDR, root=self.www,
                                               node_script=node))
        self.dnsmasq: subprocess.Popen | None = None
        self.nginx: subprocess.Popen | None = None

    def start(self) -> None:
        self.dnsmasq = self.lab.spawn(
            self.lab.ns_srv, "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0",
            "--interface=eth0", "--bind-interfaces", "--dhcp-range=10.79.0.0,proxy,255.255.0.0",
            "--dhcp-userclass=set:ipxe,iPXE",
            "--pxe-service=tag:!ipxe,x86PC,netboot,undionly.kpxe",
            f"--pxe-service=tag:ipxe,x86PC,netboot,http://{SERVER_ADDR}:8080/boot.ipxe",
            "--enable-tftp", f"--tftp-root={self.tftp}", "--tftp-max=5000",
            f"--dhcp-leasefile={self.root / 'leases'}", f"--pid-file={self.root / 'dnsmasq.pid'}",
            log=self.root / "dnsmasq.log")
        self.nginx = self.lab.spawn(self.lab.ns_srv, "nginx", "-c", str(self.conf),
                                    "-p", str(self.root), log=self.root / "nginx.log")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            up = self.lab.ns(self.lab.ns_srv, "ss", "-lnt", check=False).stdout
            if f"{SERVER_ADDR}:8080" in up:
                return
            time.sleep(0.1)
        raise RuntimeError("nginx did not start:\n" + (self.root / "nginx.log").read_text()
                           + (self.root / "nginx-error.log").read_text(errors="replace"))

    def pids(self) -> list[int]:
        out = []
        for p in (self.dnsmasq, self.nginx):
            if p is not None and p.poll() is None:
                out.append(p.pid)
                out.extend(children(p.pid))
        return out


def one_run(stack: str, n: int, work: Path, a: argparse.Namespace) -> dict[str, Any]:
    with StormLab(work / "lab", machines=n) as lab:
        if stack == "netboot":
            server = NetbootServer(lab, work / "netboot", kernel_size=a.kernel_size,
                                   src=a.src)
            server.start()

            def pids() -> list[int]:
                return [server.proc.pid] if server.alive() else []  # type: ignore[union-attr]
        else:
            peer = PeerStack(lab, work / "peer", a.kernel_size)
            peer.start()
            pids = peer.pids
        time.sleep(0.5)
        with Sampler(pids) as sampler:
            result = run_storm(lab, work / "storm.json", "-n", str(n), "--seed", str(a.seed),
                               "--require-callback", *(["--hash"] if a.hash else []))
        result["server"] = {"cpu_s": round(sampler.cpu_seconds, 2),
                            "peak_cpu_pct": round(sampler.peak_cpu_pct),
                            "peak_rss_mib": round(sampler.peak_rss_kib / 1024, 1)}
        if stack == "netboot":
            result["server"]["alive"] = server.alive()
    result.pop("acked", None)
    result.pop("uuids", None)
    return result


def table(name: str, r: dict[str, Any]) -> str:
    s = r["server"]
    rows = [f"{name}: N={r['n']} completed {r['completed']}, failed {r['failed']}"
            + (f" {r['final_failures']}" if r["failed"] else "")
            + f", last completion {r['t_last_s']:.2f} s; server CPU {s['cpu_s']} s "
              f"(peak {s['peak_cpu_pct']}%), peak RSS {s['peak_rss_mib']} MiB",
            "| phase | p50 ms | p99 ms | max ms |", "|---|---:|---:|---:|"]
    for p in PHASES:
        ph = r["phases"][p]
        rows.append(f"| {p} | {ph['p50_ms']} | {ph['p99_ms']} | {ph['max_ms']} |")
    if r["attempt_failures"]:
        rows.append(f"(failed attempts, retried: {r['attempt_failures']})")
    return "\n".join(rows)


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
    ap.add_argument("--ref", help="run netboot as committed at this git ref (git archive)")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--hash", action="store_true", help="sha256 every file on the client")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path, help="write all results here")
    a = ap.parse_args(argv)
    reason = can_run()
    for tool in ("dnsmasq", "nginx"):
        if not a.no_peers and shutil.which(tool) is None:
            reason = reason or f"{tool} is not installed (apt-get install dnsmasq-base nginx-light)"
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
            pair = {}
            for stack in ("netboot",) + (() if a.no_peers else ("peers",)):
                load = os.getloadavg()[0]
                r = one_run(stack, n, work / f"{stack}-{n}", a)
                r["load_before"] = round(load, 2)
                pair[stack] = r
                results["runs"].append({"stack": stack, **r})
                label = "netboot" if stack == "netboot" else "dnsmasq+nginx"
                print(table(label, r) + f"\n(load average before: {load:.2f})\n", flush=True)
            if "peers" in pair:
                nb, pe = pair["netboot"], pair["peers"]
                ratio = nb["t_last_s"] / pe["t_last_s"] if pe["t_last_s"] else float("nan")
                print(f"N={n}: time to last completion netboot/peers = {ratio:.2f} "
                      f"({nb['t_last_s']:.2f} s / {pe['t_last_s']:.2f} s); failures "
                      f"{nb['failed']} / {pe['failed']}\n", flush=True)
    finally:
        if a.json:
            a.json.write_text(json.dumps(results, indent=1))
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
