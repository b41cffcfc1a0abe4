"""OEM cpio archives, checked by reading them back with GNU cpio."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

import pytest

from netboot.cpio import OEM_PATHS, CpioError, OemCache, build_cpio, build_oem_archive

CPIO = shutil.which("cpio")
needs_cpio = pytest.mark.skipif(CPIO is None,
                                reason="GNU cpio not installed (apt-get install cpio)")

CONFIG = b'{"ignition":{"version":"3.3.0"}}'


def _cpio(args: list[str], data: bytes, cwd: Path | None = None) -> str:
    assert CPIO is not None
    proc = subprocess.run(
        [CPIO, *args], input=data, cwd=cwd, capture_output=True, check=True, timeout=30
    )
    return proc.stdout.decode()


def _walk_headers(archive: bytes) -> list[tuple[int, str, int, int]]:
    """(offset, name, mode, ino) of every member, checking 4-byte alignment."""
    out = []
    off = 0
    while True:
        assert off % 4 == 0, f"header at {off} not 4-aligned"
        assert archive[off : off + 6] == b"070701", f"bad magic at {off}"
        fields = [int(archive[off + 6 + 8 * i : off + 14 + 8 * i], 16) for i in range(13)]
        ino, mode, size, namesize = fields[0], fields[1], fields[6], fields[11]
        name = archive[off + 110 : off + 110 + namesize - 1].decode()
        out.append((off, name, mode, ino))
        data_off = off + 110 + namesize
        data_off += -data_off % 4
        if name == "TRAILER!!!":
            return out
        off = data_off + size + (-size % 4)


def test_headers_aligned_and_parents_first() -> None:
    archive = build_cpio({"a/b/c.txt": b"xyz", "a/d": b"12345", "top": b""})
    members = _walk_headers(archive)
    names = [m[1] for m in members]
    assert names == ["a", "a/b", "a/b/c.txt", "a/d", "top", "TRAILER!!!"]
    assert members[0][2] == 0o040755 and members[2][2] == 0o100644
    assert [m[3] for m in members[:-1]] == [1, 2, 3, 4, 5]
    assert len(archive) % 512 == 0


def test_rejects_escaping_and_conflicting_names() -> None:
    with pytest.raises(CpioError, match="escapes"):
        build_cpio({"../etc/passwd": b""})
    with pytest.raises(CpioError, match="both file and directory"):
        build_cpio({"a": b"", "a/b": b""})
    with pytest.raises(CpioError, match="duplicate"):
        build_cpio({"/a": b"", "a": b""})


def test_deterministic_bytes() -> None:
    one = build_oem_archive(CONFIG)
    two = build_oem_archive(bytes(CONFIG))
    assert one == two
    assert one[4:8] == b"\0\0\0\0", "gzip mtime must be 0"
    assert build_oem_archive(CONFIG + b" ") != one


@needs_cpio
def test_gnu_cpio_lists_and_extracts(tmp_path: Path) -> None:
    archive = gzip.decompress(build_oem_archive(CONFIG))
    listing = _cpio(["-itv"], archive)
    lines = listing.splitlines()
    names = [line.split()[-1] for line in lines]
    assert names == ["config.ign", "oem", "oem/config.ign", "usr", "usr/share",
                     "usr/share/oem", "usr/share/oem/config.ign"]
    assert lines[1].startswith("drwxr-xr-x")
    assert lines[0].startswith("-rw-r--r--")
    _cpio(["-idm", "--no-absolute-filenames"], archive, cwd=tmp_path)
    for path in OEM_PATHS:
        assert (tmp_path / path).read_bytes() == CONFIG
        assert (tmp_path / path).stat().st_mode & 0o7777 == 0o644
        assert (tmp_path / path).stat().st_mtime == 0


@needs_cpio
def test_concatenated_after_another_gzip_newc(tmp_path: Path) -> None:
    """The kernel sees main initrd + our archive; both must parse in sequence."""
    src = tmp_path / "src"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "init").write_bytes(b"#!/bin/sh\necho hi\n")
    first = subprocess.run(
        [CPIO, "-o", "-H", "newc"], input=b"bin\nbin/init\n", cwd=src,
        capture_output=True, check=True,
    ).stdout
    combined = gzip.compress(first, mtime=0) + build_oem_archive(CONFIG)
    (tmp_path / "initrd.gz").write_bytes(combined)
    # gunzip decodes the multi-member stream, as the kernel does.
    stream = subprocess.run(
        ["gunzip", "-c", str(tmp_path / "initrd.gz")], capture_output=True, check=True
    ).stdout
    assert _cpio(["-it"], stream).split() == ["bin", "bin/init"]
    # GNU cpio stops at the first trailer; the second archive starts right
    # after the first one's block padding and must parse from there.
    assert len(first) % 4 == 0
    rest = stream[len(first):]
    assert "usr/share/oem/config.ign" in _cpio(["-it"], rest).split()
    out = tmp_path / "out"
    out.mkdir()
    _cpio(["-idm"], stream, cwd=out)
    _cpio(["-idm"], rest, cwd=out)
    assert (out / "bin" / "init").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (out / "config.ign").read_bytes() == CONFIG


def test_oem_cache_lru() -> None:
    cache = OemCache(max_entries=2)
    d1, a1 = cache.get(b"1")
    d1b, a1b = cache.get(b"1")
    assert (d1, a1) == (d1b, a1b)
    assert a1b is a1, "second get must come from the cache"
    assert d1 == "6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b"
    d2, _ = cache.get(b"2")
    cache.get(b"1")  # touch 1 so 2 is the oldest
    d3, _ = cache.get(b"3")
    assert len(cache) == 2
    assert d1 in cache and d3 in cache and d2 not in cache
