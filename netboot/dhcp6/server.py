"""The asyncio side of DHCPv6: sockets on udp/547 and udp/4011 over IPv6.

Every decision is the :class:`~.responder.Dhcp6Responder`'s; the reading,
overload shedding and pacing are DHCPv4's (:class:`netboot.dhcp.server._Endpoint`,
which only moves bytes), so this module only makes the sockets. Their options:

- ``IPV6_V6ONLY``: IPv6 only. DHCPv4 has its own sockets on 0.0.0.0; without it
  a second bind to the same port would fail (and v4-mapped peers are no use here).
- ``SO_REUSEADDR``: a restart binds while the old socket lingers.
- ``SO_BINDTODEVICE``: only the provisioning interface, as for DHCPv4.
- ``IPV6_JOIN_GROUP`` ff02::1:2 on that interface: clients on the link send
  Solicit and Information-request to All_DHCP_Relay_Agents_and_Servers, never
  to a unicast address; relays send Relay-forward by unicast, which needs nothing.
- the receive and send buffers and SO_TIMESTAMPNS, as for DHCPv4 (bursts of a
  rack, and the stale-queue check).

A reply goes to the request's source address and port (a link-local client with
its scope, or the relay agent), which RFC 8415 §18.3.10 and §19.3 ask for.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable

from ..dhcp.server import MAX_AGE, DhcpServer, start_dhcp, udp_socket
from . import packet as P
from .responder import Dhcp6Responder

#: EDK2 sends its boot-service Request to udp/4011 and only then opens the socket
#: that reads the answer: under TCG a Reply sent 0.8 ms after the Request arrived
#: before that and was lost (the firmware waited 3 s, released its address and
#: said PXE-E16); one 6 ms later and one 51 ms later were taken (OVMF 2022.11, in
#: the lab). 50 ms leaves margin for a slower machine and costs one boot 50 ms.
BOOT_REPLY_DELAY = 0.05


def udp6_socket(port: int, interface: str | None, host: str = "::") -> socket.socket:
    """A non-blocking IPv6 UDP socket on ``[host]:port``, in the servers' group on
    ``interface``; the rest as DHCPv4's sockets."""
    def setup(sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if interface:
            group = socket.inet_pton(socket.AF_INET6, P.ALL_SERVERS)
            mreq = group + struct.pack("@I", socket.if_nametoindex(interface))
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)

    return udp_socket(host, port, interface, broadcast=False, family=socket.AF_INET6,
                      setup=setup)


async def start_dhcp6(responder: Dhcp6Responder, ports: list[int], *,
                      interface: str | None = None, host: str = "::",
                      max_age: float = MAX_AGE, wall: Callable[[], float] = time.time,
                      pacing: bool = True, boot_port: int | None = None,
                      boot_delay: float = BOOT_REPLY_DELAY) -> DhcpServer:
    """Serve ``responder`` on each of ``ports`` (547 and the boot-service port 4011,
    ``boot_port``, whose replies leave ``boot_delay`` seconds late, unpaced)."""
    return await start_dhcp(
        responder, ports, max_age=max_age, wall=wall, pacing=pacing,  # type: ignore[arg-type]
        make_socket=lambda port: udp6_socket(port, interface, host),
        delays={boot_port: boot_delay} if boot_port is not None else None)
