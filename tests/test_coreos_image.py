"""scripts/coreos_image.py without building: what the kernel needs of the initrd it
assembles, and the cache key. (Building and booting it: tests/e2e/test_coreos_swarm.py.)"""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lab import REPO

sys.path.insert(0, str(REPO / "scripts"))
import coreos_image  # noqa: E402


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio is not installed")
def test_squashfs_archive_starts_4_byte_aligned_after_a_compressed_one(tmp_path: Path) -> None:
    # The kernel takes a newc archive after a compressed one only at an offset that is a
    # multiple of 4 ("invalid magic at start of compressed archive" otherwise, and the
    # root never appears): a gzip'd stand-in for dracut's image of odd length.
    initrd = tmp_path / "initrd.img"
    blob = next(b for n in range(100, 200)
                if len(b := gzip.compress(bytes(range(n % 256)) * 3, mtime=0)) % 4 == 1)
    initrd.write_bytes(blob)
    compressed = initrd.stat().st_size
    squash = tmp_path / "rootfs.squashfs"
    squash.write_bytes(b"hsqs" + b"x" * 5000)
    coreos_image._append_squashfs_cpio(initrd, squash)
    data = initrd.read_bytes()
    start = data.index(b"070701", compressed)
    assert start % 4 == 0 and set(data[compressed:start]) <= {0}
    listing = subprocess.run(["cpio", "-it", "--quiet"], input=data[start:],
                             capture_output=True, check=True).stdout.decode().split()
    assert listing == ["netboot", "netboot/rootfs.squashfs"]  # with its parent directory


def test_cache_key_follows_the_script_and_apt_sources() -> None:
    key = coreos_image.inputs_digest()
    assert len(key) == 16 and key == coreos_image.inputs_digest()
    assert coreos_image.cache_dir().name == f"coreos-{key}"
