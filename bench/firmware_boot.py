"""Boot time of each firmware path under TCG: real QEMU guests booted by netboot
and, in the same run, by a peer stack serving the same files (dnsmasq ProxyDHCP +
TFTP, nginx for scripts and images), alternating guest by guest.

    .venv/bin/python bench/firmware_boot.py                      # every path, 2 rounds
    .venv/bin/python bench/firmware_boot.py --path uefi-pxe --rounds 3
    .venv/bin/python bench/firmware_boot.py --list

Each row is one guest: QEMU started, then the demo OS's first console line
(``os``: the firmware and loader part, which the server decides) and QEMU's exit
after the OS powered off (``done``). The lab is tests/lab.py's (the site's own
DHCP in one namespace, the server under test in another, guests on a bridge);
the peer runs with its default settings in the server's namespace, where netboot
ran. Needs root, qemu-system-x86, ovmf, dnsmasq and nginx-light (make bench); the
arm64 and U-Boot paths also qemu-system-arm, qemu-efi-aarch64, u-boot-qemu and
u-boot-tools (make test installs them) and images/arm64 (make images).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.storm import BOOT_IPXE, NGINX_CONF  # noqa: E402
from tests.e2e.conftest import build_demo_os, write_lab_config  # noqa: E402
from tests.lab import Lab, can_run_lab  # noqa: E402

KERNEL, INITRD = "demo/vmlinuz", "demo/initrd.cpio.gz"
ARGS = "console=ttyS0 panic=-1 quiet netboot.profile=bench netboot.host=node"
# arm64 paths boot the arm64 demo OS (scripts/arm64_os.py) on QEMU's virt board
ARM_KERNEL, ARM_INITRD = "arm64/demo/vmlinuz", "arm64/demo/initrd.cpio.gz"
ARM_ARGS = ARGS.replace("console=ttyS0", "console=ttyAMA0")
REPO = Path(__file__).resolve().parents[1]
ARM_LOADERS = REPO / "images/arm64/loaders"  # make images fetches them
# the peer's per-node iPXE script (nginx's return string: nginx turns \\n into a newline)
PEER_NODE_SCRIPT = ("#!ipxe\\nkernel http://{addr}:8080/images/" + KERNEL + " initrd=initrd "
                    + ARGS + "\\ninitrd --name initrd http://{addr}:8080/images/" + INITRD
                    + "\\nboot\\n")
PXELINUX_CFG = ("DEFAULT netboot\nPROMPT 0\nTIMEOUT 0\nLABEL netboot\n  KERNEL images/" + KERNEL
                + "\n  INITRD images/" + INITRD + "\n  APPEND " + ARGS + "\n")
# the peer's GRUB config: what netboot's grub/mac/<mac>.cfg says, as one static file
GRUB_CFG = ("set timeout=0\nlinux /images/" + KERNEL + " " + ARGS + "\ninitrd /images/" + INITRD
            + "\nboot\n")
ARM_GRUB_CFG = ("set timeout=0\nlinux /images/" + ARM_KERNEL + " " + ARM_ARGS
                + "\ninitrd /images/" + ARM_INITRD + "\nboot\n")


def uboot_script(kernel: str, initrd: str, args: str, *, arm64: bool) -> str:
    """The peer's U-Boot script: what a site writes for dnsmasq's TFTP (no per-node
    file), the same commands netboot's node script runs."""
    boot = ("booti ${kernel_addr_r} ${ramdisk_addr_r}:${filesize} ${fdtcontroladdr}" if arm64
            else "zboot ${kernel_addr_r} 0 ${ramdisk_addr_r} ${filesize}")
    return (f"setenv bootargs '{args}'\ntftpboot ${{kernel_addr_r}} images/{kernel}\n"
            f"tftpboot ${{ramdisk_addr_r}} images/{initrd}\n{boot}\n")
SHIM = "/usr/lib/shim/shimx64.efi.signed"
NO_PEER = "; netboot only (no peer row)"
GRUB = "/usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed"
LOADERS = {"undionly.kpxe": "/usr/lib/ipxe/undionly.kpxe", "ipxe.efi": "/usr/lib/ipxe/ipxe.efi",
           "pxelinux.0": "/usr/lib/PXELINUX/pxelinux.0",
           "ldlinux.c32": "/usr/lib/syslinux/modules/bios/ldlinux.c32"}


