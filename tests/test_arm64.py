"""arm64 without firmware: which loader an arm64 UEFI client is offered, a profile's
``arches.arm64`` in the decision, the refusal without one, and the GRUB and U-Boot
routes for arm64 through the real router, lifecycle and registry. The boots on AAVMF
and U-Boot are tests/e2e/test_arm64.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from netboot.boot.booter import Booter
from netboot.boot.spec import BootSpec, Client, Offer, Refusal
from netboot.config import ConfigStore
from netboot.identity import Arch, node_uuid
from tests.served import Served, serving
from tests.test_grub import _read
from tests.test_uboot import read_all

MAC, SB_MAC, OLD_MAC = "52:54:00:a7:00:01", "52:54:00:a7:00:02", "52:54:00:a7:00:03"
UUID = "5db34dac-6aee-4034-9d7c-0037a2950021"
MULTI = """\
kernel: demo/vmlinuz
initrds: [demo/initrd.cpio.gz]
cmdline: "console=ttyS0 host={{ hostname }}"
arches:
  arm64:
    kernel: arm64/demo/vmlinuz
    initrds: [arm64/demo/initrd.cpio.gz]
    cmdline: "console=ttyAMA0 host={{ hostname }}"
"""


def _tree(config_tree: Path) -> Path:
    profiles, machines = config_tree.parent / "profiles", config_tree.parent / "machines"
    (profiles / "multi.yaml").write_text(MULTI)
    (machines / "a1.yaml").write_text(f'mac: "{MAC}"\nprofile: multi\nhostname: a1\n')
    (machines / "a2.yaml").write_text(
        f'mac: "{SB_MAC}"\nprofile: multi\nhostname: a2\nsecure_boot: true\n')
    (machines / "a3.yaml").write_text(f'mac: "{OLD_MAC}"\nprofile: classic\nhostname: a3\n')
    return config_tree


def _booter(config: Path) -> Booter:
    return Booter(ConfigStore(config), "10.0.0.2", 8080)


def test_arm64_uefi_is_offered_grub_or_shim_unless_a_loader_is_named(
        config_tree: Path) -> None:
    booter = _booter(_tree(config_tree))
    grub = booter.dhcp(Client(MAC, UUID, Arch.UEFI_ARM64))
    shim = booter.dhcp(Client(SB_MAC, UUID, Arch.UEFI_ARM64))
    assert isinstance(grub, Offer) and grub.filename == "grubaa64.efi"
    assert isinstance(shim, Offer) and shim.filename == "shimaa64.efi"
    (config_tree.parent / "profiles" / "multi.yaml").write_text(
        MULTI + "loaders: {uefi-arm64: ipxe-arm64.efi}\n")
    own = _booter(config_tree).dhcp(Client(MAC, UUID, Arch.UEFI_ARM64))
    assert isinstance(own, Offer) and own.filename == "ipxe-arm64.efi"  # a site's own iPXE
    sb = _booter(config_tree).dhcp(Client(SB_MAC, UUID, Arch.UEFI_ARM64))
    assert isinstance(sb, Offer) and sb.filename == "shimaa64.efi"  # Secure Boot: shim


def test_decision_takes_the_arm64_kernel_and_cmdline(config_tree: Path) -> None:
    booter = _booter(_tree(config_tree))
    amd = booter.decide(MAC, UUID, "ipxe")
    arm = booter.decide(MAC, UUID, "grub", "arm64")
    assert isinstance(amd, BootSpec) and amd.kernel == "demo/vmlinuz" and amd.cpu == "amd64"
    assert isinstance(arm, BootSpec) and arm.cpu == "arm64"
    assert (arm.kernel, arm.initrds) == ("arm64/demo/vmlinuz", ("arm64/demo/initrd.cpio.gz",))
    assert arm.cmdline == "console=ttyAMA0 host=a1"
    # an ipxe profile (no loader: grub) boots GRUB on arm64, its only path; not on x86
    assert isinstance(booter.decide(MAC, UUID, "grub"), Refusal)


def test_a_profile_without_an_arm64_kernel_is_a_failed_refusal(config_tree: Path) -> None:
    r = _booter(_tree(config_tree)).decide(OLD_MAC, UUID, "uboot", "arm64")
    assert isinstance(r, Refusal) and r.failed
    assert "profile classic has no arm64 kernel" in r.reason and "arches:" in r.reason


@pytest.fixture
async def served(config_tree: Path) -> AsyncIterator[Served]:
    async with serving(_tree(config_tree)) as net:
        yield net


async def test_arm64_grub_and_uboot_routes_record_the_arch(served: Served) -> None:
    tftp, addr = served.services.tftp, ("10.0.0.80", 1069)
    served.lifecycle.offered(Client(MAC, UUID, Arch.UEFI_ARM64), Offer("grubaa64.efi"))
    text = _read(tftp(f"grub/arm64/mac/{MAC}.cfg", addr))
    assert "'/images/arm64/demo/vmlinuz' 'console=ttyAMA0' 'host=a1'" in text, text
    node = served.registry.get(UUID)
    assert node is not None and node.arch == "arm64" and node.state == "booting"
    assert b"images/demo/vmlinuz" in read_all(tftp(f"uboot/{MAC}.scr.uimg", addr))
    assert served.registry.get(UUID).arch == "amd64"  # the same machine, an x86 U-Boot
    script = read_all(tftp(f"uboot/arm64/{OLD_MAC}.scr.uimg", ("10.0.0.81", 1069)))
    assert b"has no arm64 kernel" in script and b"tftpboot" not in script
    refused = served.registry.get(str(node_uuid(None, OLD_MAC)))
    assert refused is not None and refused.state == "error"


async def test_an_arm64_ipxe_gets_the_arm64_kernel(served: Served) -> None:
    """A site's own arm64 iPXE says ${buildarch} = arm64 in its script request."""
    import aiohttp

    async with aiohttp.ClientSession() as s:
        async with s.get(f"{served.url}/ipxe/node", params={
                "uuid": UUID, "mac": MAC, "buildarch": "arm64"}) as r:
            text = await r.text()
        async with s.get(f"{served.url}/ipxe/node", params={
                "uuid": UUID, "mac": MAC, "buildarch": "x86_64"}) as r:
            x86 = await r.text()
    assert "/images/arm64/demo/vmlinuz" in text and "console=ttyAMA0" in text, text
    assert "/images/demo/vmlinuz" in x86 and "arm64" not in x86, x86
    assert served.registry.get(UUID).arch == "amd64"  # the last boot


def test_check_warns_of_an_unsigned_arm64_kernel_under_secure_boot(config_tree: Path) -> None:
    import subprocess
    import sys

    _tree(config_tree)
    images = config_tree.parent / "images"
    for f in ("demo/vmlinuz", "demo/initrd.cpio.gz", "arm64/demo/initrd.cpio.gz",
              "extra/oem.cpio.gz"):
        (images / f).parent.mkdir(parents=True, exist_ok=True)
        (images / f).write_bytes(b"x")
    (images / "arm64/demo/vmlinuz").write_bytes(b"MZ not really a PE")
    (config_tree.parent / "profiles" / "multi.yaml").write_text(MULTI + "secure_boot: true\n")
    out = subprocess.run([sys.executable, "-m", "netboot", "check", "--config",
                          str(config_tree)], capture_output=True, text=True)
    assert "profile multi: boots under Secure Boot, but its kernel arm64/demo/vmlinuz is " \
        "not a PE image" in out.stderr, out.stderr
