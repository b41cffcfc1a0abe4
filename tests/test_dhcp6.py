"""DHCPv6 codec and responder, without sockets. scapy is the independent oracle:
it builds the requests (as OVMF, iPXE, dhcrelay send them) and parses our answers."""

from __future__ import annotations

import random
import uuid as uuidlib

import pytest
from scapy.layers.dhcp6 import (
    DHCP6,
    DUID_LL,
    DUID_LLT,
    DUID_UUID,
    USER_CLASS_DATA,
    VENDOR_CLASS_DATA,
    DHCP6_Advertise,
    DHCP6_InfoRequest,
    DHCP6_RelayForward,
    DHCP6_RelayReply,
    DHCP6_Release,
    DHCP6_Renew,
    DHCP6_Reply,
    DHCP6_Request,
    DHCP6_Solicit,
    DHCP6OptClientArchType,
    DHCP6OptClientId,
    DHCP6OptClientLinkLayerAddr,
    DHCP6OptClientNetworkInterId,
    DHCP6OptElapsedTime,
    DHCP6OptIA_NA,
    DHCP6OptIAAddress,
    DHCP6OptIfaceId,
    DHCP6OptOptReq,
    DHCP6OptRelayMsg,
    DHCP6OptServerId,
    DHCP6OptStatusCode,
    DHCP6OptUserClass,
    DHCP6OptVendorClass,
)

from netboot.boot.booter import Booter
from netboot.config import ConfigStore
from netboot.dhcp6 import packet as P
from netboot.dhcp6.responder import Dhcp6Responder, Leases, mac_from_eui64
from netboot.metrics import Counters

MAC = "52:54:00:12:34:56"
MACB = bytes.fromhex(MAC.replace(":", ""))
UUID = "8dc30e79-5115-44b3-a5e3-4e5cbc62d3a2"
SERVER = "fd00:77::2"
SDUID = P.duid_ll(bytes.fromhex("020000000002"))
LINK_LOCAL = ("fe80::5054:ff:fe12:3456%eth0", 546)


def efi_guid_bytes(uuid: str) -> bytes:
    """The SMBIOS UUID as EDK2 puts it in a DUID-UUID: the EFI GUID layout."""
    return uuidlib.UUID(uuid).bytes_le


def client_opts(kind: str = "pxe", *, duid=None, ia: bool = True) -> list:
    duid = duid if duid is not None else DUID_UUID(uuid=efi_guid_bytes(UUID))
    opts = [DHCP6OptClientId(duid=duid), DHCP6OptElapsedTime()]
    if ia:
        opts.append(DHCP6OptIA_NA(iaid=0x17E3B9BD))
    opts.append(DHCP6OptOptReq(reqopts=[59, 60, 23, 16]))
    if kind in ("pxe", "http", "ipxe"):
        opts += [DHCP6OptClientNetworkInterId(iitype=1, iimajor=3, iiminor=0),
                 DHCP6OptClientArchType(archtypes=[16 if kind == "http" else 7])]
        vc = (b"HTTPClient:Arch:00016:UNDI:003000" if kind == "http"
              else b"PXEClient:Arch:00007:UNDI:003000")
        opts.append(DHCP6OptVendorClass(enterprisenum=343,
                                        vcdata=[VENDOR_CLASS_DATA(data=vc)]))
    if kind == "ipxe":
        opts.append(DHCP6OptUserClass(userclassdata=[USER_CLASS_DATA(data=b"iPXE")]))
    return opts


def solicit(kind: str = "pxe", **kw) -> bytes:
    pkt = DHCP6_Solicit(trid=0xABCDEF)
    for o in client_opts(kind, **kw):
        pkt = pkt / o
    return bytes(pkt)


def message(cls, kind: str = "pxe", server: bytes | None = SDUID, **kw) -> bytes:
    pkt = cls(trid=0x123456)
    for o in client_opts(kind, **kw):
        pkt = pkt / o
    if server is not None:
        pkt = pkt / DHCP6OptServerId(duid=DUID_LL(lladdr="02:00:00:00:00:02")
                                     if server == SDUID else server)
    return bytes(pkt)


@pytest.fixture
def proxy(store: ConfigStore) -> Dhcp6Responder:
    booter = Booter(store, "10.0.0.2", 8080).over_ipv6(SERVER)
    return Dhcp6Responder(booter, SERVER, SDUID, Counters())


@pytest.fixture
def assigning(store: ConfigStore) -> Dhcp6Responder:
    booter = Booter(store, "10.0.0.2", 8080).over_ipv6(SERVER)
    return Dhcp6Responder(booter, SERVER, SDUID, Counters(),
                          leases=Leases("fd00:77::1000", "fd00:77::1003", 600))


