#!/usr/bin/env python3
"""Build the stand-in Container Linux that the CoreOS end-to-end test boots.

Flatcar and Fedora CoreOS images cannot be downloaded here, but Debian ships every
part of one. This builds, from the machine's configured Debian source:

- a bookworm root filesystem (``mmdebstrap``) with systemd, udev, docker.io,
  iproute2 and the kernel's modules, packed as a zstd squashfs;
- an initramfs made by dracut *inside that root's chroot* with Debian's real
  ``30ignition`` module (the ``ignition`` 2.14 binary and its units) and a small
  ``90netboot-coreos`` module of ours that does what Flatcar's initramfs does
  around Ignition: copy the appended OEM archive's ``usr/share/oem/config.ign``
  to where Ignition reads a config (``/usr/lib/ignition/user.ign``), and mount
  ``/sysroot`` diskless: the squashfs (carried inside the initramfs) read-only
  under a tmpfs overlay;
- ``vmlinuz`` and ``initrd.img`` (dracut's archive with a second, uncompressed cpio
  holding ``netboot/rootfs.squashfs`` appended: the kernel unpacks both).

The output is cached by a content hash of its inputs (this file, the Debian
sources it builds from) in ``/var/cache/netboot-test/coreos-<hash>/``: a fresh
machine builds it once (a few minutes), a warm one reuses it. ``DEST`` gets hard
links (or copies) of the two files, since netboot serves nothing that is a
symlink out of its images directory.

    python3 scripts/coreos_image.py images/coreos      # or: make coreos-image
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CACHE_ROOT = Path(os.environ.get("NETBOOT_TEST_CACHE", "/var/cache/netboot-test"))
SUITE = "bookworm"
FILES = ("vmlinuz", "initrd.img")

PACKAGES = [
    "systemd", "systemd-sysv", "udev", "dbus", "kmod", "iproute2", "docker.io",
    "linux-image-amd64", "dracut-core", "dracut-network", "ignition", "zstd", "procps",
    "passwd",  # useradd, usermod: Ignition's files stage adds the users
    "curl",  # dracut-network's url-lib module, a dependency of 30ignition, wants it
]

# Left out of the root: documentation, and kernel drivers a QEMU guest never loads.
# Kernel postinst hooks are left out too: dracut runs once, below, with our options.
EXCLUDES = [
    "/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*", "/usr/share/info/*",
    "/etc/kernel/postinst.d/*",
    *(f"/lib/modules/*/kernel/{d}/*" for d in (
        "sound", "drivers/gpu", "drivers/media", "drivers/net/wireless",
        "drivers/infiniband", "drivers/staging", "drivers/bluetooth", "drivers/isdn",
        "drivers/iio", "drivers/hid", "drivers/usb", "drivers/scsi",
        "drivers/mmc", "drivers/mtd", "drivers/nvme", "drivers/hwmon", "drivers/platform",
        "net/wireless", "net/mac80211", "net/bluetooth", "fs/btrfs", "fs/xfs", "fs/ocfs2",
        "fs/gfs2", "fs/nfs", "fs/nfsd", "fs/cifs", "fs/smb", "fs/ceph")),
]

# Our dracut module: the Flatcar-like glue around the real Ignition module.
MODULE_SETUP = r"""#!/bin/bash
check() { return 0; }
depends() { echo ignition systemd; }
installkernel() { hostonly='' instmods squashfs overlay loop; }
install() {
    inst_multiple mount umount mkdir cp losetup modprobe
    inst_script "$moddir/is-live-image" /usr/bin/is-live-image
    inst_script "$moddir/netboot-sysroot" /usr/bin/netboot-sysroot
    inst_script "$moddir/setfiles" /usr/sbin/setfiles
    inst_simple "$moddir/netboot-oem-config.service" \
        "$systemdsystemunitdir/netboot-oem-config.service"
    inst_simple "$moddir/netboot-sysroot.service" "$systemdsystemunitdir/netboot-sysroot.service"
    inst_simple "$moddir/ignition-console.conf" \
        "$systemdsystemunitdir/ignition-.service.d/10-netboot-console.conf"
    mkdir -p "$initdir/$systemdsystemunitdir/ignition-complete.target.requires" \
             "$initdir/$systemdsystemunitdir/initrd-root-fs.target.requires"
    ln_r "$systemdsystemunitdir/netboot-oem-config.service" \
        "$systemdsystemunitdir/ignition-complete.target.requires/netboot-oem-config.service"
    ln_r "$systemdsystemunitdir/netboot-sysroot.service" \
        "$systemdsystemunitdir/initrd-root-fs.target.requires/netboot-sysroot.service"
}
"""

# Ignition's generator asks the distro whether this is a live image (no root disk):
# it is, so the diskful targets (remount /sysroot, disks by label) stay out.
IS_LIVE = "#!/bin/sh\nexit 0\n"

# Flatcar's initramfs reads the appended OEM archive's usr/share/oem/config.ign;
# upstream Ignition reads a config baked into the initramfs from
# /usr/lib/ignition/user.ign ("system" config) in its fetch-offline stage.
OEM_UNIT = """[Unit]
Description=netboot: hand the OEM archive's config.ign to Ignition
DefaultDependencies=false
ConditionPathExists=/etc/initrd-release
ConditionPathExists=/usr/share/oem/config.ign
Before=ignition-fetch-offline.service
After=basic.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/mkdir -p /usr/lib/ignition
ExecStart=/bin/cp /usr/share/oem/config.ign /usr/lib/ignition/user.ign
"""

# Debian's Ignition is built, like upstream's (for Fedora CoreOS), to relabel what its
# files stage wrote with SELinux's setfiles, always. This OS runs without SELinux (as
# Debian does by default), so there are no labels to set: a setfiles that says so.
SETFILES = """#!/bin/sh
echo "setfiles (netboot stand-in): SELinux is off in this OS; nothing relabeled" >&2
exit 0
"""

# Every ignition-*.service logs to the console too, so a failing stage says why on the
# serial console (a failed files stage also prints the config it had).
IGNITION_CONSOLE = """[Service]
StandardOutput=journal+console
StandardError=journal+console
"""

SYSROOT_SCRIPT = r"""#!/bin/sh
# Diskless root: the squashfs from the initramfs, read-only, under a tmpfs overlay.
set -e
img=/netboot/rootfs.squashfs
[ -f "$img" ] || { echo "netboot-sysroot: no $img in the initramfs" >&2; exit 1; }
modprobe -a loop squashfs overlay
mkdir -p /run/netboot/lower /run/netboot/rw
mount -t squashfs -o ro,loop "$img" /run/netboot/lower
mount -t tmpfs -o mode=0755 tmpfs /run/netboot/rw
mkdir -p /run/netboot/rw/upper /run/netboot/rw/work
mount -t overlay overlay \
    -o lowerdir=/run/netboot/lower,upperdir=/run/netboot/rw/upper,workdir=/run/netboot/rw/work \
    /sysroot
