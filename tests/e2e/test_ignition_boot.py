"""Ignition end to end: a Flatcar-style profile boots the demo OS in QEMU, and the
guest's own console shows the config netboot rendered for it, found at Flatcar's
path inside the kernel's initramfs, byte-equal (sha256) to `netboot render ignition`.

Two guests at once: OVMF through iPXE (signed HTTP URL, ``initrd --name`` plus
``initrd=`` on the kernel line, which UEFI needs) and SeaBIOS through pxelinux
(``oem/<uuid>.cpio.gz`` over TFTP, allowed only to the address that booted as it).
"""

from __future__ import annotations

import hashlib
import uuid as uuidlib

import pytest

from tests.e2e.conftest import LAB_SWARM, LabEnv
from tests.lab import VENV_BIN

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

PROFILE = """\
description: Flatcar-style first boot with a swarm-worker Ignition config (demo OS)
loader: {loader}
os: flatcar
ignition: swarm-worker
kernel: demo/vmlinuz
initrds: [demo/initrd.cpio.gz]
ssh_keys: ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE2e lab@netboot"]
site: {{ntp: [10.77.0.1]}}
cmdline: >-
  console=ttyS0 panic=-1 quiet
  netboot.profile={{{{ profile }}}} netboot.host={{{{ hostname }}}}
  {{% if node_urls %}}netboot.callback={{{{ node_urls.installed }}}}{{% endif %}}
"""


def _ignition_lines(console: str) -> dict[str, str]:
    """path -> sha256 from the demo OS's 'NETBOOT-TESTOS ignition PATH sha256=HEX' lines."""
    out = {}
    for line in console.splitlines():
        if line.startswith("NETBOOT-TESTOS ignition "):
            _, _, path, digest = line.split()
            out[path] = digest.removeprefix("sha256=")
    return out


def _render(env: LabEnv, uuid: str) -> bytes:
    """`netboot render ignition UUID` as the admin would run it beside the server."""
    out = env.lab.ns(env.lab.ns_boot, str(VENV_BIN / "netboot"), "render", "ignition", uuid,
                     "--config", str(env.config), "--interface", "eth0")
    return out.stdout.encode()


def test_flatcar_guest_finds_its_own_config(lab_env: LabEnv) -> None:
    profiles = lab_env.config.parent / "profiles"
    machines_before = lab_env.api("/health")["machines"]
    (profiles / "ign-flatcar.yaml").write_text(PROFILE.format(loader="ipxe"))
    (profiles / "ign-flatcar-pxe.yaml").write_text(PROFILE.format(loader="pxelinux"))
    plan = {"uefi": ("52:54:00:1c:00:01", "ign-flatcar"),
            "bios": ("52:54:00:1c:00:02", "ign-flatcar-pxe")}
    for firmware, (mac, profile) in plan.items():
        lab_env.add_machine(f"ign-{firmware}", mac=mac, profile=profile,
                            hostname=f"ign-{firmware}")
    lab_env.wait_loaded({"ign-flatcar", "ign-flatcar-pxe"}, machines_before + len(plan))
    guests = {fw: lab_env.lab.boot_guest(fw, uuid=str(uuidlib.uuid4()), mac=mac,
                                         serial=f"SN-IGN-{fw.upper()}")
              for fw, (mac, _) in plan.items()}
    for firmware, guest in guests.items():
        console = lab_env.lab.wait_guest(guest, timeout=480)
        assert "NETBOOT-TESTOS-DONE" in console, f"{firmware}:\n{console[-3000:]}"
        assert f"uuid={guest.uuid}" in console
        cmdline = next(ln for ln in console.splitlines()
                       if ln.startswith("NETBOOT-TESTOS cmdline: "))
        assert "flatcar.first_boot=1" in cmdline, cmdline
        if firmware == "uefi":
            assert "initrd=initrd.cpio.gz initrd=netboot-oem.cpio.gz" in cmdline, cmdline
        found = _ignition_lines(console)
        assert "/usr/share/oem/config.ign" in found, f"{firmware}:\n{console[-3000:]}"
        config = _render(lab_env, guest.uuid)
        assert config.startswith(b'{"ignition"')
        assert LAB_SWARM["worker_token"].encode() in config
        assert f'ign-{firmware}'.encode() in config  # its own hostname
        want = hashlib.sha256(config).hexdigest()
        assert found["/usr/share/oem/config.ign"] == want, (firmware, found, want)
        assert set(found.values()) == {want}  # the other OEM paths hold the same config
        assert "NETBOOT-TESTOS callback ok" in console, console[-2000:]
    log = lab_env.lab.netboot_log()
    assert LAB_SWARM["worker_token"] not in log
    assert "refused oem for" not in log  # each guest fetched only its own archive, first time
