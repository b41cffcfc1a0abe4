"""U-Boot without firmware: the script images against the real mkimage (u-boot-tools),
the node script's commands, the TFTP routes through the real router, lifecycle and
registry, and the ProxyDHCP's silence towards U-Boot's own DHCP. The boot on real
U-Boot firmware is tests/e2e/test_uboot.py."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from netboot.boot import uboot
from netboot.boot.booter import Booter
from netboot.boot.spec import BootSpec, LocalBoot, Refusal
from netboot.config import ConfigStore
from netboot.dhcp.proxy import ProxyDhcp
from netboot.identity import node_uuid
from netboot.metrics import Counters
from netboot.tftp.provider import BytesProvider, TftpError
from tests.served import Served, serving
from tests.test_dhcp_proxy import request
from tests.test_grub import _spec as grub_spec

MAC = "52:54:00:ab:00:01"
UUID = "5db34dac-6aee-4034-9d7c-0037a2950011"

needs_mkimage = pytest.mark.skipif(not shutil.which("mkimage"),
                                   reason="needs mkimage (u-boot-tools; scripts/setup.sh test)")


def _mkimage(tmp_path: Path, text: str) -> bytes:
    src, out = tmp_path / "script.txt", tmp_path / "script.img"
    src.write_text(text)
    subprocess.run(["mkimage", "-A", "invalid", "-O", "linux", "-T", "script", "-C", "none",
                    "-n", "netboot", "-d", str(src), str(out)], check=True,
                   capture_output=True, env={**os.environ, "SOURCE_DATE_EPOCH": "0"})
    return out.read_bytes()


def _spec(**kw: object) -> BootSpec:
    return grub_spec(**{"profile": "demo", "hostname": "u1", **kw})


@needs_mkimage
@pytest.mark.parametrize("text", [uboot.SCRIPT, "echo odd length!\n", "x",
                                  uboot.render(_spec()) or ""])
def test_script_image_is_what_mkimage_writes(tmp_path: Path, text: str) -> None:
    assert uboot.script_image(text) == _mkimage(tmp_path, text)


@needs_mkimage
def test_mkimage_lists_the_boot_script(tmp_path: Path) -> None:
    path = tmp_path / "boot.scr.uimg"
    path.write_bytes(uboot.SCRIPT_IMAGE)
    out = subprocess.run(["mkimage", "-l", str(path)], capture_output=True, text=True,
                         check=True).stdout
    assert "Script (uncompressed)" in out and "Image Name:   netboot" in out, out


def test_boot_script_runs_the_node_script_by_mac() -> None:
    lines = uboot.SCRIPT.splitlines()
    assert lines[1:8] == [
        "setenv nb_dir none",
        "if test x${arch} = xx86; then setenv nb_dir uboot/; fi",
        "if test x${cpu} = xarmv8; then setenv nb_dir uboot/arm64/; fi",
        "if test ${nb_dir} = none; then",
        "  echo netboot: only x86 and 64-bit ARM U-Boot are served",
        "elif tftpboot ${scriptaddr} ${nb_dir}${ethaddr}.scr.uimg; then",
        "  source ${scriptaddr}"]
    assert "'" not in uboot.SCRIPT and '"' not in uboot.SCRIPT  # see the module docstring


def test_node_script_quotes_the_arguments_and_boots_either_arch() -> None:
    text = uboot.render(_spec())
    assert text is not None
    lines = text.splitlines()
    assert "setenv bootargs 'console=ttyS0 cb=http://x/y?token=a&b=$c;d'" in lines
    assert lines.index("tftpboot ${kernel_addr_r} images/demo/vmlinuz || exit") < \
        lines.index("tftpboot ${ramdisk_addr_r} images/demo/initrd.cpio.gz || exit")
    assert "  zboot ${kernel_addr_r} 0 ${ramdisk_addr_r} ${filesize}" in lines
    assert "  booti ${kernel_addr_r} ${ramdisk_addr_r}:${filesize} ${fdtcontroladdr}" in lines
    assert "setexpr" not in text  # one initrd: nothing the x86 builds lack
    assert lines[0] == "echo netboot: booting u1, profile demo"


def test_node_script_with_several_initrds_loads_them_back_to_back() -> None:
    text = uboot.render(_spec(initrds=("a.gz", "b.gz")))
    assert text is not None
    lines = text.splitlines()
    a, b = (lines.index(f"tftpboot ${{nb_rd}} images/{n} || exit") for n in ("a.gz", "b.gz"))
    assert lines[a + 1] == lines[b + 1] == "setexpr nb_rd ${nb_rd} + ${filesize}"
    # a U-Boot without setexpr stops before fetching anything, and says why
    guard = lines.index("if setexpr nb_rd ${ramdisk_addr_r}; then")
    assert guard < lines.index("tftpboot ${kernel_addr_r} images/demo/vmlinuz || exit")
    assert lines[guard + 3].startswith("  echo netboot: this U-Boot has no setexpr")
    assert lines[guard + 4] == "  exit" and ";" not in lines[guard + 3]
    assert "setexpr nb_rdsize ${nb_rd} - ${ramdisk_addr_r}" in lines
    assert "  zboot ${kernel_addr_r} 0 ${ramdisk_addr_r} ${nb_rdsize}" in lines
    none = uboot.render(_spec(initrds=()))
    assert none is not None and "  booti ${kernel_addr_r} - ${fdtcontroladdr}" in none


def test_node_script_refusals_and_local_boot() -> None:
    assert uboot.render(Refusal(UUID, MAC, "not ours")) is None
    failed = uboot.render(Refusal(UUID, MAC, "bad 'template' \"x\" $y; reset", failed=True))
    assert failed is not None and "NOT BOOTING" in failed
    assert not any(c in failed for c in "'\"$;"), failed  # nothing U-Boot's shell runs
    assert uboot.render(LocalBoot(UUID, MAC, "demo", "u1")) is not None
    for cmdline in ("msg='hi'", "a\rb"):
        quoted = uboot.render(_spec(cmdline=cmdline))
        assert quoted is not None and "NOT BOOTING" in quoted and "setenv" not in quoted


@pytest.mark.parametrize("field", ["hostname", "profile"])
def test_names_cannot_reach_the_shell(field: str) -> None:
    hostile = "a;reset $x 'q\" b&&c|d>e#f(g)"
    text = uboot.render(_spec(**{field: hostile}))
    assert text is not None
    echo = text.splitlines()[0]
    assert echo.startswith("echo netboot: booting ") and not any(
        c in echo for c in ";$'\"&|>#()"), echo
    bad_path = uboot.render(_spec(kernel="demo/vm;reset"))
    assert bad_path is not None and "NOT BOOTING" in bad_path and "tftpboot" not in bad_path


@pytest.fixture
async def served(config_tree: Path) -> AsyncIterator[Served]:
    (config_tree.parent / "profiles" / "cb.yaml").write_text(
        'kernel: demo/vmlinuz\ninitrds: [demo/initrd.cpio.gz]\n'
        'cmdline: "console=ttyS0 host={{ hostname }} cb={{ node_urls.installed }}"\n')
    (config_tree.parent / "machines" / "u1.yaml").write_text(
        f'mac: "{MAC}"\nprofile: cb\nhostname: u1\n')
    async with serving(config_tree) as net:
        yield net


def read_all(provider: object) -> bytes:
    assert isinstance(provider, BytesProvider)
    return provider.read_at(0, provider.size())


async def test_tftp_boot_script_and_node_script_move_the_lifecycle(served: Served) -> None:
    tftp, addr = served.services.tftp, ("10.0.0.70", 1069)
    assert read_all(tftp("boot.scr.uimg", addr)) == uboot.SCRIPT_IMAGE
    image = read_all(tftp(f"uboot/{MAC}.scr.uimg", addr))
    text = image[72:].decode()  # after the header and the size table
    assert image == uboot.script_image(text)
    assert "echo netboot: booting u1, profile cb" in text  # an iPXE profile: U-Boot boots it
    # no option 97 and no ProxyDHCP offer: the node is keyed by its MAC
    keyed = node_uuid(None, MAC)
    assert keyed is not None
    node = served.registry.get(keyed)
    assert node is not None and node.state == "booting" and node.profile == "cb"
    assert f"setenv bootargs 'console=ttyS0 host=u1 cb=http://127.0.0.1:8080/api/v1/nodes/" \
        f"{keyed}/installed?token=" in text, text


async def test_tftp_node_script_names_refused(served: Served) -> None:
    def code(path: str) -> int:
        with pytest.raises(TftpError) as info:
            served.services.tftp(path, ("10.0.0.71", 1069))
        return info.value.code

    assert code("uboot/not-a-mac.scr.uimg") == 1
    assert code(f"uboot/{MAC}") == 1
    assert code("uboot/pxelinux.cfg/default") == 1
    assert code("uboot/../../etc/passwd") == 2  # escape: access violation


def test_proxy_leaves_u_boot_dhcp_to_the_site_server(store: ConfigStore) -> None:
    proxy = ProxyDhcp(Booter(store, "10.0.0.2", 8080), "10.0.0.2", Counters())
    for vendor, arch in ((b"U-Boot.armv8", 22), (b"U-Boot", None), (None, 21)):
        assert proxy.handle(request(vendor=vendor, arch=arch, uuid=None), 67,
                            ("0.0.0.0", 68)) is None
    assert proxy.counters.get("dhcp_ignored_total", reason="u-boot") == 3
    # U-Boot's EFI step says PXEClient: the UEFI path answers it
    proxy.handle(request(vendor=b"PXEClient:Arch:00007:UNDI:003000", arch=7, uuid=None),
                 67, ("0.0.0.0", 68))
    assert proxy.counters.get("dhcp_ignored_total", reason="u-boot") == 3
    assert proxy.counters.get("dhcp_offers_total", arch="uefi-x64", ipxe="no") == 1


async def test_a_known_mac_keeps_its_node_after_a_restart(served: Served) -> None:
    """No sighting this run (a restart), but the registry knows the MAC under its SMBIOS
    UUID: the U-Boot script boots that node, not a second one keyed by MAC."""
    served.registry.observe(UUID, mac=MAC, address=None, source="test")
    read_all(served.services.tftp(f"uboot/{MAC}.scr.uimg", ("10.0.0.72", 1069)))
    assert served.registry.get(UUID).state == "booting"
    assert served.registry.get(str(node_uuid(None, MAC))) is None


async def test_arguments_a_script_cannot_quote_put_the_node_in_error(served: Served,
                                                                      config_tree: Path) -> None:
    """The Booter refuses them (the node is 'error', with why), not only the renderer."""
    (config_tree.parent / "profiles" / "cb.yaml").write_text(
        "kernel: demo/vmlinuz\ncmdline: \"console=ttyS0 msg='hi'\"\n")
    served.services.booter.config.reload()
    text = read_all(served.services.tftp(f"uboot/{MAC}.scr.uimg", ("10.0.0.73", 1069)))
    assert b"NOT BOOTING" in text and b"setenv" not in text
    node = served.registry.get(str(node_uuid(None, MAC)))
    assert node is not None and node.state == "error"
    assert "cannot quote" in (node.reason or ""), node
