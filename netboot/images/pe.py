"""Is a PE image (an EFI kernel, shim, GRUB) signed? Authenticode signatures live in
the certificate table: data directory 4 (IMAGE_DIRECTORY_ENTRY_SECURITY) of the
optional header, a file offset and a size. Only the headers are read; the
signature itself is not checked (the firmware and shim do that).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

_HEADER_BYTES = 4096  # DOS stub, PE signature, COFF and optional headers fit in a page
_SECURITY = 4
#: optional header magic -> offset of NumberOfRvaAndSizes (the directories follow it)
_RVA_COUNT_AT = {0x10B: 92, 0x20B: 108}  # PE32, PE32+


class NotPE(ValueError):
    """The bytes are not a PE image."""


@dataclass(frozen=True, slots=True)
class CertTable:
    offset: int
    size: int


def cert_table(header: bytes) -> CertTable | None:
    """The certificate table the headers in ``header`` name, or None (unsigned).

    Raises :class:`NotPE` when ``header`` does not start a PE image.
    """
    if len(header) < 0x40 or header[:2] != b"MZ":
        raise NotPE("no MZ header")
    (pe,) = struct.unpack_from("<I", header, 0x3C)
    if pe + 24 > len(header) or header[pe:pe + 4] != b"PE\0\0":
        raise NotPE("no PE signature")
    (opt_size,) = struct.unpack_from("<H", header, pe + 20)
    opt = pe + 24
    if opt + min(opt_size, 2) > len(header) or opt_size < 2:
        raise NotPE("no optional header")
    (magic,) = struct.unpack_from("<H", header, opt)
    count_at = _RVA_COUNT_AT.get(magic)
    if count_at is None:
        raise NotPE(f"unknown optional header magic {magic:#x}")
    if count_at + 4 > opt_size or opt + opt_size > len(header):
        raise NotPE("optional header cut short")
    (count,) = struct.unpack_from("<I", header, opt + count_at)
    entry = count_at + 4 + 8 * _SECURITY
    if count <= _SECURITY or entry + 8 > opt_size:
        return None
    offset, size = struct.unpack_from("<II", header, opt + entry)
    return CertTable(offset, size) if offset and size else None


def signed(path: Path) -> bool:
    """True if ``path`` is a PE image with a certificate table inside the file.

    Raises :class:`NotPE` (not a PE image) or OSError (cannot be read).
    """
    with path.open("rb") as f:
        header = f.read(_HEADER_BYTES)
        length = f.seek(0, 2)
    table = cert_table(header)
    return table is not None and table.offset + table.size <= length
