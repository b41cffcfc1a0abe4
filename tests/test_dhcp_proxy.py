"""ProxyDHCP policy and codec, without sockets. scapy is the independent oracle:
it builds the requests (as a PXE ROM, iPXE, a relay would) and parses our answers."""

from __future__ import annotations

import uuid as uuidlib

import pytest
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from netboot.boot.booter import Booter
from netboot.boot.newnodes import Source
from netboot.boot.spec import Client
from netboot.config import ConfigStore
from netboot.dhcp import packet as P
from netboot.dhcp.proxy import ProxyDhcp
from netboot.identity import uuid_to_option97
from netboot.metrics import Counters

MAC = "52:54:00:12:34:56"
UUID = "8dc30e79-5115-44b3-a5e3-4e5cbc62d3a2"


def request(mtype: str = "discover", *, mac: str = MAC, arch: int | None = 0,
            vendor: bytes | None = b"PXEClient:Arch:00000:UNDI:002001", ipxe: bool = False,
            uuid: str | None = UUID, giaddr: str = "0.0.0.0", relay: bytes | None = None,
            ciaddr: str = "0.0.0.0", requested: str | None = None) -> bytes:
    opts: list = [("message-type", mtype)]
    if requested is not None:
        opts.append(("requested_addr", requested))
    if vendor is not None:
        opts.append(("vendor_class_id", vendor))
    if arch is not None:
        opts.append((93, arch.to_bytes(2, "big")))
    if uuid is not None:
        opts.append((97, uuid_to_option97(uuid)))
    if ipxe:
        opts += [("user_class", b"iPXE"), (175, b"\xb1\x05\x01\x80\x86\x10\x0e")]
    if relay is not None:
        opts.append(("relay_agent_information", relay))
    opts.append("end")
    pkt = BOOTP(op=1, chaddr=bytes.fromhex(mac.replace(":", "")) + b"\0" * 10, xid=0x1234abcd,
                flags=0x8000, giaddr=giaddr, ciaddr=ciaddr) / DHCP(options=opts)
    return bytes(pkt)


def decode(data: bytes) -> tuple[BOOTP, dict]:
    bootp = BOOTP(data)
    opts = {}
    for o in bootp[DHCP].options:
        if isinstance(o, tuple):
            opts[o[0]] = o[1] if len(o) == 2 else o[1:]
    return bootp, opts


@pytest.fixture
def proxy(store: ConfigStore) -> ProxyDhcp:
    return ProxyDhcp(Booter(store, "10.0.0.2", 8080), "10.0.0.2", Counters())


def test_bios_rom_gets_undionly_over_tftp(proxy: ProxyDhcp) -> None:
    reply = proxy.handle(request(), 67, ("0.0.0.0", 68))
    assert reply is not None and (reply.address, reply.port) == ("255.255.255.255", 68)
    bootp, opts = decode(reply.data)
    assert bootp.op == 2 and bootp.xid == 0x1234abcd
    assert bootp.yiaddr == "0.0.0.0"  # a proxy never hands out addresses
    assert bootp.siaddr == "10.0.0.2"
    assert bootp.file.rstrip(b"\0") == b"undionly.kpxe"
    assert opts["message-type"] == 2  # OFFER
    assert opts["server_id"] == "10.0.0.2"
    assert opts["vendor_class_id"] == b"PXEClient"
    assert opts["pxe_client_machine_identifier"] == uuid_to_option97(UUID)  # echoed
    assert P.decode_suboptions(opts["vendor_specific"]) == {6: b"\x08"}
    assert proxy.counters.get("dhcp_offers_total", arch="bios", ipxe="no") == 1


@pytest.mark.parametrize("code", [7, 9])
def test_uefi_x64_gets_ipxe_efi_with_the_7_9_swap(proxy: ProxyDhcp, code: int) -> None:
    reply = proxy.handle(request(arch=code, vendor=b"PXEClient:Arch:%05d:UNDI:003016" % code),
                         67, ("0.0.0.0", 68))
    assert reply is not None
    assert decode(reply.data)[0].file.rstrip(b"\0") == b"ipxe.efi"


def test_arch_from_vendor_class_when_option_93_is_missing(proxy: ProxyDhcp) -> None:
    reply = proxy.handle(request(arch=None, vendor=b"PXEClient:Arch:00007:UNDI:003016"),
                         67, ("0.0.0.0", 68))
    assert reply is not None and decode(reply.data)[0].file.rstrip(b"\0") == b"ipxe.efi"


def test_ipxe_gets_the_http_script_never_a_loader(proxy: ProxyDhcp) -> None:
    reply = proxy.handle(request(ipxe=True), 67, ("0.0.0.0", 68))
    assert reply is not None
    bootp, opts = decode(reply.data)
    assert bootp.file.rstrip(b"\0") == b"http://10.0.0.2:8080/boot.ipxe"
    assert bootp.siaddr == "10.0.0.2"  # iPXE accepts a proxy answer only with siaddr + file
    assert "vendor_specific" not in opts


