"""A shared lab for the end-to-end boots: namespaces, the site's dnsmasq and netboot."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from netboot.config import DEFAULT_TFTP_ROOTS
from tests.bmc_lab import bmc_lab  # noqa: F401  (a fixture: a guest behind a real BMC)
from tests.lab import REPO, Lab, can_run_lab


def build_demo_os() -> Path:
    """images/ with what the bundled profiles boot: the demo OS, the stand-in
    Container Linux (configs/profiles/coreos.yaml; built once per machine, cached
    outside the clone, linked in here) and the arm64 loaders and demo OS."""
    images = REPO / "images"
    demo = images / "demo"
    python = str(REPO / ".venv/bin/python")
    if not (demo / "vmlinuz").exists() or not (demo / "initrd.cpio.gz").exists():
        subprocess.run([python, str(REPO / "scripts/demo_os.py"), str(demo)], check=True)
    subprocess.run([python, str(REPO / "scripts/coreos_image.py"), str(images / "coreos")],
                   check=True)
    subprocess.run([python, str(REPO / "scripts/arm64_os.py"), str(images / "arm64")],
                   check=True)  # up to date: no download
    return images


# Static swarm facts for profiles with an Ignition template (no dockerd in the lab);
# fake lab values, so tests can check the token reaches the guest and never the log.
LAB_SWARM = {"manager_addr": "10.77.0.2:2377",
             "worker_token": "SWMTKN-1-lab-worker-0123456789abcdef",
             "manager_token": "SWMTKN-1-lab-manager-0123456789abcdef"}


def write_lab_config(root: Path, images: Path, swarm: dict[str, Any] | None = None,
                     extra: str = "") -> Path:
    """The bundled configs, with the lab's own machine files and data dir.

    ``swarm`` (default: LAB_SWARM) becomes netboot.yaml's ``swarm:`` block; profiles
    without ``ignition:`` do not use it. ``extra`` is appended to netboot.yaml.
    """
    cfg = root / "configs"
    shutil.copytree(REPO / "configs" / "profiles", cfg / "profiles")
    (cfg / "machines").mkdir(parents=True)
    once = (REPO / "configs/profiles/default.yaml").read_text().replace(
        "boot: always", "boot: once")
    (cfg / "profiles" / "once.yaml").write_text(once)
    swarm = LAB_SWARM if swarm is None else swarm
    (cfg / "netboot.yaml").write_text(
        f"data_dir: {root / 'data'}\nimages_dir: {images}\n"
        f"ignition_dir: {REPO / 'ignition'}\ndefault_profile: default\n"
        f"tftp:\n  roots: {json.dumps([*DEFAULT_TFTP_ROOTS, str(images / 'arm64/loaders')])}\n"
        "api:\n  admin_token: lab-admin-token\n"
        + ("swarm:\n" if swarm else "")
        + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in swarm.items()) + extra)
    return cfg / "netboot.yaml"


class LabEnv:
    def __init__(self, lab: Lab, config: Path):
        self.lab = lab
        self.config = config
        self.machines = config.parent / "machines"

    def add_machine(self, name: str, **fields: Any) -> None:
        """Write a machine file and wait until the server has loaded it (its /health)."""
        before = self.api("/health")["machines"]
        body = "".join(f"{k}: {json.dumps(v)}\n" for k, v in fields.items())
        (self.machines / f"{name}.yaml").write_text(body)
        self.wait_loaded(set(), before + 1)

    def wait_loaded(self, profiles: set[str], machines: int, timeout: float = 30) -> None:
        """Until the server's config watcher has loaded ``profiles`` and at least
        ``machines`` machine files, as its /health reports (slow on a busy machine)."""
        deadline = time.monotonic() + timeout
        health: dict[str, Any] = {}
        while time.monotonic() < deadline:
            health = self.api("/health")
            if profiles <= set(health["profiles"]) and health["machines"] >= machines:
                return
            time.sleep(0.2)
        raise AssertionError(f"netboot did not load the new profiles and machines: {health}")

    def node_in(self, uuid: str, state: str, timeout: float = 10) -> dict[str, Any]:
        """The node's detail (with events) once it is in ``state`` (asserted)."""
        deadline = time.monotonic() + timeout
        node: dict[str, Any] = {}
        while time.monotonic() < deadline:
            node = self.api(f"/api/v1/nodes/{uuid}")
            if node.get("state") == state:
                break
            time.sleep(0.5)
        assert node.get("state") == state, node
        return node

    def api(self, path: str) -> Any:
        """GET from netboot's HTTP API inside the boot namespace."""
        out = self.lab.ns(self.lab.ns_boot, "curl", "-sf",
                          f"http://{self.lab.boot_addr}:8080{path}")
        return json.loads(out.stdout)


def lab_config(root: Path, extra: str = "") -> Path:
    """Skip unless a lab can run here; else the demo OS built and the lab's netboot.yaml
    written under ``root`` (``extra`` appended to it)."""
    reason = can_run_lab()
    if reason:
        pytest.skip(reason)
    return write_lab_config(root, build_demo_os(), extra=extra)


@contextmanager
def running_lab(root: Path, config: Path, *, next_server: bool = False) -> Iterator[LabEnv]:
    """A lab in ``root``: the site's DHCP and netboot serving ``config``; with
    ``next_server`` the site DHCP names netboot as next-server (siaddr), as GRUB needs."""
    lab = Lab(root)
    try:
        lab.up()
        lab.start_site_dhcp(lab.boot_addr if next_server else None)
        lab.start_netboot(config)
        yield LabEnv(lab, config)
    finally:
        lab.down()
        log = lab.netboot_log()
        if log:
            print("---- netboot log (tail) ----\n" + log[-6000:])


@pytest.fixture(scope="session")
def lab_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabEnv]:
    root = tmp_path_factory.mktemp("lab")
    with running_lab(root, lab_config(root)) as env:
        yield env
