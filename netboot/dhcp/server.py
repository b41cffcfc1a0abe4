"""The asyncio side of ProxyDHCP: sockets on 67 and 4011, nothing else.

Every decision is made by :class:`ProxyDhcp`; this layer only moves bytes.
Sockets are bound to the interface (SO_BINDTODEVICE) so broadcasts leave by
the right link even in a namespace with no default route.

Overload: the kernel stamps each datagram when it arrives (SO_TIMESTAMPNS). A
request that waited in the socket queue longer than ``max_age`` is dropped
before it is decoded and counted (``dhcp_overload_dropped_total``): after a
stall the server sheds the stale part of its queue at the cost of a read
instead of answering it late and in a burst, which a relay with default
buffers (166 replies on Linux's 208 kB) would lose anyway. The stamp is read
once per wake-up while the queue is fresh (a datagram behind a fresh one is
fresher), and per datagram only while the head of the queue is stale.
Replies leave one by one as they are decided, interleaved with the reads.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections.abc import Callable

from .pacer import Pacer
from .proxy import ProxyDhcp

log = logging.getLogger("netboot.dhcp")

SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # SCM_TIMESTAMPNS, the same number
BUFFER_BYTES = 4 << 20
#: a request older than this when read is stale: its client has retried or given up
#: (iPXE's first DHCP timer is 1 s) and an answer now would leave in a burst
MAX_AGE = 0.25
_TIMESPEC = struct.Struct("@ll")
_ANC_SPACE = socket.CMSG_SPACE(_TIMESPEC.size)


def _set_buffer(sock: socket.socket, force: int, plain: int, size: int) -> None:
    """As root, past net.core.[rw]mem_max; else as far as the limit allows."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, plain, size)


def udp_socket(host: str, port: int, interface: str | None,
               broadcast: bool = True, *, family: socket.AddressFamily = socket.AF_INET,
               setup: Callable[[socket.socket], None] | None = None) -> socket.socket:
    """A non-blocking UDP socket bound to ``host:port``, optionally to one device;
    ``setup`` sets the options of another family (DHCPv6's) first."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if setup is not None:
            setup(sock)
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
        # the kernel's arrival time of each datagram, for the overload check
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


#: datagrams read per wake-up before yielding to the loop (HTTP and TFTP share it)
BATCH = 64


def _arrival(ancdata: list[tuple[int, int, bytes]]) -> float | None:
    """The SCM_TIMESTAMPNS stamp (wall-clock seconds) in a recvmsg's ancillary data."""
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
            sec, nsec = _TIMESPEC.unpack_from(data)
            return sec + nsec * 1e-9
    return None