def test_http_boot_client_gets_a_url_and_httpclient_echoed(proxy: ProxyDhcp) -> None:
    reply = proxy.handle(request(arch=16, vendor=b"HTTPClient:Arch:00016:UNDI:003001"),
                         67, ("0.0.0.0", 68))
    assert reply is not None
    bootp, opts = decode(reply.data)
    assert bootp.file.rstrip(b"\0") == b"http://10.0.0.2:8080/loader/ipxe.efi"
    assert opts["vendor_class_id"] == b"HTTPClient"


def test_pxelinux_profile_by_mac(proxy: ProxyDhcp) -> None:
    reply = proxy.handle(request(mac="52:54:00:00:00:01", ipxe=True), 67, ("0.0.0.0", 68))
    assert reply is not None and decode(reply.data)[0].file.rstrip(b"\0") == b"pxelinux.0"


def test_port_4011_request_gets_an_ack_by_unicast(proxy: ProxyDhcp) -> None:
    data = request("request", ciaddr="10.0.0.50")
    reply = proxy.handle(data, 4011, ("10.0.0.50", 68))
    assert reply is not None and (reply.address, reply.port) == ("10.0.0.50", 68)
    bootp, opts = decode(reply.data)
    assert opts["message-type"] == 5  # ACK
    assert bootp.ciaddr == "10.0.0.50"
    assert proxy.counters.total("dhcp_acks_total") == 1


def test_relay_gets_unicast_on_67_with_option_82_echoed(proxy: ProxyDhcp) -> None:
    agent = b"\x01\x04rack\x02\x06switch"
    reply = proxy.handle(request(giaddr="10.9.0.1", relay=agent), 67, ("10.9.0.1", 67))
    assert reply is not None and (reply.address, reply.port) == ("10.9.0.1", 67)
    bootp, opts = decode(reply.data)
    assert bootp.giaddr == "10.9.0.1"
    assert opts["relay_agent_information"] == agent


@pytest.mark.parametrize("case,data,port,reason", [
    ("plain DHCP client", dict(vendor=None), 67, "not-pxe"),
    ("other vendor class", dict(vendor=b"MSFT 5.0"), 67, "not-pxe"),
    ("request on 67", dict(mtype="request"), 67, "message-type"),
    ("discover on 4011", dict(mtype="discover"), 4011, "message-type"),
    ("unknown arch", dict(arch=0x99, vendor=b"PXEClient"), 67, "policy"),
    ("netboot: false", dict(mac="52:54:00:00:00:0f"), 67, "policy"),
])
def test_ignored_and_counted(proxy: ProxyDhcp, case: str, data: dict, port: int,
                             reason: str) -> None:
    assert proxy.handle(request(**data), port, ("0.0.0.0", 68)) is None, case
    assert proxy.counters.get("dhcp_ignored_total", reason=reason) == 1, case


def test_no_default_profile_means_unknown_machines_are_ignored(config_tree) -> None:
    text = config_tree.read_text() + "default_profile: null\n"
    config_tree.write_text(text)
    store = ConfigStore(config_tree)
    proxy = ProxyDhcp(Booter(store, "10.0.0.2", 8080), "10.0.0.2")
    assert proxy.handle(request(), 67, ("0.0.0.0", 68)) is None
    # but a machine with a file still boots
    assert proxy.handle(request(mac="52:54:00:00:00:01"), 67, ("0.0.0.0", 68)) is not None


def test_uuid_machine_match_uses_dmidecode_form(proxy: ProxyDhcp) -> None:
    seen: list[Client] = []
    proxy.report = lambda client, offer: seen.append(client)
    proxy.handle(request(uuid="11111111-2222-3333-4444-555555555555", ipxe=True), 67,
                 ("0.0.0.0", 68))
    assert [(c.mac, c.uuid) for c in seen] == [(MAC, "11111111-2222-3333-4444-555555555555")]


def test_option97_is_swapped_to_smbios_order() -> None:
    from netboot.identity import uuid_from_option97

    u = uuidlib.UUID(UUID)
    # On the wire the first three fields are little-endian (what QEMU guests sent).
    assert uuid_from_option97(b"\0" + u.bytes_le) == UUID
    assert uuid_from_option97(b"\0" + b"\0" * 16) is None
    assert uuid_from_option97(b"\1" + u.bytes_le) is None
    assert uuid_from_option97(b"\0" + u.bytes[:10]) is None


@pytest.mark.parametrize("data", [
    b"", b"\x01" * 10, b"\x01" * 240,  # short, no magic
    request()[:240] + b"\x35",  # option truncated before its length
    request()[:240] + b"\x35\x09\x01",  # length past the end
])
def test_malformed_is_dropped_and_counted(proxy: ProxyDhcp, data: bytes) -> None:
    assert proxy.handle(data, 67, ("0.0.0.0", 68)) is None
    assert proxy.counters.total("dhcp_malformed_total") == 1