"""

SYSROOT_UNIT = """[Unit]
Description=netboot: diskless /sysroot (squashfs under a tmpfs overlay)
DefaultDependencies=false
ConditionPathExists=/etc/initrd-release
Before=initrd-root-fs.target ignition-mount.service
After=systemd-udevd.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/bin/netboot-sysroot
StandardOutput=journal+console
StandardError=journal+console
"""

# The booted OS: DHCP on the first NIC with systemd-networkd, Docker's state on tmpfs
# (overlay2 does not stack on the overlay root), the machine id made at boot.
NETWORK = "[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\n"
FSTAB = "tmpfs /var/lib/docker tmpfs mode=0711 0 0\n"

# On the serial console, after the join unit has run once (success or not) and again
# at shutdown after Docker stopped: the swarm units' journal, so a failing unit says
# why. Tokens never reach the journal (the units read them from a 0600 file).
REPORT = r"""#!/bin/sh
echo "NETBOOT-COREOS $1 begin" > /dev/ttyS0
journalctl -b --no-pager -o short-monotonic -u swarm-join.service -u swarm-leave.service \
    -u docker.service -n 60 > /dev/ttyS0 2>&1
echo "NETBOOT-COREOS $1 end swarm-join=$(systemctl is-active swarm-join.service)" > /dev/ttyS0
"""
REPORT_JOIN_UNIT = """[Unit]
Description=netboot test image: the swarm units' journal after the join
After=swarm-join.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/bin/netboot-report booted

[Install]
WantedBy=multi-user.target
"""
# Stop jobs run in reverse start order: being Before= Docker and swarm-leave, this
# one's ExecStop runs once both have stopped (journald is still up, After= it).
REPORT_SHUTDOWN_UNIT = """[Unit]
Description=netboot test image: the swarm units' journal at shutdown
DefaultDependencies=no
After=systemd-journald.service
Before=docker.service swarm-leave.service shutdown.target
Conflicts=shutdown.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/true
ExecStop=/usr/local/bin/netboot-report shutdown