class _Endpoint:
    """One port, driven by loop.add_reader with non-blocking recvfrom/sendto: one
    wake-up serves a burst, and no transport or protocol callback per packet
    (uvloop's transport sendto cost more than the ProxyDHCP decision itself).
    Replies go through the :class:`Pacer` (None: pacing off); held ones leave on a
    timer."""

    def __init__(self, proxy: ProxyDhcp, port: int, sock: socket.socket, *,
                 loop: asyncio.AbstractEventLoop, max_age: float = MAX_AGE,
                 wall: Callable[[], float] = time.time, pacer: Pacer | None = None):
        self.proxy = proxy
        self.port = port
        self.sock = sock
        self.max_age = max_age
        #: the clock the kernel stamps arrivals with (CLOCK_REALTIME)
        self.wall = wall
        self.loop = loop
        #: None: every reply leaves as soon as it is decided (dhcp.pacing: false)
        self.pacer = pacer
        self._timer: asyncio.TimerHandle | None = None

    def _fresh(self) -> tuple[bytes, tuple[str, int]]:
        """Read past stale datagrams (counted) to the first fresh one; raises what
        recvmsg raises (BlockingIOError once the queue is empty)."""
        recvmsg = self.sock.recvmsg
        while True:
            data, ancdata, _flags, addr = recvmsg(2048, _ANC_SPACE)
            stamp = _arrival(ancdata)
            if stamp is None or self.wall() - stamp <= self.max_age:
                return data, addr
            self.proxy.counters.inc("dhcp_overload_dropped_total")

    def on_readable(self) -> None:
        self._read()
        if self.pacer is not None and self._timer is None:
            self._schedule()

    def _read(self) -> None:
        recvfrom = self.sock.recvfrom
        handle = self.proxy.handle
        offer = self.pacer.offer if self.pacer is not None else None
        now = self.loop.time
        port = self.port
        counters = self.proxy.counters
        fresh = False  # the head of the queue was fresh: what follows it is fresher
        for _ in range(BATCH):
            try:
                if fresh:
                    data, addr = recvfrom(2048)
                else:
                    data, addr = self._fresh()
                    fresh = True
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. ICMP errors queued on the socket
                counters.inc("dhcp_socket_errors_total")
                log.debug("DHCP socket error: %s", exc)
                continue
            try:
                reply = handle(data, port, addr)
            except Exception:  # a bug must cost one packet, not the server
                counters.inc("dhcp_errors_total")
                log.exception("error handling a DHCP packet from %s:%d", addr[0], addr[1])
                continue
            if reply is not None:
                dest = (reply.address, reply.port)
                if offer is None or offer(dest, reply.data, now()):
                    self._send(reply.data, dest)

    def _send(self, data: bytes, dest: tuple[str, int]) -> None:
        try:
            self.sock.sendto(data, dest)
        except (BlockingIOError, InterruptedError):
            # The kernel is pushing back (send buffer full): drop, the client
            # retransmits; never queue without bound in user space.
            self.proxy.counters.inc("dhcp_send_dropped_total")
        except OSError as exc:  # unreachable giaddr and the like
            self.proxy.counters.inc("dhcp_socket_errors_total")
            log.debug("DHCP send to %s failed: %s", dest[0], exc)

    def _schedule(self) -> None:
        assert self.pacer is not None
        at = self.pacer.deadline()
        if at is not None:
            self._timer = self.loop.call_at(at, self._flush)

    def _flush(self) -> None:
        assert self.pacer is not None
        self._timer = None
        dropped = self.pacer.dropped
        for dest, data in self.pacer.due(self.loop.time()):
            self._send(data, dest)
        if self.pacer.dropped != dropped:
            self.proxy.counters.inc("dhcp_paced_dropped_total", self.pacer.dropped - dropped)
        self._schedule()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _DelayedEndpoint(_Endpoint):
    """An endpoint whose replies leave ``delay`` seconds after they are decided
    (DHCPv6's boot-service port: netboot.dhcp6.server.BOOT_REPLY_DELAY says why);
    at most MAX_DELAYED wait, more are dropped and counted."""

    MAX_DELAYED = 1024

    def __init__(self, proxy: ProxyDhcp, port: int, sock: socket.socket, *,
                 loop: asyncio.AbstractEventLoop, delay: float, max_age: float = MAX_AGE,
                 wall: Callable[[], float] = time.time):
        super().__init__(proxy, port, sock, loop=loop, max_age=max_age, wall=wall)
        self.delay = delay
        self.waiting = 0

    def _send(self, data: bytes, dest: tuple[str, int]) -> None:
        if self.waiting >= self.MAX_DELAYED:
            self.proxy.counters.inc("dhcp_delayed_dropped_total")
            return
        self.waiting += 1
        self.loop.call_later(self.delay, self._later, data, dest)

    def _later(self, data: bytes, dest: tuple[str, int]) -> None:
        self.waiting -= 1
        super()._send(data, dest)


class DhcpServer:
    def __init__(self) -> None:
        self.sockets: list[socket.socket] = []
        self.ports: list[int] = []
        self.endpoints: list[_Endpoint] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def close(self) -> None:
        for endpoint in self.endpoints:
            endpoint.close()
        self.endpoints.clear()
        for sock in self.sockets:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self.sockets.clear()


async def start_dhcp(proxy: ProxyDhcp, ports: list[int], *, host: str = "0.0.0.0",
                     interface: str | None = None, max_age: float = MAX_AGE,
                     wall: Callable[[], float] = time.time,
                     pacer: Callable[[], Pacer] | None = None,
                     pacing: bool = True,
                     make_socket: Callable[[int], socket.socket] | None = None,
                     delays: dict[int, float] | None = None) -> DhcpServer:
    """Serve ``proxy`` on each of ``ports``; ``pacer`` makes each port's Pacer
    (default: Pacer's defaults, holding replies no longer than ``max_age``);
    ``pacing=False`` sends every reply at once. ``make_socket`` (DHCPv6's) makes
    a port's socket; ``delays`` holds each reply of a port that long, unpaced."""
    loop = asyncio.get_running_loop()
    server = DhcpServer()
    server._loop = loop
    try:
        for port in ports:
            sock = make_socket(port) if make_socket else udp_socket(host, port, interface)
            server.sockets.append(sock)
            server.ports.append(sock.getsockname()[1])
            paced = None if not pacing else pacer() if pacer is not None else Pacer(
                max_age=max_age)
            delay = (delays or {}).get(port, 0.0)
            endpoint = _Endpoint(proxy, port, sock, loop=loop, max_age=max_age, wall=wall,
                                 pacer=paced) if delay <= 0 else _DelayedEndpoint(
                proxy, port, sock, loop=loop, max_age=max_age, wall=wall, delay=delay)
            server.endpoints.append(endpoint)
            loop.add_reader(sock.fileno(), endpoint.on_readable)
    except BaseException:
        server.close()
        raise
    return server
