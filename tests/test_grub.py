"""GRUB and Secure Boot through shim, without firmware: the renderer, the TFTP routes
(stub, per-node file, unknown MAC, path confinement) through the real router, booter,
lifecycle and registry, the DHCP offer for each firmware, configuration rules, the
loader table's aliases and ``netboot check``'s warnings."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from netboot.boot import grub
from netboot.boot.spec import BootSpec, Client, LocalBoot, Offer, Refusal
from netboot.config import ConfigStore
from netboot.identity import Arch
from netboot.loaders import LoaderTable
from netboot.tftp.provider import BytesProvider, TftpError
from tests.served import Served, serving
from tests.test_artifacts import M3, U3, write_tree

MAC = "52:54:00:77:00:01"
UUID = "5db34dac-6aee-4034-9d7c-0037a2950001"
SB_MAC = "52:54:00:77:00:02"
PLAIN = """\
loader: grub
kernel: demo/vmlinuz
initrds: [demo/initrd.cpio.gz]
cmdline: "console=ttyS0 host={{ hostname }} cb={{ node_urls.installed }}"
"""


def _tree(config_tree: Path, netboot_extra: str = "") -> Path:
    profiles, machines = config_tree.parent / "profiles", config_tree.parent / "machines"
    (profiles / "grub.yaml").write_text(PLAIN)
    (profiles / "sb.yaml").write_text(PLAIN.replace("loader: grub\n", "secure_boot: true\n"))
    (machines / "g1.yaml").write_text(f'mac: "{MAC}"\nprofile: grub\nhostname: g1\n')
    (machines / "sb1.yaml").write_text(f'mac: "{SB_MAC}"\nprofile: sb\nhostname: sb1\n')
    if netboot_extra:
        with config_tree.open("a") as f:
            f.write(netboot_extra)
    return config_tree


# -- the renderer -------------------------------------------------------------------
def _spec(**kw: object) -> BootSpec:
    base: dict[str, object] = dict(uuid=UUID, mac=MAC, profile="grub", hostname="g1",
                                   kernel="demo/vmlinuz", initrds=("demo/initrd.cpio.gz",),
                                   cmdline="console=ttyS0 cb=http://x/y?token=a&b=$c;d")
    base.update(kw)
    return BootSpec(**base)  # type: ignore[arg-type]


def test_render_quotes_every_argument_literally() -> None:
    text = grub.render(_spec())
    assert text is not None
    lines = text.splitlines()
    assert lines[0] == "set timeout=0"
    assert ("linux '/images/demo/vmlinuz' 'console=ttyS0' "
            "'cb=http://x/y?token=a&b=$c;d'") in lines
    assert "initrd '/images/demo/initrd.cpio.gz'" in lines
    assert lines[-1] == "boot"
    assert grub.quote("it's") == "'it'\\''s'"


def test_render_refusals_and_local_boot() -> None:
    assert grub.render(Refusal(UUID, MAC, "not ours")) is None  # the stub tries the next name
    failed = grub.render(Refusal(UUID, MAC, "bad 'template' $x", failed=True))
    assert failed is not None and "NOT BOOTING" in failed and failed.endswith("exit\n")
    assert "'netboot: bad '\\''template'\\'' $x'" in failed
    assert grub.render(LocalBoot(UUID, MAC, "grub", "g1")) == grub.LOCAL


def test_stub_hands_over_by_mac_then_address() -> None:
    lines = grub.STUB.splitlines()
    by_mac = lines.index("  configfile ${nb}/mac/${net_default_mac}.cfg")
    by_ip = lines.index("  configfile ${nb}/ip/${net_default_ip}.cfg")
    assert by_mac < by_ip < lines.index("exit")
    # an arm64 GRUB asks under grub/arm64/ (the profile's arches.arm64)
    assert lines.index("set nb=/grub") < lines.index('if [ "$grub_cpu" = "arm64" ]; then') \
        < lines.index("  set nb=/grub/arm64") < by_mac


# -- configuration ------------------------------------------------------------------
def test_secure_boot_implies_grub_and_contradictions_are_named(config_tree: Path) -> None:
    _tree(config_tree)
    store = ConfigStore(config_tree)
    assert store.problems == []
    assert store.snapshot.profiles["sb"].loader == "grub"
    bad = config_tree.parent / "profiles" / "bad.yaml"
    bad.write_text("kernel: k\nloader: ipxe\nsecure_boot: true\n")
    store = ConfigStore(config_tree)
    [problem] = store.problems
    assert problem.startswith(f"{bad}:") and "set loader: grub" in problem, problem


# -- DHCP: which boot file --------------------------------------------------------------
@pytest.fixture
def booter_store(config_tree: Path) -> ConfigStore:
    return ConfigStore(_tree(config_tree))


def _offer(config: Path, mac: str, arch: Arch, **kw: bool) -> Offer:
    from netboot.boot.booter import Booter

    offer = Booter(ConfigStore(config), "10.0.0.2", 8080).dhcp(Client(mac, UUID, arch, **kw))
    assert isinstance(offer, Offer), offer
    return offer


def test_offer_per_firmware(config_tree: Path) -> None:
    cfg = _tree(config_tree)
    assert _offer(cfg, MAC, Arch.UEFI_X64).filename == "grubx64.efi"
    assert _offer(cfg, SB_MAC, Arch.UEFI_X64).filename == "shimx64.efi"
    # BIOS of a grub or Secure Boot profile: iPXE, as before
    assert _offer(cfg, MAC, Arch.BIOS).filename == "undionly.kpxe"
    assert _offer(cfg, SB_MAC, Arch.BIOS).filename == "undionly.kpxe"
    # iPXE itself asks: its script (never a loader again)
    assert _offer(cfg, MAC, Arch.UEFI_X64, ipxe=True).http
    # an iPXE profile is untouched
    other = "52:54:00:77:00:09"
    assert _offer(cfg, other, Arch.UEFI_X64).filename == "ipxe.efi"


def test_site_default_and_machine_file_secure_boot(config_tree: Path) -> None:
    cfg = _tree(config_tree, "secure_boot: true\n")
    other = "52:54:00:77:00:09"  # default profile (iPXE), site default on: shim
    assert _offer(cfg, other, Arch.UEFI_X64).filename == "shimx64.efi"
    assert _offer(cfg, other, Arch.BIOS).filename == "undionly.kpxe"
    (config_tree.parent / "machines" / "off.yaml").write_text(
        f'mac: "{other}"\nsecure_boot: false\n')
    assert _offer(cfg, other, Arch.UEFI_X64).filename == "ipxe.efi"  # the machine says no
    (config_tree.parent / "machines" / "g1.yaml").write_text(
        f'mac: "{MAC}"\nprofile: grub\nsecure_boot: false\n')
    assert _offer(cfg, MAC, Arch.UEFI_X64).filename == "grubx64.efi"


# -- TFTP routes, through the real router, lifecycle and registry ------------------------
@pytest.fixture
async def served(config_tree: Path) -> AsyncIterator[Served]:
    async with serving(_tree(config_tree)) as net:
        yield net


def _read(provider: object) -> str:
    assert isinstance(provider, BytesProvider)
    return provider.read_at(0, provider.size()).decode()


def _not_found(served: Served, path: str, address: str = "10.0.0.50") -> int:
    with pytest.raises(TftpError) as info:
        served.services.tftp(path, (address, 1069))
    return info.value.code


async def test_tftp_stub_and_node_config_move_the_lifecycle(served: Served) -> None:
    tftp, addr = served.services.tftp, ("10.0.0.50", 1069)
    served.lifecycle.offered(Client(MAC, UUID, Arch.UEFI_X64), Offer("grubx64.efi"))
    assert _read(tftp("/grub/grub.cfg", addr)) == grub.STUB
    assert served.registry.get(UUID) is None or served.registry.get(UUID).state == "discovered"
    text = _read(tftp(f"/grub/mac/{MAC}.cfg", addr))
    assert "host=g1" in text and f"/api/v1/nodes/{UUID}/installed?token=" in text
    assert served.registry.get(UUID).state == "booting"
    assert served.registry.get(UUID).profile == "grub"
    assert _not_found(served, "images/demo/vmlinuz", addr[0]) == 1  # not in images/: absent
    (served.services.booter.config.server.images_dir / "demo").mkdir(parents=True)
    (served.services.booter.config.server.images_dir / "demo" / "vmlinuz").write_bytes(b"k")
    tftp("images/demo/vmlinuz", addr)
    assert served.registry.get(UUID).state == "deploying"
    # by address: only the client at that address, as the node it booted as
    again = _read(tftp("grub/ip/10.0.0.50.cfg", addr))
    assert "host=g1" in again
    assert _not_found(served, "grub/ip/10.0.0.50.cfg", "10.0.0.51") == 1


async def test_tftp_grub_names_refused(served: Served) -> None:
    assert _not_found(served, "grub/mac/52:54:00:77:00:09.cfg") == 1  # iPXE profile
    assert _not_found(served, "grub/mac/not-a-mac.cfg") == 1
    assert _not_found(served, f"grub/mac/{MAC}") == 1  # no .cfg
    assert _not_found(served, "grub/ip/10.0.0.99.cfg", "10.0.0.99") == 1  # never booted
    assert _not_found(served, "grub/ip/nonsense.cfg") == 1
    assert _not_found(served, "grub/mac/../../etc/passwd") == 2  # escape: access violation
    assert _not_found(served, "grub/x86_64-efi/command.lst") == 1  # GRUB's module probes
    # the node's own file goes out under its MAC in any spelling GRUB could send
    served.lifecycle.offered(Client(MAC, UUID, Arch.UEFI_X64), Offer("grubx64.efi"))
    assert "host=g1" in _read(served.services.tftp(f"grub/mac/{MAC.upper()}.cfg",
                                                   ("10.0.0.50", 1069)))


async def test_tftp_grub_ignition_archive_over_tftp(tmp_path: Path) -> None:
    config = write_tree(tmp_path)
    fcos = (tmp_path / "profiles" / "fcos-pxe.yaml")
    fcos.write_text(fcos.read_text().replace("loader: pxelinux", "loader: grub"))
    async with serving(config, tftp=True) as net:
        tftp, addr = net.services.tftp, ("10.0.0.60", 1069)
        net.lifecycle.offered(Client(M3, U3, Arch.UEFI_X64), Offer("grubx64.efi"))
        text = _read(tftp(f"grub/mac/{M3}.cfg", addr))
        initrd = next(ln for ln in text.splitlines() if ln.startswith("initrd "))
        assert initrd.endswith(f"'/oem/{U3}.cpio.gz'"), text
        archive = tftp(f"oem/{U3}.cpio.gz", addr)
        issued = net.artifacts.issued(U3)
        assert issued is not None and archive.read_at(0, archive.size()) == issued.archive
        with pytest.raises(TftpError):
            tftp(f"oem/{U3}.cpio.gz", ("10.0.0.61", 1069))


# -- loaders: Debian's names under the served ones -------------------------------------
def test_loader_aliases_win_over_same_named_files(tmp_path: Path) -> None:
    shim, grubd = tmp_path / "shim", tmp_path / "grub"
    shim.mkdir()
    grubd.mkdir()
    (shim / "shimx64.efi").write_bytes(b"unsigned")
    (shim / "shimx64.efi.signed").write_bytes(b"signed")
    (grubd / "grubnetx64.efi.signed").write_bytes(b"grub")
    table = LoaderTable([shim, grubd], {"shimx64.efi": "shimx64.efi.signed",
                                        "grubx64.efi": "grubnetx64.efi.signed",
                                        "absent.efi": "nothing"})
    assert table.path("shimx64.efi") == shim / "shimx64.efi.signed"
    assert table.path("grubx64.efi") == grubd / "grubnetx64.efi.signed"
    assert table.path("absent.efi") is None


# -- netboot check -------------------------------------------------------------------
def _check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "netboot", "check", "--config", str(config)],
                          capture_output=True, text=True)


def test_check_warns_of_unsigned_secure_boot_kernels_and_missing_loaders(
        config_tree: Path) -> None:
    cfg = _tree(config_tree, "tftp:\n  roots: [empty]\n")
    (config_tree.parent / "empty").mkdir()
    images = config_tree.parent / "images" / "demo"
    images.mkdir(parents=True)
    (images / "initrd.cpio.gz").write_bytes(b"x")
    (config_tree.parent / "images" / "extra").mkdir()
    (config_tree.parent / "images" / "extra" / "oem.cpio.gz").write_bytes(b"x")
    shutil.copy("/usr/lib/ipxe/ipxe.efi", images / "vmlinuz")  # an unsigned PE
    out = _check(cfg)
    assert out.returncode == 0, out.stderr  # warnings, not problems
    assert "profile sb: boots under Secure Boot, but its kernel demo/vmlinuz has no PE " \
        "signature" in out.stderr, out.stderr
    assert "profile grub:" not in out.stderr  # no Secure Boot: no warning
    assert "Secure Boot (shim-signed) (shimx64.efi)" in out.stderr
    assert "GRUB (grub-efi-amd64-signed) (grubx64.efi)" in out.stderr
    signed = sorted(Path("/boot").glob("vmlinuz-*"))[-1]
    shutil.copy(signed, images / "vmlinuz")
    assert "profile sb:" not in _check(cfg).stderr


# -- over HTTP, for a GRUB built with http --------------------------------------------
async def test_http_stub_and_node_config(tmp_path: Path) -> None:
    import aiohttp

    config = write_tree(tmp_path)
    fcos = tmp_path / "profiles" / "fcos-pxe.yaml"
    fcos.write_text(fcos.read_text().replace("loader: pxelinux", "loader: grub"))
    async with serving(config) as net, aiohttp.ClientSession() as s:
        async with s.get(f"{net.url}/grub/grub.cfg") as r:
            assert r.status == 200 and await r.text() == grub.STUB
        async with s.get(f"{net.url}/grub/mac/not-a-mac.cfg") as r:
            assert r.status == 404
        async with s.get(f"{net.url}/grub/mac/52:54:00:10:00:08.cfg") as r:
            assert r.status == 404  # profile plain: iPXE, not GRUB
        net.lifecycle.offered(Client(M3, U3, Arch.UEFI_X64), Offer("grubx64.efi"))
        async with s.get(f"{net.url}/grub/mac/{M3}.cfg") as r:
            assert r.status == 200
            text = await r.text()
        assert net.registry.get(U3).state == "booting"
        initrd = next(ln for ln in text.splitlines() if ln.startswith("initrd "))
        oem = initrd.split()[-1].strip("'")
        assert oem.startswith(f"/oem/{U3}.cpio.gz?"), initrd  # the signed URL, on this host
        async with s.get(f"{net.url}{oem}") as r:  # GRUB's root is (http,<netboot>)
            assert r.status == 200
            assert await r.read() == net.artifacts.issued(U3).archive
        async with s.get(f"{net.url}/oem/{U3}.cpio.gz") as r:
            assert r.status != 200  # unsigned: refused
