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


#: datagrams read per wake-up before yielding to the loop (HTTP and TFTP share it)
BATCH = 64


class _Endpoint:
    """One port, driven by loop.add_reader with non-blocking recvfrom/sendto: one
    wake-up serves a burst, and no transport or protocol callback per packet
    (uvloop's transport sendto cost more than the ProxyDHCP decision itself)."""

    def __init__(self, proxy: ProxyDhcp, port: int, sock: socket.socket):
        self.proxy = proxy
        self.port = port
        self.sock = sock

    def on_readable(self) -> None:
        recvfrom = self.sock.recvfrom
        sendto = self.sock.sendto
        handle = self.proxy.handle
        port = self.port
        for _ in range(BATCH):
            try:
                data, addr = recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. ICMP errors queued on the socket
                self.proxy.counters.inc("dhcp_socket_errors_total")
                log.debug("DHCP socket error: %s", exc)
                continue
            try:
                reply = handle(data, port, addr)
                if reply is not None:
                    sendto(reply.data, (reply.address, reply.port))
            except (BlockingIOError, InterruptedError):
                # The kernel is pushing back (send buffer full): drop, the client
                # retransmits; never queue without bound in user space.
                self.proxy.counters.inc("dhcp_send_dropped_total")
            except OSError as exc:  # unreachable giaddr and the like
                self.proxy.counters.inc("dhcp_socket_errors_total")
                log.debug("DHCP send to %s failed: %s", addr[0], exc)
            except Exception:  # a bug must cost one packet, not the server
                self.proxy.counters.inc("dhcp_errors_total")
                log.exception("error handling a DHCP packet from %s:%d", addr[0], addr[1])


class DhcpServer:
    def __init__(self) -> None:
        self.sockets: list[socket.socket] = []
        self.ports: list[int] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def close(self) -> None:
        for sock in self.sockets:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self.sockets.clear()


async def start_dhcp(proxy: ProxyDhcp, ports: list[int], *, host: str = "0.0.0.0",
                     interface: str | None = None) -> DhcpServer:
    loop = asyncio.get_running_loop()
    server = DhcpServer()
    server._loop = loop
    try:
        for port in ports:
            sock = udp_socket(host, port, interface)
            server.sockets.append(sock)
            server.ports.append(sock.getsockname()[1])
            loop.add_reader(sock.fileno(), _Endpoint(proxy, port, sock).on_readable)
    except BaseException:
        server.close()
        raise
    return server
