#!/usr/bin/env python3
"""Build the demo OS that the bundled profiles boot and the end-to-end tests use.

It is Debian's own kernel plus a busybox initramfs made here: it loads the
e1000 and virtio-net drivers, prints the machine's SMBIOS identity on the serial console,
takes an address from the site's DHCP server, looks for an Ignition config
where Flatcar and Fedora CoreOS look, calls back the URL in its kernel
arguments (``netboot.callback=``) and powers off.

    python3 scripts/demo_os.py images/demo
"""

from __future__ import annotations

import argparse
import glob
import gzip
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# SecureBoot-<EFI global variable GUID>: 4 attribute bytes, then 1 (on) or 0 (off).
# Prints 1, 0, or nothing (BIOS, or no efivarfs). efivarfs cannot seek: read it whole.
SECURE_BOOT_SH = r"""secure_boot() {
  [ -d /sys/firmware/efi ] || return 0
  v=/sys/firmware/efi/efivars
  [ -e $v/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c ] || \
    mount -t efivarfs efivarfs $v 2>/dev/null
  case "$(cat $v/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c 2>/dev/null \
          | od -An -v -tx1 | tr -d ' \n')" in
    ????????01) echo 1 ;;
    ????????00) echo 0 ;;
  esac
}
"""

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
""" + SECURE_BOOT_SH + r"""export PATH=/bin
mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "NETBOOT-TESTOS-START"
echo "NETBOOT-TESTOS cmdline: $(cat /proc/cmdline)"
UUID=$(cat /sys/class/dmi/id/product_uuid 2>/dev/null)
SERIAL=$(cat /sys/class/dmi/id/product_serial 2>/dev/null)
VENDOR=$(cat /sys/class/dmi/id/sys_vendor 2>/dev/null)
PRODUCT=$(cat /sys/class/dmi/id/product_name 2>/dev/null)
for m in $(cat /lib/modules.order); do insmod "/lib/$m" 2>/dev/null; done
sleep 1
IF=$(ls /sys/class/net | grep -v '^lo$' | head -n 1)
MAC=$(cat /sys/class/net/$IF/address 2>/dev/null)
echo "NETBOOT-TESTOS identity uuid=$UUID mac=$MAC serial=$SERIAL vendor=$VENDOR product=$PRODUCT"
SB=$(secure_boot)
echo "NETBOOT-TESTOS secureboot=${SB:-unknown}"
for f in /usr/share/oem/config.ign /oem/config.ign /config.ign; do
  [ -f "$f" ] && echo "NETBOOT-TESTOS ignition $f sha256=$(sha256sum $f | cut -d' ' -f1)"
done
ip link set lo up
ip link set "$IF" up
udhcpc -i "$IF" -s /bin/udhcpc.script -q -n -t 15 -T 2 >/dev/null 2>&1
echo "NETBOOT-TESTOS address $(ip -4 -o addr show dev $IF | awk '{print $4}')"
CALLBACK=""
for arg in $(cat /proc/cmdline); do
  case "$arg" in netboot.callback=*) CALLBACK="${arg#netboot.callback=}" ;; esac
done
if [ -n "$CALLBACK" ]; then
  # Tell netboot what the OS sees of the hardware (the pxelinux path has no iPXE
  # stage to report it), then that the machine is up.
  REGISTER=$(echo "$CALLBACK" | sed 's#/installed?#/register?#')
  wget -q -O /tmp/reg \
      --post-data "serial=$SERIAL&vendor=$VENDOR&product=$PRODUCT&mac=$MAC${SB:+&secure_boot=$SB}" \
      "$REGISTER" || echo "NETBOOT-TESTOS register failed"
  if wget -q -O /tmp/cb --post-data "" "$CALLBACK"; then
    echo "NETBOOT-TESTOS callback ok"
  else
    echo "NETBOOT-TESTOS callback failed"
  fi
fi
echo "NETBOOT-TESTOS-DONE"
sync
poweroff -f
"""

UDHCPC = r"""#!/bin/sh
case "$1" in
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    if [ -n "$router" ]; then ip route add default via "${router%% *}" dev "$interface"; fi
    ;;
