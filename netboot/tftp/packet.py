"""TFTP wire format (RFC 1350, 2347): parse and build packets, nothing else.

Kept free of I/O and policy so the session state machine and the socket layer
share one codec and the codec can be tested byte by byte.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

RRQ = 1
WRQ = 2
DATA = 3
ACK = 4
ERROR = 5
OACK = 6

# RFC 1350 / 2347 error codes.
ERR_UNDEFINED = 0
ERR_NOT_FOUND = 1
ERR_ACCESS = 2
ERR_DISK_FULL = 3
ERR_ILLEGAL = 4
ERR_UNKNOWN_TID = 5
ERR_EXISTS = 6
ERR_NO_USER = 7
ERR_OPTION = 8

_HDR = struct.Struct("!HH")
_ACK_PREFIX = b"\x00\x04"
_ERROR_PREFIX = b"\x00\x05"


class MalformedPacket(ValueError):
    """The bytes are not a TFTP packet we can make sense of; the caller drops and counts it."""


@dataclass(slots=True)
class Request:
    """A parsed RRQ or WRQ. Option names are lower-cased; the first occurrence wins."""

    opcode: int
    filename: str
    mode: str
    options: dict[str, str] = field(default_factory=dict)


def _text(raw: bytes) -> str:
    # surrogateescape keeps arbitrary filename bytes round-trippable to the filesystem.
    return raw.decode("utf-8", "surrogateescape")


def parse_request(data: bytes) -> Request:
    """Parse an RRQ/WRQ. Lenient about extra trailing NULs, strict about everything else."""
    if len(data) < 4:
        raise MalformedPacket("short request")
    opcode = (data[0] << 8) | data[1]
    if opcode not in (RRQ, WRQ):
        raise MalformedPacket("not a request")
    parts = data[2:].split(b"\0")
    if len(parts) < 3 or parts[-1] != b"":
        raise MalformedPacket("unterminated request")
    filename, mode = _text(parts[0]), _text(parts[1]).lower()
    if not mode:
        raise MalformedPacket("empty mode")
    options: dict[str, str] = {}
    rest = parts[2:-1]  # an odd leftover or empty name (padding NULs) is ignored
    for i in range(0, len(rest) - 1, 2):
        name = _text(rest[i]).lower()
        if name and name not in options:
            options[name] = _text(rest[i + 1])
    return Request(opcode, filename, mode, options)


def opcode_of(data: bytes) -> int:
    """Opcode of a packet, or -1 if it is too short to have one."""
    if len(data) < 2:
        return -1
    return (data[0] << 8) | data[1]


def parse_ack(data: bytes) -> int:
    """Block number of an ACK (trailing bytes ignored, as some clients pad)."""
    if len(data) < 4 or data[0] != 0 or data[1] != ACK:
        raise MalformedPacket("not an ack")
    return (data[2] << 8) | data[3]


def parse_error(data: bytes) -> tuple[int, str]:
    """(code, message) of an ERROR packet; a missing terminator is tolerated."""
    if len(data) < 4 or data[0] != 0 or data[1] != ERROR:
        raise MalformedPacket("not an error")
    code = (data[2] << 8) | data[3]
    msg = data[4:].split(b"\0", 1)[0]
    return code, msg.decode("utf-8", "replace")


def parse_data(data: bytes) -> tuple[int, bytes]:
    """(block, payload) of a DATA packet; used by tests and tools acting as a client."""
    if len(data) < 4 or data[0] != 0 or data[1] != DATA:
        raise MalformedPacket("not data")
    return (data[2] << 8) | data[3], data[4:]


def parse_oack(data: bytes) -> dict[str, str]:
    """Options of an OACK packet (lower-cased names)."""
    if len(data) < 2 or data[0] != 0 or data[1] != OACK:
        raise MalformedPacket("not an oack")
    parts = data[2:].split(b"\0")
    if parts[-1] != b"":
        raise MalformedPacket("unterminated oack")
    parts = parts[:-1]
    if len(parts) % 2:
        raise MalformedPacket("odd oack")
    return {_text(parts[i]).lower(): _text(parts[i + 1]) for i in range(0, len(parts), 2)}


def encode_data(block: int, payload: bytes) -> bytes:
    """DATA packet; block is taken modulo 65536 (rollover to 0)."""
    return _HDR.pack(DATA, block & 0xFFFF) + payload


def encode_ack(block: int) -> bytes:
    return _ACK_PREFIX + (block & 0xFFFF).to_bytes(2, "big")


def encode_error(code: int, message: str) -> bytes:
    text = message.encode("utf-8", "replace")
    return _ERROR_PREFIX + (code & 0xFFFF).to_bytes(2, "big") + text + b"\0"


def encode_oack(options: dict[str, str]) -> bytes:
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in options.items())
    return b"\x00\x06" + body


def encode_request(opcode: int, filename: str, mode: str = "octet",
                   options: dict[str, str] | None = None) -> bytes:
    """RRQ/WRQ bytes; the server never sends one, tests and probes do."""
    out = [opcode.to_bytes(2, "big"), filename.encode("utf-8", "surrogateescape"), b"\0",
           mode.encode(), b"\0"]
    for k, v in (options or {}).items():
        out += [k.encode(), b"\0", v.encode(), b"\0"]
    return b"".join(out)
