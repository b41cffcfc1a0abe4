#!/usr/bin/env python3
"""Fetch what arm64 machines boot, from Debian's arm64 packages, on any machine.

- the loaders: shim-signed's ``shimaa64.efi.signed`` and grub-efi-arm64-signed's
  ``grubnetaa64.efi.signed`` into OUT/loaders (a tftp.roots directory; netboot
  serves them as ``shimaa64.efi`` and ``grubaa64.efi``);
- the arm64 demo OS into OUT/demo: Debian's arm64 kernel (an uncompressed ``Image``
  that GRUB and U-Boot's ``booti`` both load) and a busybox initramfs built by
  scripts/demo_os.py from busybox-static:arm64 and that kernel's modules.

The packages come through apt (``dpkg --add-architecture arm64``, ``apt-get
download``: apt checks them against the signed archive index) and are unpacked with
``dpkg-deb -x`` (and the kernel's modules.dep made by ``depmod -b``); nothing is
installed. Nothing is fetched again when OUT holds what
the newest package versions make.

    python3 scripts/arm64_os.py images/arm64
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_os  # noqa: E402

PACKAGES = ("busybox-static", "shim-signed", "grub-efi-arm64-signed")
LOADERS = {"shimaa64.efi.signed": "usr/lib/shim", "grubnetaa64.efi.signed":
           "usr/lib/grub/arm64-efi-signed"}


def run(*argv: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kw)


def ensure_arch() -> None:
    """arm64 known to dpkg and apt's lists (once per machine)."""
    if "arm64" not in run("dpkg", "--print-foreign-architectures").stdout.split():
        print("arm64_os: dpkg --add-architecture arm64; apt-get update", flush=True)
        run("dpkg", "--add-architecture", "arm64")
        run("apt-get", "update", "-q")
    elif not candidate("busybox-static:arm64"):
        run("apt-get", "update", "-q")


def candidate(pkg: str) -> str:
    out = run("apt-cache", "policy", pkg).stdout
    for line in out.splitlines():
        if line.strip().startswith("Candidate:"):
            value = line.split(":", 1)[1].strip()
            return "" if value == "(none)" else value
    return ""


def kernel_package() -> str:
    """The versioned arm64 kernel package that linux-image-arm64 depends on."""
    out = run("apt-cache", "depends", "linux-image-arm64:arm64").stdout
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends: linux-image-") and line.endswith("-arm64:arm64"):
            return line.split()[1].removesuffix(":arm64")
    sys.exit("arm64_os: apt knows no linux-image-arm64:arm64 (is arm64 in apt's lists?)")


def build(out: Path) -> None:
    ensure_arch()
    try:
        _build(out)
    except subprocess.CalledProcessError as exc:
        if "apt-get" not in exc.cmd[0]:
            raise
        # apt's lists are older than the archive (a version was replaced): once more
        print("arm64_os: download failed; apt-get update and once more", flush=True)
        run("apt-get", "update", "-q")
        _build(out)


def _build(out: Path) -> None:
    wanted = [kernel_package(), *PACKAGES]
    stamp = " ".join(f"{p}={candidate(p + ':arm64')}" for p in wanted)
    done = out / ".packages"
    if done.exists() and done.read_text() == stamp and (out / "demo" / "vmlinuz").exists():
        print(f"arm64_os: {out} is up to date ({stamp})")
        return
    with tempfile.TemporaryDirectory() as tmp:
        debs, root = Path(tmp) / "debs", Path(tmp) / "root"
        debs.mkdir()
        print(f"arm64_os: apt-get download {' '.join(wanted)} (arm64)", flush=True)
        run("apt-get", "download", "-q", *(f"{p}:arm64" for p in wanted), cwd=debs)
        for deb in sorted(debs.glob("*.deb")):
            run("dpkg-deb", "-x", str(deb), str(root))
        for moddir in (root / "lib/modules").iterdir():  # modules.dep is made at install
            run("depmod", "-b", str(root), moddir.name)
        loaders = out / "loaders"
        loaders.mkdir(parents=True, exist_ok=True)
        for name, where in LOADERS.items():
            shutil.copy(root / where / name, loaders / name)
        demo_os.build(out / "demo", sysroot=root)
    done.write_text(stamp)
    print(f"arm64_os: {out}/loaders ({', '.join(LOADERS)}) and {out}/demo")


def main() -> None:
    demo_os.cli(build, Path("images/arm64"), __doc__)


if __name__ == "__main__":
    main()
