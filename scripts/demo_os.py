#!/usr/bin/env python3
"""Build the demo OS that the bundled profiles boot and the end-to-end tests use.

It is Debian's own kernel plus a busybox initramfs made here: it loads the
e1000 driver, prints the machine's SMBIOS identity on the serial console,
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

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
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
insmod /lib/e1000.ko 2>/dev/null
sleep 1
IF=$(ls /sys/class/net | grep -v '^lo$' | head -n 1)
MAC=$(cat /sys/class/net/$IF/address 2>/dev/null)
echo "NETBOOT-TESTOS identity uuid=$UUID mac=$MAC serial=$SERIAL vendor=$VENDOR product=$PRODUCT"
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
  if wget -q -O /tmp/cb --post-data "serial=$SERIAL&vendor=$VENDOR&product=$PRODUCT&mac=$MAC" \
      "$CALLBACK"; then
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


def find_kernel() -> tuple[Path, Path]:
    kernels = sorted(glob.glob("/boot/vmlinuz-*"))
    if not kernels:
        sys.exit("demo_os: no /boot/vmlinuz-*; install it with: apt-get install linux-image-amd64")
    kernel = Path(kernels[-1])
    version = kernel.name[len("vmlinuz-"):]
    found = glob.glob(f"/lib/modules/{version}/kernel/drivers/net/ethernet/intel/e1000/e1000.ko*")
    if not found:
        sys.exit(f"demo_os: no e1000.ko for kernel {version}")
    return kernel, Path(found[0])


def build(out: Path) -> None:
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not Path(busybox).exists():
        sys.exit("demo_os: no busybox; install it with: apt-get install busybox-static")
    kernel, module = find_kernel()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for d in ("bin", "lib", "proc", "sys", "dev", "tmp", "etc"):
            (root / d).mkdir()
        shutil.copy(busybox, root / "bin/busybox")
        ko = module.read_bytes()
        if module.suffix == ".xz":
            import lzma

            ko = lzma.decompress(ko)
        (root / "lib/e1000.ko").write_bytes(ko)
        (root / "init").write_text(INIT)
        (root / "bin/udhcpc.script").write_text(UDHCPC)
        for f in ("init", "bin/udhcpc.script", "bin/busybox"):
            os.chmod(root / f, 0o755)
        names = subprocess.run(["find", "."], cwd=root, check=True, capture_output=True).stdout
        archive = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet", "--reproducible"],
                                 cwd=root, input=names, check=True, capture_output=True).stdout
    (out / "initrd.cpio.gz").write_bytes(gzip.compress(archive, mtime=0))
    shutil.copy(kernel, out / "vmlinuz")
    print(f"demo OS: {out}/vmlinuz ({kernel.name}) and {out}/initrd.cpio.gz")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, nargs="?", default=Path("images/demo"))
    build(parser.parse_args().out)


if __name__ == "__main__":
    main()
