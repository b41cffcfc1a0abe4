"""ProxyDHCP policy without sockets: a request's bytes in, a reply's bytes and
destination out.

A ProxyDHCP server never hands out addresses; it answers PXE clients beside
the site's own DHCP server with only the boot information (PXE 2.1 §2.2.3).
It answers DHCPDISCOVER on port 67 with an offer and DHCPREQUEST on port 4011
with an ack, ignores everything that is not a PXE, HTTP-boot or iPXE client,
and counts every outcome.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from ..booter import Booter, Client, Ignore, Offer
from ..identity import arch_from_code, normalise_mac, uuid_from_option97
from ..metrics import Counters
from . import packet as P

log = logging.getLogger("netboot.dhcp")

BROADCAST = "255.255.255.255"
CLIENT_PORT = 68
SERVER_PORT = 67

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
                 log_every: float = 60.0, dhcp_port: int = SERVER_PORT):
        self.booter = booter
        self.dhcp_port = dhcp_port
        self.server_ip = server_ip
        self._server_ip_bytes = bytes(int(x) for x in server_ip.split("."))
        self.counters = counters or Counters()
        self._last_logged: dict[tuple[str, str], float] = {}
        self._log_every = log_every

    def handle(self, data: bytes, port: int, source: tuple[str, int],
               now: float | None = None) -> Reply | None:
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
            c.inc("dhcp_ignored_total", reason="message-type")
            return None
        vendor = pkt.options.get(P.OPT_VENDOR_CLASS, b"")
        http_boot = vendor.startswith(b"HTTPClient")
        if not (vendor.startswith(b"PXEClient") or http_boot):
            c.inc("dhcp_ignored_total", reason="not-pxe")
            return None
        client = self._client(pkt, vendor, http_boot)
        if client is None:
            c.inc("dhcp_ignored_total", reason="bad-identity")
            return None
        decision = self.booter.dhcp(client)
        if isinstance(decision, Ignore):
            c.inc("dhcp_ignored_total", reason="policy")
            self._log(client, decision.reason, now)
            return None
        reply = self._reply(pkt, decision, client, P.OFFER if on_dhcp_port else P.ACK)
        c.inc("dhcp_offers_total" if on_dhcp_port else "dhcp_acks_total",
              arch=client.arch.value, ipxe="yes" if client.ipxe else "no")
        self._log(client, f"offered {decision.filename} (profile {decision.profile})", now)
        if pkt.giaddr != b"\0\0\0\0":
            return Reply(reply, _ip(pkt.giaddr), SERVER_PORT)
        if on_dhcp_port:
            return Reply(reply, BROADCAST, CLIENT_PORT)
        # port 4011: the client has an address by now and talks to us directly
        return Reply(reply, source[0], source[1])

    def _client(self, pkt: P.DhcpPacket, vendor: bytes, http_boot: bool) -> Client | None:
        try:
            mac = normalise_mac(pkt.mac)
        except ValueError:
            return None
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
        uuid = uuid_from_option97(uuid_opt) if uuid_opt else None
        user_class = pkt.options.get(P.OPT_USER_CLASS, b"")
        ipxe = user_class == b"iPXE" or P.OPT_IPXE_ENCAP in pkt.options
        return Client(mac=mac, uuid=uuid, arch=arch, http_boot=http_boot or is_http_arch,
                      ipxe=ipxe)

    def _reply(self, req: P.DhcpPacket, offer: Offer, client: Client, mtype: int) -> bytes:
        opts: dict[int, bytes] = {
            P.OPT_MESSAGE_TYPE: bytes((mtype,)),
            P.OPT_SERVER_ID: self._server_ip_bytes,
            P.OPT_VENDOR_CLASS: b"HTTPClient" if client.http_boot else b"PXEClient",
        }
        if not client.ipxe and not client.http_boot:
            opts[P.OPT_VENDOR_SPECIFIC] = _PXE_VENDOR_OPTIONS
        uuid = req.options.get(P.OPT_CLIENT_UUID)
        if uuid is not None:
            opts[P.OPT_CLIENT_UUID] = uuid
        filename = offer.filename.encode()
        if len(filename) > 127:  # too long for the file field: option 67 carries it
            opts[P.OPT_BOOTFILE] = filename
        relay = req.options.get(P.OPT_RELAY_AGENT)
        if relay is not None:
            opts[P.OPT_RELAY_AGENT] = relay  # RFC 3046 §2.2: echoed last
        return P.build(P.DhcpPacket(
            op=P.BOOTREPLY, htype=req.htype, hlen=req.hlen, hops=0, xid=req.xid, secs=0,
            flags=req.flags, ciaddr=req.ciaddr if mtype == P.ACK else b"\0\0\0\0",
            yiaddr=b"\0\0\0\0", siaddr=self._server_ip_bytes,  # iPXE wants siaddr + file
            giaddr=req.giaddr, chaddr=req.chaddr,
            sname=self.server_ip.encode(), file=filename if len(filename) <= 127 else b"",
            options=opts,
        ))

    def _log(self, client: Client, what: str, now: float | None) -> None:
        """Log each distinct decision per client once a minute, not per packet."""
        if not log.isEnabledFor(logging.INFO):
            return
        now = time.monotonic() if now is None else now
        key = (client.mac, what + str(client.ipxe))
        last = self._last_logged.get(key)
        if last is not None and now - last < self._log_every:
            return
        if len(self._last_logged) > 50_000:
            self._last_logged.clear()
        self._last_logged[key] = now
        log.info("boot decision: mac=%s uuid=%s arch=%s%s%s: %s", client.mac,
                 client.uuid or "-", client.arch.value, " ipxe" if client.ipxe else "",
                 " http-boot" if client.http_boot else "", what)


def _ip(b: bytes) -> str:
    return ".".join(str(x) for x in b)