@dataclass(frozen=True)
class BootPath:
    """One way a machine boots: the guest's firmware and NIC, what netboot's profile
    says, and the peer's dnsmasq options for the same boot."""

    firmware: str
    nic: str
    nic_rom: bool
    loader: str  # the netboot profile's loader
    #: the peer's pxe-service lines and tags, beside the common options; None: no
    #: peer row for this path
    dnsmasq: tuple[str, ...] | None
    files: dict[str, str] = field(default_factory=dict)  # extra TFTP files for the peer
    secure_boot: bool = False  # the netboot profile's secure_boot
    #: GRUB takes its TFTP server from the site DHCP's next-server, not from the
    #: ProxyDHCP offer (docs/firmware.md): the site must name the boot server
    next_server: bool = False
    arm64: bool = False  # an arm64 guest: the arm64 kernel, initrd and console
    #: the peer's U-Boot script (boot.scr.uimg, made with mkimage), for U-Boot paths
    uboot: str | None = None


def _script_url(addr: str) -> str:
    return f"http://{addr}:8080/boot.ipxe"


# Under QEMU a "BIOS PXE" client is iPXE in the NIC's option ROM, so the BIOS paths
# are iPXE straight to the script, and iPXE handed pxelinux.0.
PATHS: dict[str, Callable[[str], BootPath]] = {
    "bios-ipxe": lambda a: BootPath("bios", "e1000", True, "ipxe", (
        f"--pxe-service=x86PC,netboot,{_script_url(a)}",)),
    "bios-pxelinux": lambda a: BootPath("bios", "e1000", True, "pxelinux", (
        "--pxe-service=x86PC,netboot,pxelinux",)),
    "uefi-pxe": lambda a: BootPath("uefi", "virtio-net-pci", False, "ipxe", (
        "--pxe-service=tag:!ipxe,X86-64_EFI,netboot,ipxe.efi",
        f"--pxe-service=tag:ipxe,X86-64_EFI,netboot,{_script_url(a)}")),
    "uefi-ipxe": lambda a: BootPath("uefi", "e1000", True, "ipxe", (
        f"--pxe-service=X86-64_EFI,netboot,{_script_url(a)}",)),
    "uefi-grub": lambda a: BootPath("uefi", "virtio-net-pci", False, "grub", (
        "--pxe-service=X86-64_EFI,netboot,grubx64.efi",), {"grubx64.efi": GRUB},
        next_server=True),
    "secure-boot": lambda a: BootPath("uefi-sb", "virtio-net-pci", False, "grub", (
        "--pxe-service=X86-64_EFI,netboot,shimx64.efi",),
        {"shimx64.efi": SHIM, "grubx64.efi": GRUB}, secure_boot=True, next_server=True),
    # dnsmasq has no HTTP Boot service: the closest a site can write is a vendor-class
    # tag, option 60 forced, and the URL as the boot file
    "uefi-http": lambda a: BootPath("uefi-http", "virtio-net-pci", False, "ipxe", (
        "--dhcp-vendorclass=set:http,HTTPClient", "--dhcp-option-force=tag:http,60,HTTPClient",
        f"--dhcp-boot=tag:http,http://{a}:8080/loader/ipxe.efi",
        f"--pxe-service=tag:ipxe,X86-64_EFI,netboot,{_script_url(a)}",),
        {"loader/ipxe.efi": "/usr/lib/ipxe/ipxe.efi"}),
    # U-Boot binds the site DHCP's offer and asks its next-server for boot.scr.uimg:
    # the peer is dnsmasq's TFTP serving one static script
    "uboot-x86": lambda a: BootPath("uboot", "e1000", False, "ipxe", (), next_server=True,
                                    uboot=uboot_script(KERNEL, INITRD, ARGS, arm64=False)),
    "arm64-grub": lambda a: BootPath("aavmf", "virtio-net-pci", False, "ipxe", (
        "--pxe-service=ARM64_EFI,netboot,grubaa64.efi",),
        {"grubaa64.efi": f"{ARM_LOADERS}/grubnetaa64.efi.signed"}, next_server=True,
        arm64=True),
    "arm64-secure-boot": lambda a: BootPath("aavmf-sb", "virtio-net-pci", False, "grub", (
        "--pxe-service=ARM64_EFI,netboot,shimaa64.efi",),
        {"shimaa64.efi": f"{ARM_LOADERS}/shimaa64.efi.signed",
         "grubaa64.efi": f"{ARM_LOADERS}/grubnetaa64.efi.signed"}, secure_boot=True,
        next_server=True, arm64=True),
    "uboot-arm64": lambda a: BootPath("uboot-arm64", "virtio-net-pci", False, "ipxe", (),
                                      next_server=True, arm64=True,
                                      uboot=uboot_script(ARM_KERNEL, ARM_INITRD, ARM_ARGS,
                                                         arm64=True)),
}