[Install]
WantedBy=multi-user.target
"""

CUSTOMIZE = r"""#!/bin/sh
set -eu
root="$1"; files="$2"
mod="$root/usr/lib/dracut/modules.d/90netboot-coreos"
mkdir -p "$mod"
cp "$files/module-setup.sh" "$files/is-live-image" "$files/netboot-sysroot" \
   "$files/netboot-oem-config.service" "$files/netboot-sysroot.service" \
   "$files/ignition-console.conf" "$files/setfiles" "$mod/"
chmod 0755 "$mod/module-setup.sh" "$mod/is-live-image" "$mod/netboot-sysroot" "$mod/setfiles"
cp "$files/10-lan.network" "$root/etc/systemd/network/10-lan.network"
cp "$files/fstab" "$root/etc/fstab"
# Ignition's relabeling reads SELINUXTYPE here (else its files stage fails: "open
# /sysroot/etc/selinux/config: no such file or directory"); see SETFILES.
mkdir -p "$root/etc/selinux"
printf 'SELINUX=disabled\nSELINUXTYPE=targeted\n' > "$root/etc/selinux/config"
install -m 0755 "$files/netboot-report" "$root/usr/local/bin/netboot-report"
cp "$files/netboot-report-join.service" "$files/netboot-report-shutdown.service" \
   "$root/etc/systemd/system/"
chroot "$root" systemctl enable systemd-networkd.service netboot-report-join.service \
    netboot-report-shutdown.service
chroot "$root" systemctl enable docker.service
# Every boot is a first boot (see machine-id below): systemd-firstboot would stop it
# to ask for a locale and a root password on the console.
chroot "$root" systemctl mask systemd-firstboot.service
rm -f "$root/var/lib/dbus/machine-id"
echo localhost > "$root/etc/hostname"
kver=$(ls "$root/lib/modules")
# Only the drivers a QEMU guest with Docker loads: NICs, virtio, loop, and the ACPI
# power button with evdev (logind powers off on system_powerdown); a few filesystems.
for d in "$root/lib/modules/$kver/kernel/drivers/"*; do
    case "${d##*/}" in net|virtio|block|char|acpi|input) ;; *) rm -rf "$d" ;; esac
done
for d in "$root/lib/modules/$kver/kernel/fs/"*; do
    case "${d##*/}" in overlayfs|squashfs|fuse|ext4|jbd2|mbcache.ko|nls|fat|isofs) ;;
    *) rm -rf "$d" ;; esac
done
rm -rf "$root/lib/modules/$kver/kernel/drivers/net/wireless" \
       "$root/lib/modules/$kver/kernel/drivers/net/ethernet/mellanox"
chroot "$root" depmod -a "$kver"
chroot "$root" dracut --force --no-hostonly --no-early-microcode --compress zstd \
    --modules "base systemd systemd-initrd dracut-systemd kernel-modules ignition netboot-coreos" \
    --kver "$kver" /boot/netboot-initrd.img
"""


def inputs_digest() -> str:
    """What the image is made of: this file and the Debian sources it is built from."""
    h = hashlib.sha256(Path(__file__).read_bytes())
    for src in sorted(Path("/etc/apt").glob("sources.list*")) + sorted(
            Path("/etc/apt/sources.list.d").glob("*")):
        if src.is_file():
            h.update(src.name.encode() + b"\0" + src.read_bytes())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    return CACHE_ROOT / f"coreos-{inputs_digest()}"


def _append_squashfs_cpio(initrd: Path, squashfs: Path) -> None:
    """Append an uncompressed newc cpio holding netboot/rootfs.squashfs to ``initrd``."""
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "netboot").mkdir()
        os.link(squashfs, Path(d) / "netboot" / "rootfs.squashfs")
        listing = "netboot\nnetboot/rootfs.squashfs\n"
        with initrd.open("ab") as out:
            # The kernel takes an uncompressed archive after a compressed one only at a
            # 4-byte aligned offset (zeros between are skipped); else "invalid magic".
            out.write(b"\0" * (-out.tell() % 512))
            out.flush()  # before cpio writes to the same file descriptor
            subprocess.run(["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"], cwd=d,
                           input=listing.encode(), stdout=out, check=True)


def _remove_tree(path: Path) -> None:
    """rmtree, after unmounting what a failed mmdebstrap left mounted below ``path``
    (rmtree crosses mount points: a bind-mounted /dev would lose the host's nodes)."""
    prefix = str(path.resolve()) + "/"
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
              if line.split()[4].startswith(prefix)]
    for point in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)
    left = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4].startswith(prefix)]
    if left:
        print(f"coreos_image: not removing {path}: still mounted: {left}", file=sys.stderr)
        return
    shutil.rmtree(path, ignore_errors=True)


