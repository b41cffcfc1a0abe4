"""ProxyDHCP policy without sockets: a request's bytes in, a reply's bytes and
destination out.

A ProxyDHCP server never hands out addresses; it answers PXE clients beside
the site's own DHCP server with only the boot information (PXE 2.1 §2.2.3).
It answers DHCPDISCOVER on port 67 with an offer and DHCPREQUEST on port 4011
with an ack, ignores everything that is not a PXE, HTTP-boot or iPXE client,
and counts every outcome. A boot client's DHCPREQUEST to the site's server is
not answered either, but the address it asks for is passed on (``leased``): its
loader download will come from there (boot/refusals.py).
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..boot.booter import Booter
from ..boot.spec import Client, Ignore, Offer
from ..identity import arch_from_code, node_uuid, uuid_from_option97
from ..metrics import Counters
from ..util.ratelimit import RateLimitedLog
from . import packet as P

log = logging.getLogger("netboot.dhcp")

BROADCAST = "255.255.255.255"
CLIENT_PORT = 68
SERVER_PORT = 67

# op htype hlen hops xid secs flags ciaddr yiaddr siaddr giaddr chaddr: the reply's
# per-request part; sname, file and the magic cookie follow from a template.
_REPLY_FIXED = struct.Struct("!BBBBIHH4s4s4s4s16s")
# The per-client decision log is rate-limited: a storm of thousands of new
# machines must not turn into per-packet logging, which halves a DHCP server's
# rate (measured with dnsmasq --log-dhcp); what is dropped is counted and summed up.
LOG_BURST = 200
LOG_RATE = 50.0

# Option 43 sub-option 6 (PXE_DISCOVERY_CONTROL) = 8: skip boot-server
# discovery and take the boot file from this packet; every ROM accepts it.
_PXE_VENDOR_OPTIONS = P.encode_suboptions([(6, b"\x08")])


@dataclass(frozen=True, slots=True)
class Reply:
    data: bytes
    address: str
    port: int


class ProxyDhcp:
    """Stateless apart from counters and the log de-duplication memory."""

    def __init__(self, booter: Booter, server_ip: str, counters: Counters | None = None,
                 log_every: float = 60.0, dhcp_port: int = SERVER_PORT,
                 report: Callable[[Client, Offer], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 leased: Callable[[str, str], None] | None = None):
        self.booter = booter
        #: told of every offer (the lifecycle records first contacts); must not block
        self.report = report
        #: told (mac, address) of a PXE or HTTP Boot client's DHCPREQUEST to the site's
        #: server: the address its loader download will come from; must not block
        self.leased = leased
        self.dhcp_port = dhcp_port
        self.server_ip = server_ip
        self._server_ip_bytes = bytes(int(x) for x in server_ip.split("."))
        self.counters = counters or Counters()
        self._templates: dict[tuple[str, int, bool, bool], tuple[bytes, bytes, bytes]] = {}
        #: the decision log: LOG_BURST lines, refilled at LOG_RATE a second; one line per
        #: client and decision every ``log_every`` seconds
        self._log = DecisionLog(log, "boot decision", lambda: self.counters.inc(
            "dhcp_log_suppressed_total"), counted_in="dhcp_log_suppressed_total",
            clock=clock, quiet=log_every)

    def handle(self, data: bytes, port: int, source: tuple[str, int]) -> Reply | None:
        """Decide on one datagram received on ``port`` (the DHCP port, or the PXE
        boot-server port 4011) from ``source``."""
        c = self.counters
        try:
            pkt = P.parse(data)
        except P.MalformedPacket as exc:
            c.inc("dhcp_malformed_total")
            log.debug("malformed packet from %s:%d: %s", source[0], source[1], exc)
            return None
        if pkt.op != P.BOOTREQUEST or pkt.htype != 1 or pkt.hlen != 6:
            c.inc("dhcp_ignored_total", reason="not-ethernet-request")
            return None
        mtype = pkt.message_type
        on_dhcp_port = port == self.dhcp_port
        if mtype != P.DISCOVER if on_dhcp_port else mtype not in (P.REQUEST, P.INFORM):
            if on_dhcp_port and mtype == P.REQUEST and self.leased is not None:
                self._lease(pkt)
            c.inc("dhcp_ignored_total", reason="message-type")
            return None
        vendor = pkt.options.get(P.OPT_VENDOR_CLASS, b"")
        http_boot = vendor.startswith(b"HTTPClient")
        if not (vendor.startswith(b"PXEClient") or http_boot):
            if _is_uboot(pkt, vendor):
                # It takes the first offer, the site's, and asks that offer's next-server
                # for boot.scr.uimg (boot/uboot.py): a proxy offer would only race it.
                c.inc("dhcp_ignored_total", reason="u-boot")
                self._log(self._client(pkt, vendor, False), "U-Boot: not answered (it "
                          "boots from the site DHCP's next-server, which must be netboot)")
                return None
            c.inc("dhcp_ignored_total", reason="not-pxe")
            return None
        client = self._client(pkt, vendor, http_boot)
        decision = self.booter.dhcp(client)
        if isinstance(decision, Ignore):
            c.inc("dhcp_ignored_total", reason="policy")
            self._log(client, decision.reason)
            return None
        reply = self._reply(pkt, decision, client, P.OFFER if on_dhcp_port else P.ACK)
        if self.report is not None:
            self.report(client, decision)
        c.inc("dhcp_offers_total" if on_dhcp_port else "dhcp_acks_total",
              arch=client.arch.value, ipxe="yes" if client.ipxe else "no")
        self._log(client, f"offered {decision.filename} (profile {decision.profile})")
        if pkt.giaddr != b"\0\0\0\0":
            return Reply(reply, _ip(pkt.giaddr), SERVER_PORT)
        if on_dhcp_port:
            return Reply(reply, BROADCAST, CLIENT_PORT)
        # port 4011: the client has an address by now and talks to us directly
        return Reply(reply, source[0], source[1])

    def _lease(self, pkt: P.DhcpPacket) -> None:
        """A boot client's REQUEST to the site's DHCP server (broadcast, or relayed to
        every helper address): the address it asks for is the one it will fetch from."""
        vendor = pkt.options.get(P.OPT_VENDOR_CLASS, b"")
        if not (vendor.startswith(b"PXEClient") or vendor.startswith(b"HTTPClient")):
            return
        wanted = pkt.options.get(P.OPT_REQUESTED_IP)
        addr = wanted if wanted is not None and len(wanted) == 4 else pkt.ciaddr
        if addr == b"\0\0\0\0":
            return
        assert self.leased is not None
        self.leased(pkt.chaddr[:6].hex(":"), _ip(addr))

    def _client(self, pkt: P.DhcpPacket, vendor: bytes, http_boot: bool) -> Client:
        mac = pkt.chaddr[:6].hex(":")  # hlen is 6 here: normalise_mac's form, faster
        arch_opt = pkt.options.get(P.OPT_CLIENT_ARCH)
        code: int | None = None
        if arch_opt and len(arch_opt) >= 2:
            code = int.from_bytes(arch_opt[:2], "big")
        elif vendor[:15] in (b"PXEClient:Arch:", b"HTTPClient:Arch"):
            try:  # "PXEClient:Arch:00007:UNDI:003016"
                code = int(vendor.split(b":")[2])
            except (IndexError, ValueError):
                code = None
        arch, is_http_arch = arch_from_code(code)
        uuid_opt = pkt.options.get(P.OPT_CLIENT_UUID)
        uuid = node_uuid(uuid_from_option97(uuid_opt) if uuid_opt else None, mac)
        user_class = pkt.options.get(P.OPT_USER_CLASS, b"")
        ipxe = user_class == b"iPXE" or P.OPT_IPXE_ENCAP in pkt.options
        return Client(mac=mac, uuid=uuid, arch=arch, http_boot=http_boot or is_http_arch,
                      ipxe=ipxe, giaddr=pkt.giaddr,
                      agent=pkt.options.get(P.OPT_RELAY_AGENT))

    def _reply(self, req: P.DhcpPacket, offer: Offer, client: Client, mtype: int) -> bytes:
        """The reply's bytes: a cached per-decision template (sname, file and the
        fixed options), with the request's own fields patched in. Building each
        reply from a DhcpPacket cost a third of the per-packet time."""
        key = (offer.filename, mtype, client.http_boot, client.ipxe)
        tpl = self._templates.get(key)
        if tpl is None:
            tpl = self._template(*key)
        head, fixed_opts, tail_opts = tpl
        flags = req.flags
        if mtype == P.OFFER and req.giaddr != b"\0\0\0\0":
            # A relay unicasts a reply to yiaddr unless BROADCAST is set (RFC 1542
            # §5.4); a proxy offer has no yiaddr, so without this the relay sends it
            # nowhere (seen with dnsmasq's relay and iPXE, which clears the flag).
            flags |= P.FLAG_BROADCAST
        parts = [
            _REPLY_FIXED.pack(P.BOOTREPLY, req.htype, req.hlen, 0, req.xid, 0, flags,
                              req.ciaddr if mtype == P.ACK else b"\0\0\0\0", b"\0\0\0\0",
                              self._server_ip_bytes,  # iPXE wants siaddr + file
                              req.giaddr, req.chaddr),
            head, fixed_opts,
        ]
        uuid = req.options.get(P.OPT_CLIENT_UUID)
        if uuid is not None:
            parts.append(P.encode_option(P.OPT_CLIENT_UUID, uuid))
        parts.append(tail_opts)
        relay = req.options.get(P.OPT_RELAY_AGENT)
        if relay is not None:  # RFC 3046 §2.2: echoed, last
            parts.append(P.encode_option(P.OPT_RELAY_AGENT, relay))
        parts.append(b"\xff")
        out = b"".join(parts)
        if len(out) < 300:  # BOOTP minimum; some ROMs drop shorter replies
            out += bytes(300 - len(out))
        return out

    def _template(self, filename: str, mtype: int, http_boot: bool,
                  ipxe: bool) -> tuple[bytes, bytes, bytes]:
        """(sname + file + magic, options before 97, options between 97 and 82)."""
        name = filename.encode()
        fixed = [P.encode_option(P.OPT_MESSAGE_TYPE, bytes((mtype,))),
                 P.encode_option(P.OPT_SERVER_ID, self._server_ip_bytes),
                 P.encode_option(P.OPT_VENDOR_CLASS,
                                 b"HTTPClient" if http_boot else b"PXEClient")]
        if not ipxe and not http_boot:
            fixed.append(P.encode_option(P.OPT_VENDOR_SPECIFIC, _PXE_VENDOR_OPTIONS))
        # too long for the file field: option 67 carries it
        tail = P.encode_option(P.OPT_BOOTFILE, name) if len(name) > 127 else b""
        head = (self.server_ip.encode()[:63].ljust(64, b"\0")
                + (name if len(name) <= 127 else b"").ljust(128, b"\0") + P.MAGIC)
        if len(self._templates) > 4096:  # one per (file, type, flags): a config's worth
            self._templates.clear()
        tpl = self._templates[(filename, mtype, http_boot, ipxe)] = (head, b"".join(fixed), tail)
        return tpl



class DecisionLog:
    """Each distinct boot decision per client logged once a minute, not per packet:
    LOG_BURST lines, refilled at LOG_RATE a second; what is held back is counted
    (``held``) and summed up in one line. Used by the DHCPv4 and DHCPv6 responders."""

    def __init__(self, logger: logging.Logger, what: str, held: Callable[[], Any], *,
                 counted_in: str, clock: Callable[[], float], quiet: float | None):
        self._logger = logger
        self._what = what
        self._limit = RateLimitedLog(
            logger, f"%d {what}(s) were not logged (%s: more than {LOG_RATE:g} new clients "
            f"a second; counted in {counted_in}); latest: mac=%s",
            every=LOG_BURST / LOG_RATE, burst=LOG_BURST, clock=clock, level=logging.INFO,
            quiet=quiet, on_held=lambda _reason: held())

    def __call__(self, client: Client, what: str) -> None:
        if self._logger.isEnabledFor(logging.INFO) and self._limit.allow(
                (client.mac, what, client.ipxe), "over_rate", client.mac):
            self._logger.info("%s: mac=%s uuid=%s arch=%s%s%s: %s", self._what, client.mac,
                              client.uuid or "-", client.arch.value,
                              " ipxe" if client.ipxe else "",
                              " http-boot" if client.http_boot else "", what)


def _is_uboot(pkt: P.DhcpPacket, vendor: bytes) -> bool:
    """U-Boot's own DHCP: option 60 ``U-Boot`` (``U-Boot.armv8``, ...), or option 93 =
    21/22 (IANA: ARM 32/64-bit U-Boot) without PXEClient."""
    arch = pkt.options.get(P.OPT_CLIENT_ARCH, b"")
    return vendor.startswith(b"U-Boot") or (len(arch) >= 2 and arch[:2] in (
        b"\x00\x15", b"\x00\x16"))


def _ip(b: bytes) -> str:
    return socket.inet_ntoa(b)