esac
"""


# NIC drivers the lab's guests use: e1000 (SeaBIOS/OVMF with iPXE ROMs) and
# virtio-net (OVMF's own PXE client); efivarfs, to read the SecureBoot variable.
DRIVERS = ("e1000", "virtio_pci", "virtio_net", "efivarfs")


def find_kernel(drivers: tuple[str, ...] = DRIVERS,
                sysroot: Path = Path("/")) -> tuple[Path, list[Path]]:
    """The newest kernel under ``sysroot`` and the modules ``drivers`` name, in load
    order (each one's dependencies from modules.dep first)."""
    kernels = sorted(glob.glob(str(sysroot / "boot/vmlinuz-*")))
    if not kernels:
        sys.exit(f"demo_os: no {sysroot / 'boot/vmlinuz-*'}; install it with: "
                 "apt-get install linux-image-amd64")
    kernel = Path(kernels[-1])
    moddir = sysroot / "lib/modules" / kernel.name[len("vmlinuz-"):]
    deps: dict[str, list[str]] = {}
    try:
        for line in (moddir / "modules.dep").read_text().splitlines():
            name, _, rest = line.partition(":")
            deps[name] = rest.split()
    except FileNotFoundError:
        sys.exit(f"demo_os: no {moddir}/modules.dep for {kernel.name}")
    by_name = {Path(k).name.split(".ko")[0]: k for k in deps}
    order: list[str] = []

    def visit(rel: str) -> None:
        for dep in deps.get(rel, []):
            visit(dep)
        if rel not in order:
            order.append(rel)

    for driver in drivers:
        if driver in by_name:
            visit(by_name[driver])
    if not order:
        sys.exit(f"demo_os: none of {drivers} found under {moddir}")
    return kernel, [moddir / rel for rel in order]


def find_busybox(sysroot: Path = Path("/")) -> str:
    if sysroot != Path("/"):
        busybox = str(sysroot / "bin/busybox")
    else:
        busybox = shutil.which("busybox") or "/bin/busybox"
    if not Path(busybox).exists():
        sys.exit("demo_os: no busybox; install it with: apt-get install busybox-static")
    return busybox


def new_root(root: Path, busybox: str, modules: list[Path], init: str) -> None:
    """The initramfs tree under ``root``: busybox, ``init``, the udhcpc script and the
    modules (decompressed) in /lib with their load order in /lib/modules.order."""
    for d in ("bin", "lib", "proc", "sys", "dev", "tmp", "etc"):
        (root / d).mkdir()
    shutil.copy(busybox, root / "bin/busybox")
    names_in_order = []
    for module in modules:
        ko = module.read_bytes()
        if module.suffix == ".xz":
            import lzma

            ko = lzma.decompress(ko)
        name = module.name.split(".ko")[0] + ".ko"
        (root / "lib" / name).write_bytes(ko)
        names_in_order.append(name)
    (root / "lib/modules.order").write_text("\n".join(names_in_order) + "\n")
    (root / "init").write_text(init)
    (root / "bin/udhcpc.script").write_text(UDHCPC)
    for f in ("init", "bin/udhcpc.script", "bin/busybox"):
        os.chmod(root / f, 0o755)


def pack(root: Path, archive: Path) -> None:
    """``root`` as a gzip'd newc cpio archive (reproducible: no mtimes)."""
    names = subprocess.run(["find", "."], cwd=root, check=True, capture_output=True).stdout
    data = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet", "--reproducible"],
                          cwd=root, input=names, check=True, capture_output=True).stdout
    archive.write_bytes(gzip.compress(data, mtime=0))


def build(out: Path, sysroot: Path = Path("/")) -> None:
    """The demo OS from the kernel, modules and busybox under ``sysroot`` (another
    architecture's packages unpacked there: scripts/arm64_os.py)."""
    busybox = find_busybox(sysroot)
    kernel, modules = find_kernel(sysroot=sysroot)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        new_root(Path(tmp), busybox, modules, INIT)
        pack(Path(tmp), out / "initrd.cpio.gz")
    shutil.copy(kernel, out / "vmlinuz")
    print(f"demo OS: {out}/vmlinuz ({kernel.name}) and {out}/initrd.cpio.gz")


def cli(build_into, default: Path, doc: str | None) -> None:
    """``script.py [OUT]``: build into OUT (default ``default``)."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, nargs="?", default=default)
    build_into(parser.parse_args().out)


def main() -> None:
    cli(build, Path("images/demo"), __doc__)


if __name__ == "__main__":
    main()
