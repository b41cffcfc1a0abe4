"""DHCPv6 wire codec (RFC 8415, RFC 5970 boot options), sans-I/O, on ``struct``.

A message is a 1-byte type and a 3-byte transaction id, then options; a relay
message (Relay-forw, Relay-repl) is type, hop count, link address and peer
address, then options, one of which (9) carries the relayed message. Options are
2-byte code, 2-byte length, value; a code may repeat (several IA_NA), so they are
kept as an ordered list. Structure is checked strictly (lengths, nesting):
anything that lies raises :class:`MalformedPacket`, the v4 codec's error, so the
servers count one kind of drop. Content is read leniently: unknown options are
kept as raw bytes and written back unchanged.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ..dhcp.packet import MalformedPacket

__all__ = ["MalformedPacket"]

CLIENT_PORT = 546
SERVER_PORT = 547
#: All_DHCP_Relay_Agents_and_Servers (RFC 8415 §7.1)
ALL_SERVERS = "ff02::1:2"

# Message types (RFC 8415 §7.3)
SOLICIT = 1
ADVERTISE = 2
REQUEST = 3
CONFIRM = 4
RENEW = 5
REBIND = 6
REPLY = 7
RELEASE = 8
DECLINE = 9
RECONFIGURE = 10
INFORMATION_REQUEST = 11
RELAY_FORW = 12
RELAY_REPL = 13
RELAY_TYPES = (RELAY_FORW, RELAY_REPL)

# Option codes (RFC 8415 §21, RFC 5970, RFC 6939)
OPT_CLIENTID = 1
OPT_SERVERID = 2
OPT_IA_NA = 3
OPT_IA_TA = 4
OPT_IAADDR = 5
OPT_ORO = 6
OPT_PREFERENCE = 7
OPT_ELAPSED_TIME = 8
OPT_RELAY_MSG = 9
OPT_STATUS_CODE = 13
OPT_RAPID_COMMIT = 14
OPT_USER_CLASS = 15
OPT_VENDOR_CLASS = 16
OPT_VENDOR_OPTS = 17
OPT_INTERFACE_ID = 18
OPT_DNS_SERVERS = 23
OPT_BOOTFILE_URL = 59
OPT_BOOTFILE_PARAM = 60
OPT_CLIENT_ARCH_TYPE = 61
OPT_NII = 62
OPT_CLIENT_LINKLAYER_ADDR = 79

# Status codes (RFC 8415 §21.13)
STATUS_SUCCESS = 0
STATUS_UNSPEC_FAIL = 1
STATUS_NO_ADDRS_AVAIL = 2
STATUS_NO_BINDING = 3
STATUS_NOT_ON_LINK = 4
STATUS_USE_MULTICAST = 5

# DUID types (RFC 8415 §11)
DUID_LLT = 1
DUID_EN = 2
DUID_LL = 3
DUID_UUID = 4
HWTYPE_ETHERNET = 1

#: relays nest at most this deep (HOP_COUNT_LIMIT, RFC 8415 §7.6)
HOP_COUNT_LIMIT = 8
#: UEFI's and PXE's vendor class enterprise number (Intel's, used by EDK2 and iPXE)
ENTERPRISE_PXE = 343

_HEAD = struct.Struct("!I")  # type (8 bits) + transaction id (24 bits)
_RELAY_HEAD = struct.Struct("!BB16s16s")
_OPT = struct.Struct("!HH")
_IA = struct.Struct("!III")  # IAID, T1, T2
_IAADDR = struct.Struct("!16sII")  # address, preferred, valid lifetime
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


Options = list[tuple[int, bytes]]


@dataclass(slots=True)
class Message:
    """A client or server message (every type but the relay ones)."""

    msg_type: int
    xid: int  # 24 bits
    options: Options = field(default_factory=list)

    def get(self, code: int) -> bytes | None:
        return first(self.options, code)


@dataclass(slots=True)
class RelayMessage:
    """Relay-forw or Relay-repl: ``link`` and ``peer`` are 16-byte addresses; the
    relayed message is option 9's value (see :attr:`inner`)."""

    msg_type: int
    hop_count: int
    link: bytes
    peer: bytes
    options: Options = field(default_factory=list)

    def get(self, code: int) -> bytes | None:
        return first(self.options, code)


