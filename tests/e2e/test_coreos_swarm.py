"""The CoreOS path with a real OS: power on, and the node is in the swarm.

A real swarm manager (dockerd in the lab's boot namespace, `docker swarm init`);
netboot reads the join token from that manager's Engine API socket. A QEMU guest
boots the stand-in Container Linux (scripts/coreos_image.py) through iPXE: the real
Ignition engine applies the OEM archive's config in the initramfs, the guest's real
systemd starts Docker and the rendered swarm-join unit. What is asserted is what the
manager saw (its Engine API), not what the guest printed. Then an ACPI power-down
(QEMU monitor): swarm-leave runs before Docker stops and the manager lists the node
Down; the guest boots again, joins as a new node, netboot's sweep removes the old
Down entry, and exactly one Ready node carries the hostname.

On failure the guest's console (with the journal of swarm-join, swarm-leave and
docker, which the image prints there after the join and at shutdown) is in the
assertion message.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.conftest import LabEnv, build_demo_os, write_lab_config
from tests.lab import REPO, Guest, Lab, can_run_lab
from tests.test_swarm_lab import DOCKER, DOCKERD, Engine, _unmount_below, nodes

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]

HOST = "cos1"
MAC = "52:54:00:c0:05:01"
MEMORY_MB = 1536  # the squashfs root (~100 MiB) lives in RAM beside Docker
BOOT_TIMEOUT = 900  # power-on to Ready under TCG on a busy 2-core machine
# Console lines (systemd's status, the kernel, our image's report) whose first sight
# marks a step of the boot, in order.
STEPS = (
    ("kernel started", "Linux version"),
    ("Ignition fetch-offline done", "Finished ignition-fetch-of"),  # ellipsized
    ("Ignition files done", "Finished ignition-files"),
    ("switching root", "Reached target initrd-switch-root.target"),
    ("docker started", "Started docker.service"),
    ("swarm-join started", "Starting swarm-join.service"),
    ("swarm-join finished", "Finished swarm-join.service"),
)


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass
class Timeline:
    """Seconds since power-on at which each step was first seen."""

    start: float = field(default_factory=time.monotonic)
    seen: dict[str, float] = field(default_factory=dict)

    def mark(self, step: str) -> None:
        self.seen.setdefault(step, round(time.monotonic() - self.start, 1))

    def watch(self, console: str) -> None:
        plain = ANSI.sub("", console)  # systemd colours the unit names
        for step, marker in STEPS:
            if marker in plain:
                self.mark(step)

    def __str__(self) -> str:
        return ", ".join(f"{k} {v}s" for k, v in self.seen.items())


def node_states(manager: Engine, hostname: str) -> list[str]:
    """The manager's view (`docker node ls`) of every node named ``hostname``."""
    return [n["Status"] for n in nodes(manager) if n["Hostname"] == hostname]


