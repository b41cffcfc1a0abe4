"""arm64 machines on QEMU's virt board (TCG), end to end, from Debian's arm64 packages
(scripts/arm64_os.py): AAVMF through GRUB, AAVMF under Secure Boot through shim and
GRUB, and U-Boot's qemu_arm64 build through netboot's U-Boot scripts. Each boots the
bundled default profile's ``arches.arm64`` (Debian's arm64 kernel and the demo OS
built for arm64) and calls back; the registry records the node's UUID and ``arm64``.
A profile without an arm64 kernel refuses an arm64 machine, and says why.
"""

from __future__ import annotations

import hashlib
import time
import uuid as uuidlib
from collections.abc import Iterator
from typing import Any

import pytest

from netboot.identity import node_uuid
from tests.e2e.conftest import LabEnv, lab_config, running_lab
from tests.e2e.test_ignition_boot import PROFILE, _ignition_lines, _render

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def lab_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabEnv]:
    """GRUB and U-Boot take their TFTP server from the site DHCP's next-server."""
    root = tmp_path_factory.mktemp("arm64lab")
    with running_lab(root, lab_config(root), next_server=True) as env:
        yield env


def _boot(env: LabEnv, firmware: str, mac: str, name: str, **machine: Any) -> tuple[str, str]:
    """(the guest's SMBIOS UUID, its console) once its demo OS called back."""
    env.add_machine(name, mac=mac, hostname=name, **machine)
    started = time.monotonic()
    guest = env.lab.boot_guest(firmware, uuid=str(uuidlib.uuid4()), mac=mac)
    console = env.lab.wait_guest(guest, timeout=300)
    print(f"{firmware} guest: {time.monotonic() - started:.1f} s")
    assert "NETBOOT-TESTOS-DONE" in console, console[-4000:]
    assert "NETBOOT-TESTOS callback ok" in console, console[-3000:]
    assert "console=ttyAMA0" in console and f"netboot.host={name}" in console  # arm64's args
    return guest.uuid, console


def _installed(env: LabEnv, uuid: str) -> dict[str, Any]:
    node = env.node_in(uuid, "installed", 15)
    assert node["arch"] == "arm64", node
    return node


def test_aavmf_boots_grub_and_the_arm64_kernel(lab_env: LabEnv) -> None:
    mac = "52:54:00:a6:00:01"
    uuid, console = _boot(lab_env, "aavmf", mac, "arm-uefi", profile="default")
    assert "NBP filename is grubaa64.efi" in console
    assert "BOOT_IMAGE=/images/arm64/demo/vmlinuz" in console  # GRUB loaded arm64's kernel
    assert f"identity uuid={uuid} " in console
    node = _installed(lab_env, uuid)  # keyed by its SMBIOS UUID (option 97)
    assert mac in node["macs"] and node["secure_boot"] is False, node


def test_aavmf_secure_boot_goes_through_shim(lab_env: LabEnv) -> None:
    mac = "52:54:00:a6:00:02"
    uuid, console = _boot(lab_env, "aavmf-sb", mac, "arm-sb", profile="default",
                          secure_boot=True)
    assert "NBP filename is shimaa64.efi" in console
    assert "NETBOOT-TESTOS secureboot=1" in console  # the firmware enforced signatures
    assert _installed(lab_env, uuid)["secure_boot"] is True


def test_uboot_arm64_boots_through_its_node_script(lab_env: LabEnv) -> None:
    mac = "52:54:00:a6:00:03"
    _, console = _boot(lab_env, "uboot-arm64", mac, "arm-uboot", profile="default")
    assert f"Filename 'uboot/arm64/{mac}.scr.uimg'" in console
    assert "Filename 'images/arm64/demo/vmlinuz'" in console
    _installed(lab_env, str(node_uuid(None, mac)))  # no option 97: keyed by MAC


def test_a_profile_without_an_arm64_kernel_refuses_the_machine(lab_env: LabEnv) -> None:
    mac = "52:54:00:a6:00:04"
    lab_env.add_machine("arm-nokernel", mac=mac, hostname="arm-nokernel",
                        profile="demo-pxelinux")
    guest = lab_env.lab.boot_guest("aavmf", uuid=str(uuidlib.uuid4()), mac=mac)
    console = lab_env.lab.wait_guest(guest, "has no arm64 kernel", timeout=240)
    assert "NOT BOOTING this machine" in console, console[-3000:]
    node = lab_env.node_in(guest.uuid, "error", 15)
    assert "profile demo-pxelinux has no arm64 kernel" in node["reason"], node


def test_uboot_arm64_loads_the_oem_archive_after_the_initrd(lab_env: LabEnv) -> None:
    """An Ignition profile: two initrds (the demo OS's and the OEM archive), loaded back
    to back with setexpr; the OS finds the config netboot rendered for it."""
    profiles = lab_env.config.parent / "profiles"
    arm = ("arches:\n  arm64:\n    kernel: arm64/demo/vmlinuz\n"
           "    initrds: [arm64/demo/initrd.cpio.gz]\n"
           "    cmdline: console=ttyAMA0 panic=-1 quiet netboot.host={{ hostname }}"
           " netboot.callback={{ node_urls.installed }}\n")
    (profiles / "ign-arm.yaml").write_text(PROFILE.format(loader="ipxe") + arm)
    lab_env.wait_loaded({"ign-arm"}, 0)
    mac = "52:54:00:a6:00:05"
    _, console = _boot(lab_env, "uboot-arm64", mac, "arm-ign", profile="ign-arm")
    assert "netboot: 2 initrds, one after the other" in console, console[-3000:]
    keyed = str(node_uuid(None, mac))
    config = _render(lab_env, keyed)
    assert b"arm-ign" in config
    assert _ignition_lines(console).get("/usr/share/oem/config.ign") == \
        hashlib.sha256(config).hexdigest(), console[-3000:]
    _installed(lab_env, keyed)
