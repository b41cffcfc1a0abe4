"""Thin asyncio socket layer around session.ReadSession.

Sockets are driven with loop.add_reader and non-blocking recvfrom/sendto
rather than DatagramProtocol transports: one fewer layer per packet, and it
behaves the same on plain asyncio and uvloop (the caller picks the loop).
Each transfer gets its own socket on an ephemeral port (RFC 1350 TIDs), or in
single-port mode every transfer is answered from the listening socket.
Timers are lazy: the session moves its deadline on every packet for free, and
one call_at per transfer re-arms itself only when it fires early.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path

from netboot.metrics import Counters
from netboot.tftp import packet as pk
from netboot.tftp.offload import Ended, Offload
from netboot.tftp.provider import (
    FileProvider,
    NetasciiProvider,
    Provider,
    Resolver,
    TftpError,
    normalise_path,
)
from netboot.tftp.session import MAX_BLKSIZE, Outcome, ReadSession
from netboot.util.ratelimit import RateLimitedLog

log = logging.getLogger("netboot.tftp")

#: seconds between log summaries of refused requests (a flood is one line, not one a packet)
REFUSAL_LOG_EVERY = 10.0

_RUNNING = Outcome.RUNNING  # a global: Outcome.RUNNING is slow in 3.11 (EnumType.__getattr__)

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # Linux values; the socket module may lack them
IP_MTU = getattr(socket, "IP_MTU", 14)
IPV6_MTU = getattr(socket, "IPV6_MTU", 24)
SAFE_BLKSIZE = 1468  # fits a 1500-byte ethernet MTU over IPv4

OnTransfer = Callable[[str, tuple[str, int], bool], None]

_HELP = {
    "tftp_requests": "RRQ/WRQ packets received",
    "tftp_transfers_started": "transfers started",
    "tftp_transfers_completed": "transfers whose last block was acknowledged",
    "tftp_transfers_failed": "transfers that ended without completing, by reason",
    "tftp_size_probes": "OACKs declined with ERROR 8 (UEFI size probes)",
    "tftp_errors_sent": "ERROR packets sent, by code",
    "tftp_client_errors": "ERROR packets received from clients, by code",
    "tftp_malformed": "packets dropped as malformed or unexpected",
    "tftp_refused": "requests refused, by reason",
    "tftp_wrong_tid": "packets from an unknown transfer ID (answered with ERROR 5)",
    "tftp_duplicate_requests": "retransmitted RRQs for a transfer already running",
    "tftp_bytes_sent": "payload bytes sent, retransmissions included",
    "tftp_retransmits": "DATA/OACK packets sent again after a timeout",
    "tftp_send_errors": "packets the kernel refused to send",
    "tftp_handed_off": "file transfers given to the worker process",
    "tftp_hand_off_skipped": "file transfers served here although a worker runs, by reason",
}

#: counters shown in /metrics from the start, so that none served reads as a 0
_EXPORTED_AT_ZERO = ("tftp_requests", "tftp_transfers_started", "tftp_transfers_completed",
                     "tftp_bytes_sent")


class _Transfer:
    """Glue between one ReadSession and its socket, peer and timer.

    In the normal mode `sock` is connected to the peer, so the per-packet path is a
    plain recv/send with no address to build, parse or compare; packets from any other
    address reach `catcher`, an unconnected socket on the same port (see
    TftpServer._transfer_sockets), and get ERROR 5 from it. In single-port mode `sock`
    is the listening socket and packets arrive through `feed`.
    """

    __slots__ = ("catcher", "filename", "ip", "on_ack", "path", "peer", "recv", "send",
                 "server", "session", "sock", "time", "timer")

    def __init__(self, server: TftpServer, session: ReadSession, sock: socket.socket,
                 catcher: socket.socket | None, peer: tuple[str, int], path: str,
                 filename: str):
        self.server = server
        self.session = session
        self.sock = sock
        self.catcher = catcher
        self.peer = peer
        self.path = path
        self.filename = filename
        self.ip = peer[0]
        self.timer: asyncio.TimerHandle | None = None
        self.time = server._time
        # Bound once: the per-packet path below is attribute loads of this object only.
        self.on_ack = session.on_ack
        self.recv = sock.recv
        if catcher is not None:  # connected
            self.send: Callable[[bytes | memoryview], int] = sock.send
        else:
            sendto = sock.sendto
            self.send = lambda p: sendto(p, peer)

    def abort(self, reason: str) -> None:
        self.session.abort(reason)

    def on_readable(self) -> None:
        # The per-packet path. One datagram per wake-up: in lock-step there is never a
        # second one waiting, and a second recv would cost a syscall plus an exception
        # every block. 516 bytes: an ACK is 4, and a buffer over 512 would be malloc'd.
        try:
            data = self.recv(516)
        except OSError:  # EAGAIN after a spurious wake-up, or an ICMP error (client gone)
            return
        if len(data) >= 4 and data[1] == 4 and data[0] == 0:  # ACK: the session's fast path
            out = self.on_ack((data[2] << 8) | data[3], self.time())
            if out:  # send_all() inlined: a frame less per ACK (about 400 instructions)
                send = self.send
                for p in out:
                    try:
                        send(p)
                    except OSError:
                        self.server.counters.inc("tftp_send_errors")
                return
            if self.session.outcome is not _RUNNING:
                self.server._finish(self)
            return
        self.feed(data)

    def on_catcher_readable(self) -> None:
        """A packet to this transfer's port from anyone but the peer: ERROR 5 (RFC 1350)."""
        catcher = self.catcher
        assert catcher is not None
        for _ in range(16):
            try:
                data, addr = catcher.recvfrom(2048)
            except OSError:
                return
            if addr == self.peer:  # raced with connect(): it is ours after all
                self.feed(data)
            else:
                self.server._wrong_tid(catcher, data, addr)

    def feed(self, data: bytes) -> None:
        session = self.session
        try:
            out = session.receive(data, self.time())
        except pk.MalformedPacket:
            self.server.counters.inc("tftp_malformed")
            return
        self.send_all(out)
        if session.outcome is not _RUNNING:
            self.server._finish(self)

    def send_all(self, out: list[bytes | memoryview]) -> None:
        send = self.send
        for p in out:
            try:
                send(p)
            except OSError:
                self.server.counters.inc("tftp_send_errors")

    def arm(self) -> None:
        deadline = self.session.deadline
        if deadline is not None:
            self.timer = self.server._loop.call_at(deadline, self.on_timer)

    def on_timer(self) -> None:
        self.timer = None
        session = self.session
        if session.outcome is not _RUNNING:
            return
        now = self.time()
        if session.deadline is not None and now >= session.deadline:
            self.send_all(session.on_timer(now))
            if session.outcome is not _RUNNING:
                self.server._finish(self)
                return
        self.arm()


