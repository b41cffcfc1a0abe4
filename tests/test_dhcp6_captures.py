"""DHCPv6 as OVMF, iPXE and dhcrelay sent it in the e2e runs (tests/captures/*.hex,
written by tests/e2e/test_ipv6.py with NETBOOT_SAVE_CAPTURES): the codec
round-trips every datagram byte for byte, the responder answers the captured
requests as it did on the wire, and tshark dissects netboot's replies with no
malformed packet and no expert warning."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from netboot.boot.booter import Booter
from netboot.config import ConfigStore
from netboot.dhcp6 import packet as P
from netboot.dhcp6.responder import Dhcp6Responder, Leases
from netboot.metrics import Counters

CAPTURES = Path(__file__).parent / "captures"
SERVER = "fd00:77::2"


def load(path: Path) -> list[tuple[str, int, bytes]]:
    """(direction, port, datagram) per line: in = to netboot, out = from it."""
    out = []
    for line in path.read_text().split("\n"):
        if line.strip():
            direction, port, data = line.split()
            out.append((direction, int(port), bytes.fromhex(data)))
    return out


FILES = sorted(CAPTURES.glob("*.hex"))


def test_there_are_captures_of_each_e2e_run() -> None:
    names = {f.stem for f in FILES}
    assert {"ovmf-assign-direct", "ovmf-proxy", "ovmf-assign-relay"} <= names, names


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_codec_round_trips_every_captured_datagram(path: Path) -> None:
    packets = load(path)
    assert packets
    for _, _, data in packets:
        assert P.build(P.parse(data)) == data


def _inner(data: bytes) -> P.Message:
    pkt = P.parse(data)
    while isinstance(pkt, P.RelayMessage):
        pkt = P.parse(pkt.get(P.OPT_RELAY_MSG) or b"")
    return pkt


def answered(packets: list[tuple[str, int, bytes]]) -> list[tuple[int, bytes, bytes | None]]:
    """(port, request, netboot's answer or None) for each request, in wire order: the
    answer is the next datagram netboot sent with the request's transaction id
    before the next request came in."""
    out = []
    for i, (direction, port, data) in enumerate(packets):
        if direction != "in":
            continue
        xid, answer = _inner(data).xid, None
        for later_dir, _, later in packets[i + 1:]:
            if later_dir == "in":
                break
            if _inner(later).xid == xid:
                answer = later
                break
        out.append((port, data, answer))
    return out


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_responder_answers_the_captured_requests_as_on_the_wire(
        path: Path, store: ConfigStore) -> None:
    """Replayed in order into a responder set up as in that run, each captured
    request gets what it got on the wire: nothing, or an answer of the same type
    with the same boot URL, vendor class and relay framing."""
    packets = load(path)
    duid = next(_inner(d).get(P.OPT_SERVERID) for direction, _, d in packets
                if direction == "out")
    prefix = "fd00:78::" if "relay" in path.stem else "fd00:77::"
    responder = Dhcp6Responder(Booter(store, "10.77.0.2", 8080).over_ipv6(SERVER), SERVER,
                               duid or b"", Counters(),
                               leases=Leases(f"{prefix}1000", f"{prefix}1fff")
                               if "assign" in path.stem else None)
    answers = 0
    for port, request, want in answered(packets):
        got = responder.handle(request, port, ("fe80::5054:ff:fe00:1%eth0", port))
        if want is None:
            assert got is None, P.parse(request)
            continue
        assert got is not None, P.parse(request)
        assert got.data[0] == want[0]  # Advertise/Reply, or Relay-reply around one
        mine, theirs = _inner(got.data), _inner(want)
        assert mine.msg_type == theirs.msg_type
        for code in (P.OPT_BOOTFILE_URL, P.OPT_VENDOR_CLASS, P.OPT_CLIENTID):
            assert mine.get(code) == theirs.get(code), code
        answers += 1
    assert answers >= 2


def pcap_of(datagrams: list[tuple[int, bytes]], path: Path) -> Path:
    """Replies as netboot sent them (from ``port``), in a pcap for tshark."""
    from scapy.layers.inet import UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw
    from scapy.utils import wrpcap

    frames = [Ether() / IPv6(src=SERVER, dst="fe80::1")
              / UDP(sport=547 if port in (546, 547) else port, dport=port) / Raw(data)
              for port, data in datagrams]
    wrpcap(str(path), frames)
    return path


def tshark_problems(pcap: Path) -> str:
    """tshark's lines for frames that are malformed or carry an expert warning or error."""
    out = subprocess.run(["tshark", "-r", str(pcap), "-Y",
                          "_ws.malformed || _ws.expert.severity >= 0x00600000"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


needs_tshark = pytest.mark.skipif(shutil.which("tshark") is None,
                                  reason="tshark is not installed (scripts/setup.sh test)")


@needs_tshark
@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_tshark_finds_nothing_wrong_in_netboots_replies(path: Path, tmp_path: Path) -> None:
    ours = [(port, d) for direction, port, d in load(path) if direction == "out"]
    assert ours
    assert tshark_problems(pcap_of(ours, tmp_path / "replies.pcap")) == ""


@needs_tshark
def test_tshark_check_catches_a_broken_reply(tmp_path: Path) -> None:
    """The check above can fail: an IA_NA that lies about its length is reported."""
    bad = P.build(P.Message(P.REPLY, 1, [(P.OPT_SERVERID, P.duid_ll(b"\x02" * 6)),
                                         (P.OPT_IA_NA, b"\x00\x00\x00\x01\x00\x00")]))
    assert tshark_problems(pcap_of([(546, bad)], tmp_path / "bad.pcap")) != ""
