"""DHCPv6 boot policy without sockets: a message's bytes and source in, a reply's
bytes and destination out.

Two modes, one responder:

- **proxy** (default): netboot hands out no address. Beside the site's DHCPv6
  server it answers Solicit with an Advertise that carries no IA_NA and only the
  boot information (option 59, and for UEFI the vendor class PXEClient/HTTPClient);
  EDK2 classifies such an Advertise as a proxy offer, takes its address from the
  site's server and then asks this server again on udp/4011 (a Request with
  our Server Identifier and no IA), which gets a Reply with the boot URL.
  Information-request gets the same Reply.
- **assign** (``dhcp6.assign``): on a provisioning segment where netboot is the
  only DHCPv6 server, it also binds IA_NA addresses from a configured range
  (:class:`Leases`, in memory) and answers Request, Renew, Rebind, Release and
  Decline.

The Booter decides what boots (the same decision as DHCPv4, through
:meth:`Dhcp6Responder.client`); this module only renders it as RFC 5970 says:
a TFTP loader as ``tftp://[addr]/name``, UEFI HTTP Boot as the loader's HTTP URL
with vendor class ``HTTPClient`` echoed, iPXE as its script URL (never a loader:
no loop). Relay-forward in, Relay-reply out, each relay level's Interface-Id
echoed (RFC 8415 §19.3).
"""

from __future__ import annotations

import ipaddress
import logging
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass

from ..boot.booter import Booter
from ..boot.spec import Client, Ignore, Offer
from ..dhcp.proxy import DecisionLog
from ..identity import arch_from_code, node_uuid, uuid_from_option97
from ..metrics import Counters
from ..util.lru import Lru
from . import packet as P

log = logging.getLogger("netboot.dhcp6")

#: what each client message gets back, and whether it must name this server
_ANSWERS = {P.SOLICIT: P.ADVERTISE, P.REQUEST: P.REPLY, P.RENEW: P.REPLY,
            P.REBIND: P.REPLY, P.RELEASE: P.REPLY, P.DECLINE: P.REPLY,
            P.INFORMATION_REQUEST: P.REPLY}
#: only the address-assigning mode has bindings to renew, rebind, release or decline
_ASSIGN_ONLY = (P.RENEW, P.REBIND, P.RELEASE, P.DECLINE)
#: messages that carry a Server Identifier, which must be ours (RFC 8415 §16)
_OURS_ONLY = (P.REQUEST, P.RENEW, P.RELEASE, P.DECLINE)


@dataclass(frozen=True, slots=True)
class Reply6:
    data: bytes
    address: str  # the source the request came from: the client or its relay
    port: int


class Leases:
    """IA_NA bindings for the address-assigning mode: addresses ``first``..``last``
    of one range, keyed by (client DUID, IAID), kept in memory only (a restart
    forgets them; a client renewing an unknown binding gets NoBinding and
    solicits again, RFC 8415 §18.3.4). Bounded by the range and by ``limit``
    clients; a free address is found in at most ``PROBES`` steps from a moving
    cursor, so a full range costs a bounded scan, never one of every lease."""

    PROBES = 64

    def __init__(self, first: str, last: str, lifetime: int = 3600, *, limit: int = 65536,
                 clock: Callable[[], float] = time.monotonic):
        lo, hi = int(ipaddress.IPv6Address(first)), int(ipaddress.IPv6Address(last))
        if hi < lo:
            raise ValueError(f"dhcp6 range {first}..{last} is empty")
        self.lo, self.size = lo, min(hi - lo + 1, limit)
        self.lifetime = lifetime
        self._clock = clock
        self._cursor = 0
        self._by_key: Lru[tuple[bytes, int], tuple[int, float]] = Lru(self.size)
        self._by_addr: dict[int, tuple[bytes, int]] = {}

    def __len__(self) -> int:
        return len(self._by_addr)

    def lookup(self, key: tuple[bytes, int]) -> bytes | None:
        entry = self._by_key.get(key)
        if entry is None or entry[1] < self._clock():
            return None
        return entry[0].to_bytes(16, "big")

    def bind(self, key: tuple[bytes, int]) -> bytes | None:
        """The client's address (its own again, else a free one), held for
        ``lifetime`` seconds; None when the range is full."""
        now = self._clock()
        entry = self._by_key.get(key)
        if entry is not None:
            addr = entry[0]
        else:
            found = self._free(now)
            if found is None:
                return None
            addr = found
        # the LRU forgets the least recent binding when full; its address entry then
        # names a key it no longer has, which _free() takes as free
        self._by_key.put(key, (addr, now + self.lifetime))
        self._by_addr[addr] = key
        return addr.to_bytes(16, "big")

    def release(self, key: tuple[bytes, int]) -> bool:
        entry = self._by_key.pop(key)
        if entry is None:
            return False
        self._by_addr.pop(entry[0], None)
        return True

    def _free(self, now: float) -> int | None:
        for _ in range(min(self.PROBES, self.size)):
            addr = self.lo + self._cursor
            self._cursor = (self._cursor + 1) % self.size
            holder = self._by_addr.get(addr)
            if holder is None:
                return addr
            held = self._by_key.get(holder)
            if held is None or held[1] < now:  # expired: reuse it
                self._by_key.pop(holder)
                del self._by_addr[addr]
                return addr
        return None


