"""The asyncio side of ProxyDHCP: sockets on 67 and 4011, nothing else.

Every decision is made by :class:`ProxyDhcp`; this layer only moves bytes.
Sockets are bound to the interface (SO_BINDTODEVICE) so broadcasts leave by
the right link even in a namespace with no default route.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from .proxy import ProxyDhcp

log = logging.getLogger("netboot.dhcp")

SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
BUFFER_BYTES = 4 << 20


def _set_buffer(sock: socket.socket, force: int, plain: int, size: int) -> None:
    """As root, past net.core.[rw]mem_max; else as far as the limit allows."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, plain, size)


def udp_socket(host: str, port: int, interface: str | None,
               broadcast: bool = True) -> socket.socket:
    """A non-blocking UDP socket bound to ``host:port``, optionally to one device."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if broadcast:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        if interface:
            sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, interface.encode() + b"\0")
        # A burst of DISCOVERs (a rack powering on) must not overflow the receive
        # queue. The send buffer is large because the kernel charges replies waiting
        # on ARP (a relay's giaddr that does not answer) to it for ~3 s: with the
        # default 208 kB, three silent "relays" stalled every other reply.
        _set_buffer(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, BUFFER_BYTES)
        _set_buffer(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, BUFFER_BYTES)
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, proxy: ProxyDhcp, port: int):
        self.proxy = proxy
        self.port = port
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            reply = self.proxy.handle(data, self.port, addr)
            if reply is not None and self.transport is not None:
                if self.transport.get_write_buffer_size():
                    # The kernel is pushing back: drop rather than queue without
                    # bound in user space; the client retransmits.
                    self.proxy.counters.inc("dhcp_send_dropped_total")
                    return
                self.transport.sendto(reply.data, (reply.address, reply.port))
        except Exception:  # a bug must cost one packet, not the server
            self.proxy.counters.inc("dhcp_errors_total")
            log.exception("error handling a DHCP packet from %s:%d", addr[0], addr[1])

    def error_received(self, exc: Exception) -> None:
        self.proxy.counters.inc("dhcp_socket_errors_total")
        log.debug("DHCP socket error: %s", exc)


class DhcpServer:
    def __init__(self) -> None:
        self.transports: list[asyncio.DatagramTransport] = []
        self.ports: list[int] = []

    def close(self) -> None:
        for t in self.transports:
            t.close()


async def start_dhcp(proxy: ProxyDhcp, ports: list[int], *, host: str = "0.0.0.0",
                     interface: str | None = None) -> DhcpServer:
    loop = asyncio.get_running_loop()
    server = DhcpServer()
    try:
        for port in ports:
            sock = udp_socket(host, port, interface)
            transport, _ = await loop.create_datagram_endpoint(
                lambda p=port: _Endpoint(proxy, p), sock=sock)
            server.transports.append(transport)  # type: ignore[arg-type]
            server.ports.append(sock.getsockname()[1])
    except BaseException:
        server.close()
        raise
    return server