_TYPES = {2: DHCP6_Advertise, 7: DHCP6_Reply, 13: DHCP6_RelayReply, 12: DHCP6_RelayForward}


def decode(raw: bytes):
    """scapy's class for the message type (DHCP6(raw) does not dispatch)."""
    return _TYPES.get(raw[0], DHCP6)(raw)


def options(scapy_msg) -> dict[int, object]:
    out = {}
    layer = scapy_msg.payload
    while layer and layer.__class__.__name__ != "NoPayload":
        code = getattr(layer, "optcode", None)
        if code is not None:
            out.setdefault(code, layer)
        layer = layer.payload
    return out


# -- codec -----------------------------------------------------------------------------
@pytest.mark.parametrize("raw", [
    solicit(), solicit("http"), solicit("ipxe"), message(DHCP6_Request),
    bytes(DHCP6_InfoRequest(trid=7) / DHCP6OptClientId(duid=DUID_LL(lladdr=MAC))),
    bytes(DHCP6_RelayForward(hopcount=1, linkaddr="fd00:78::1", peeraddr="fe80::1")
          / DHCP6OptIfaceId(ifaceid=b"eth1") / DHCP6OptRelayMsg(message=DHCP6_Solicit(
              bytes.fromhex(solicit().hex())))),
])
def test_codec_round_trips_what_scapy_builds(raw: bytes) -> None:
    pkt = P.parse(raw)
    assert P.build(pkt) == raw


def test_codec_reads_fields_as_scapy_wrote_them() -> None:
    msg = P.parse(solicit())
    assert isinstance(msg, P.Message)
    assert (msg.msg_type, msg.xid) == (P.SOLICIT, 0xABCDEF)
    assert [c for c, _ in msg.options] == [1, 8, 3, 6, 62, 61, 16]
    assert P.decode_oro(msg.get(P.OPT_ORO) or b"") == [59, 60, 23, 16]
    assert P.decode_arch(msg.get(P.OPT_CLIENT_ARCH_TYPE) or b"") == [7]
    assert P.decode_vendor_class(msg.get(P.OPT_VENDOR_CLASS) or b"") == (
        343, [b"PXEClient:Arch:00007:UNDI:003000"])
    assert P.decode_ia_na(msg.get(P.OPT_IA_NA) or b"").iaid == 0x17E3B9BD
    assert P.uuid_from_duid(msg.get(P.OPT_CLIENTID) or b"") == efi_guid_bytes(UUID)


@pytest.mark.parametrize("duid,mac", [
    (bytes(DUID_LL(lladdr=MAC)), MACB),
    (bytes(DUID_LLT(lladdr=MAC, timeval=12345)), MACB),
    (bytes(DUID_UUID(uuid=b"\x01" * 16)), None),
    (b"\x00\x03\x00\x06" + MACB, None),  # hardware type 6 (IEEE 802) is not Ethernet
    (b"\x00\x03", None),
])
def test_mac_from_duid(duid: bytes, mac: bytes | None) -> None:
    assert P.mac_from_duid(duid) == mac


def test_mac_from_eui64_link_local() -> None:
    import ipaddress
    assert mac_from_eui64(ipaddress.IPv6Address("fe80::5054:ff:fe12:3456").packed) == MACB
    assert mac_from_eui64(ipaddress.IPv6Address("fd00:77::187").packed) is None


@pytest.mark.parametrize("raw,why", [
    (b"", "short"),
    (b"\x01\x00\x00", "short"),
    (b"\x00\x00\x00\x01", "type 0"),
    (b"\x01\x00\x00\x01\x00\x01", "option header truncated"),
    (b"\x01\x00\x00\x01\x00\x01\x00\x05abc", "runs past"),
    (b"\x0c\x00" + b"\0" * 32, "without a relayed message"),
    (b"\x0c\x00" + b"\0" * 32 + b"\x00\x09\x00\x02\x01\x00", "short"),
    (b"\x0c\x00" + b"\0" * 30, "short relay"),
])
def test_malformed_input_raises_one_error_type(raw: bytes, why: str) -> None:
    with pytest.raises(P.MalformedPacket, match=why):
        P.parse(raw)


def test_relays_nested_past_the_hop_limit_are_malformed() -> None:
    inner = solicit()
    for _ in range(P.HOP_COUNT_LIMIT + 2):
        inner = b"\x0c\x00" + b"\0" * 32 + P.encode_option(P.OPT_RELAY_MSG, inner)
    with pytest.raises(P.MalformedPacket, match="too deep"):
        P.parse(inner)