def build(out: Path) -> None:
    """Build into ``out`` (a fresh directory)."""
    for tool in ("mmdebstrap", "mksquashfs", "cpio"):
        if shutil.which(tool) is None:
            sys.exit(f"coreos_image: {tool} is missing (scripts/setup.sh test installs it)")
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="coreos-build-", dir=out.parent))
    try:
        files = work / "files"
        files.mkdir()
        for name, text in (("module-setup.sh", MODULE_SETUP), ("is-live-image", IS_LIVE),
                           ("netboot-sysroot", SYSROOT_SCRIPT),
                           ("netboot-oem-config.service", OEM_UNIT),
                           ("netboot-sysroot.service", SYSROOT_UNIT),
                           ("ignition-console.conf", IGNITION_CONSOLE), ("setfiles", SETFILES),
                           ("10-lan.network", NETWORK), ("fstab", FSTAB),
                           ("netboot-report", REPORT),
                           ("netboot-report-join.service", REPORT_JOIN_UNIT),
                           ("netboot-report-shutdown.service", REPORT_SHUTDOWN_UNIT),
                           ("customize.sh", CUSTOMIZE)):
            (files / name).write_text(text)
        root = work / "root"
        cmd = ["mmdebstrap", "--variant=apt", "--mode=root", "--format=directory",
               f"--include={','.join(PACKAGES)}",
               *(f"--dpkgopt=path-exclude={p}" for p in EXCLUDES),
               f"--customize-hook=sh {files / 'customize.sh'} \"$1\" {files}",
               SUITE, str(root)]
        # Docker and friends must not start on the build machine.
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(cmd, check=True, env=env)
        t1 = time.monotonic()
        kernels = sorted((root / "boot").glob("vmlinuz-*"))
        if len(kernels) != 1:
            sys.exit(f"coreos_image: expected one kernel in the root, found {kernels}")
        shutil.copy(kernels[0], out / "vmlinuz")
        shutil.move(root / "boot" / "netboot-initrd.img", out / "initrd.img")
        # Not needed once booted: the kernel and initramfs files, apt's lists and cache.
        # "uninitialized": every boot is systemd's first boot, and it applies presets,
        # which is how Ignition enables units; an empty file (what mmdebstrap leaves,
        # after the customize hook) gives a transient id and no first boot.
        (root / "etc/machine-id").write_text("uninitialized\n")
        # dracut and its modules (the ignition binary among them) live on in the initramfs.
        for junk in ("boot", "var/lib/apt/lists", "var/cache/apt", "var/cache/debconf",
                     "usr/lib/dracut"):
            shutil.rmtree(root / junk, ignore_errors=True)
            (root / junk).mkdir(parents=True, exist_ok=True)
        squash = work / "rootfs.squashfs"
        subprocess.run(["mksquashfs", str(root), str(squash), "-comp", "zstd",
                        "-Xcompression-level", "15", "-noappend", "-no-progress",
                        "-quiet", "-e", "proc", "sys", "dev", "run", "tmp"],
                       check=True, stdout=subprocess.DEVNULL)
        _append_squashfs_cpio(out / "initrd.img", squash)
        for name in FILES:
            (out / name).chmod(0o644)
        t2 = time.monotonic()
        print(f"coreos_image: root {t1 - t0:.0f}s, squashfs+initrd {t2 - t1:.0f}s; "
              f"initrd.img {(out / 'initrd.img').stat().st_size >> 20} MiB", flush=True)
    finally:
        _remove_tree(work)


def ensure_image() -> Path:
    """The cached image's directory, built first if this machine has none for these inputs."""
    target = cache_dir()
    if all((target / f).is_file() for f in FILES):
        return target
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    with open(CACHE_ROOT / ".coreos.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; the others then reuse it
        if all((target / f).is_file() for f in FILES):
            return target
        staging = Path(tempfile.mkdtemp(prefix=f"{target.name}.", dir=CACHE_ROOT))
        try:
            build(staging)
            staging.chmod(0o755)
            os.rename(staging, target)
        finally:
            _remove_tree(staging)
    return target


def install_into(dest: Path) -> Path:
    """Hard links (or copies) of the cached image's files in ``dest``."""
    src = ensure_image()
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        target = dest / name
        if target.exists() and os.path.samefile(target, src / name):
            continue
        target.unlink(missing_ok=True)
        try:
            os.link(src / name, target)
        except OSError:
            shutil.copy(src / name, target)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dest", type=Path, help="directory for vmlinuz and initrd.img")
    args = ap.parse_args()
    t0 = time.monotonic()
    install_into(args.dest)
    print(f"coreos_image: {args.dest} from {cache_dir()} in {time.monotonic() - t0:.1f}s")


if __name__ == "__main__":
    main()
