"""A two-namespace lab for boot storms, fault and hostile-input tests.

    ns <tag>-srv: eth0 10.79.0.2/16   -- the server under test (netboot, or dnsmasq + nginx)
          |  veth
    ns <tag>-cli: eth0 10.79.0.3/16   -- the DHCP relay address and the machines' own
                  addresses 10.79.10.1 ... (one per simulated machine)

With ``servers=K`` (K > 1: a fleet, bench/storm_fleet.py) the client namespace holds a
bridge br0 instead (10.79.0.3 and the machines' addresses on it), and K server
namespaces hang off it: <tag>-boot at 10.79.0.2, then <tag>-boot1 ... at 10.79.0.4 ...
(``server_ns(k)``, ``server_addr(k)``).

Only 10.79.0.0/16 addresses, and only inside these namespaces. Everything
started here is stopped by ``down()``; ``StormLab`` is a context manager.
Used by bench/storm.py and tests/test_faults.py, tests/test_hostile.py.
"""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.lab import REPO, VENV_BIN, Lab, sh  # noqa: E402

SERVER_ADDR = "10.79.0.2"
RELAY_ADDR = "10.79.0.3"
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def machine_addr(i: int) -> str:
    """The address of simulated machine i (0-based): 10.79.10.1 upwards, 250 per /24."""
    return f"10.79.{10 + i // 250}.{1 + i % 250}"


def can_run() -> str | None:
    """None if namespaces can be built here, else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "iproute2 is not installed"
    return None


def in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Run fn in a thread that has entered network namespace ns.

    Network namespaces are per thread, and a socket keeps the namespace it was
    created in: sockets made by fn can be used from any thread afterwards.
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            with open(f"/var/run/netns/{ns}") as f:
                if libc.setns(f.fileno(), CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {ns}: {os.strerror(err)}")
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller
            box["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def netns_socket(ns: str, kind: int = socket.SOCK_DGRAM, bind: tuple[str, int] | None = None,
                 connect: tuple[str, int] | None = None, timeout: float = 5.0) -> socket.socket:
    """A socket living in namespace ns, optionally bound/connected there."""

    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, kind)
        s.settimeout(timeout)
        if bind is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(bind)
        if connect is not None:
            s.connect(connect)
        return s

    return in_netns(ns, make)


def proc_sample(pid: int) -> tuple[float, int]:
    """(CPU seconds used so far, VmRSS in KiB) of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return cpu, rss


def children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return out


class CpuGroup:
    """A cgroup (v1 cpuacct) that counts the CPU of a stack's processes and of every
    process they fork later: tftpd-hpa forks one per transfer, and a child that lives
    between two /proc samples is never seen by the Sampler. Processes forked after
    ``add`` join the group by inheritance. ``seconds()`` is None where the controller
    is not mounted or not writable."""

    ROOT = Path("/sys/fs/cgroup/cpuacct")

    def __init__(self, tag: str):
        self.path: Path | None = None
        if not (self.ROOT / "cpuacct.usage").exists():  # not v1's cpuacct (e.g. v2 only)
            return
        try:
            path = self.ROOT / "netboot-bench" / tag
            path.mkdir(parents=True, exist_ok=True)
            self.path = path
        except OSError:
            pass

    def add(self, pids: list[int]) -> None:
        """Move these processes into the group: a stack's ``pids()``, which lists its
        children alive now (nginx's worker, netboot's TFTP worker) beside them."""
        if self.path is None:
            return
        for pid in pids:
            try:
                (self.path / "cgroup.procs").write_text(str(pid))
            except OSError:
                pass  # gone already

    def seconds(self) -> float | None:
        if self.path is None:
            return None
        return int((self.path / "cpuacct.usage").read_text()) / 1e9

    def close(self) -> None:
        """Remove the group (its processes, if any are left, go back to the root)."""
        if self.path is None:
            return
        try:
            for pid in (self.path / "cgroup.procs").read_text().split():
                try:
                    (self.ROOT / "cgroup.procs").write_text(pid)
                except OSError:
                    pass
            self.path.rmdir()
            self.path.parent.rmdir()  # unless another run's group is in it
        except OSError:
            pass