def test_fuzzed_messages_raise_only_malformed(proxy: Dhcp6Responder) -> None:
    """Mutations of real requests: parse either succeeds or raises MalformedPacket, and
    the responder never raises (a bad packet costs a counter, not the server)."""
    rng = random.Random(20261202)
    seeds = [solicit(), solicit("http"), solicit("ipxe"), message(DHCP6_Request, ia=False),
             bytes(DHCP6_RelayForward(hopcount=0, linkaddr="fd00:78::1", peeraddr="fe80::1")
                   / DHCP6OptIfaceId(ifaceid=b"eth1") / DHCP6OptRelayMsg(
                       message=DHCP6_Solicit(solicit())))]
    outcomes = {"ok": 0, "malformed": 0}
    for _ in range(20000):
        b = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            i = rng.randrange(len(b))
            if op < 0.5:
                b[i] = rng.randrange(256)
            elif op < 0.75:
                del b[i:i + rng.randint(1, 8)]
            else:
                b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            if not b:
                break
        try:
            P.parse(bytes(b))
            outcomes["ok"] += 1
        except P.MalformedPacket:
            outcomes["malformed"] += 1
        proxy.handle(bytes(b), 547, LINK_LOCAL)
    assert outcomes["ok"] > 1000 and outcomes["malformed"] > 1000, outcomes
    assert proxy.counters.get("dhcp6_malformed_total") > 1000


# -- responder: proxy mode ------------------------------------------------------------------
def test_proxy_advertise_to_uefi_pxe_has_the_tftp_url_and_no_address(
        proxy: Dhcp6Responder) -> None:
    reply = proxy.handle(solicit(), 547, LINK_LOCAL)
    assert reply is not None and (reply.address, reply.port) == LINK_LOCAL
    adv = decode(reply.data)
    assert isinstance(adv, DHCP6_Advertise) and adv.trid == 0xABCDEF
    opts = options(adv)
    assert opts[59].optdata == b"tftp://[fd00:77::2]/ipxe.efi"
    assert 3 not in opts and 7 not in opts  # no IA_NA, no preference: a proxy offer
    assert opts[16].enterprisenum == 343 and opts[16].vcdata[0].data == b"PXEClient"
    assert bytes(opts[1].duid) == bytes(DUID_UUID(uuid=efi_guid_bytes(UUID)))
    assert bytes(opts[2].duid) == SDUID


def test_http_boot_gets_the_loader_url_with_httpclient_echoed(proxy: Dhcp6Responder) -> None:
    reply = proxy.handle(solicit("http"), 547, LINK_LOCAL)
    assert reply is not None
    opts = options(decode(reply.data))
    assert opts[59].optdata == b"http://[fd00:77::2]:8080/loader/ipxe.efi"
    assert opts[16].vcdata[0].data == b"HTTPClient"


def test_ipxe_gets_the_script_url_never_a_loader(proxy: Dhcp6Responder) -> None:
    reply = proxy.handle(solicit("ipxe"), 547, LINK_LOCAL)
    assert reply is not None
    opts = options(decode(reply.data))
    assert opts[59].optdata == b"http://[fd00:77::2]:8080/boot.ipxe"
    assert 16 not in opts


def test_edk2_boot_service_request_on_4011_gets_a_reply(proxy: Dhcp6Responder) -> None:
    """EDK2's second step to a proxy offer: a Request naming us, without IA, to 4011."""
    raw = message(DHCP6_Request, ia=False)
    reply = proxy.handle(raw, 4011, ("fd00:77::144", 4011))
    assert reply is not None and (reply.address, reply.port) == ("fd00:77::144", 4011)
    rep = decode(reply.data)
    assert isinstance(rep, DHCP6_Reply) and rep.trid == 0x123456
    assert options(rep)[59].optdata == b"tftp://[fd00:77::2]/ipxe.efi"


@pytest.mark.parametrize("raw,reason", [
    (message(DHCP6_Request, server=bytes(DUID_LL(lladdr="02:00:00:00:00:99"))),
     "other-server"),
    (message(DHCP6_Request, server=None), "no-server-id"),
    (message(DHCP6_Renew), "message-type"),  # no bindings in proxy mode
    (message(DHCP6_Release), "message-type"),
    (solicit("plain"), "not-pxe"),
    (bytes(DHCP6_Advertise(trid=1) / DHCP6OptClientId(duid=DUID_LL(lladdr=MAC))),
     "message-type"),
])
def test_proxy_ignores_what_is_not_for_it(proxy: Dhcp6Responder, raw: bytes,
                                          reason: str) -> None:
    assert proxy.handle(raw, 547, LINK_LOCAL) is None
    assert proxy.counters.get("dhcp6_ignored_total", reason=reason) == 1


