"""GRUB and Secure Boot through shim, end to end, with Debian's signed binaries.

- Plain OVMF (its own PXE client over virtio-net) offered ``grubx64.efi`` (Debian's
  grubnetx64.efi.signed): GRUB reads the stub ``/grub/grub.cfg``, then its own
  ``grub/mac/<mac>.cfg``, then kernel, initrd and the OEM archive (Ignition) over
  TFTP; the guest's console shows the config's sha256, equal to `netboot render`.
- OVMF with Secure Boot on (Microsoft's keys) offered ``shimx64.efi``: shim loads
  ``grubx64.efi`` beside it, GRUB the signed demo kernel; the OS reads the SecureBoot
  EFI variable (on) and reports it, and the registry records it. A SeaBIOS guest
  boots through iPXE at the same time, into its own path.
"""

from __future__ import annotations

import hashlib
import time
import uuid as uuidlib
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.conftest import LAB_SWARM, LabEnv, lab_config, running_lab
from tests.e2e.test_ignition_boot import PROFILE, _ignition_lines, _render

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

UEFI_NIC: dict[str, Any] = {"nic": "virtio-net-pci", "nic_rom": False}


@pytest.fixture(scope="module")
def lab_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabEnv]:
    """A lab whose site DHCP names netboot as next-server: Debian 12's GRUB asks the
    ACK's siaddr for its files and ignores the ProxyDHCP offer (seen here: with
    dnsmasq's default, its own address, GRUB sent every RRQ to the site DHCP server)."""
    root = tmp_path_factory.mktemp("grublab")
    with running_lab(root, lab_config(root), next_server=True) as env:
        yield env


def _states(node: dict[str, Any]) -> list[str]:
    return [e["state"] for e in node["events"] if e.get("kind") == "state"]


def test_uefi_grub_with_ignition(lab_env: LabEnv) -> None:
    profiles = lab_env.config.parent / "profiles"
    (profiles / "ign-grub.yaml").write_text(PROFILE.format(loader="grub"))
    mac = "52:54:00:6b:00:01"
    lab_env.add_machine("grub-uefi", mac=mac, profile="ign-grub", hostname="grub-uefi")
    lab_env.wait_loaded({"ign-grub"}, 1)
    started = time.monotonic()
    guest = lab_env.lab.boot_guest("uefi", uuid=str(uuidlib.uuid4()), mac=mac,
                                   serial="SN-GRUB", **UEFI_NIC)
    console = lab_env.lab.wait_guest(guest, timeout=480)
    print(f"grub uefi guest: {time.monotonic() - started:.1f} s")
    assert "NETBOOT-TESTOS-DONE" in console, console[-3000:]
    assert f"uuid={guest.uuid}" in console
    cmdline = next(ln for ln in console.splitlines()
                   if ln.startswith("NETBOOT-TESTOS cmdline: "))
    assert "BOOT_IMAGE=/images/demo/vmlinuz" in cmdline, cmdline  # GRUB loaded it
    assert "flatcar.first_boot=1" in cmdline, cmdline
    found = _ignition_lines(console)
    config = _render(lab_env, guest.uuid)
    assert b"grub-uefi" in config and LAB_SWARM["worker_token"].encode() in config
    assert found.get("/usr/share/oem/config.ign") == hashlib.sha256(config).hexdigest(), found
    assert "NETBOOT-TESTOS callback ok" in console, console[-2000:]
    node = lab_env.node_in(guest.uuid, "installed", 15)
    assert _states(node)[-3:] == ["booting", "deploying", "installed"], node["events"]
    assert node["secure_boot"] is not True  # plain OVMF
    assert "NETBOOT-TESTOS secureboot=1" not in console


def test_secure_boot_and_bios_at_once(lab_env: LabEnv) -> None:
    sb_mac, bios_mac = "52:54:00:5b:00:01", "52:54:00:5b:00:02"
    lab_env.add_machine("sb-node", mac=sb_mac, profile="demo-secureboot", hostname="sb-node")
    lab_env.add_machine("sb-bios", mac=bios_mac, profile="demo-secureboot",
                        hostname="sb-bios")
    started = time.monotonic()
    sb = lab_env.lab.boot_guest("uefi-sb", uuid=str(uuidlib.uuid4()), mac=sb_mac,
                                serial="SN-SB", **UEFI_NIC)
    bios = lab_env.lab.boot_guest("bios", uuid=str(uuidlib.uuid4()), mac=bios_mac,
                                  serial="SN-SB-BIOS")
    consoles = {}
    for name, guest in (("uefi-sb", sb), ("bios", bios)):
        consoles[name] = lab_env.lab.wait_guest(guest, timeout=480)
        print(f"{name} guest: {time.monotonic() - started:.1f} s")
        assert "NETBOOT-TESTOS-DONE" in consoles[name], f"{name}:\n{consoles[name][-3000:]}"
        assert f"uuid={guest.uuid}" in consoles[name]
        assert "NETBOOT-TESTOS callback ok" in consoles[name], consoles[name][-2000:]
    # the Secure Boot guest: shim -> GRUB -> the signed kernel, with Secure Boot on
    assert "Secure boot enabled" in consoles["uefi-sb"], consoles["uefi-sb"][-3000:]
    assert "NETBOOT-TESTOS secureboot=1" in consoles["uefi-sb"]
    assert "BOOT_IMAGE=/images/demo/vmlinuz" in consoles["uefi-sb"]
    node = lab_env.node_in(sb.uuid, "installed", 15)
    assert node["secure_boot"] is True, node
    assert _states(node)[-3:] == ["booting", "deploying", "installed"], node["events"]
    # the BIOS guest of the same profile: through iPXE (GRUB is UEFI x64 only)
    log = lab_env.lab.netboot_log()
    assert f"boot script: mac={bios_mac}" in log  # iPXE asked for its script
    assert "NETBOOT-TESTOS cmdline: initrd=initrd.cpio.gz " in consoles["bios"]  # iPXE's
    assert "BOOT_IMAGE=" not in consoles["bios"]  # not GRUB's
    assert f"mac={sb_mac} " in log and "offered shimx64.efi (profile demo-secureboot)" in log
    assert "NETBOOT-TESTOS secureboot=unknown" in consoles["bios"]
    bios_node = lab_env.node_in(bios.uuid, "installed", 15)
    assert bios_node["secure_boot"] is None, bios_node
