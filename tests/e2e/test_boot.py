"""Real firmware boots through netboot: SeaBIOS and OVMF guests in QEMU on a
lab bridge, beside the site's own address-only DHCP server (dnsmasq).

Each test passes only when the guest's own serial console shows the demo OS
running with the SMBIOS UUID QEMU gave it, with the kernel arguments of the
profile netboot chose, and netboot recorded the guest's callback.
"""

from __future__ import annotations

import uuid as uuidlib

import pytest

from tests.e2e.conftest import LabEnv
from tests.lab import Guest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def _identity(console: str) -> dict[str, str]:
    for line in console.splitlines():
        if line.startswith("NETBOOT-TESTOS identity "):
            return dict(kv.split("=", 1) for kv in line.split()[2:] if "=" in kv)
    return {}


def _cmdline(console: str) -> str:
    for line in console.splitlines():
        if line.startswith("NETBOOT-TESTOS cmdline: "):
            return line.split(": ", 1)[1]
    return ""


def _boot(env: LabEnv, firmware: str, *, profile: str, mac: str | None = None,
          nic: str = "e1000", nic_rom: bool = True, serial: str = "SN-E2E") -> tuple[str, str]:
    uuid = str(uuidlib.uuid4())
    guest = env.lab.boot_guest(firmware, uuid=uuid, mac=mac, nic=nic, nic_rom=nic_rom,
                               serial=serial, vendor="NetbootLab", product="QemuBlade")
    return uuid, _booted(env, guest, uuid, profile)


def _booted(env: LabEnv, guest: Guest, uuid: str, profile: str) -> str:
    """The guest's console once it ran the demo OS as ``uuid`` with ``profile`` and
    called back (asserted)."""
    console = env.lab.wait_guest(guest, timeout=300)
    assert "NETBOOT-TESTOS-DONE" in console, f"guest did not finish booting:\n{console[-3000:]}"
    ident = _identity(console)
    assert ident.get("uuid") == uuid, ident
    assert ident.get("mac") == guest.mac, ident
    cmdline = _cmdline(console)
    assert f"netboot.profile={profile}" in cmdline, cmdline
    assert "NETBOOT-TESTOS callback ok" in console, console[-2000:]
    return console


def _registered(env: LabEnv, uuid: str, serial: str) -> dict:
    node = env.node_in(uuid, "installed")
    assert node.get("serial") == serial
    assert node.get("vendor") == "NetbootLab"
    assert node.get("product") == "QemuBlade"
    return node


def test_bios_ipxe_http_path(lab_env: LabEnv) -> None:
    """SeaBIOS + iPXE ROM: ProxyDHCP -> boot.ipxe -> per-node script -> kernel over HTTP."""
    uuid, _ = _boot(lab_env, "bios", profile="default", serial="SN-BIOS-IPXE")
    node = _registered(lab_env, uuid, "SN-BIOS-IPXE")
    states = [e.get("state") for e in node["events"] if e.get("kind") == "state"]
    assert states[-3:] == ["booting", "deploying", "installed"], node["events"]
    assert "boot script: mac=" in lab_env.lab.netboot_log()


def test_bios_pxelinux_tftp_path(lab_env: LabEnv) -> None:
    """A machine file picks the pxelinux profile: pxelinux.0, 01-<mac>, kernel all over TFTP."""
    mac = "52:54:00:aa:01:01"
    lab_env.add_machine("rack1-node1", mac=mac, profile="demo-pxelinux", hostname="rack1-node1")
    uuid, console = _boot(lab_env, "bios", profile="demo-pxelinux", mac=mac,
                          serial="SN-BIOS-PXELINUX")
    assert "netboot.host=rack1-node1" in _cmdline(console)
    assert "BOOT_IMAGE=images/demo/vmlinuz" in _cmdline(console)  # pxelinux loaded it
    _registered(lab_env, uuid, "SN-BIOS-PXELINUX")


def test_uefi_edk2_pxe_fetches_ipxe_efi_over_tftp(lab_env: LabEnv) -> None:
    """OVMF's own PXE client (virtio-net, no iPXE ROM): ipxe.efi over TFTP with
    EDK2's tsize probe and windowsize 4, then iPXE over HTTP, with initrd= names."""
    uuid, console = _boot(lab_env, "uefi", profile="default", nic="virtio-net-pci",
                          nic_rom=False, serial="SN-UEFI")
    assert "NBP file downloaded successfully" in console
    assert "initrd=initrd.cpio.gz" in _cmdline(console)
    _registered(lab_env, uuid, "SN-UEFI")


def test_boot_once_exits_to_local_disk_after_install(lab_env: LabEnv) -> None:
    mac = "52:54:00:aa:02:02"
    lab_env.add_machine("once-node", mac=mac, profile="once", hostname="once-node")
    uuid = str(uuidlib.uuid4())
    first = lab_env.lab.boot_guest("uefi", uuid=uuid, mac=mac, serial="SN-ONCE")
    console = lab_env.lab.wait_guest(first, timeout=300)
    assert "NETBOOT-TESTOS callback ok" in console, console[-2000:]
    _registered(lab_env, uuid, "SN-ONCE")
    second = lab_env.lab.boot_guest("uefi", uuid=uuid, mac=mac, serial="SN-ONCE")
    console = lab_env.lab.wait_guest(second, marker="booting from local disk", timeout=240)
    assert "netboot: installed, booting from local disk" in console, console[-2000:]
    assert "NETBOOT-TESTOS-START" not in console