def test_information_request_gets_boot_information(proxy: Dhcp6Responder) -> None:
    pkt = DHCP6_InfoRequest(trid=9)
    for o in client_opts("pxe", ia=False):
        pkt = pkt / o
    reply = proxy.handle(bytes(pkt), 547, LINK_LOCAL)
    assert reply is not None
    rep = decode(reply.data)
    assert isinstance(rep, DHCP6_Reply) and options(rep)[59].optdata.startswith(b"tftp://[")


def test_uuid_and_mac_of_edk2_and_ipxe(proxy: Dhcp6Responder) -> None:
    """EDK2's DUID-UUID is in the EFI GUID layout, iPXE's in RFC 4122 order; the MAC
    comes from the link-local source's EUI-64 when the DUID has none."""
    seen = []
    proxy.report = lambda client, offer: seen.append(client)
    proxy.handle(solicit(), 547, LINK_LOCAL)
    proxy.handle(solicit("ipxe", duid=DUID_UUID(uuid=uuidlib.UUID(UUID).bytes)), 547,
                 LINK_LOCAL)
    assert [(c.uuid, c.mac, c.ipxe) for c in seen] == [(UUID, MAC, False), (UUID, MAC, True)]
    proxy.handle(message(DHCP6_Request, ia=False), 4011, ("fd00:77::144", 4011))
    assert len(seen) == 2  # answered, but a sighting without a MAC is not reported


# -- relays -------------------------------------------------------------------------------
def relayed(inner: bytes, *, lla: bool = True, hops: int = 1) -> bytes:
    pkt = DHCP6_RelayForward(hopcount=0, linkaddr="fd00:78::1", peeraddr="fe80::99")
    if lla:
        pkt = pkt / DHCP6OptClientLinkLayerAddr(lltype=1, clladdr=MAC)
    pkt = pkt / DHCP6OptIfaceId(ifaceid=b"eth1") / DHCP6OptRelayMsg(message=DHCP6(inner))
    raw = bytes(pkt)
    for n in range(1, hops):
        raw = bytes(DHCP6_RelayForward(hopcount=n, linkaddr="::", peeraddr=f"fd00:77::{n + 2}")
                    / DHCP6OptIfaceId(ifaceid=f"up{n}".encode())
                    / DHCP6OptRelayMsg(message=DHCP6_RelayForward(raw)))
    return raw


@pytest.mark.parametrize("hops", [1, 2])
def test_relay_forward_gets_relay_reply_with_interface_ids_echoed(
        proxy: Dhcp6Responder, hops: int) -> None:
    seen = []
    proxy.report = lambda client, offer: seen.append(client)
    reply = proxy.handle(relayed(solicit(duid=DUID_UUID(uuid=b"\x11" * 16)), hops=hops), 547,
                         ("fd00:77::3", 547))
    assert reply is not None and (reply.address, reply.port) == ("fd00:77::3", 547)
    layer = decode(reply.data)
    for n in reversed(range(hops)):
        assert isinstance(layer, DHCP6_RelayReply)
        want = b"eth1" if n == 0 else f"up{n}".encode()
        assert layer[DHCP6OptIfaceId].ifaceid == want
        layer = layer[DHCP6OptRelayMsg].message
    assert isinstance(layer, DHCP6_Advertise)
    assert options(layer)[59].optdata == b"tftp://[fd00:77::2]/ipxe.efi"
    assert seen[0].mac == MAC  # from option 79, the DUID has none


def test_relay_reply_in_is_ignored(proxy: Dhcp6Responder) -> None:
    raw = bytes(DHCP6_RelayReply(hopcount=0, linkaddr="::", peeraddr="::")
                / DHCP6OptRelayMsg(message=DHCP6_Advertise(trid=1)))
    assert proxy.handle(raw, 547, LINK_LOCAL) is None
    assert proxy.counters.get("dhcp6_ignored_total", reason="message-type") == 1


# -- responder: address-assigning mode ------------------------------------------------------
def test_assign_mode_binds_an_address_and_keeps_it(assigning: Dhcp6Responder) -> None:
    adv = decode(assigning.handle(solicit(), 547, LINK_LOCAL).data)  # type: ignore[union-attr]
    ia = adv[DHCP6OptIA_NA]
    assert ia.iaid == 0x17E3B9BD and (ia.T1, ia.T2) == (300, 480)
    assert ia[DHCP6OptIAAddress].addr == "fd00:77::1000"
    assert ia[DHCP6OptIAAddress].validlft == 600
    # an address with "PXEClient" would make EDK2 take the BINL path: not sent
    assert 16 not in options(adv) and options(adv)[59].optdata.startswith(b"tftp://")
    rep = decode(assigning.handle(message(DHCP6_Request), 547, LINK_LOCAL).data)  # type: ignore
    assert isinstance(rep, DHCP6_Reply)
    assert rep[DHCP6OptIAAddress].addr == "fd00:77::1000"
    rep = decode(assigning.handle(message(DHCP6_Renew), 547, LINK_LOCAL).data)  # type: ignore
    assert rep[DHCP6OptIAAddress].addr == "fd00:77::1000"