class Sampler:
    """Samples CPU and RSS of a set of processes (and their children) every interval."""

    def __init__(self, pids: Callable[[], list[int]], interval: float = 0.1):
        self._pids = pids
        self.interval = interval
        self.peak_rss_kib = 0
        self._cpu0: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = self.t1 = 0.0
        self.peak_cpu_pct = 0.0

    def _poll(self) -> None:
        rss = 0
        for pid in self._pids():
            try:
                cpu, r = proc_sample(pid)
            except (OSError, IndexError, ValueError):
                continue
            self._cpu0.setdefault(pid, cpu)
            self._cpu_last[pid] = cpu
            rss += r
        self.peak_rss_kib = max(self.peak_rss_kib, rss)

    def _run(self) -> None:
        prev_t, prev_cpu = time.monotonic(), 0.0
        while not self._stop.is_set():
            self._poll()
            now = time.monotonic()
            cpu = self.cpu_seconds
            if now - prev_t >= 0.5:
                self.peak_cpu_pct = max(self.peak_cpu_pct, 100 * (cpu - prev_cpu) / (now - prev_t))
                prev_t, prev_cpu = now, cpu
            self._stop.wait(self.interval)

    @property
    def cpu_seconds(self) -> float:
        return sum(self._cpu_last[p] - self._cpu0[p] for p in self._cpu_last)

    def __enter__(self) -> Sampler:
        self.t0 = time.monotonic()
        self._poll()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()
        self.t1 = time.monotonic()


