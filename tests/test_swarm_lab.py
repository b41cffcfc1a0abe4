"""A real two-engine Docker swarm in network namespaces: facts, join, idempotency, leave, sweep.

Each dockerd runs inside its own network namespace (and UTS namespace, so
the two nodes get distinct hostnames), joined by a veth pair
10.252.0.1/24 <-> 10.252.0.2/24. Only the network namespace is entered
(`ip netns exec` would remount /sys and break dockerd).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote_to_bytes

import pytest

from netboot.ignition.render import IgnitionRenderer, SiteSettings, bundled_template_dir
from netboot.swarm import SwarmError, read_swarm_facts, sweep_down_nodes

pytestmark = pytest.mark.lab

DOCKERD = shutil.which("dockerd") or ("/usr/sbin/dockerd" if Path("/usr/sbin/dockerd").exists()
                                      else None)
DOCKER = shutil.which("docker")
MANAGER_IP, WORKER_IP = "10.252.0.1", "10.252.0.2"


def _need_lab() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces and dockerd")
    for tool, path in (("dockerd", DOCKERD), ("docker", DOCKER), ("ip", shutil.which("ip")),
                       ("nsenter", shutil.which("nsenter")), ("unshare", shutil.which("unshare"))):
        if path is None:
            pytest.skip(f"{tool} missing (apt-get install docker.io iproute2 util-linux)")


def run(*args: str, check: bool = True, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True, env=env, timeout=timeout,
                          check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{shlex.join(args)} -> {proc.returncode}\n{proc.stdout}{proc.stderr}")
    return proc


@dataclass
class Engine:
    name: str  # namespace and hostname
    ip: str
    root: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def sock(self) -> Path:
        return self.root / "docker.sock"

    @property
    def host(self) -> str:
        return f"unix://{self.sock}"

    def env(self) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "DOCKER_HOST": self.host,
                "DOCKER_CONFIG": str(self.root / "cli")}

    def docker(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        assert DOCKER is not None
        return run(DOCKER, *args, check=check, env=self.env())

    def start(self) -> None:
        assert DOCKERD is not None
        (self.root / "daemon.json").write_text("{}")
        cmd = shlex.join([
            DOCKERD, "--host", self.host, "--data-root", str(self.root / "data"),
            "--exec-root", str(self.root / "exec"), "--pidfile", str(self.root / "pid"),
            "--config-file", str(self.root / "daemon.json"),
            "--iptables=false", "--ip-forward=false", "--bridge=none",
        ])
        log = (self.root / "dockerd.log").open("wb")
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/var/run/netns/{self.name}", "unshare", "--uts",
             "sh", "-c", f"hostname {self.name} && exec {cmd}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"dockerd {self.name} exited:\n{self.log_tail()}")
            if self.sock.exists() and self.docker("version", check=False).returncode == 0:
                return
            time.sleep(0.5)
        raise AssertionError(f"dockerd {self.name} not ready in {timeout}s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        path = self.root / "dockerd.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        # containerd and shims that dockerd started may have left its group.
        for pid in _pids_mentioning(str(self.root)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _pids_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(entry.name))
    return pids


def _unmount_below(root: Path) -> None:
    prefix = str(root) + "/"
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if point.startswith(prefix):
            mounts.append(point)
    for point in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


@dataclass
class Lab:
    manager: Engine
    worker: Engine


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    _need_lab()
    tag = os.getpid() % 100000
    base = Path(tempfile.mkdtemp(prefix="igntest-", dir="/tmp"))  # short: socket paths <108
    names = (f"igntest-m{tag}", f"igntest-w{tag}")
    veths = (f"igtm{tag}", f"igtw{tag}")
    engines = [Engine(names[0], MANAGER_IP, base / "m"), Engine(names[1], WORKER_IP, base / "w")]
    try:
        for ns in names:
            run("ip", "netns", "add", ns)
        run("ip", "link", "add", veths[0], "type", "veth", "peer", "name", veths[1])
        for eng, veth in zip(engines, veths, strict=True):
            eng.root.mkdir(parents=True)
            run("ip", "link", "set", veth, "netns", eng.name)
            run("ip", "-n", eng.name, "addr", "add", f"{eng.ip}/24", "dev", veth)
            run("ip", "-n", eng.name, "link", "set", veth, "up")
            run("ip", "-n", eng.name, "link", "set", "lo", "up")
        for eng in engines:
            eng.start()
        for eng in engines:
            eng.wait_ready()
        yield Lab(*engines)
    finally:
        for eng in engines:
            eng.stop()
        _unmount_below(base)
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", veths[0]], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)


def unit_command(cfg: dict, unit_name: str, key: str) -> list[str]:
    """The argv systemd would run for ``key`` (ExecStart/ExecStop) of a unit."""
    for unit in cfg["systemd"]["units"]:
        if unit["name"] == unit_name:
            lines = [ln for ln in unit["contents"].splitlines() if ln.startswith(key + "=")]
            assert len(lines) == 1, lines
            # systemd turns "$$" into a literal "$" for the shell; we use no specifiers.
            return shlex.split(lines[0].removeprefix(key + "=").replace("$$", "$"))
    raise KeyError(unit_name)


def env_file(cfg: dict, path: str) -> dict[str, str]:
    for f in cfg["storage"]["files"]:
        if f["path"] == path:
            src = f["contents"]["source"]
            assert src.startswith("data:,")
            text = unquote_to_bytes(src.removeprefix("data:,")).decode()
            return dict(line.split("=", 1) for line in text.splitlines() if line)
    raise KeyError(path)


def nodes(manager: Engine) -> list[dict[str, str]]:
    out = manager.docker("node", "ls", "--format", "{{json .}}").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


async def test_swarm_join_idempotent_leave_and_sweep(
    lab: Lab, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    m, w = lab.manager, lab.worker

    with pytest.raises(SwarmError, match="not in a swarm"):
        await read_swarm_facts(str(m.sock))

    m.docker("swarm", "init", "--advertise-addr", MANAGER_IP)
    facts = await read_swarm_facts(str(m.sock))
    assert facts.manager_addr == f"{MANAGER_IP}:2377"
    assert facts.worker_token.startswith("SWMTKN-1-")
    assert facts.manager_token.startswith("SWMTKN-1-")
    assert facts.worker_token != facts.manager_token
    assert m.docker("swarm", "join-token", "-q", "worker").stdout.strip() == facts.worker_token
    for token in (facts.worker_token, facts.manager_token):
        assert token not in caplog.text
        assert token not in repr(facts)

    # The worker's own socket is not a manager: tokens cannot come from it.
    renderer = IgnitionRenderer(bundled_template_dir())
    ctx = {
        "hostname": w.name, "mac": "52:54:00:00:00:02", "uuid": "u-2",
        "base_url": f"http://{MANAGER_IP}:8080", "vars": {}, "swarm": facts,
        "site": SiteSettings(ntp=["ntp.lab"]), "ssh_keys": [], "node_urls": {}, "role": "worker",
    }
    cfg = json.loads(renderer.render("swarm-worker", ctx))
    env = {**w.env(), **env_file(cfg, "/etc/netboot/swarm.env")}
    join = unit_command(cfg, "swarm-join.service", "ExecStart")
    leave = unit_command(cfg, "swarm-leave.service", "ExecStop")

    first = run(*join, env=env)
    assert "already" not in first.stdout
    wait_for(lambda: sorted((n["Hostname"], n["Status"]) for n in nodes(m))
             == sorted([(m.name, "Ready"), (w.name, "Ready")]), "two Ready nodes")
    old_id = w.docker("info", "--format", "{{.Swarm.NodeID}}").stdout.strip()

    again = run(*join, env=env)  # idempotent: already a member
    assert again.returncode == 0 and "already in a swarm" in again.stdout
    assert len(nodes(m)) == 2

    with pytest.raises(SwarmError, match="worker"):
        await read_swarm_facts(str(w.sock))

    run(*leave, env=env)
    assert w.docker("info", "--format", "{{.Swarm.LocalNodeState}}").stdout.strip() == "inactive"
    wait_for(lambda: any(n["ID"] == old_id and n["Status"] == "Down" for n in nodes(m)),
             "the manager to see the worker down")
    assert run(*leave, env=env).returncode == 0  # leaving twice is harmless

    # Netbooted again: same hostname, new node ID. The sweeper removes the stale entry.
    run(*join, env=env)
    wait_for(lambda: [n["Status"] for n in nodes(m) if n["Hostname"] == w.name].count("Ready")
             == 1, "the re-joined worker to be Ready")
    assert await sweep_down_nodes(str(m.sock), set()) == []
    assert await sweep_down_nodes(str(m.sock), {"some-other-host"}) == []
    assert await sweep_down_nodes(str(m.sock), {w.name}) == [old_id]
    remaining = nodes(m)
    assert old_id not in {n["ID"] for n in remaining}
    assert sorted(n["Status"] for n in remaining) == ["Ready", "Ready"]
    for token in (facts.worker_token, facts.manager_token):
        assert token not in caplog.text


async def test_manager_join_and_demoting_leave(lab: Lab) -> None:
    """swarm-manager joins with the manager token; its ExecStop demotes, then leaves."""
    m, w = lab.manager, lab.worker
    if m.docker("info", "--format", "{{.Swarm.LocalNodeState}}").stdout.strip() != "active":
        m.docker("swarm", "init", "--advertise-addr", MANAGER_IP)
    w.docker("swarm", "leave", "--force", check=False)
    facts = await read_swarm_facts(str(m.sock))
    renderer = IgnitionRenderer(bundled_template_dir())
    ctx = {
        "hostname": w.name, "mac": "52:54:00:00:00:03", "uuid": "u-3",
        "base_url": f"http://{MANAGER_IP}:8080", "vars": {}, "swarm": facts,
        "site": SiteSettings(), "ssh_keys": [], "node_urls": {}, "role": "manager",
    }
    cfg = json.loads(renderer.render("swarm-manager", ctx))
    env = {**w.env(), **env_file(cfg, "/etc/netboot/swarm.env")}
    run(*unit_command(cfg, "swarm-join.service", "ExecStart"), env=env)
    assert w.docker("info", "--format", "{{.Swarm.ControlAvailable}}").stdout.strip() == "true"
    assert "already in a swarm" in run(*unit_command(cfg, "swarm-join.service", "ExecStart"),
                                       env=env).stdout

    run(*unit_command(cfg, "swarm-leave.service", "ExecStop"), env=env)
    assert w.docker("info", "--format", "{{.Swarm.LocalNodeState}}").stdout.strip() == "inactive"
    # Demoted before leaving, so the remaining manager keeps its quorum.
    wait_for(lambda: m.docker("node", "ls", check=False).returncode == 0, "manager quorum")
    managers = [n for n in nodes(m) if n["ManagerStatus"]]
    assert [n["Hostname"] for n in managers] == [m.name]

    # The last manager's ExecStop refuses to leave: that would end the swarm.
    last = {**m.env(), **env_file(cfg, "/etc/netboot/swarm.env")}
    out = run(*unit_command(cfg, "swarm-leave.service", "ExecStop"), env=last)
    assert "last manager" in out.stdout
    assert m.docker("info", "--format", "{{.Swarm.LocalNodeState}}").stdout.strip() == "active"


async def test_first_manager_inits_and_a_second_joins_with_the_manager_token(lab: Lab) -> None:
    """swarm-manager with vars.swarm_init (no swarm facts yet) creates the swarm on a real
    dockerd; a second manager rendered with the facts read from it joins as a manager."""
    m, w = lab.manager, lab.worker
    for eng in (w, m):  # start with no swarm at all (earlier tests made one)
        eng.docker("swarm", "leave", "--force", check=False)
    renderer = IgnitionRenderer(bundled_template_dir())
    base = {"mac": "52:54:00:00:00:04", "base_url": f"http://{MANAGER_IP}:8080",
            "site": SiteSettings(), "ssh_keys": [], "node_urls": {}, "role": "manager"}
    first = json.loads(renderer.render("swarm-manager", {
        **base, "hostname": m.name, "uuid": "u-4", "swarm": None,
        "vars": {"swarm_init": True, "swarm_advertise_addr": MANAGER_IP}}))
    env = {**m.env(), **env_file(first, "/etc/netboot/swarm.env")}
    init = unit_command(first, "swarm-join.service", "ExecStart")
    out = run(*init, env=env)
    assert "Swarm initialized" in out.stdout
    assert m.docker("info", "--format", "{{.Swarm.ControlAvailable}}").stdout.strip() == "true"
    assert "already in a swarm" in run(*init, env=env).stdout  # a reboot does not re-init

    facts = await read_swarm_facts(str(m.sock))  # what netboot reads from the new swarm
    assert facts.manager_addr == f"{MANAGER_IP}:2377"
    second = json.loads(renderer.render("swarm-manager", {
        **base, "hostname": w.name, "uuid": "u-5", "swarm": facts, "vars": {}}))
    wenv = {**w.env(), **env_file(second, "/etc/netboot/swarm.env")}
    assert wenv["SWARM_TOKEN"] == facts.manager_token
    run(*unit_command(second, "swarm-join.service", "ExecStart"), env=wenv)
    wait_for(lambda: sorted((n["Hostname"], n["Status"], bool(n["ManagerStatus"]))
                            for n in nodes(m))
             == sorted([(m.name, "Ready", True), (w.name, "Ready", True)]),
             "two Ready managers")
    run(*unit_command(second, "swarm-leave.service", "ExecStop"), env=wenv)  # demote, leave
    assert w.docker("info", "--format", "{{.Swarm.LocalNodeState}}").stdout.strip() == "inactive"