Packet = Message | RelayMessage


def first(options: Options, code: int) -> bytes | None:
    for c, v in options:
        if c == code:
            return v
    return None


def parse_options(data: bytes, pos: int = 0, end: int | None = None) -> Options:
    """TLVs from ``pos`` to ``end``; every byte must belong to a whole option."""
    end = len(data) if end is None else end
    out: Options = []
    while pos < end:
        if pos + 4 > end:
            raise MalformedPacket(f"option header truncated at byte {pos}")
        code, length = _OPT.unpack_from(data, pos)
        start = pos + 4
        stop = start + length
        if stop > end:
            raise MalformedPacket(f"option {code} length {length} runs past its container")
        out.append((code, data[start:stop]))
        pos = stop
    return out


def parse(data: bytes) -> Packet:
    """Decode one message. A relay message's option 9 must itself parse (relays
    nest up to HOP_COUNT_LIMIT deep), so a valid result can be walked without checks."""
    return _parse(data, 0)


def _parse(data: bytes, depth: int) -> Packet:
    if len(data) < 4:
        raise MalformedPacket(f"short DHCPv6 message ({len(data)} bytes)")
    msg_type = data[0]
    if msg_type == 0:
        raise MalformedPacket("message type 0")
    if msg_type in RELAY_TYPES:
        if len(data) < _RELAY_HEAD.size:
            raise MalformedPacket(f"short relay message ({len(data)} bytes)")
        if depth > HOP_COUNT_LIMIT:
            raise MalformedPacket("relay messages nested too deep")
        _, hops, link, peer = _RELAY_HEAD.unpack_from(data)
        options = parse_options(data, _RELAY_HEAD.size)
        inner = first(options, OPT_RELAY_MSG)
        if inner is None:
            raise MalformedPacket("relay message without a relayed message (option 9)")
        _parse(inner, depth + 1)
        return RelayMessage(msg_type, hops, link, peer, options)
    xid = _HEAD.unpack_from(data)[0] & 0xFFFFFF
    return Message(msg_type, xid, parse_options(data, 4))