def test_option_overload_is_read() -> None:
    base = bytearray(request(vendor=None, arch=None, uuid=None))
    # put option 60 PXEClient into the sname field and declare overload=2
    sname = b"\x3c\x09PXEClient\xff"
    base[44:44 + len(sname)] = sname
    end = base.index(b"\xff", 240)
    base[end:end] = b"\x34\x01\x02"
    pkt = P.parse(bytes(base))
    assert pkt.options[P.OPT_VENDOR_CLASS] == b"PXEClient"
    assert pkt.sname == b""


def test_codec_round_trip_and_long_options() -> None:
    pkt = P.parse(request(ipxe=True))
    pkt.options[P.OPT_BOOTFILE] = b"x" * 300  # split per RFC 3396 and joined back
    again = P.parse(P.build(pkt))
    assert again.options[P.OPT_BOOTFILE] == b"x" * 300
    assert again.options[P.OPT_USER_CLASS] == b"iPXE"
    assert again.xid == pkt.xid and again.mac == pkt.mac


def test_scapy_reads_a_full_ethernet_frame_of_our_reply(proxy: ProxyDhcp) -> None:
    reply = proxy.handle(request(), 67, ("0.0.0.0", 68))
    assert reply is not None
    frame = Ether() / IP(dst="255.255.255.255") / UDP(sport=67, dport=68) / reply.data
    parsed = Ether(bytes(frame))
    assert parsed[BOOTP].file.rstrip(b"\0") == b"undionly.kpxe"
    assert len(reply.data) >= 300  # BOOTP minimum size


def test_relayed_offer_sets_broadcast_so_the_relay_can_deliver_it(proxy: ProxyDhcp) -> None:
    """iPXE clears BROADCAST; a relay would then unicast to yiaddr, which a proxy
    offer leaves empty, and the offer would be lost (seen with dnsmasq's relay)."""
    data = bytearray(request(giaddr="10.9.0.1", ipxe=True))
    data[10:12] = b"\0\0"  # flags: BROADCAST cleared, as iPXE sends it
    reply = proxy.handle(bytes(data), 67, ("10.9.0.1", 67))
    assert reply is not None
    assert decode(reply.data)[0].flags & 0x8000


def test_decision_log_is_rate_limited_and_counted(proxy: ProxyDhcp,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    from netboot.dhcp.proxy import LOG_BURST

    caplog.set_level("INFO", logger="netboot.dhcp")
    n = LOG_BURST + 300
    for i in range(n):  # distinct clients: each decision is new
        mac = f"52:54:01:00:{i // 256:02x}:{i % 256:02x}"
        assert proxy.handle(request(mac=mac, uuid=None), 67, ("0.0.0.0", 68)) is not None
    logged = [r for r in caplog.records if r.getMessage().startswith("boot decision")]
    suppressed = proxy.counters.total("dhcp_log_suppressed_total")
    assert LOG_BURST <= len(logged) < n
    assert len(logged) + suppressed == n


def test_placeholder_option97_is_keyed_by_mac(proxy: ProxyDhcp) -> None:
    from netboot.identity import node_uuid

    seen: list[Client] = []
    proxy.report = lambda client, offer: seen.append(client)
    for mac in ("52:54:00:00:09:01", "52:54:00:00:09:02"):
        proxy.handle(request(uuid="03000200-0400-0500-0006-000700080009", mac=mac), 67,
                     ("0.0.0.0", 68))
    assert [c.uuid for c in seen] == [node_uuid(None, c.mac) for c in seen]
    assert len({c.uuid for c in seen}) == 2


def test_the_segment_a_request_came_from(store: ConfigStore) -> None:
    """What limits.new_nodes calls a DHCP source: the relay and its circuit (option 82),
    or this link; never the client's own MAC or UUID."""
    seen: list[Client] = []
    proxy = ProxyDhcp(Booter(store, "10.0.0.2", 8080), "10.0.0.2", Counters(),
                      report=lambda c, o: seen.append(c))
    agent = P.encode_suboptions([(1, b"port7"), (2, b"sw1")])[:-1]
    for kw in ({}, {"giaddr": "10.9.0.1"}, {"giaddr": "10.9.0.1", "relay": agent},
               {"giaddr": "10.9.0.1", "relay": agent, "mac": "52:54:00:99:99:99"}):
        assert proxy.handle(request(**kw), 67, ("10.9.0.1", 67)) is not None
    assert [Source.dhcp(c.giaddr, c.agent) for c in seen] == [
        Source("dhcp on this link", segment=True), Source("dhcp relay 10.9.0.1", segment=True),
        Source(f"dhcp relay 10.9.0.1 option 82 {agent.hex()}", segment=True),
        Source(f"dhcp relay 10.9.0.1 option 82 {agent.hex()}", segment=True)]
    # option 82 from a client on this link is its own claim: the link is one segment
    assert Source.dhcp(bytes(4), agent) == Source.dhcp(bytes(4), None)