@dataclass
class Row:
    path: str
    stack: str
    os_s: float | None  # QEMU start to the OS's first console line
    done_s: float | None  # QEMU start to QEMU's exit after poweroff


class Peer:
    """dnsmasq (ProxyDHCP + TFTP) and nginx in the lab's boot namespace."""

    def __init__(self, lab: Lab, root: Path, images: Path, path: BootPath):
        self.lab, self.root = lab, root
        addr = lab.boot_addr
        tftp, www = root / "tftp", root / "www"
        for d in (tftp / "pxelinux.cfg", www, *(root / d for d in (
                "body", "proxy", "fastcgi", "uwsgi", "scgi"))):
            d.mkdir(parents=True, exist_ok=True)
        for name, src in {**LOADERS, **path.files}.items():
            (tftp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tftp / name)
        (tftp / "images").symlink_to(images)
        (www / "images").symlink_to(images)
        (tftp / "pxelinux.cfg" / "default").write_text(PXELINUX_CFG)
        (tftp / "grub").mkdir()
        (tftp / "grub" / "grub.cfg").write_text(ARM_GRUB_CFG if path.arm64 else GRUB_CFG)
        if path.uboot is not None:
            (root / "boot.txt").write_text(path.uboot)
            subprocess.run(["mkimage", "-A", "invalid", "-O", "linux", "-T", "script", "-C",
                            "none", "-d", str(root / "boot.txt"), str(tftp / "boot.scr.uimg")],
                           check=True, capture_output=True)
        (www / "boot.ipxe").write_text(BOOT_IPXE.replace("{addr}", addr))
        conf = root / "nginx.conf"
        conf.write_text(NGINX_CONF.format(work=root, addr=addr, root=www, tftp=tftp,
                                          node_script=PEER_NODE_SCRIPT.format(addr=addr),
                                          connections=1024))
        self.procs = [
            lab.spawn(lab.ns_boot, "dnsmasq", "--no-daemon", "--conf-file=/dev/null",
                      "--port=0", "--interface=eth0", "--bind-interfaces",
                      f"--dhcp-range={lab.net}.0,proxy", "--dhcp-userclass=set:ipxe,iPXE",
                      *(path.dnsmasq or ()), "--enable-tftp", f"--tftp-root={tftp}",
                      f"--dhcp-leasefile={root / 'leases'}",
                      f"--pid-file={root / 'dnsmasq.pid'}", log=root / "dnsmasq.log"),
            lab.spawn(lab.ns_boot, "nginx", "-c", str(conf), "-p", str(root),
                      log=root / "nginx.log")]
        _wait_listening(lab, f"{addr}:8080")

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
            p.wait(10)