def test_assign_mode_release_frees_and_renew_of_unknown_is_nobinding(
        assigning: Dhcp6Responder) -> None:
    assigning.handle(message(DHCP6_Request), 547, LINK_LOCAL)
    rep = decode(assigning.handle(message(DHCP6_Release), 547, LINK_LOCAL).data)  # type: ignore
    assert rep[DHCP6OptStatusCode].statuscode == 0
    assert assigning.leases is not None and len(assigning.leases) == 0
    rep = decode(assigning.handle(message(DHCP6_Renew), 547, LINK_LOCAL).data)  # type: ignore
    assert rep[DHCP6OptIA_NA][DHCP6OptStatusCode].statuscode == P.STATUS_NO_BINDING


def test_a_full_range_says_noaddrsavail(assigning: Dhcp6Responder) -> None:
    for n in range(5):
        duid = DUID_LL(lladdr=f"52:54:00:00:00:{n:02x}")
        adv = decode(assigning.handle(solicit(duid=duid), 547, LINK_LOCAL).data)  # type: ignore
        if n < 4:
            assert adv[DHCP6OptIAAddress].addr == f"fd00:77::100{n}"
        else:
            assert adv[DHCP6OptIA_NA][DHCP6OptStatusCode].statuscode == P.STATUS_NO_ADDRS_AVAIL
    assert assigning.counters.get("dhcp6_no_addresses_total") == 1


def test_leases_expire_and_are_reused() -> None:
    now = [0.0]
    leases = Leases("fd00::1", "fd00::2", 60, clock=lambda: now[0])
    a = leases.bind((b"a", 1))
    b = leases.bind((b"b", 1))
    assert a != b and leases.bind((b"c", 1)) is None
    now[0] = 61.0
    assert leases.lookup((b"a", 1)) is None
    assert leases.bind((b"c", 1)) in (a, b)


# -- URLs for clients that came over IPv6 ------------------------------------------------
def test_ipxe_scripts_for_ipv6_clients_use_the_bracketed_address(store: ConfigStore) -> None:
    from netboot.boot import ipxe
    from netboot.boot.spec import BootSpec
    from netboot.http.context import HttpContext

    booter = Booter(store, "10.0.0.2", 8080)
    ctx = HttpContext.__new__(HttpContext)  # only the two Booters matter here
    ctx.booter, ctx.booter6 = booter, booter.over_ipv6(SERVER)
    assert ctx.booter_for("10.0.0.9") is booter
    assert ctx.booter_for("fd00:77::1001") is ctx.booter6
    six = ctx.booter_for("fd00:77::1001")
    assert ipxe.chain_script(six.base_url).startswith(
        "#!ipxe\nchain --autofree http://[fd00:77::2]:8080/ipxe/node?")
    decision = six.decide(MAC, UUID)
    assert isinstance(decision, BootSpec)
    assert "kernel http://[fd00:77::2]:8080/images/" in ipxe.render(decision, six.base_url)
    ctx.booter6 = None  # no IPv6 configured: everyone gets the IPv4 URLs
    assert ctx.booter_for("fd00:77::1001") is booter


@pytest.mark.parametrize("settings,error", [
    ({"enabled": True, "address": "10.0.0.2"}, "address"),
    ({"assign": {"first": "fd00::2", "last": "fd00::1"}}, "before first"),
    ({"assign": {"first": "fd00::", "last": "fd00::ffff:ffff"}}, "more than"),
    ({"assign": {"first": "fd00::1", "last": "fd00::9", "lifetime": 5}}, "greater than"),
])
def test_dhcp6_settings_are_checked(settings: dict, error: str) -> None:
    from pydantic import ValidationError

    from netboot.config import Dhcp6Settings
    with pytest.raises(ValidationError, match=error):
        Dhcp6Settings.model_validate(settings)


def test_dhcp6_is_off_and_proxy_by_default() -> None:
    from netboot.config import Dhcp6Settings
    d = Dhcp6Settings()
    assert (d.enabled, d.assign, d.port, d.boot_port) == (False, None, 547, 4011)
