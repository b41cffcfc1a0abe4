"""Deterministic newc cpio archives for handing an Ignition config to the initrd.

Flatcar and Fedora CoreOS read their first-boot config from a file inside an
extra initrd. The kernel unpacks every newc archive it is given (gzip'd or
not, concatenated after the main initrd), so serving a tiny archive holding
``config.ign`` lets us configure a diskless or fresh node without touching
the vendor image.

Output is byte-for-byte reproducible (mtime 0, sorted entries, sequential
inode numbers, gzip header without timestamp) so equal configs give equal
archives, which keeps HTTP caching and ETags honest.
"""

from __future__ import annotations

import gzip
import hashlib
from collections import OrderedDict
from pathlib import PurePosixPath

__all__ = [
    "OEM_PATHS",
    "CpioError",
    "OemCache",
    "build_cpio",
    "build_oem_archive",
]

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"
# GNU cpio pads archives to 512-byte blocks; we do the same so tools that
# expect block-sized archives (and concatenation after them) behave alike.
BLOCK = 512

S_IFDIR = 0o040000
S_IFREG = 0o100000
DIR_MODE = 0o755

# Where each supported OS looks for the config inside an appended initrd.
OEM_PATHS: tuple[str, ...] = (
    "usr/share/oem/config.ign",  # Flatcar
    "oem/config.ign",  # newer Flatcar
    "config.ign",  # Fedora CoreOS live
)


class CpioError(ValueError):
    """An archive member name or mode cannot be represented safely."""


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _normalise(name: str) -> str:
    """Relative, slash-separated member name; refuses escapes like '..'."""
    parts = [p for p in PurePosixPath(name).parts if p not in ("/", ".")]
    if not parts:
        raise CpioError(f"empty archive member name: {name!r}")
    if ".." in parts:
        raise CpioError(f"archive member name escapes the root: {name!r}")
    for p in parts:
        if "\0" in p:
            raise CpioError(f"NUL byte in archive member name: {name!r}")
    return "/".join(parts)


def _entry(ino: int, mode: int, nlink: int, name: str, data: bytes) -> bytes:
    encoded = name.encode() + b"\0"
    fields = (
        ino,
        mode,
        0,  # uid
        0,  # gid
        nlink,
        0,  # mtime: fixed for reproducibility
        len(data),
        0,  # devmajor
        0,  # devminor
        0,  # rdevmajor
        0,  # rdevminor
        len(encoded),
        0,  # check (newc has none)
    )
    header = NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)
    head = header + encoded
    return head + _pad4(len(head)) + data + _pad4(len(data))


def build_cpio(files: dict[str, bytes], mode: int = 0o644) -> bytes:
    """Uncompressed newc archive of ``files``, parents first, deterministic.

    Every parent directory gets its own entry (mode 0755) because the
    kernel's unpacker does not create missing directories.
    """
    if not 0 <= mode <= 0o7777:
        raise CpioError(f"file mode out of range: {mode:#o}")
    members: dict[str, bytes] = {}
    for raw, data in files.items():
        name = _normalise(raw)
        if name in members:
            raise CpioError(f"duplicate archive member: {name!r}")
        members[name] = bytes(data)
    dirs: set[str] = set()
    for name in members:
        parts = name.split("/")
        for i in range(1, len(parts)):
            dirs.add("/".join(parts[:i]))
    clash = dirs & members.keys()
    if clash:
        raise CpioError(f"archive member is both file and directory: {min(clash)!r}")
    # Sorting by path components puts every directory before its contents.
    order = sorted(dirs | members.keys(), key=lambda n: n.split("/"))
    out = bytearray()
    for ino, name in enumerate(order, start=1):
        if name in dirs:
            out += _entry(ino, S_IFDIR | DIR_MODE, 2, name, b"")
        else:
            out += _entry(ino, S_IFREG | mode, 1, name, members[name])
    out += _entry(0, 0, 1, TRAILER, b"")
    out += b"\0" * (-len(out) % BLOCK)
    return bytes(out)


def build_oem_archive(ignition_json: bytes) -> bytes:
    """Gzip'd newc archive placing the config where Flatcar and FCOS look."""
    archive = build_cpio({path: ignition_json for path in OEM_PATHS}, mode=0o644)
    return gzip.compress(archive, compresslevel=9, mtime=0)


class OemCache:
    """Bounded LRU of built OEM archives, keyed by the config's sha256.

    Many machines of one profile get identical configs; building and
    gzipping once per distinct config keeps per-boot work to a hash.
    """

    def __init__(self, max_entries: int = 64) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._items: OrderedDict[str, bytes] = OrderedDict()

    def get(self, ignition_json: bytes) -> tuple[str, bytes]:
        """Return (sha256 hex of ``ignition_json``, gzip'd OEM archive)."""
        digest = hashlib.sha256(ignition_json).hexdigest()
        archive = self._items.get(digest)
        if archive is None:
            archive = build_oem_archive(ignition_json)
            self._items[digest] = archive
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)
        else:
            self._items.move_to_end(digest)
        return digest, archive

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, digest: object) -> bool:
        return digest in self._items