def wait_until(what: str, predicate: Callable[[], bool], timeout: float,
               guest: Guest | None = None, timeline: Timeline | None = None,
               hide: str = "", while_on: bool = True) -> None:
    """Poll ``predicate``; on timeout (or, with ``while_on``, the guest gone) fail with
    the guest's console, ``hide`` (the join token: a failed Ignition stage prints its
    config) blanked out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if guest is not None and timeline is not None:
            timeline.watch(guest.console())
        if predicate():
            return
        if while_on and guest is not None and guest.proc is not None \
                and guest.proc.poll() is not None:
            break
        time.sleep(0.5)
    console = guest.console() if guest is not None else ""
    if hide:
        console = console.replace(hide, "<join token>")
    raise AssertionError(f"not {what} (timeline: {timeline})\n---- guest console (tail) "
                         f"----\n{console[-12000:]}")


@pytest.fixture
def swarm_lab(tmp_path: Path) -> Iterator[tuple[LabEnv, Engine]]:
    """A lab whose boot namespace runs a real swarm manager, and netboot reading it."""
    reason = can_run_lab()
    if reason:
        pytest.skip(reason)
    if DOCKERD is None or DOCKER is None:
        pytest.skip("docker.io is not installed (make deps-test installs it)")
    t0 = time.monotonic()
    images = build_demo_os()  # the coreos image too: built or reused from the cache
    print(f"images ready in {time.monotonic() - t0:.1f}s")
    lab = Lab(tmp_path / "lab")
    lab.workdir.mkdir()
    base = Path(tempfile.mkdtemp(prefix="cos-", dir="/tmp"))  # socket path under 108 bytes
    manager = Engine(lab.ns_boot, lab.boot_addr, base / "m")
    manager.root.mkdir()
    try:
        lab.up()
        manager.start()
        manager.wait_ready()
        manager.docker("swarm", "init", "--advertise-addr", lab.boot_addr)
        config = write_lab_config(tmp_path, images, swarm={
            "docker_socket": str(manager.sock), "sweep_down_nodes": True,
            "refresh_seconds": 5})
        lab.start_site_dhcp()
        lab.start_netboot(config)
        yield LabEnv(lab, config), manager
    finally:
        lab.down()
        manager.stop()
        _unmount_below(base)
        shutil.rmtree(base, ignore_errors=True)
        log = lab.netboot_log()
        if log:
            print("---- netboot log (tail) ----\n" + log[-4000:])


def boot_to_ready(env: LabEnv, manager: Engine, uuid: str,
                  token: str) -> tuple[Guest, Timeline]:
    """Power on a guest and wait until the manager lists it Ready."""
    timeline = Timeline()
    guest = env.lab.boot_guest("bios", mac=MAC, uuid=uuid, serial="SN-COS-1",
                               memory_mb=MEMORY_MB, monitor=True)
    wait_until("Ready on the manager", lambda: "Ready" in node_states(manager, HOST),
               BOOT_TIMEOUT, guest, timeline, hide=token)
    timeline.mark("Ready on the manager")
    return guest, timeline


def test_coreos_guest_joins_leaves_and_rejoins(
        swarm_lab: tuple[LabEnv, Engine]) -> None:
    env, manager = swarm_lab
    env.add_machine(HOST, mac=MAC, profile="coreos", hostname=HOST)
    uuid = str(uuidlib.uuid4())
    token = manager.docker("swarm", "join-token", "-q", "worker").stdout.strip()

    guest, first = boot_to_ready(env, manager, uuid, token)
    assert node_states(manager, HOST) == ["Ready"]
    first_id = next(n["ID"] for n in nodes(manager) if n["Hostname"] == HOST)
    role = manager.docker("node", "inspect", first_id, "--format", "{{.Spec.Role}}")
    assert role.stdout.strip() == "worker"
    wait_until("the join report on the console",
               lambda: "NETBOOT-COREOS booted end" in guest.console(), 120, guest, first,
               hide=token)
    assert "NETBOOT-COREOS booted end swarm-join=active" in guest.console()
    first.watch(guest.console())
    print(f"first boot: {first}")

    # ACPI power button: systemd shuts down, swarm-leave's ExecStop runs before
    # docker.service stops, the manager sees the node go, QEMU exits.
    down_at = time.monotonic()
    env.lab.monitor(guest, "system_powerdown")
    wait_until("Down on the manager", lambda: node_states(manager, HOST) == ["Down"], 180,
               guest, hide=token, while_on=False)
    left_after = time.monotonic() - down_at
    assert guest.proc is not None
    guest.proc.wait(timeout=180)
    console = guest.console()
    assert "NETBOOT-COREOS shutdown end" in console, console[-8000:]
    shutdown = console[console.index("NETBOOT-COREOS shutdown begin"):]
    # The journal the image printed after Docker stopped: leave ran, then Docker went.
    assert "Node left the swarm." in shutdown, shutdown[-6000:]
    assert shutdown.index("Node left the swarm.") < shutdown.index("Stopping docker.service"), \
        shutdown[-6000:]
    print(f"power-down to Down on the manager: {left_after:.1f}s")

    # Diskless: the second boot is a new engine and a new node ID for the same host.
    # netboot's sweep (every 5 s here) removes the old Down entry once the new is Ready.
    guest2, second = boot_to_ready(env, manager, uuid, token)
    print(f"second boot: {second}")
    wait_until("the old Down entry swept", lambda: node_states(manager, HOST) == ["Ready"],
               60, guest2, hide=token)
    ids = [n["ID"] for n in nodes(manager) if n["Hostname"] == HOST]
    assert len(ids) == 1 and ids[0] != first_id
    log = env.lab.netboot_log()
    assert "swarm sweep removed 1 stale node(s)" in log
    for text in (log, guest.console(), guest2.console()):
        assert token not in text  # the join token reaches neither log nor console
    env.lab.monitor(guest2, "system_powerdown")
    assert guest2.proc is not None
    guest2.proc.wait(timeout=180)


PXELINUX_PROFILE = (REPO / "configs/profiles/coreos.yaml").read_text().replace(
    "loader: ipxe", "loader: pxelinux")


@pytest.mark.parametrize("firmware,profile", [("uefi", "coreos"), ("bios", "coreos-pxe")])
def test_coreos_guest_joins_under_uefi_and_through_pxelinux(
        swarm_lab: tuple[LabEnv, Engine], firmware: str, profile: str) -> None:
    """Once each: OVMF through iPXE (initrds named on the kernel line), and SeaBIOS
    through pxelinux with kernel, initrd and the OEM archive over TFTP."""
    env, manager = swarm_lab
    if profile == "coreos-pxe":
        (env.config.parent / "profiles" / "coreos-pxe.yaml").write_text(PXELINUX_PROFILE)
        env.wait_loaded({"coreos-pxe"}, 0)
    env.add_machine(HOST, mac=MAC, profile=profile, hostname=HOST)
    token = manager.docker("swarm", "join-token", "-q", "worker").stdout.strip()
    timeline = Timeline()
    guest = env.lab.boot_guest(firmware, mac=MAC, uuid=str(uuidlib.uuid4()),
                               serial="SN-COS-2", memory_mb=MEMORY_MB, monitor=True)
    wait_until("Ready on the manager", lambda: node_states(manager, HOST) == ["Ready"],
               BOOT_TIMEOUT, guest, timeline, hide=token)
    timeline.mark("Ready on the manager")
    print(f"{firmware} {profile}: {timeline}")
    assert token not in env.lab.netboot_log()
    env.lab.monitor(guest, "system_powerdown")
    wait_until("Down on the manager", lambda: node_states(manager, HOST) == ["Down"], 180,
               guest, hide=token, while_on=False)