@dataclass
class StormLab(Lab):
    """tests/lab.py's Lab with two namespaces joined directly: its ``ns_boot`` is the
    server side (``ns_srv``), its ``ns_lab`` the machines' side (``ns_cli``)."""

    machines: int = 0  # addresses to add in the client namespace
    servers: int = 1  # server namespaces (more than one: on a bridge in the client's)
    wire: bool = False  # tap devices joined by bench/storm_wire.py instead of a veth pair
    tag: str = field(default_factory=lambda: "st" + uuidlib.uuid4().hex[:6])
    mounts: list[Path] = field(default_factory=list)
    sysctl_restore: list[tuple[Path, int, int]] = field(default_factory=list)

    @property
    def ns_srv(self) -> str:
        return self.ns_boot

    @property
    def ns_cli(self) -> str:
        return self.ns_lab

    @property
    def cli_dev(self) -> str:
        """The client namespace's interface: eth0, or br0 with several servers."""
        return "br0" if self.servers > 1 else "eth0"

    def server_ns(self, k: int) -> str:
        return self.ns_srv if k == 0 else f"{self.ns_srv}{k}"

    @staticmethod
    def server_addr(k: int) -> str:
        return SERVER_ADDR if k == 0 else f"10.79.0.{3 + k}"

    def __enter__(self) -> StormLab:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.down()

    def up(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for ns in (self.ns_srv, self.ns_cli):
            sh("ip", "netns", "add", ns)
        if self.servers > 1:
            assert not self.wire, "the user-space wire joins two namespaces only"
            self.ns(self.ns_cli, "ip", "link", "add", "br0", "type", "bridge")
            self.ns(self.ns_cli, "ip", "link", "set", "br0", "up")
            for k in range(self.servers):
                ns = self.server_ns(k)
                if k:
                    sh("ip", "netns", "add", ns)
                sh("ip", "link", "add", f"vs{k}", "netns", self.ns_cli, "type", "veth",
                   "peer", "name", "eth0", "netns", ns)
                self.ns(self.ns_cli, "ip", "link", "set", f"vs{k}", "master", "br0", "up")
                self.ns(ns, "ip", "addr", "add", f"{self.server_addr(k)}/16", "dev", "eth0")
                self.ns(ns, "ip", "link", "set", "eth0", "up")
                self.ns(ns, "ip", "link", "set", "lo", "up")
            self.ns(self.ns_cli, "ip", "addr", "add", f"{RELAY_ADDR}/16", "dev", "br0")
            self.ns(self.ns_cli, "ip", "link", "set", "lo", "up")
        elif self.wire:
            self.control = self.workdir / "wire.json"
            self.control.write_text('{"loss": 0, "reorder": 0, "delay_ms": 0}')
            for ns in (self.ns_srv, self.ns_cli):
                self.ns(ns, "ip", "tuntap", "add", "dev", "eth0", "mode", "tap")
            log = self.workdir / "wire.log"
            with open(log, "ab") as out:
                self.procs.append(subprocess.Popen(
                    [str(VENV_BIN / "python"), str(REPO / "bench" / "storm_wire.py"),
                     self.ns_srv, self.ns_cli, "--control", str(self.control)],
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
            deadline = time.monotonic() + 10
            while "wire up" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.05)
        else:
            sh("ip", "link", "add", "eth0", "netns", self.ns_srv, "type", "veth",
               "peer", "name", "eth0", "netns", self.ns_cli)
        if self.servers == 1:
            for ns, addr in ((self.ns_srv, SERVER_ADDR), (self.ns_cli, RELAY_ADDR)):
                self.ns(ns, "ip", "addr", "add", f"{addr}/16", "dev", "eth0")
                self.ns(ns, "ip", "link", "set", "eth0", "up")
                self.ns(ns, "ip", "link", "set", "lo", "up")
        if self.machines:
            batch = "".join(f"addr add {machine_addr(i)}/16 dev {self.cli_dev}\n"
                            for i in range(self.machines))
            subprocess.run(["ip", "-n", self.ns_cli, "-batch", "-"], input=batch, text=True,
                           check=True, capture_output=True)
        # Neighbour tables sized for a rack: past gc_thresh2 (512 by default) the kernel
        # drops entries it still needs, and replies to machines go unanswered (at N=10,000
        # only ~512 machines booted, on either stack). On this kernel the thresholds exist
        # only in the initial namespace and apply to all: raised there while the lab is up
        # (only ever raised), restored by down().
        if self.machines > 256:
            need = {"gc_thresh1": 2 * self.machines, "gc_thresh2": 4 * self.machines,
                    "gc_thresh3": 8 * self.machines}
            for k, v in need.items():
                path = Path(f"/proc/sys/net/ipv4/neigh/default/{k}")
                try:
                    old = int(path.read_text())
                    if old < v:
                        path.write_text(str(v))
                        self.sysctl_restore.append((path, old, v))
                except (OSError, ValueError):
                    pass

    def impair(self, loss: float = 0, reorder: float = 0, delay_ms: float = 0) -> None:
        """netem's 'loss L% reorder R% delay Dms' on both ends: tc netem where the kernel
        has it, else the user-space wire (the lab must be built with wire=True)."""
        spec = f"loss {loss}% reorder {reorder}% delay {delay_ms}ms"
        if not self.wire:
            for ns in (self.ns_srv, self.ns_cli):
                if loss or reorder or delay_ms:
                    self.netem(ns, spec)
                else:
                    self.clear_netem(ns)
            return
        import json

        self.control.write_text(json.dumps({"loss": loss, "reorder": reorder,
                                            "delay_ms": delay_ms}))
        time.sleep(0.3)  # the wire re-reads its control file every 0.1 s

    @staticmethod
    def has_netem() -> bool:
        probe = f"nbstprobe{os.getpid()}"
        sh("ip", "netns", "add", probe)
        try:
            return sh("ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root",
                      "netem", "delay", "1ms", check=False).returncode == 0
        finally:
            sh("ip", "netns", "del", probe, check=False)

    def netem(self, ns: str, spec: str) -> None:
        """tc netem on eth0 in ns, e.g. 'loss 10% reorder 25% delay 2ms'."""
        self.ns(ns, "tc", "qdisc", "replace", "dev", "eth0", "root", "netem", *spec.split())

    def clear_netem(self, ns: str) -> None:
        self.ns(ns, "tc", "qdisc", "del", "dev", "eth0", "root", check=False)

    def tmpfs(self, path: Path, size: str = "1M") -> Path:
        path.mkdir(parents=True, exist_ok=True)
        sh("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", f"{self.tag}-tmpfs", str(path))
        self.mounts.append(path)
        return path

    def down(self) -> None:
        super().down()
        for k in range(1, self.servers):
            sh("ip", "netns", "del", self.server_ns(k), check=False)
        for m in reversed(self.mounts):
            sh("umount", "-l", str(m), check=False)
        for path, old, ours in reversed(self.sysctl_restore):
            try:
                if int(path.read_text()) == ours:  # unless someone changed it since
                    path.write_text(str(old))
            except (OSError, ValueError):
                pass
        self.sysctl_restore.clear()


# -- netboot as a subprocess ------------------------------------------------------------

STORM_PROFILE = """\
description: boot storm
loader: ipxe
boot: always
kernel: {kernel}
initrds: [{initrd}]
cmdline: >-
  console=ttyS0 panic=-1 quiet
  netboot.profile={{{{ profile }}}} netboot.host={{{{ hostname }}}}
  {{% if node_urls %}}netboot.callback={{{{ node_urls.installed }}}}{{% endif %}}
"""


def stage_images(dest: Path, kernel_size: int | None = None,
                 initrd_size: int | None = None) -> tuple[str, str]:
    """Kernel and initrd under dest/storm/ (copies, so symlink confinement is not in play).

    kernel_size, initrd_size: generated stand-ins of that many bytes instead of the demo
    OS's files (the same seed, so both stacks serve the same bytes).
    Returns the two paths relative to dest.
    """
    demo = REPO / "images" / "demo"
    if not (demo / "vmlinuz").exists():
        subprocess.run([str(VENV_BIN / "python"), str(REPO / "scripts/demo_os.py"), str(demo)],
                       check=True)
    d = dest / "storm"
    d.mkdir(parents=True, exist_ok=True)
    for name, size, seed in (("vmlinuz", kernel_size, 1), ("initrd.cpio.gz", initrd_size, 2)):
        if size:
            (d / name).write_bytes(random.Random(seed).randbytes(size))
        else:
            shutil.copyfile(demo / name, d / name)
    return "storm/vmlinuz", "storm/initrd.cpio.gz"


@dataclass
class NetbootServer:
    """netboot serve in the server namespace, with its own config tree under root."""

    lab: StormLab
    root: Path
    data_dir: Path | None = None
    kernel_size: int | None = None
    initrd_size: int | None = None
    extra_yaml: str = ""
    proc: subprocess.Popen | None = None
    starts: int = 0
    #: which of the lab's server namespaces it runs in (StormLab.server_ns)
    index: int = 0
    env: dict[str, str] = field(default_factory=dict)
    #: run netboot from this source tree (e.g. a `git archive` export) instead of the
    #: installed one; default $STORM_NETBOOT_SRC, else the working tree
    src: Path | None = field(default_factory=lambda: (Path(os.environ["STORM_NETBOOT_SRC"])
                                                      if os.environ.get("STORM_NETBOOT_SRC")
                                                      else None))

    def __post_init__(self) -> None:
        self.cfg = self.root / "configs"
        self.images = self.root / "images"
        (self.cfg / "profiles").mkdir(parents=True, exist_ok=True)
        (self.cfg / "machines").mkdir(parents=True, exist_ok=True)
        self.kernel, self.initrd = stage_images(self.images, self.kernel_size,
                                                self.initrd_size)
        self.profile_path = self.cfg / "profiles" / "storm.yaml"
        self.profile_path.write_text(STORM_PROFILE.format(kernel=self.kernel, initrd=self.initrd))
        data = self.data_dir or self.root / "data"
        self.config = self.cfg / "netboot.yaml"
        self.config.write_text(
            f"data_dir: {data}\nimages_dir: {self.images}\nignition_dir: {REPO / 'ignition'}\n"
            f"default_profile: storm\naddress: {self.addr}\n"
            "api:\n  admin_token: storm-admin-token\n" + self.extra_yaml)
        self.log = self.root / "netboot.log"

    @property
    def addr(self) -> str:
        return StormLab.server_addr(self.index)

    @property
    def url(self) -> str:
        return f"http://{self.addr}:8080"

    def start(self, wait: bool = True, timeout: float = 30) -> subprocess.Popen:
        offset = self.log.stat().st_size if self.log.exists() else 0
        env = {**os.environ, **self.env} if self.env else None
        if self.src is not None:
            env = {**(env or os.environ), "PYTHONPATH": str(self.src)}
        self.proc = self.lab.spawn(self.lab.server_ns(self.index), str(VENV_BIN / "python"),
                                   "-m", "netboot",
                                   "serve", "--config", str(self.config), "--interface", "eth0",
                                   log=self.log, env=env)
        self.starts += 1
        if not wait:
            return self.proc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_text()[offset:]
            if "ProxyDHCP listening" in text:
                return self.proc
            if self.proc.poll() is not None:
                raise RuntimeError(f"netboot exited {self.proc.returncode}:\n{text}")
            time.sleep(0.1)
        raise RuntimeError(f"netboot did not start:\n{self.log_text()[offset:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)  # ip netns exec execs: this is netboot itself
        self.proc.wait(timeout=20)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def http(self, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None, timeout: float = 10) -> tuple[int, bytes]:
        """One HTTP request from the client namespace (path sent as is)."""
        import http.client

        conn = http.client.HTTPConnection(self.addr, 8080, timeout=timeout)
        conn.sock = netns_socket(self.lab.ns_cli, socket.SOCK_STREAM,
                                 connect=(self.addr, 8080), timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def json(self, path: str) -> Any:
        import json

        status, body = self.http("GET", path)
        if status != 200:
            raise RuntimeError(f"GET {path}: {status} {body[:200]!r}")
        return json.loads(body)


def run_storm(lab: StormLab, out: Path, *args: str, log: Path | None = None,
              background: bool = False) -> subprocess.Popen | dict:
    """bench/storm_client.py in the client namespace; returns its JSON result."""
    import json

    log = log or out.with_suffix(".log")
    cmd = ["ip", "netns", "exec", lab.ns_cli, str(VENV_BIN / "python"),
           str(REPO / "bench" / "storm_client.py"), "--json", str(out), *args]
    if background:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(log, "ab"), text=True,
                                start_new_session=True)
        lab.procs.append(proc)
        return proc
    out.unlink(missing_ok=True)
    with open(log, "ab") as err:
        rc = subprocess.run(cmd, stdout=err, stderr=err).returncode  # 1: some machines failed
    if not out.exists():
        raise RuntimeError(f"storm client exited {rc} without a result:\n"
                           + log.read_text(errors="replace")[-3000:])
    return json.loads(out.read_text())