class _Remote:
    """A transfer the worker process runs (offload.py): what the limits, duplicate RRQs
    and the report at its end need to know of it here."""

    __slots__ = ("filename", "ip", "offload", "path", "peer", "tid")

    def __init__(self, offload: Offload, tid: int, peer: tuple[str, int], path: str,
                 filename: str):
        self.offload = offload
        self.tid = tid
        self.peer = peer
        self.ip = peer[0]
        self.path = path
        self.filename = filename

    def abort(self, reason: str) -> None:
        self.offload.abort(self.tid, reason)


def send_error(counters: Counters, sock: socket.socket, addr: tuple[str, int], code: int,
               msg: str) -> None:
    counters.inc("tftp_errors_sent", code=str(code))
    try:
        sock.sendto(pk.encode_error(code, msg), addr)
    except OSError:
        counters.inc("tftp_send_errors")


def answer_wrong_tid(counters: Counters, sock: socket.socket, data: bytes,
                     addr: tuple[str, int]) -> None:
    """A packet from a stranger to a transfer's port: ERROR 5, unless it is an ERROR
    itself (never answer one: two servers could loop)."""
    counters.inc("tftp_wrong_tid")
    if pk.opcode_of(data) != pk.ERROR:
        send_error(counters, sock, addr, pk.ERR_UNKNOWN_TID, "unknown transfer ID")


