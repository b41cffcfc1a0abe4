"""DHCP/BOOTP wire codec built on ``struct``: about 10 µs a packet, against
hundreds for scapy, which is why the hot path never touches scapy.

Parsing is strict about structure (a packet that lies about lengths raises
``MalformedPacket``) and lenient about content (unknown options are kept as
raw bytes), so one bad packet costs a counter increment and nothing else.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

MAGIC = b"\x63\x82\x53\x63"
_HEADER = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")  # 236 bytes, RFC 2131 figure 1
HEADER_LEN = _HEADER.size
MIN_LEN = HEADER_LEN + len(MAGIC)

BOOTREQUEST = 1
BOOTREPLY = 2

# Option codes used by ProxyDHCP (RFC 2132, 4578, 3046, PXE 2.1).
OPT_PAD = 0
OPT_SUBNET_MASK = 1
OPT_HOSTNAME = 12
OPT_REQUESTED_IP = 50
OPT_OVERLOAD = 52
OPT_MESSAGE_TYPE = 53
OPT_SERVER_ID = 54
OPT_PARAM_REQUEST = 55
OPT_MAX_SIZE = 57
OPT_VENDOR_CLASS = 60
OPT_CLIENT_ID = 61
OPT_TFTP_SERVER = 66
OPT_BOOTFILE = 67
OPT_USER_CLASS = 77
OPT_RELAY_AGENT = 82
OPT_CLIENT_ARCH = 93
OPT_CLIENT_NDI = 94
OPT_CLIENT_UUID = 97
OPT_VENDOR_SPECIFIC = 43
OPT_IPXE_ENCAP = 175
OPT_END = 255

DISCOVER = 1
OFFER = 2
REQUEST = 3
DECLINE = 4
ACK = 5
NAK = 6
RELEASE = 7
INFORM = 8

FLAG_BROADCAST = 0x8000


class MalformedPacket(ValueError):
    """The bytes are not a DHCP packet we can read; the reason is for a debug log."""


@dataclass(slots=True)
class DhcpPacket:
    op: int
    htype: int
    hlen: int
    hops: int
    xid: int
    secs: int
    flags: int
    ciaddr: bytes
    yiaddr: bytes
    siaddr: bytes
    giaddr: bytes
    chaddr: bytes  # 16 bytes as on the wire
    sname: bytes = b""
    file: bytes = b""
    options: dict[int, bytes] = field(default_factory=dict)
    #: option codes in the order they appeared, for tests and diagnostics
    order: list[int] = field(default_factory=list)

    @property
    def mac(self) -> bytes:
        return self.chaddr[: min(self.hlen, 16)]

    @property
    def message_type(self) -> int | None:
        v = self.options.get(OPT_MESSAGE_TYPE)
        return v[0] if v and len(v) == 1 else None


def parse(data: bytes) -> DhcpPacket:
    """Decode a DHCP packet, honouring option overload (RFC 2132 §9.3)."""
    if len(data) < MIN_LEN:
        raise MalformedPacket(f"short packet ({len(data)} bytes)")
    (op, htype, hlen, hops, xid, secs, flags, ci, yi, si, gi, chaddr, sname, bfile) = (
        _HEADER.unpack_from(data)
    )
    if data[HEADER_LEN:MIN_LEN] != MAGIC:
        raise MalformedPacket("no DHCP magic cookie")
    if hlen > 16:
        raise MalformedPacket(f"hlen {hlen} > 16")
    options: dict[int, bytes] = {}
    order: list[int] = []
    _parse_options(data, MIN_LEN, len(data), options, order)
    overload = options.get(OPT_OVERLOAD)
    if overload is not None:
        if len(overload) != 1 or overload[0] not in (1, 2, 3):
            raise MalformedPacket("bad option overload value")
        base = 44  # offset of sname in the header
        if overload[0] & 1:
            _parse_options(data, base + 64, base + 64 + 128, options, order)  # file field
            bfile = b""
        if overload[0] & 2:
            _parse_options(data, base, base + 64, options, order)  # sname field
            sname = b""
    return DhcpPacket(
        op, htype, hlen, hops, xid, secs, flags, ci, yi, si, gi, chaddr,
        sname.split(b"\0", 1)[0], bfile.split(b"\0", 1)[0], options, order,
    )


def _parse_options(data: bytes, pos: int, end: int, out: dict[int, bytes],
                   order: list[int]) -> None:
    """Options are TLVs; a repeated code is concatenated (RFC 3396 long options)."""
    while pos < end:
        code = data[pos]
        if code == OPT_PAD:
            pos += 1
            continue
        if code == OPT_END:
            return
        if pos + 1 >= end:
            raise MalformedPacket(f"option {code} truncated before its length")
        length = data[pos + 1]
        start = pos + 2
        stop = start + length
        if stop > end:
            raise MalformedPacket(f"option {code} length {length} runs past the packet")
        value = data[start:stop]
        if code in out:
            out[code] += value
        else:
            out[code] = value
            order.append(code)
        pos = stop
    # Running off the end without END is tolerated: several ROMs do it.


def build(pkt: DhcpPacket, min_size: int = 300) -> bytes:
    """Encode a packet; options go out in insertion order, long values split per RFC 3396."""
    parts = [
        _HEADER.pack(
            pkt.op, pkt.htype, pkt.hlen, pkt.hops, pkt.xid, pkt.secs, pkt.flags,
            pkt.ciaddr, pkt.yiaddr, pkt.siaddr, pkt.giaddr,
            pkt.chaddr.ljust(16, b"\0")[:16], pkt.sname[:63].ljust(64, b"\0"),
            pkt.file[:127].ljust(128, b"\0"),
        ),
        MAGIC,
    ]
    for code, value in pkt.options.items():
        parts.append(encode_option(code, value))
    parts.append(b"\xff")
    out = b"".join(parts)
    if len(out) < min_size:  # BOOTP minimum; some ROMs drop shorter replies
        out += b"\0" * (min_size - len(out))
    return out


def encode_option(code: int, value: bytes) -> bytes:
    """One option as TLVs; a value over 255 bytes is split (RFC 3396)."""
    if len(value) <= 255:
        return bytes((code, len(value))) + value
    return b"".join(bytes((code, len(value[i:i + 255]))) + value[i:i + 255]
                    for i in range(0, len(value), 255))


def encode_suboptions(subs: list[tuple[int, bytes]]) -> bytes:
    """Encapsulated options (option 43, 175): TLVs terminated by END."""
    out = bytearray()
    for code, value in subs:
        out += bytes((code, len(value))) + value
    out.append(OPT_END)
    return bytes(out)


def decode_suboptions(value: bytes) -> dict[int, bytes]:
    """Lenient decode of encapsulated options; stops at END or at a truncated entry."""
    out: dict[int, bytes] = {}
    pos = 0
    while pos < len(value):
        code = value[pos]
        if code == OPT_PAD:
            pos += 1
            continue
        if code == OPT_END or pos + 1 >= len(value):
            break
        length = value[pos + 1]
        out[code] = value[pos + 2 : pos + 2 + length]
        pos += 2 + length
    return out