def encode_option(code: int, value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError(f"option {code} value of {len(value)} bytes is too long")
    return _OPT.pack(code, len(value)) + value


def encode_options(options: Options) -> bytes:
    return b"".join(encode_option(c, v) for c, v in options)


def build(pkt: Packet) -> bytes:
    if isinstance(pkt, RelayMessage):
        return _RELAY_HEAD.pack(pkt.msg_type, pkt.hop_count, pkt.link, pkt.peer) + \
            encode_options(pkt.options)
    return _HEAD.pack((pkt.msg_type << 24) | (pkt.xid & 0xFFFFFF)) + encode_options(pkt.options)


# -- option values ---------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class IaAddress:
    address: bytes  # 16 bytes
    preferred: int
    valid: int
    options: tuple[tuple[int, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class IaNa:
    iaid: int
    t1: int
    t2: int
    options: tuple[tuple[int, bytes], ...] = ()

    @property
    def addresses(self) -> list[IaAddress]:
        return [decode_iaaddr(v) for c, v in self.options if c == OPT_IAADDR]


def _fixed(value: bytes, fmt: struct.Struct, what: str) -> tuple[tuple, Options]:
    """An option value made of fixed fields, then options (IA_NA, IA address)."""
    if len(value) < fmt.size:
        raise MalformedPacket(f"{what} of {len(value)} bytes")
    return fmt.unpack_from(value), parse_options(value, fmt.size)


def decode_ia_na(value: bytes) -> IaNa:
    (iaid, t1, t2), opts = _fixed(value, _IA, "IA_NA")
    return IaNa(iaid, t1, t2, tuple(opts))


def decode_iaaddr(value: bytes) -> IaAddress:
    (addr, pref, valid), opts = _fixed(value, _IAADDR, "IA address")
    return IaAddress(addr, pref, valid, tuple(opts))


def encode_ia_na(ia: IaNa) -> bytes:
    return _IA.pack(ia.iaid, ia.t1, ia.t2) + encode_options(list(ia.options))


def encode_iaaddr(a: IaAddress) -> bytes:
    return _IAADDR.pack(a.address, a.preferred, a.valid) + encode_options(list(a.options))


def status(code: int, message: str = "") -> bytes:
    """A Status Code option's value (RFC 8415 §21.13): code, then UTF-8 text."""
    return _U16.pack(code) + message.encode()


def decode_status(value: bytes) -> tuple[int, str]:
    if len(value) < 2:
        raise MalformedPacket("status code of fewer than 2 bytes")
    return _U16.unpack_from(value)[0], value[2:].decode("utf-8", "replace")


def decode_oro(value: bytes) -> list[int]:
    if len(value) % 2:
        raise MalformedPacket("option request option of odd length")
    return [c for (c,) in struct.iter_unpack("!H", value)]


def decode_arch(value: bytes) -> list[int]:
    """Option 61: a list of 16-bit architecture types (RFC 5970 §3.3)."""
    if not value or len(value) % 2:
        raise MalformedPacket("client architecture option of odd or no length")
    return [c for (c,) in struct.iter_unpack("!H", value)]


def _strings(value: bytes, pos: int, what: str) -> list[bytes]:
    """A list of 2-byte-length-prefixed opaque strings (user class, vendor class)."""
    out = []
    while pos < len(value):
        if pos + 2 > len(value):
            raise MalformedPacket(f"{what} entry truncated")
        (n,) = _U16.unpack_from(value, pos)
        if pos + 2 + n > len(value):
            raise MalformedPacket(f"{what} entry runs past the option")
        out.append(value[pos + 2:pos + 2 + n])
        pos += 2 + n
    return out


def encode_strings(items: list[bytes]) -> bytes:
    return b"".join(_U16.pack(len(i)) + i for i in items)


def decode_user_class(value: bytes) -> list[bytes]:
    return _strings(value, 0, "user class")


def decode_vendor_class(value: bytes) -> tuple[int, list[bytes]]:
    """Option 16: enterprise number, then class strings (RFC 8415 §21.16)."""
    if len(value) < 4:
        raise MalformedPacket("vendor class shorter than its enterprise number")
    return _U32.unpack_from(value)[0], _strings(value, 4, "vendor class")


def encode_vendor_class(enterprise: int, items: list[bytes]) -> bytes:
    return _U32.pack(enterprise) + encode_strings(items)


def encode_bootfile_params(params: list[str]) -> bytes:
    """Option 60 (RFC 5970 §3.2): each parameter as a 2-byte length and UTF-8."""
    return encode_strings([p.encode() for p in params])


def mac_from_duid(duid: bytes) -> bytes | None:
    """The Ethernet address in a DUID-LLT or DUID-LL, else None (DUID-EN and
    DUID-UUID carry none)."""
    if len(duid) < 4:
        return None
    kind, hw = struct.unpack_from("!HH", duid)
    if hw != HWTYPE_ETHERNET:
        return None
    if kind == DUID_LLT and len(duid) == 14:
        return duid[8:14]
    if kind == DUID_LL and len(duid) == 10:
        return duid[4:10]
    return None


def uuid_from_duid(duid: bytes) -> bytes | None:
    """DUID-UUID's 16 bytes (RFC 6355), else None."""
    if len(duid) == 18 and duid[:2] == b"\x00\x04":
        return duid[2:]
    return None


def duid_ll(mac: bytes) -> bytes:
    """A DUID-LL for an Ethernet address (a server's own identifier)."""
    return struct.pack("!HH", DUID_LL, HWTYPE_ETHERNET) + mac