class Dhcp6Responder:
    """Stateless apart from counters, the decision log and (assign mode) leases."""

    def __init__(self, booter: Booter, server_addr: str, server_duid: bytes,
                 counters: Counters | None = None, *, leases: Leases | None = None,
                 report: Callable[[Client, Offer], None] | None = None,
                 boot_port: int = 4011, log_every: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        #: decides as for DHCPv4, but its base URL is this server's bracketed IPv6
        self.booter = booter
        self.server_addr = str(ipaddress.IPv6Address(server_addr))
        self.duid = server_duid
        self.counters = counters or Counters()
        self.leases = leases
        self.report = report
        #: requests on this port are EDK2's boot-service Request to a proxy offer
        self.boot_port = boot_port
        self._log = DecisionLog(log, "DHCPv6 boot decision", lambda: self.counters.inc(
            "dhcp6_log_suppressed_total"), counted_in="dhcp6_log_suppressed_total",
            clock=clock, quiet=log_every)

    # -- in ----------------------------------------------------------------------
    def handle(self, data: bytes, port: int, source: tuple[str, int]) -> Reply6 | None:
        """Decide on one datagram received on ``port`` from ``source``."""
        c = self.counters
        try:
            pkt = P.parse(data)
            relays: list[P.RelayMessage] = []
            while isinstance(pkt, P.RelayMessage):
                if pkt.msg_type != P.RELAY_FORW:
                    c.inc("dhcp6_ignored_total", reason="message-type")
                    return None
                relays.append(pkt)
                inner = pkt.get(P.OPT_RELAY_MSG)
                assert inner is not None  # parse() checked it
                pkt = P.parse(inner)
            reply = self._answer(pkt, relays, source, port)
        except P.MalformedPacket as exc:
            c.inc("dhcp6_malformed_total")
            log.debug("malformed DHCPv6 message from %s: %s", source[0], exc)
            return None
        if reply is None:
            return None
        for relay in reversed(relays):  # innermost first: wrap outwards
            reply = P.build(self._relay_reply(relay, reply))
        return Reply6(reply, source[0], source[1])

    def _answer(self, msg: P.Message, relays: list[P.RelayMessage],
                source: tuple[str, int], port: int) -> bytes | None:
        c = self.counters
        answer = _ANSWERS.get(msg.msg_type)
        if answer is None or (msg.msg_type in _ASSIGN_ONLY and self.leases is None):
            c.inc("dhcp6_ignored_total", reason="message-type")
            return None
        duid = msg.get(P.OPT_CLIENTID)
        server = msg.get(P.OPT_SERVERID)
        if duid is None and msg.msg_type != P.INFORMATION_REQUEST:
            c.inc("dhcp6_ignored_total", reason="no-client-id")
            return None
        if server is not None and server != self.duid:
            c.inc("dhcp6_ignored_total", reason="other-server")  # chose another server
            return None
        if server is None and msg.msg_type in _OURS_ONLY:
            c.inc("dhcp6_ignored_total", reason="no-server-id")
            return None
        if msg.msg_type == P.SOLICIT and port == self.boot_port:
            c.inc("dhcp6_ignored_total", reason="message-type")
            return None
        if msg.msg_type in (P.RELEASE, P.DECLINE):
            assert self.leases is not None and duid is not None
            for ia in self._ias(msg):
                self.leases.release((duid, ia.iaid))
            c.inc("dhcp6_released_total")
            return P.build(P.Message(P.REPLY, msg.xid, [
                (P.OPT_SERVERID, self.duid), (P.OPT_CLIENTID, duid),
                (P.OPT_STATUS_CODE, P.status(P.STATUS_SUCCESS, "released"))]))
        client = self.client(msg, relays, source)
        if client is None:
            c.inc("dhcp6_ignored_total", reason="not-pxe")
            return None
        decision = self.booter.dhcp(client)
        if isinstance(decision, Ignore):
            c.inc("dhcp6_ignored_total", reason="policy")
            self._log(client, decision.reason)
            return None
        options: list[tuple[int, bytes]] = [(P.OPT_SERVERID, self.duid)]
        if duid is not None:
            options.append((P.OPT_CLIENTID, duid))
        if self.leases is not None and duid is not None:
            options += self._bindings(msg, duid)
        options += self.boot_options(client, decision)
        if self.report is not None and client.mac:
            # without a MAC (EDK2's udp/4011 Request comes from its new global
            # address, not the EUI-64 link-local one) the first contact was already
            # reported with the Solicit; a MAC-less sighting would only mislead
            self.report(client, decision)
        kind = "advertise" if answer == P.ADVERTISE else "reply"
        c.inc("dhcp6_offers_total", kind=kind, arch=client.arch.value,
              ipxe="yes" if client.ipxe else "no")
        self._log(client, f"{kind}: {decision.filename} (profile {decision.profile})")
        return P.build(P.Message(answer, msg.xid, options))

    # -- who is it ------------------------------------------------------------------
    def client(self, msg: P.Message, relays: list[P.RelayMessage],
               source: tuple[str, int]) -> Client | None:
        """The Booter's view of a DHCPv6 client, or None if it is no boot client.

        Its MAC comes from the DUID (LLT/LL), else the innermost relay's
        client link-layer address (option 79, RFC 6939), else the EUI-64 of its
        link-local source address (EDK2 and iPXE use EUI-64). Its UUID from a
        DUID-UUID, else one made from the MAC (as for DHCPv4 without option 97).
        """
        vendor = msg.get(P.OPT_VENDOR_CLASS)
        classes: list[bytes] = []
        if vendor is not None:
            _, classes = P.decode_vendor_class(vendor)
        user = msg.get(P.OPT_USER_CLASS)
        ipxe = user is not None and b"iPXE" in P.decode_user_class(user)
        http_boot = any(v.startswith(b"HTTPClient") for v in classes)
        pxe = any(v.startswith(b"PXEClient") for v in classes)
        arch_opt = msg.get(P.OPT_CLIENT_ARCH_TYPE)
        if not (pxe or http_boot or ipxe or arch_opt is not None):
            return None
        code = P.decode_arch(arch_opt)[0] if arch_opt is not None else None
        arch, http_arch = arch_from_code(code if code is not None else _vendor_arch(classes))
        duid = msg.get(P.OPT_CLIENTID) or b""
        mac_bytes = P.mac_from_duid(duid)
        if mac_bytes is None and relays:
            lla = relays[-1].get(P.OPT_CLIENT_LINKLAYER_ADDR)
            if lla is not None and len(lla) == 8 and lla[:2] == b"\x00\x01":
                mac_bytes = lla[2:]
        if mac_bytes is None:
            mac_bytes = mac_from_eui64(relays[-1].peer if relays else _packed(source[0]))
        mac = mac_bytes.hex(":") if mac_bytes is not None else None
        raw = P.uuid_from_duid(duid)
        # EDK2 writes the SMBIOS UUID in the EFI GUID layout (as option 97), iPXE in
        # RFC 4122 order (both seen on the wire for one QEMU -smbios uuid)
        smbios = (str(uuidlib.UUID(bytes=raw)) if ipxe else uuid_from_option97(b"\0" + raw)) \
            if raw else None
        uuid = node_uuid(smbios, mac)
        if mac is None and uuid is None:
            return None
        return Client(mac=mac or "", uuid=uuid, arch=arch, http_boot=http_boot or http_arch,
                      ipxe=ipxe)

    # -- out ------------------------------------------------------------------------
    def boot_options(self, client: Client, offer: Offer) -> list[tuple[int, bytes]]:
        """Option 59 (and the vendor class UEFI wants echoed) for a decision."""
        url = offer.filename if offer.http else f"tftp://[{self.server_addr}]/{offer.filename}"
        options = [(P.OPT_BOOTFILE_URL, url.encode())]
        if client.ipxe:
            return options
        if client.http_boot:  # OVMF ignores an HTTP Boot offer without "HTTPClient"
            name = b"HTTPClient"
        elif self.leases is None:
            # A proxy offer (no address) counts for EDK2 only with vendor class 343
            # "PXEClient": it then asks again on udp/4011 for the URL. With an address,
            # "PXEClient" would make it a BINL offer, whose 4011 Request (seen from
            # OVMF 2022.11) names a server id that is not ours and no client id;
            # without the class the offer is "DHCP only with a boot file URL", booted as is.
            name = b"PXEClient"
        else:
            return options
        options.append((P.OPT_VENDOR_CLASS, P.encode_vendor_class(P.ENTERPRISE_PXE, [name])))
        return options

    def _ias(self, msg: P.Message) -> list[P.IaNa]:
        return [P.decode_ia_na(v) for c, v in msg.options if c == P.OPT_IA_NA]

    def _bindings(self, msg: P.Message, duid: bytes) -> list[tuple[int, bytes]]:
        """One IA_NA per IA_NA asked for: bound, or with a status saying why not."""
        assert self.leases is not None
        out = []
        life = self.leases.lifetime
        for ia in self._ias(msg):
            key = (duid, ia.iaid)
            if msg.msg_type in (P.RENEW,) and self.leases.lookup(key) is None:
                inner = [(P.OPT_STATUS_CODE, P.status(P.STATUS_NO_BINDING, "unknown binding"))]
                t1 = t2 = 0
            else:
                addr = self.leases.bind(key)
                if addr is None:
                    self.counters.inc("dhcp6_no_addresses_total")
                    inner = [(P.OPT_STATUS_CODE,
                              P.status(P.STATUS_NO_ADDRS_AVAIL, "range exhausted"))]
                    t1 = t2 = 0
                else:
                    inner = [(P.OPT_IAADDR, P.encode_iaaddr(P.IaAddress(addr, life, life)))]
                    t1, t2 = life // 2, life * 4 // 5
            out.append((P.OPT_IA_NA, P.encode_ia_na(P.IaNa(ia.iaid, t1, t2, tuple(inner)))))
        return out

    @staticmethod
    def _relay_reply(relay: P.RelayMessage, inner: bytes) -> P.RelayMessage:
        options: list[tuple[int, bytes]] = []
        iface = relay.get(P.OPT_INTERFACE_ID)
        if iface is not None:
            options.append((P.OPT_INTERFACE_ID, iface))
        options.append((P.OPT_RELAY_MSG, inner))
        return P.RelayMessage(P.RELAY_REPL, relay.hop_count, relay.link, relay.peer, options)


def _vendor_arch(classes: list[bytes]) -> int | None:
    """The arch in 'PXEClient:Arch:00007:UNDI:003000' when option 61 is missing."""
    for v in classes:
        parts = v.split(b":")
        if len(parts) > 2 and parts[1] == b"Arch":
            try:
                return int(parts[2])
            except ValueError:
                return None
    return None


def _packed(address: str) -> bytes:
    try:
        return ipaddress.IPv6Address(address.split("%", 1)[0]).packed
    except ValueError:
        return b""


def mac_from_eui64(address: bytes) -> bytes | None:
    """The MAC in a modified-EUI-64 interface identifier (…xx:xxff:fexx:xxxx), if any."""
    if len(address) != 16 or address[11:13] != b"\xff\xfe":
        return None
    iid = address[8:]
    return bytes((iid[0] ^ 0x02,)) + iid[1:3] + iid[5:8]