def _wait_listening(lab: Lab, where: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if where in lab.ns(lab.ns_boot, "ss", "-lnt", check=False).stdout:
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {where}")


def netboot(lab: Lab, root: Path, images: Path, path: BootPath) -> subprocess.Popen:
    """netboot serve with one profile, ``bench``, booting the same kernel and initrd."""
    config = write_lab_config(root, images, extra="default_profile: bench\n")
    (config.parent / "profiles" / "bench.yaml").write_text(
        f"loader: {path.loader}\nboot: always\nkernel: {KERNEL}\ninitrds: [{INITRD}]\n"
        f"cmdline: {ARGS}\n" + ("secure_boot: true\n" if path.secure_boot else "")
        + f"arches:\n  arm64:\n    kernel: {ARM_KERNEL}\n    initrds: [{ARM_INITRD}]\n"
        f"    cmdline: {ARM_ARGS}\n")
    text = config.read_text().replace("default_profile: default\n", "")
    config.write_text(text)
    return lab.start_netboot(config)


def boot_one(lab: Lab, path: BootPath, timeout: float) -> tuple[float | None, float | None]:
    t0 = time.monotonic()
    g = lab.boot_guest(path.firmware, uuid=str(uuidlib.uuid4()), nic=path.nic,
                       nic_rom=path.nic_rom)
    os_s = done_s = None
    while time.monotonic() - t0 < timeout:
        if os_s is None and "NETBOOT-TESTOS-START" in g.console():
            os_s = time.monotonic() - t0
        if g.proc is not None and g.proc.poll() is not None:
            done_s = time.monotonic() - t0 if "NETBOOT-TESTOS-DONE" in g.console() else None
            break
        time.sleep(0.05)
    else:
        if g.proc is not None:
            g.proc.kill()
    if g.proc is not None:
        g.proc.wait(10)
    return os_s, done_s


def run(names: list[str], rounds: int, timeout: float, keep: Path | None) -> list[Row]:
    images = build_demo_os()
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    for name in names:
        for r in range(rounds):
            # alternate which stack goes first, so neither always boots a warm lab
            stacks = ("netboot", "peer") if r % 2 == 0 else ("peer", "netboot")
            if PATHS[name]("").dnsmasq is None and PATHS[name]("").uboot is None:
                stacks = ("netboot",)
            for stack in stacks:
                root = Path(tempfile.mkdtemp(prefix=f"fwboot-{name}-{stack}-", dir=keep))
                lab = Lab(root / "lab")
                (root / "lab").mkdir()
                try:
                    lab.up()
                    path = PATHS[name](lab.boot_addr)
                    lab.start_site_dhcp(next_server=lab.boot_addr if path.next_server else None)
                    if stack == "netboot":
                        netboot(lab, root / "netboot", images, path)
                    else:
                        Peer(lab, root / "peer", images.resolve(), path)
                    os_s, done_s = boot_one(lab, path, timeout)
                finally:
                    lab.down()
                rows.append(Row(name, stack, os_s, done_s))
                print(f"{name:14} {stack:8} os {_s(os_s) if os_s else 'FAILED':>7}  "
                      f"done {_s(done_s) if done_s else 'FAILED':>7}", flush=True)
                if keep is None:
                    shutil.rmtree(root, ignore_errors=True)
    return rows


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} s"


def summary(rows: list[Row]) -> str:
    out = ["| path | netboot: to OS | peer: to OS | ratio | netboot: to power-off | "
           "peer: to power-off |", "|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r.path for r in rows):
        med = {}
        for stack in ("netboot", "peer"):
            got = [r for r in rows if r.path == name and r.stack == stack]
            oss = [r.os_s for r in got if r.os_s is not None]
            dones = [r.done_s for r in got if r.done_s is not None]
            med[stack] = (statistics.median(oss) if got and len(oss) == len(got) else None,
                          statistics.median(dones) if got and len(dones) == len(got) else None)
        nb, peer = med["netboot"], med["peer"]  # (None, None): failed, or no peer row
        ratio = f"{nb[0] / peer[0]:.2f}x" if nb[0] and peer[0] else "-"
        out.append(f"| {name} | {_s(nb[0])} | {_s(peer[0])} | {ratio} | {_s(nb[1])} | "
                   f"{_s(peer[1])} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--path", action="append", choices=sorted(PATHS),
                    help="a boot path to time (repeatable; default: all)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="guests per path and stack (default 2); medians are printed")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per guest (300)")
    ap.add_argument("--keep", type=Path, help="keep each lab's files under this directory")
    ap.add_argument("--list", action="store_true", help="list the paths and exit")
    a = ap.parse_args()
    if a.list:
        for name, make in PATHS.items():
            p = make("10.77.0.2")
            print(f"{name:14} firmware {p.firmware}, {p.nic}{'' if p.nic_rom else ' (no ROM)'},"
                  f" netboot loader {p.loader}{' (Secure Boot)' if p.secure_boot else ''}"
                  f"{'' if p.dnsmasq is not None or p.uboot else NO_PEER}")
        return 0
    reason = can_run_lab()
    if reason:
        print(f"firmware_boot: cannot run here: {reason}", file=sys.stderr)
        return 2
    rows = run(a.path or list(PATHS), a.rounds, a.timeout, a.keep)
    print(summary(rows))
    # the peer may fail a path it has no service for (uefi-http): that is a result
    return 0 if all(r.os_s is not None for r in rows if r.stack == "netboot") else 1


if __name__ == "__main__":
    sys.exit(main())
