"""Machine identity as every part of netboot spells it: MACs as lowercase
colon-separated hex, SMBIOS UUIDs as dmidecode and iPXE's ``${uuid}`` print
them, and client architectures from DHCP option 93.
"""

from __future__ import annotations

import re
import uuid as _uuid
from enum import Enum

_MAC_HEX = re.compile(r"^[0-9a-f]{12}$")


class IdentityError(ValueError):
    pass


def normalise_mac(value: str | bytes) -> str:
    """'52-54-00-AB-CD-EF', '525400abcdef', raw 6 bytes -> '52:54:00:ab:cd:ef'."""
    if isinstance(value, (bytes, bytearray)):
        if len(value) != 6:
            raise IdentityError(f"MAC must be 6 bytes, got {len(value)}")
        return ":".join(f"{b:02x}" for b in value)
    hexed = re.sub(r"[:\-.\s]", "", value.strip().lower())
    if not _MAC_HEX.match(hexed):
        raise IdentityError(f"not a MAC address: {value!r}")
    return ":".join(hexed[i : i + 2] for i in range(0, 12, 2))


def normal_mac_shape(value: str) -> bool:
    """True when ``value`` is shaped like normalise_mac's output (17 lowercase
    characters, colons at 2, 5, 8, 11, 14): normalising it returns it or fails, so a
    lookup keyed by normal forms may skip the normalising (the DHCP hot path)."""
    return (len(value) == 17 and value[2] == value[5] == value[8] == value[11]
            == value[14] == ":" and value == value.lower())


def normal_uuid_shape(value: str) -> bool:
    """The same for normalise_uuid's 8-4-4-4-12 lowercase form."""
    return (len(value) == 36 and value[8] == value[13] == value[18] == value[23] == "-"
            and value == value.lower())


def normalise_uuid(value: str) -> str:
    """Any textual UUID form -> lowercase canonical 8-4-4-4-12."""
    try:
        return str(_uuid.UUID(value.strip()))
    except ValueError:
        raise IdentityError(f"not a UUID: {value!r}") from None


#: SMBIOS UUIDs that name no machine: unset, erased, and a vendor placeholder that
#: whole batches of boards ship with. Such machines are keyed by their boot MAC.
PLACEHOLDER_UUIDS = frozenset({
    "00000000-0000-0000-0000-000000000000",
    "ffffffff-ffff-ffff-ffff-ffffffffffff",
    "03000200-0400-0500-0006-000700080009",
})
_BY_MAC = _uuid.UUID("6b1d3c52-5e0f-4d6e-9a55-6e6574626f6f")  # netboot's uuid5 namespace


def node_uuid(uuid: str | None, mac: str | None) -> str | None:
    """The key a machine is registered under: its SMBIOS UUID, or, when it has none or a
    placeholder, a UUID made from its boot MAC (uuid5), so two boards that share a
    placeholder are two nodes. Both arguments in normal form."""
    if uuid is not None and uuid not in PLACEHOLDER_UUIDS:
        return uuid
    return str(_uuid.uuid5(_BY_MAC, mac)) if mac else None


def uuid_from_option97(value: bytes) -> str | None:
    """Option 97 (type 0 + 16 bytes) -> the UUID as dmidecode prints it.

    PXE ROMs and iPXE send the SMBIOS 2.6 on-wire order, whose first three
    fields are little-endian (RFC 4578 §2.3 defers to the EFI GUID layout), so
    they are swapped back here. All-zero and all-ones UUIDs mean "unknown".
    """
    if len(value) != 17 or value[0] != 0:
        return None
    raw = value[1:]
    if raw in (b"\0" * 16, b"\xff" * 16):
        return None
    h = (raw[3::-1] + raw[5:3:-1] + raw[7:5:-1] + raw[8:]).hex()  # = UUID(bytes_le=raw)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def uuid_to_option97(value: str) -> bytes:
    return b"\0" + _uuid.UUID(value).bytes_le


class Arch(Enum):
    """First-stage loader families. One value per distinct binary we hand out."""

    BIOS = "bios"
    UEFI_X86 = "uefi-x86"  # 32-bit UEFI (IA32)
    UEFI_X64 = "uefi-x64"
    UEFI_ARM32 = "uefi-arm32"
    UEFI_ARM64 = "uefi-arm64"
    UNKNOWN = "unknown"


# RFC 4578 §2.1 and the IANA "Processor Architecture Types" registry.
# 6 is IA32 UEFI; 7 is x64 UEFI; 9 was registered as "EFI x86-64" but early
# EDK2 and some ROMs sent 9 for what is really BC/x64, so 7 and 9 both mean x64.
_ARCH_CODES: dict[int, tuple[Arch, bool]] = {
    0: (Arch.BIOS, False),
    6: (Arch.UEFI_X86, False),
    7: (Arch.UEFI_X64, False),
    9: (Arch.UEFI_X64, False),
    10: (Arch.UEFI_ARM32, False),
    11: (Arch.UEFI_ARM64, False),
    15: (Arch.UEFI_X86, True),
    16: (Arch.UEFI_X64, True),
    18: (Arch.UEFI_ARM32, True),
    19: (Arch.UEFI_ARM64, True),
}


def arch_from_code(code: int | None) -> tuple[Arch, bool]:
    """Option 93 value -> (loader family, is UEFI HTTP boot). No option 93 means BIOS."""
    if code is None:
        return Arch.BIOS, False
    return _ARCH_CODES.get(code, (Arch.UNKNOWN, False))
