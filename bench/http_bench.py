"""HTTP image serving: netboot against nginx, the same 8 MB file, in one run.

Each server gets ``wrk -t2 -c50 -d10s`` on the same file from the same
directory; prints GB/s for each and the ratio. netboot runs as ``netboot serve``
(uvloop, as in production) with DHCP and TFTP off; nginx runs in the
foreground with one worker and sendfile, from a config written here.

    .venv/bin/python bench/http_bench.py [--duration 10] [--rounds 1] [--size-mb 8]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UNITS = {"B": 1, "KB": 1024, "MB": 1024 ** 2, "GB": 1024 ** 3, "TB": 1024 ** 4}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                resp.read()
                return
        except OSError as exc:
            last = exc
            time.sleep(0.1)
    raise SystemExit(f"{what} did not answer {url} within {timeout:.0f} s ({last})")


def start_netboot(tmp: Path, images: Path, port: int) -> subprocess.Popen[bytes]:
    for d in ("profiles", "machines", "data"):
        (tmp / d).mkdir(exist_ok=True)
    cfg = tmp / "netboot.yaml"
    cfg.write_text(f"images_dir: {images}\nprofiles_dir: profiles\nmachines_dir: machines\n"
                   "data_dir: data\ndefault_profile: null\nlog_level: warning\n"
                   "dhcp: {enabled: false}\ntftp: {enabled: false}\n")
    netboot = ROOT / ".venv" / "bin" / "netboot"
    cmd = [str(netboot) if netboot.exists() else "netboot", "serve", "--config", str(cfg),
           "--interface", "lo", "--address", "127.0.0.1", "--http-port", str(port)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(tmp / "netboot.log", "wb"))


def start_nginx(tmp: Path, images: Path, port: int) -> subprocess.Popen[bytes]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(nginx):
        raise SystemExit("nginx is not installed: apt-get install nginx-light (make bench does)")
    conf = tmp / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        location /images/ {{ alias {images}/; }}
    }}
}}
""")
    return subprocess.Popen([nginx, "-p", str(tmp), "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=open(tmp / "nginx.log", "wb"))


def latency(out: str, label: str) -> str:
    """wrk's latency percentile (``50%``, ``99%``) or ``Max`` as printed, e.g. ``1.20s``."""
    if label == "Max":
        m = re.search(r"Latency\s+\S+\s+\S+\s+(\S+)", out)
    else:
        m = re.search(rf"^\s+{re.escape(label)}\s+(\S+)", out, re.M)
    return m.group(1) if m else "?"


def wrk(url: str, duration: int, threads: int, connections: int) -> tuple[float, float, str]:
    """(bytes per second, requests per second, the raw output)."""
    wrk_bin = shutil.which("wrk")
    if wrk_bin is None:
        raise SystemExit("wrk is not installed: apt-get install wrk (make bench does)")
    out = subprocess.run([wrk_bin, f"-t{threads}", f"-c{connections}", f"-d{duration}s",
                          "--latency", url],
                         check=True, capture_output=True, text=True).stdout
    m = re.search(r"(\d+) requests in ([\d.]+)(m?s), ([\d.]+)([KMGT]?B) read", out)
    if not m:
        raise SystemExit(f"cannot parse wrk output:\n{out}")
    seconds = float(m.group(2)) * (60 if m.group(3) == "m" else 1)
    if m.group(3) == "ms":
        seconds = float(m.group(2)) / 1000
    read = float(m.group(4)) * UNITS[m.group(5)]
    if "Non-2xx" in out or "Socket errors" in out:
        errors = re.findall(r"(Non-2xx.*|Socket errors.*)", out)
        print(f"warning: wrk reported for {url}: {'; '.join(errors)}", file=sys.stderr)
    return read / seconds, int(m.group(1)) / seconds, out


def cpu_seconds(pid: int) -> float:
    """User+system CPU of a process and its children (nginx's worker), from /proc."""
    total = 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return total
    return total + sum(cpu_seconds(int(c)) for c in children)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run (10)")
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds per server (1)")
    ap.add_argument("--size-mb", type=int, default=8, help="file size in MB (8)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--connections", type=int, default=50)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="netboot-http-bench-") as tmpname:
        tmp = Path(tmpname)
        tmp.chmod(0o755)  # nginx's worker runs as nobody when started by root
        images = tmp / "images"
        images.mkdir()
        (images / "bench.bin").write_bytes(os.urandom(args.size_mb << 20))
        ports = {"netboot": free_port(), "nginx": free_port()}
        procs = {"netboot": start_netboot(tmp, images, ports["netboot"]),
                 "nginx": start_nginx(tmp, images, ports["nginx"])}
        results: dict[str, list[float]] = {"netboot": [], "nginx": []}
        try:
            for name, proc in procs.items():
                wait_http(f"http://127.0.0.1:{ports[name]}/images/bench.bin", proc, name)
                wrk(f"http://127.0.0.1:{ports[name]}/images/bench.bin", 2, args.threads,
                    args.connections)  # warm up: page cache, connection setup
            for _ in range(args.rounds):
                for name in ("netboot", "nginx"):
                    url = f"http://127.0.0.1:{ports[name]}/images/bench.bin"
                    cpu0 = cpu_seconds(procs[name].pid)
                    bps, rps, out = wrk(url, args.duration, args.threads, args.connections)
                    cpu = cpu_seconds(procs[name].pid) - cpu0
                    results[name].append(bps)
                    print(f"{name:8} {bps / 1e9:6.2f} GB/s  {rps:8.1f} req/s  "
                          f"{cpu / (bps * args.duration / 1e9):5.3f} CPU s/GB  latency p50 "
                          f"{latency(out, '50%')} p99 {latency(out, '99%')} max "
                          f"{latency(out, 'Max')}  "
                          f"(wrk -t{args.threads} -c{args.connections} -d{args.duration}s, "
                          f"{args.size_mb} MiB file)", flush=True)
        finally:
            for proc in procs.values():
                stop(proc)
        best = {k: max(v) for k, v in results.items()}
        ratio = best["netboot"] / best["nginx"]
        print(f"netboot {best['netboot'] / 1e9:.2f} GB/s, nginx {best['nginx'] / 1e9:.2f} GB/s: "
              f"netboot/nginx = {ratio:.2f}x (target >= 0.80x)")
        return 0 if ratio >= 0.8 else 1


if __name__ == "__main__":
    sys.exit(main())
