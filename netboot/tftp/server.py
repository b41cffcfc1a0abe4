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

import argparse
import asyncio
import ipaddress
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from netboot.metrics import Counters
from netboot.tftp import packet as pk
from netboot.tftp.provider import (
    NetasciiProvider,
    Provider,
    Resolver,
    RootResolver,
    TftpError,
    normalise_path,
)
from netboot.tftp.session import MAX_BLKSIZE, Outcome, ReadSession

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
}


class _Transfer:
    """Glue between one ReadSession and its socket, peer and timer."""

    __slots__ = ("filename", "ip", "path", "peer", "server", "session", "sock", "time", "timer")

    def __init__(self, server: TftpServer, session: ReadSession, sock: socket.socket,
                 peer: tuple[str, int], path: str, filename: str):
        self.server = server
        self.session = session
        self.sock = sock
        self.peer = peer
        self.path = path
        self.filename = filename
        self.ip = peer[0]
        self.timer: asyncio.TimerHandle | None = None
        self.time = server._loop.time

    def on_readable(self) -> None:
        # One datagram per wake-up: in lock-step there is never a second one waiting,
        # and a second recvfrom would cost a syscall plus an exception every block.
        try:
            data, addr = self.sock.recvfrom(2048)
        except OSError:  # EAGAIN after a spurious wake-up, or an ICMP error
            return
        if addr != self.peer:
            self.server._wrong_tid(self.sock, data, addr)
            return
        self.feed(data)

    def feed(self, data: bytes) -> None:
        session = self.session
        try:
            out = session.receive(data, self.time())
        except pk.MalformedPacket:
            self.server.counters.inc("tftp_malformed")
            return
        sendto, peer = self.sock.sendto, self.peer
        for p in out:
            try:
                sendto(p, peer)
            except OSError:
                self.server.counters.inc("tftp_send_errors")
        if session.outcome is not Outcome.RUNNING:
            self.server._finish(self)

    def arm(self) -> None:
        deadline = self.session.deadline
        if deadline is not None:
            self.timer = self.server._loop.call_at(deadline, self.on_timer)

    def on_timer(self) -> None:
        self.timer = None
        session = self.session
        if session.outcome is not Outcome.RUNNING:
            return
        now = self.server._loop.time()
        if session.deadline is not None and now >= session.deadline:
            out = session.on_timer(now)
            for p in out:
                self.server._send(self.sock, p, self.peer)
            if session.outcome is not Outcome.RUNNING:
                self.server._finish(self)
                return
        self.arm()


