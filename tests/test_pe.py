"""PE certificate tables on real binaries: Debian's signed kernel, iPXE's unsigned EFI
build, and the signed kernel with its table taken out of the headers."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from netboot.images.pe import NotPE, cert_table, signed

KERNELS = sorted(Path("/boot").glob("vmlinuz-*"))
IPXE_EFI = Path("/usr/lib/ipxe/ipxe.efi")
needs = pytest.mark.skipif(not KERNELS or not IPXE_EFI.exists(),
                           reason="needs linux-image-amd64 and ipxe (scripts/setup.sh)")


def _security_entry(data: bytes) -> int:
    """Offset of data directory 4 in a PE32+ image (as the parser finds it)."""
    (pe,) = struct.unpack_from("<I", data, 0x3C)
    return pe + 24 + 112 + 4 * 8


@needs
def test_debian_kernel_is_signed_and_ipxe_efi_is_not() -> None:
    kernel = KERNELS[-1]
    assert signed(kernel)
    table = cert_table(kernel.read_bytes()[:4096])
    assert table is not None and table.offset + table.size == kernel.stat().st_size
    assert not signed(IPXE_EFI)


@needs
def test_table_taken_out_is_unsigned_and_one_past_the_end_is_not_signed(
        tmp_path: Path) -> None:
    data = bytearray(KERNELS[-1].read_bytes())
    at = _security_entry(data)
    stripped = tmp_path / "stripped"
    stripped.write_bytes(bytes(data[:at]) + b"\0" * 8 + bytes(data[at + 8:]))
    assert not signed(stripped)
    cut = tmp_path / "cut"  # the table named, but the file ends before it does
    cut.write_bytes(bytes(data[:-16]))
    assert not signed(cut)


def test_not_pe(tmp_path: Path) -> None:
    for body in (b"", b"MZ" + b"\0" * 100, b"\x7fELF" + b"\0" * 200):
        f = tmp_path / "x"
        f.write_bytes(body)
        with pytest.raises(NotPE):
            signed(f)
