"""The TFTP codec, byte by byte."""

from __future__ import annotations

import pytest

from netboot.tftp import packet as pk


def test_parse_rrq_with_options_lowercases_names_and_first_wins() -> None:
    raw = b"\x00\x01boot/pxelinux.0\x00OCTET\x00BlkSize\x001468\x00TSIZE\x000\x00blksize\x00512\x00"
    req = pk.parse_request(raw)
    assert req.opcode == pk.RRQ
    assert req.filename == "boot/pxelinux.0"
    assert req.mode == "octet"
    assert req.options == {"blksize": "1468", "tsize": "0"}


def test_parse_request_tolerates_padding_and_dangling_option() -> None:
    assert pk.parse_request(b"\x00\x01f\x00octet\x00\x00\x00").options == {}
    assert pk.parse_request(b"\x00\x01f\x00octet\x00tsize\x00").options == {}


def test_parse_wrq() -> None:
    assert pk.parse_request(b"\x00\x02up\x00octet\x00").opcode == pk.WRQ


@pytest.mark.parametrize("raw", [
    b"", b"\x00", b"\x00\x01", b"\x00\x01f", b"\x00\x01f\x00octet",  # unterminated
    b"\x00\x01f\x00\x00",  # empty mode
    b"\x00\x03\x00\x01abc", b"\x00\x09f\x00octet\x00",  # not a request
])
def test_parse_request_rejects(raw: bytes) -> None:
    with pytest.raises(pk.MalformedPacket):
        pk.parse_request(raw)


def test_filename_bytes_survive() -> None:
    req = pk.parse_request(b"\x00\x01caf\xe9\x00octet\x00")
    assert req.filename.encode("utf-8", "surrogateescape") == b"caf\xe9"


def test_data_rolls_over_to_zero() -> None:
    assert pk.encode_data(1, b"ab") == b"\x00\x03\x00\x01ab"
    assert pk.encode_data(65535, b"") == b"\x00\x03\xff\xff"
    assert pk.encode_data(65536, b"x") == b"\x00\x03\x00\x00x"
    assert pk.parse_data(pk.encode_data(65537, b"yz")) == (1, b"yz")


def test_ack_roundtrip_and_padding() -> None:
    assert pk.encode_ack(7) == b"\x00\x04\x00\x07"
    assert pk.parse_ack(b"\x00\x04\x01\x00") == 256
    assert pk.parse_ack(b"\x00\x04\x00\x02junk") == 2
    for bad in (b"\x00\x04\x00", b"\x00\x03\x00\x01", b""):
        with pytest.raises(pk.MalformedPacket):
            pk.parse_ack(bad)


def test_error_roundtrip() -> None:
    raw = pk.encode_error(pk.ERR_NOT_FOUND, "file not found")
    assert raw == b"\x00\x05\x00\x01file not found\x00"
    assert pk.parse_error(raw) == (1, "file not found")
    assert pk.parse_error(b"\x00\x05\x00\x08no nul") == (8, "no nul")
    with pytest.raises(pk.MalformedPacket):
        pk.parse_error(b"\x00\x05\x00")


def test_oack_roundtrip() -> None:
    raw = pk.encode_oack({"blksize": "1468", "tsize": "99"})
    assert raw == b"\x00\x06blksize\x001468\x00tsize\x0099\x00"
    assert pk.parse_oack(raw) == {"blksize": "1468", "tsize": "99"}
    for bad in (b"\x00\x06a\x00", b"\x00\x06a\x00b", b"\x00\x04"):
        with pytest.raises(pk.MalformedPacket):
            pk.parse_oack(bad)


def test_encode_request_roundtrip() -> None:
    raw = pk.encode_request(pk.RRQ, "a/b", "octet", {"windowsize": "4"})
    req = pk.parse_request(raw)
    assert (req.filename, req.mode, req.options) == ("a/b", "octet", {"windowsize": "4"})


def test_opcode_of() -> None:
    assert pk.opcode_of(b"") == -1
    assert pk.opcode_of(b"\x00") == -1
    assert pk.opcode_of(b"\x00\x06") == pk.OACK