class TftpServer:
    """A running TFTP server; create it with start_tftp()."""

    def __init__(self, sock: socket.socket, resolver: Resolver, *, counters: Counters,
                 interface: str | None, single_port: bool, max_transfers: int,
                 max_per_client: int, on_transfer: OnTransfer | None, timeout: float,
                 retries: int, max_windowsize: int):
        self._loop = asyncio.get_running_loop()
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
        self._max_windowsize = max_windowsize
        self._by_peer: dict[tuple[str, int], _Transfer] = {}
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
        self._loop.remove_reader(self._sock.fileno())
        for t in list(self._by_peer.values()):
            t.session.abort("shutdown")
            self._finish(t)
        self._sock.close()

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
            existing.session.abort("superseded")
            self._finish(existing)
        if req.mode not in ("octet", "netascii"):
            c.inc("tftp_refused", reason="mode")
            self._send_error(self._sock, addr, pk.ERR_ILLEGAL, "unsupported mode")
            return
        if len(self._by_peer) >= self._max_transfers:
            c.inc("tftp_refused", reason="busy")
            self._send_error(self._sock, addr, pk.ERR_UNDEFINED, "server busy")
            return
        if self._per_ip.get(addr[0], 0) >= self._max_per_client:
            c.inc("tftp_refused", reason="client_limit")
            self._send_error(self._sock, addr, pk.ERR_UNDEFINED, "too many transfers")
            return
        try:
            path = normalise_path(req.filename)
            provider = self._resolver(path, addr)
            if req.mode == "netascii":
                provider = NetasciiProvider(provider)
        except TftpError as exc:
            c.inc("tftp_refused", reason="not_found" if exc.code == pk.ERR_NOT_FOUND else "denied")
            self._send_error(self._sock, addr, exc.code, exc.message)
            return
        except Exception:  # noqa: BLE001 - a buggy resolver refuses one request, no more
            c.inc("tftp_refused", reason="resolver_error")
            self._send_error(self._sock, addr, pk.ERR_UNDEFINED, "internal error")
            return
        self._start(provider, req, path, addr, local)

    def _start(self, provider: Provider, req: pk.Request, path: str, addr: tuple[str, int],
               local: str | None) -> None:
        try:
            session = ReadSession(provider, req.options, max_blksize=self._max_blksize(addr[0]),
                                  max_windowsize=self._max_windowsize, timeout=self._timeout,
                                  retries=self._retries)
            sock = self._sock if self._single_port else self._transfer_socket(local)
        except Exception:  # noqa: BLE001 - e.g. no free port: refuse this request only
            provider.close()
            self.counters.inc("tftp_refused", reason="internal")
            self._send_error(self._sock, addr, pk.ERR_UNDEFINED, "internal error")
            return
        t = _Transfer(self, session, sock, addr, path, req.filename)
        self._by_peer[addr] = t
        self._per_ip[addr[0]] = self._per_ip.get(addr[0], 0) + 1
        self.counters.inc("tftp_transfers_started")
        if not self._single_port:
            self._loop.add_reader(sock.fileno(), t.on_readable)
        for p in session.start(self._loop.time()):
            self._send(sock, p, addr)
        t.arm()

    def _transfer_socket(self, local: str | None) -> socket.socket:
        sock = socket.socket(self._family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            if self._interface:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE,
                                self._interface.encode())
            sock.bind((local or self.host, 0))
        except BaseException:
            sock.close()
            raise
        return sock

    def _finish(self, t: _Transfer) -> None:
        if self._by_peer.get(t.peer) is not t:
            return
        del self._by_peer[t.peer]
        n = self._per_ip.get(t.ip, 1) - 1
        if n > 0:
            self._per_ip[t.ip] = n
        else:
            self._per_ip.pop(t.ip, None)
        if t.timer is not None:
            t.timer.cancel()
            t.timer = None
        if t.sock is not self._sock:
            self._loop.remove_reader(t.sock.fileno())
            t.sock.close()
        s = t.session
        try:
            s.provider.close()
        except Exception:  # noqa: BLE001 - caller-supplied provider
            self.counters.inc("tftp_internal_errors")
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
                self._on_transfer(t.path, t.peer, ok)
            except Exception:  # noqa: BLE001 - caller-supplied callback
                c.inc("tftp_callback_errors")

    # -- helpers ----------------------------------------------------------

    def _send(self, sock: socket.socket, data: bytes, addr: tuple[str, int]) -> None:
        try:
            sock.sendto(data, addr)
        except OSError:
            self.counters.inc("tftp_send_errors")

    def _send_error(self, sock: socket.socket, addr: tuple[str, int], code: int, msg: str) -> None:
        self.counters.inc("tftp_errors_sent", code=str(code))
        self._send(sock, pk.encode_error(code, msg), addr)

    def _wrong_tid(self, sock: socket.socket, data: bytes, addr: tuple[str, int]) -> None:
        self.counters.inc("tftp_wrong_tid")
        if pk.opcode_of(data) != pk.ERROR:  # never answer an ERROR: two servers could loop
            self._send_error(sock, addr, pk.ERR_UNKNOWN_TID, "unknown transfer ID")

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
                     max_windowsize: int = 64) -> TftpServer:
    """Bind the listening socket and start serving on the running loop.

    timeout/retries: retransmission timer when the client did not set one, and how many
    timeouts in a row end a transfer. max_windowsize caps RFC 7440 windows (bursts).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
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
                          timeout=timeout, retries=retries, max_windowsize=max_windowsize)
    except BaseException:
        sock.close()
        raise


async def _serve(args: argparse.Namespace) -> None:
    server = await start_tftp(RootResolver([Path(r) for r in args.root]), args.host, args.port,
                              interface=args.interface, single_port=args.single_port,
                              max_transfers=args.max_transfers,
                              max_per_client=args.max_per_client, timeout=args.timeout)
    print(f"listening {server.host} {server.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.close()
    if args.stats:
        sys.stdout.write(server.counters.render())
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    """Standalone server for tests, benchmarks and labs: serve --root directories until SIGTERM."""
    ap = argparse.ArgumentParser(prog="python -m netboot.tftp.server")
    ap.add_argument("--root", action="append", required=True, help="directory to serve (repeat)")
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=69, help="0 picks a free port (printed)")
    ap.add_argument("--interface")
    ap.add_argument("--single-port", action="store_true")
    ap.add_argument("--max-transfers", type=int, default=1000)
    ap.add_argument("--max-per-client", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=1.0)
    ap.add_argument("--uvloop", action="store_true", help="run on uvloop instead of asyncio")
    ap.add_argument("--stats", action="store_true", help="print counters on exit")
    args = ap.parse_args(argv)
    if args.uvloop:
        import uvloop

        uvloop.run(_serve(args))
    else:
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