class TftpServer:
    """A running TFTP server; create it with start_tftp()."""

    def __init__(self, sock: socket.socket, resolver: Resolver, *, counters: Counters,
                 interface: str | None, single_port: bool, max_transfers: int,
                 max_per_client: int, on_transfer: OnTransfer | None, timeout: float,
                 retries: int, max_windowsize: int, workers: int = 0):
        self._loop = asyncio.get_running_loop()
        # The clock of the loop's timers. Stock asyncio's loop.time() is a Python method
        # around time.monotonic(): call that directly (one frame less per packet).
        self._time: Callable[[], float] = self._loop.time
        if getattr(type(self._loop), "time", None) is asyncio.BaseEventLoop.time:
            self._time = time.monotonic
        self._sock = sock
        self._resolver = resolver
        self.counters = counters
        self.port: int = sock.getsockname()[1]
        self.host: str = sock.getsockname()[0]
        self._family = sock.family
        self._interface = interface
        self._single_port = single_port
        self._max_transfers = max_transfers
        self._max_per_client = max_per_client
        self._on_transfer = on_transfer
        self._timeout = timeout
        self._retries = retries
        #: refusals logged as one summary line per REFUSAL_LOG_EVERY seconds
        self.refusals = RateLimitedLog(
            log, "TFTP refused %d request(s) since the last report (%s); latest: %r from %s (%s)",
            every=REFUSAL_LOG_EVERY)
        self._max_windowsize = max_windowsize
        self._by_peer: dict[tuple[str, int], _Transfer | _Remote] = {}
        self._remote: dict[int, _Remote] = {}  # transfers the worker runs, by id
        self.offload: Offload | None = None
        if workers and not single_port:
            self.offload = Offload.start(counters, self._remote_ended)
        self._per_ip: dict[str, int] = {}
        self._mtu_cache: dict[str, int] = {}
        self._iface_mtu = self._interface_mtu(interface) if interface else None
        self._wildcard = ipaddress.ip_address(self.host).is_unspecified
        self._pktinfo = False
        if self._wildcard and self._family == socket.AF_INET and not single_port:
            try:  # learn which local address each RRQ was sent to, to answer from it
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
                self._pktinfo = True
            except OSError:
                pass
        self._closed = False
        for name, text in _HELP.items():
            counters.describe(name, text)
        for name in _EXPORTED_AT_ZERO:  # "served nothing" reads as 0, not as absent
            counters.inc(name, 0)
        self._loop.add_reader(sock.fileno(), self._on_listen_readable)

    @property
    def active(self) -> int:
        """Transfers in progress."""
        return len(self._by_peer)

    async def close(self) -> None:
        """Stop listening and abort every transfer still running."""
        if self._closed:
            return
        self._closed = True
        self.refusals.flush()
        self._loop.remove_reader(self._sock.fileno())
        for t in list(self._by_peer.values()):
            if isinstance(t, _Transfer):
                t.abort("shutdown")
                self._finish(t)
        self._sock.close()
        if self.offload is not None:
            await self.offload.close()  # the worker aborts the rest; their reports are lost
            self._remote.clear()

    # -- listening socket -------------------------------------------------

    def _on_listen_readable(self) -> None:
        sock = self._sock
        for _ in range(64):
            local: str | None = None
            try:
                if self._pktinfo:
                    data, anc, _flags, addr = sock.recvmsg(2048, 64)
                    for level, kind, cdata in anc:
                        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(cdata) >= 12:
                            local = socket.inet_ntoa(cdata[4:8])  # ipi_spec_dst
                else:
                    data, addr = sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            try:
                self._on_listen_packet(data, addr, local)
            except Exception:  # noqa: BLE001 - no packet may take the server down
                self.counters.inc("tftp_internal_errors")

    def _on_listen_packet(self, data: bytes, addr: tuple[str, int], local: str | None) -> None:
        op = pk.opcode_of(data)
        if self._single_port:
            t = self._by_peer.get(addr)
            if t is not None and op != pk.RRQ:
                t.feed(data)
                return
            if t is None and op in (pk.DATA, pk.ACK):
                self._wrong_tid(self._sock, data, addr)
                return
        if op == pk.RRQ:
            self._on_rrq(data, addr, local)
        elif op == pk.WRQ:
            self.counters.inc("tftp_requests")
            self.counters.inc("tftp_refused", reason="write")
            self._send_error(self._sock, addr, pk.ERR_ACCESS, "write not supported")
        else:
            self.counters.inc("tftp_malformed")

    def _on_rrq(self, data: bytes, addr: tuple[str, int], local: str | None) -> None:
        c = self.counters
        c.inc("tftp_requests")
        try:
            req = pk.parse_request(data)
        except pk.MalformedPacket:
            c.inc("tftp_malformed")
            return
        existing = self._by_peer.get(addr)
        if existing is not None:
            if existing.filename == req.filename:
                c.inc("tftp_duplicate_requests")
                return
            existing.abort("superseded")
            if isinstance(existing, _Transfer):
                self._finish(existing)
            else:  # the worker's report comes later and is counted then
                self._release(existing)
        if req.mode not in ("octet", "netascii"):
            self._refused("mode", req.filename, addr)
            self._send_error(self._sock, addr, pk.ERR_ILLEGAL, "unsupported mode")
            return
        if len(self._by_peer) >= self._max_transfers:
            self._refused("busy", req.filename, addr)
            self._send_error(self._sock, addr, pk.ERR_UNDEFINED, "server busy")
            return
        if self._per_ip.get(addr[0], 0) >= self._max_per_client:
            self._refused("client_limit", req.filename, addr)
            self._send_error(self._sock, addr, pk.ERR_UNDEFINED, "too many transfers")
            return
        try:
            path = normalise_path(req.filename)
            provider = self._resolver(path, addr)
            if req.mode == "netascii":
                provider = NetasciiProvider(provider)
        except TftpError as exc:
            self._refused("not_found" if exc.code == pk.ERR_NOT_FOUND else "denied",
                          req.filename, addr)
            self._send_error(self._sock, addr, exc.code, exc.message)
            return
        except Exception:  # noqa: BLE001 - a buggy resolver refuses one request, no more
            self._refused("resolver_error", req.filename, addr)
            self._send_error(self._sock, addr, pk.ERR_UNDEFINED, "internal error")
            return
        self._start(provider, req, path, addr, local)

    def _refused(self, reason: str, filename: str, addr: tuple[str, int]) -> None:
        """Count a refusal; log a summary at most every REFUSAL_LOG_EVERY seconds."""
        self.counters.inc("tftp_refused", reason=reason)
        self.refusals.record(reason, filename[:80], addr[0], reason)

    def _start(self, provider: Provider, req: pk.Request, path: str, addr: tuple[str, int],
               local: str | None) -> None:
        catcher: socket.socket | None = None
        try:
            session = ReadSession(provider, req.options, max_blksize=self._max_blksize(addr[0]),
                                  max_windowsize=self._max_windowsize, timeout=self._timeout,
                                  retries=self._retries, concurrent=len(self._by_peer) + 1)
            if self._single_port:
                sock = self._sock
            else:
                sock, catcher = self._transfer_sockets(local, addr)
        except Exception:  # noqa: BLE001 - e.g. no free port: refuse this request only
            provider.close()
            self.counters.inc("tftp_refused", reason="internal")
            self._send_error(self._sock, addr, pk.ERR_UNDEFINED, "internal error")
            return
        if (self.offload is not None and catcher is not None
                and type(provider) is FileProvider):
            tid = self.offload.hand_off(provider, sock, catcher, addr, req.options,
                                        max_blksize=self._max_blksize(addr[0]),
                                        max_windowsize=self._max_windowsize,
                                        timeout=self._timeout, retries=self._retries)
            if tid is None:
                self.counters.inc("tftp_hand_off_skipped",
                                  reason="worker busy" if self.offload.alive else "worker lost")
            else:  # the worker has its own copies of the three descriptors
                self.counters.inc("tftp_handed_off")
                sock.close()
                catcher.close()
                provider.close()
                r = self._remote[tid] = _Remote(self.offload, tid, addr, path, req.filename)
                self._by_peer[addr] = r
                self._per_ip[addr[0]] = self._per_ip.get(addr[0], 0) + 1
                self.counters.inc("tftp_transfers_started")
                return
        t = _Transfer(self, session, sock, catcher, addr, path, req.filename)
        self._by_peer[addr] = t
        self._per_ip[addr[0]] = self._per_ip.get(addr[0], 0) + 1
        self.counters.inc("tftp_transfers_started")
        if catcher is not None:
            self._loop.add_reader(sock.fileno(), t.on_readable)
            self._loop.add_reader(catcher.fileno(), t.on_catcher_readable)
        t.send_all(session.start(self._time()))
        t.arm()

    def _transfer_sockets(self, local: str | None,
                          peer: tuple[str, int]) -> tuple[socket.socket, socket.socket]:
        """A socket connected to the peer on a fresh port, plus a catcher on the same port.

        They share one port; the kernel hands a datagram to the connected socket only
        when it comes from the peer (the better match), everything else to the unconnected
        catcher. So the data path needs no address handling while strangers still get
        ERROR 5 from the transfer's port. The catcher picks its port before it allows
        SO_REUSEADDR, so the port is one no other socket holds.
        """
        socks: list[socket.socket] = []
        try:
            for _ in range(2):
                s = socket.socket(self._family, socket.SOCK_DGRAM)
                socks.append(s)
                s.setblocking(False)
                if self._interface:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE,
                                 self._interface.encode())
            catcher, sock = socks
            catcher.bind((local or self.host, 0))
            for s in socks:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(catcher.getsockname())
            sock.connect(peer)
        except BaseException:
            for s in socks:
                s.close()
            raise
        return sock, catcher

    def _release(self, t: _Transfer | _Remote) -> bool:
        """Forget a transfer in the limits and the peer table; False if already gone."""
        if self._by_peer.get(t.peer) is not t:
            return False
        del self._by_peer[t.peer]
        n = self._per_ip.get(t.ip, 1) - 1
        if n > 0:
            self._per_ip[t.ip] = n
        else:
            self._per_ip.pop(t.ip, None)
        return True

    def _finish(self, t: _Transfer) -> None:
        if not self._release(t):
            return
        if t.timer is not None:
            t.timer.cancel()
            t.timer = None
        if t.catcher is not None:
            for sock in (t.sock, t.catcher):
                self._loop.remove_reader(sock.fileno())
                sock.close()
        s = t.session
        try:
            s.provider.close()
        except Exception:  # noqa: BLE001 - caller-supplied provider
            self.counters.inc("tftp_internal_errors")
        self._account(t.path, t.peer, Ended(s.outcome, s.reason, s.bytes_sent, s.retransmits,
                                            s.error_code))

    def _remote_ended(self, tid: int, ended: Ended) -> None:
        """The worker's report of one transfer (tid 0: the worker is gone, and with it
        every transfer it ran)."""
        gone = [self._remote.pop(tid)] if tid in self._remote else []
        if tid == 0:
            gone = list(self._remote.values())
            self._remote.clear()
        for r in gone:
            self._release(r)
            self._account(r.path, r.peer, ended)

    def _account(self, path: str, peer: tuple[str, int], s: Ended) -> None:
        c = self.counters
        c.inc("tftp_bytes_sent", s.bytes_sent)
        if s.retransmits:
            c.inc("tftp_retransmits", s.retransmits)
        if s.error_code >= 0:
            c.inc("tftp_client_errors", code=str(s.error_code))
        if s.outcome is Outcome.PROBE:
            c.inc("tftp_size_probes")
            return  # not a transfer: on_transfer is not called
        ok = s.outcome is Outcome.COMPLETED
        if ok:
            c.inc("tftp_transfers_completed")
        else:
            c.inc("tftp_transfers_failed", reason=s.reason)
        if self._on_transfer is not None:
            try:
                self._on_transfer(path, peer, ok)
            except Exception:  # noqa: BLE001 - caller-supplied callback
                c.inc("tftp_callback_errors")

    # -- helpers ----------------------------------------------------------

    def _send_error(self, sock: socket.socket, addr: tuple[str, int], code: int, msg: str) -> None:
        send_error(self.counters, sock, addr, code, msg)

    def _wrong_tid(self, sock: socket.socket, data: bytes, addr: tuple[str, int]) -> None:
        answer_wrong_tid(self.counters, sock, data, addr)

    @staticmethod
    def _interface_mtu(interface: str) -> int | None:
        try:
            return int(Path(f"/sys/class/net/{interface}/mtu").read_text())
        except (OSError, ValueError):
            return None

    def _max_blksize(self, ip: str) -> int:
        """Largest blksize whose datagram fits the route MTU towards this client."""
        v6 = self._family == socket.AF_INET6
        overhead = 52 if v6 else 32  # IP + UDP + TFTP headers
        if self._iface_mtu is not None:
            return min(MAX_BLKSIZE, self._iface_mtu - overhead)
        cached = self._mtu_cache.get(ip)
        if cached is not None:
            return cached
        try:
            with socket.socket(self._family, socket.SOCK_DGRAM) as probe:
                probe.connect((ip, 9))  # UDP connect sends nothing; it only picks a route
                mtu = probe.getsockopt(socket.IPPROTO_IPV6 if v6 else socket.IPPROTO_IP,
                                       IPV6_MTU if v6 else IP_MTU)
            value = min(MAX_BLKSIZE, mtu - overhead)
        except OSError:
            value = SAFE_BLKSIZE
        if len(self._mtu_cache) > 4096:
            self._mtu_cache.clear()
        self._mtu_cache[ip] = value
        return value


async def start_tftp(resolver: Resolver, host: str = "0.0.0.0", port: int = 69, *,
                     interface: str | None = None, single_port: bool = False,
                     counters: Counters | None = None, max_transfers: int = 1000,
                     max_per_client: int = 16, on_transfer: OnTransfer | None = None,
                     timeout: float = 1.0, retries: int = 5,
                     max_windowsize: int = 64, workers: int = 0) -> TftpServer:
    """Bind the listening socket and start serving on the running loop.

    timeout/retries: retransmission timer when the client did not set one, and how many
    timeouts in a row end a transfer. max_windowsize caps RFC 7440 windows (bursts).
    workers: 1 runs file transfers in a second process (offload.py); 0 all in this one.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if family == socket.AF_INET6:  # beside the IPv4 socket on the same port
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if interface:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        try:  # absorb bursts of RRQs (many machines powering on at once)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        except OSError:
            pass
        sock.bind((host, port))
        return TftpServer(sock, resolver, counters=counters or Counters(), interface=interface,
                          single_port=single_port, max_transfers=max_transfers,
                          max_per_client=max_per_client, on_transfer=on_transfer,
                          timeout=timeout, retries=retries, max_windowsize=max_windowsize,
                          workers=workers)
    except BaseException:
        sock.close()
        raise
