"""Boot-storm client: N simulated PXE machines through the whole exchange, all at once.

The machines are a mix of kinds (--mix, default bios=40,uefi=40,pxelinux=10,direct=10,
assigned in an even interleave by index):

  bios      SeaBIOS + iPXE, DHCP through the relay (below)
  uefi      EDK2 + ipxe.efi: DHCP arch 7; TFTP the EDK2 way (RRQ with tsize, blksize
            1468, windowsize 4 -> OACK -> ERROR 8 from the client, then a new RRQ with
            blksize 1468 and windowsize 4, one ACK per window); then iPXE as bios
  pxelinux  PXE ROM fetches pxelinux.0 (blksize 1468), then pxelinux itself fetches
            ldlinux.c32, pxelinux.cfg/<uuid> (not found), pxelinux.cfg/01-<mac>, and the
            KERNEL and INITRD it names over TFTP (tsize, blksize 1408, lock-step), then the
            OS calls back over HTTP
  direct    bios, but with no relay: DISCOVERs broadcast from udp/68, offers broadcast
            back to udp/68 (one socket for all of them, demultiplexed by xid)

A bios machine does what SeaBIOS + iPXE do, in order:

  dhcp     ProxyDHCP DISCOVER (option 60 PXEClient:Arch:00000:UNDI:002001, 93, 94, 97
           with its own SMBIOS UUID, its own MAC); if the offer carries no boot file,
           a DHCPREQUEST to the boot server's port 4011, as a PXE ROM does
  tftp     the offered first-stage loader over TFTP (blksize 1468, lock-step; iPXE ROMs
           ask no tsize)
  dhcp2    iPXE's own DISCOVER (user class "iPXE", option 175)
  script   HTTP GET of the offered script, then of the URL in its `chain` line with
           ${uuid}, ${netX/mac}, ${serial:uristring}... substituted as iPXE does
  images   the `kernel` and `initrd` URLs of that script, one after the other
  callback POST to the netboot.callback= URL on the kernel line (what the booted OS does)

DHCP goes through a relay: every DISCOVER leaves one socket on udp/67 of the
relay address (10.79.0.3) with giaddr set to it, and the server answers by
unicast to that socket. This is how a rack behind a DHCP relay is served, it
needs no broadcast (so no SO_BINDTODEVICE, no flood of every offer to every
machine), and the relay socket demultiplexes replies by xid. TFTP and HTTP
leave from each machine's own address (10.79.10.x), so per-client limits and
per-address state on the server see N distinct machines.

Run it inside the client namespace (bench/storm_lab.py does): prints a
summary, writes --json. Exit status 0 if every machine completed.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import re
import resource
import socket
import struct
import sys
import time
import uuid as uuidlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp

PHASES = ("dhcp", "tftp", "dhcp2", "script", "images", "callback")
KINDS = ("bios", "uefi", "pxelinux", "direct")
DEFAULT_MIX = "bios=40,uefi=40,pxelinux=10,direct=10"
MAGIC = b"\x63\x82\x53\x63"
DISCOVER, OFFER, REQUEST, ACK = 1, 2, 3, 5
VENDOR_BIOS = b"PXEClient:Arch:00000:UNDI:002001"
VENDOR_UEFI = b"PXEClient:Arch:00007:UNDI:003016"
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
PXELINUX_BLKSIZE = 1408  # pxelinux's own TFTP client (core/fs/pxe)
DHCP_TIMEOUTS = (1.0, 2.0, 4.0, 8.0)  # iPXE-like: start at 1 s, double


class StepFailed(Exception):
    def __init__(self, phase: str, why: str):
        super().__init__(f"{phase}: {why}")
        self.phase = phase
        self.why = why


# -- DHCP ----------------------------------------------------------------------------------

def build_dhcp(xid: int, mac: bytes, mtype: int, options: list[tuple[int, bytes]], *,
               giaddr: bytes = b"\0" * 4, ciaddr: bytes = b"\0" * 4) -> bytes:
    hdr = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 1 if giaddr != b"\0" * 4 else 0,
                      xid, 4, 0, ciaddr, b"\0" * 4, b"\0" * 4, giaddr, mac.ljust(16, b"\0"),
                      b"", b"")
    opts = bytes((53, 1, mtype)) + b"".join(bytes((c, len(v))) + v for c, v in options)
    pkt = hdr + MAGIC + opts + b"\xff"
    return pkt.ljust(300, b"\0")


@dataclass
class DhcpReply:
    op: int
    xid: int
    siaddr: str
    file: str
    options: dict[int, bytes]

    @property
    def mtype(self) -> int:
        return self.options.get(53, b"\0")[0]

    @property
    def bootfile(self) -> str:
        return self.file or self.options.get(67, b"").rstrip(b"\0").decode(errors="replace")

    @property
    def server_id(self) -> str:
        sid = self.options.get(54)
        return socket.inet_ntoa(sid) if sid and len(sid) == 4 else self.siaddr


def parse_dhcp(data: bytes) -> DhcpReply | None:
    if len(data) < 240 or data[236:240] != MAGIC:
        return None
    op, xid = data[0], struct.unpack("!I", data[4:8])[0]
    siaddr = socket.inet_ntoa(data[20:24])
    file = data[108:236].split(b"\0", 1)[0].decode(errors="replace")
    opts: dict[int, bytes] = {}
    i = 240
    while i < len(data):
        code = data[i]
        if code == 255:
            break
        if code == 0:
            i += 1
            continue
        if i + 1 >= len(data):
            return None
        n = data[i + 1]
        opts[code] = opts.get(code, b"") + data[i + 2:i + 2 + n]
        i += 2 + n
    return DhcpReply(op, xid, siaddr, file, opts)


def pxe_menu_first_item(opt43: bytes) -> int | None:
    """Boot server type of the first PXE_BOOT_MENU (sub-option 9) entry, if any."""
    i = 0
    while i + 1 < len(opt43):
        code, n = opt43[i], opt43[i + 1]
        if code == 255:
            return None
        if code == 9 and n >= 3:
            return int.from_bytes(opt43[i + 2:i + 4], "big")
        i += 2 + n
    return None


class DhcpMux(asyncio.DatagramProtocol):
    """Replies by xid to whoever waits for them."""

    def __init__(self) -> None:
        self.waiting: dict[int, asyncio.Queue[DhcpReply]] = {}
        self.transport: asyncio.DatagramTransport | None = None
        self.stray = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        r = parse_dhcp(data)
        q = self.waiting.get(r.xid) if r is not None and r.op == 2 else None
        if q is None:
            self.stray += 1
            return
        q.put_nowait(r)  # type: ignore[arg-type]


class _SockSender:
    """The part of a datagram transport DhcpMux uses (sendto), on a plain socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.dropped = 0

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            self.sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            self.dropped += 1  # as a full NIC queue would; the machine's timer resends

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()


def attach_batched(mux: DhcpMux, sock: socket.socket, batch: int = 512) -> None:
    """Feed ``mux`` from ``sock`` reading every queued datagram per wake-up (up to
    ``batch``), not one per event-loop pass as a datagram transport does: the shared
    sockets take every reply of the storm (three per DISCOVER from an HA fleet), and one
    datagram per pass let the backlog outlast the machines' DHCP timers."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    mux.transport = _SockSender(sock)  # type: ignore[assignment]

    def drain() -> None:
        for _ in range(batch):
            try:
                data, addr = sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            mux.datagram_received(data, addr)

    loop.add_reader(sock.fileno(), drain)


async def dhcp_exchange(mux: DhcpMux, xid: int, packet: bytes,
                        dest: tuple[str, int] | list[tuple[str, int]],
                        want: int, phase: str) -> DhcpReply:
    """Send ``packet`` to ``dest`` (several: as a relay with several helper addresses
    does) until a reply of type ``want`` comes; the first one wins."""
    dests = dest if isinstance(dest, list) else [dest]
    q: asyncio.Queue[DhcpReply] = asyncio.Queue()
    mux.waiting[xid] = q
    try:
        for timeout in DHCP_TIMEOUTS:
            assert mux.transport is not None
            for d in dests:
                mux.transport.sendto(packet, d)
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                try:
                    r = await asyncio.wait_for(q.get(), left)
                except TimeoutError:
                    break
                if r.mtype == want:
                    return r
        raise StepFailed(phase, f"no DHCP {'OFFER' if want == OFFER else 'ACK'} after "
                         f"{len(DHCP_TIMEOUTS)} tries")
    finally:
        mux.waiting.pop(xid, None)


# -- TFTP ----------------------------------------------------------------------------------

class _TftpClient(asyncio.DatagramProtocol):
    """One RRQ as a callback state machine: no task or queue per packet, so a thousand
    of them in one process stay cheap and ACK on time. Lock-step, or windowed (RFC 7440:
    one ACK per window, the last in-order block acknowledged after a gap), and EDK2's
    size probe (``probe``: OACK -> ERROR 8, the result is the OACK's tsize)."""

    def __init__(self, server: str, port: int, filename: str, blksize: int, timeout: float,
                 retries: int, hasher: Any, *, tsize: bool, windowsize: int, probe: bool):
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[int] = self.loop.create_future()
        self.server, self.filename, self.timeout, self.retries = server, filename, timeout, retries
        self.hasher = hasher
        self.probe = probe
        opts = [("blksize", str(blksize))]
        if tsize:
            opts.append(("tsize", "0"))
        if windowsize > 1:
            opts.append(("windowsize", str(windowsize)))
        self.rrq = (b"\0\x01" + filename.encode() + b"\0octet\0"
                    + b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in opts))
        self.last, self.dest = self.rrq, (server, port)
        self.peer: tuple[str, int] | None = None
        self.expected, self.blk, self.size, self.tsize, self.tries = 1, 512, 0, None, 0
        self.window, self.unacked = 1, 0
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._send(self.rrq)

    def _send(self, data: bytes, dest: tuple[str, int] | None = None) -> None:
        assert self.transport is not None
        self.transport.sendto(data, dest or self.dest)
        if dest is None:
            self.last = data
            # Lazy timer (as the server's): moving the deadline is a store; the one timer
            # re-arms itself when it fires early. A new TimerHandle per ACK was a large
            # share of the client's CPU, and the client shares the machine with the server.
            self.deadline = self.loop.time() + self.timeout * min(4, 2 ** self.tries)
            if self.timer is None:
                self.timer = self.loop.call_at(self.deadline, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        if self.done.done():
            return
        if self.loop.time() < self.deadline:
            self.timer = self.loop.call_at(self.deadline, self._on_timer)
            return
        self.tries += 1
        if self.tries > self.retries:
            self._fail(f"timeout after {self.retries} retransmissions at block {self.expected}")
            return
        self._send(self.last)

    def _fail(self, why: str) -> None:
        if not self.done.done():
            self.done.set_exception(StepFailed("tftp", why))

    def _finish(self, result: int) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if not self.done.done():
            self.done.set_result(result)

    def error_received(self, exc: Exception) -> None:  # ICMP port unreachable etc.
        pass

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.done.done():
            return
        if self.peer is None:
            if addr[0] != self.server:
                return
            self.peer = self.dest = addr
        elif addr != self.peer:
            self._send(b"\0\x05\0\x05unknown transfer ID\0", addr)
            return
        op = int.from_bytes(data[:2], "big")
        if op == 5:
            code = int.from_bytes(data[2:4], "big")
            msg = data[4:].split(b"\0", 1)[0].decode(errors="replace")
            self._fail(f"ERROR {code} {msg!r}")
        elif op == 6 and self.expected == 1:  # OACK
            parts = data[2:].split(b"\0")
            try:
                opts = {parts[i].decode().lower(): parts[i + 1].decode()
                        for i in range(0, len(parts) - 1, 2)}
                self.blk = int(opts.get("blksize", 512))
                self.tsize = int(opts["tsize"]) if "tsize" in opts else None
                self.window = int(opts.get("windowsize", 1))  # a server may decline it
            except (ValueError, UnicodeDecodeError):
                self._fail(f"bad OACK {data[:60]!r}")
                return
            if self.probe:  # EDK2: the size is all it wanted; decline the transfer
                assert self.transport is not None
                self.transport.sendto(b"\0\x05\0\x08size probe\0", self.dest)
                if self.tsize is None:
                    self._fail("the size probe's OACK has no tsize")
                else:
                    self._finish(self.tsize)
                return
            self.tries = 0
            self._send(b"\0\x04\0\0")
        elif op == 3 and len(data) >= 4:
            if self.probe:
                self._fail("DATA instead of an OACK to the size probe")
                return
            n = int.from_bytes(data[2:4], "big")
            if n == self.expected & 0xFFFF:
                got = len(data) - 4
                if self.hasher is not None:
                    self.hasher.update(data[4:])
                self.size += got
                self.expected += 1
                self.tries = 0
                if got < self.blk:
                    assert self.transport is not None
                    self.transport.sendto(b"\0\x04" + data[2:4], self.dest)
                    if self.tsize is not None and self.tsize != self.size:
                        self._fail(f"got {self.size} bytes, tsize said {self.tsize}")
                    else:
                        self._finish(self.size)
                    return
                self.unacked += 1
                if self.unacked >= self.window:
                    self.unacked = 0
                    self._send(b"\0\x04" + data[2:4])
            elif self.window > 1 and (n - self.expected) & 0xFFFF < 0x8000:
                # a gap in the window: acknowledge the last block we have (RFC 7440)
                self.unacked = 0
                self._send(b"\0\x04" + ((self.expected - 1) & 0xFFFF).to_bytes(2, "big"))
            elif n == (self.expected - 1) & 0xFFFF and self.window == 1:
                # our ACK was lost: say it again
                assert self.transport is not None
                self.transport.sendto(self.last, self.dest)


async def tftp_get(local_ip: str, server: str, filename: str, *, port: int = 69,
                   blksize: int = 1468, timeout: float = 1.0, retries: int = 8,
                   hasher: Any = None, tsize: bool = False, windowsize: int = 1,
                   probe: bool = False) -> int:
    """Fetch one file; returns its size (with ``probe``, the size the OACK announced).
    Raises StepFailed('tftp', why)."""
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: _TftpClient(server, port, filename, blksize, timeout, retries, hasher,
                            tsize=tsize or probe, windowsize=windowsize, probe=probe),
        local_addr=(local_ip, 0))
    try:
        return await proto.done
    finally:
        if proto.timer is not None:
            proto.timer.cancel()
        transport.close()


async def http_fetch(local_ip: str, url: str, phase: str, *, timeout: float,
                     hasher: Any = None) -> int:
    """GET a large file over a plain socket into one reused buffer (aiohttp would copy
    every chunk several times: at 9 GB per storm the client, not the server, would be
    the bottleneck). Returns the body size; the body must have a Content-Length."""
    u = urlsplit(url)
    host, port = u.hostname or "", u.port or 80
    path = u.path + (f"?{u.query}" if u.query else "")
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout) as deadline:
            sock.bind((local_ip, 0))
            await loop.sock_connect(sock, (host, port))
            await loop.sock_sendall(sock, (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                "User-Agent: iPXE/1.0.0+ (storm)\r\nConnection: close\r\n\r\n").encode())
            buf = bytearray(1 << 18)
            mv = memoryview(buf)
            head = b""
            while b"\r\n\r\n" not in head:
                n = await loop.sock_recv_into(sock, buf)
                if n == 0 or len(head) > 65536:
                    raise StepFailed(phase, f"no HTTP header for {u.path}")
                head += buf[:n]
            header, _, body = head.partition(b"\r\n\r\n")
            lines = header.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            if status != 200:
                raise StepFailed(phase, f"HTTP {status} for {u.path}")
            fields = {k.strip().lower(): v.strip() for k, _, v in
                      (ln.partition(":") for ln in lines[1:])}
            if "content-length" not in fields:
                raise StepFailed(phase, f"no Content-Length for {u.path}")
            length = int(fields["content-length"])
            size = len(body)
            if hasher is not None:
                hasher.update(body)
            while size < length:
                deadline.reschedule(loop.time() + timeout)
                n = await loop.sock_recv_into(sock, mv[:min(len(buf), length - size)])
                if n == 0:
                    raise StepFailed(phase, f"short body {size}/{length} for {u.path}")
                if hasher is not None:
                    hasher.update(mv[:n])
                size += n
            return size
    except TimeoutError:
        raise StepFailed(phase, f"HTTP timeout for {u.path}") from None
    except OSError as exc:
        raise StepFailed(phase, f"{type(exc).__name__}: {exc}") from None
    finally:
        sock.close()


class Collect:
    """A hasher stand-in that keeps the bytes (a pxelinux config)."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def update(self, data: bytes) -> None:
        self.buf += data


# -- iPXE scripts --------------------------------------------------------------------------

_SETTING = re.compile(r"\$\{([^}:]+)(?::([^}]+))?\}")


def expand(text: str, settings: dict[str, str]) -> str:
    """iPXE setting expansion: unknown settings expand to nothing."""

    def one(m: re.Match[str]) -> str:
        value = settings.get(m.group(1), "")
        return quote(value, safe="") if m.group(2) == "uristring" else value

    return _SETTING.sub(one, text)


def script_lines(script: str) -> list[str]:
    if not script.startswith("#!ipxe"):
        raise StepFailed("script", f"not an iPXE script: {script[:60]!r}")
    return [ln.strip() for ln in script.splitlines()[1:] if ln.strip()]


# -- one machine ---------------------------------------------------------------------------

@dataclass
class Machine:
    index: int
    ip: str
    mac: bytes
    uuid: str
    serial: str
    kind: str = "bios"
    phases: dict[str, float] = field(default_factory=dict)
    done_at: float | None = None
    attempts: int = 0
    errors: list[str] = field(default_factory=list)
    acked: bool = False

    @property
    def mac_text(self) -> str:
        return ":".join(f"{b:02x}" for b in self.mac)

    @property
    def uefi(self) -> bool:
        return self.kind == "uefi"

    def settings(self) -> dict[str, str]:
        s = {"uuid": self.uuid, "netX/mac": self.mac_text, "net0/mac": self.mac_text,
             "mac": self.mac_text, "serial": self.serial, "manufacturer": "StormLab",
             "product": "Blade 9000", "asset": "",
             "platform": "efi" if self.uefi else "pcbios",
             "buildarch": "x86_64" if self.uefi else "i386",
             "ip": self.ip, "netX/ip": self.ip, "net0/ip": self.ip}
        return s


@dataclass
class Storm:
    args: argparse.Namespace
    mux: DhcpMux
    t0: float = 0.0
    files: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    attempt_failures: Counter = field(default_factory=Counter)
    sems: dict[str, asyncio.Semaphore] = field(default_factory=dict)
    direct: DhcpMux | None = None  # the shared udp/68 socket of the relay-less machines

    def sem(self, phase: str) -> asyncio.Semaphore | None:
        return self.sems.get(phase)

    async def phase(self, m: Machine, name: str, coro: Any) -> Any:
        sem = self.sem(name)
        t = time.monotonic()
        if sem is None:
            result = await coro
        else:
            async with sem:
                result = await coro
        m.phases[name] = time.monotonic() - t
        return result

    def note_file(self, name: str, size: int, hasher: Any) -> None:
        key = f"{size}:{hasher.hexdigest()}" if hasher is not None else str(size)
        self.files[name.rsplit("/", 1)[-1]][key] += 1

    async def dhcp(self, m: Machine, ipxe: bool, phase: str) -> DhcpReply:
        a = self.args
        xid = (m.index << 8 | (m.attempts & 0x7F) << 1 | int(ipxe)) & 0xFFFFFFFF
        xid ^= a.xid_salt
        opts = [(60, VENDOR_UEFI if m.uefi else VENDOR_BIOS),
                (93, b"\0\x07" if m.uefi else b"\0\0"),
                (94, b"\x01\x03\x10" if m.uefi else b"\x01\x02\x01"),
                (97, b"\0" + uuidlib.UUID(m.uuid).bytes_le), (57, b"\x05\xc0"),
                (55, bytes((1, 3, 6, 43, 54, 60, 66, 67, 97, 128, 129, 175)))]
        if ipxe:
            opts += [(77, b"iPXE"), (175, b"\x13\x01\x01\x11\x01\x01\x24\x01\x01")]
        if m.kind == "direct":  # no relay: broadcast from udp/68, offers broadcast back
            assert self.direct is not None
            pkt = build_dhcp(xid, m.mac, DISCOVER, opts)
            offer = await dhcp_exchange(self.direct, xid, pkt, ("255.255.255.255", a.dhcp_port),
                                        OFFER, phase)
        else:
            pkt = build_dhcp(xid, m.mac, DISCOVER, opts, giaddr=socket.inet_aton(a.relay))
            offer = await dhcp_exchange(self.mux, xid, pkt,
                                        [(s, a.dhcp_port) for s in a.server.split(",")],
                                        OFFER, phase)
        if offer.bootfile:
            return offer
        # No file in the offer: ask the boot server on 4011, as a PXE ROM does, naming
        # the first item of the offer's PXE boot menu (option 43 sub-option 9) in
        # sub-option 71 (PXE_BOOT_ITEM: type, layer 0).
        item = pxe_menu_first_item(offer.options.get(43, b""))
        if item is not None:
            opts = [*opts, (43, bytes((71, 4)) + item.to_bytes(2, "big") + b"\0\0\xff")]
        loop = asyncio.get_running_loop()
        own = DhcpMux()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: own, local_addr=(m.ip, 68), reuse_port=True)
        try:
            req = build_dhcp(xid, m.mac, REQUEST, opts, ciaddr=socket.inet_aton(m.ip))
            ack = await dhcp_exchange(own, xid, req, (offer.server_id, a.proxy_port), ACK, phase)
        finally:
            transport.close()
        if not ack.bootfile:
            raise StepFailed(phase, "neither the offer nor the 4011 ACK names a boot file")
        return ack

    async def get(self, http: aiohttp.ClientSession, url: str, phase: str,
                  body: bool = True) -> tuple[str, int]:
        try:
            async with http.get(url) as r:
                if r.status != 200:
                    raise StepFailed(phase, f"HTTP {r.status} for {urlsplit(url).path}")
                if body:
                    return await r.text(), r.status
                hasher = hashlib.sha256() if self.args.hash else None
                size = 0
                async for chunk in r.content.iter_chunked(1 << 18):
                    size += len(chunk)
                    if hasher is not None:
                        hasher.update(chunk)
                if r.content_length is not None and r.content_length != size:
                    raise StepFailed(phase, f"short body {size}/{r.content_length}")
                self.note_file(urlsplit(url).path, size, hasher)
                return "", size
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise StepFailed(phase, f"{type(exc).__name__}: {exc}".strip()) from None

    async def boot_once(self, m: Machine) -> None:
        a = self.args
        m.phases.clear()
        offer = await self.phase(m, "dhcp", self.dhcp(m, False, "dhcp"))
        loader = offer.bootfile
        if "://" in loader:
            raise StepFailed("dhcp", f"offered a URL to the PXE ROM: {loader}")
        server = offer.siaddr if offer.siaddr != "0.0.0.0" else offer.server_id
        if m.kind == "pxelinux":
            await self.pxelinux(m, server, loader)
            return
        hasher = hashlib.sha256() if a.hash else None
        if m.uefi:  # EDK2: the size first, declined with ERROR 8, then the windowed read
            size = await self.phase(m, "tftp", self.edk2_get(m, server, loader, hasher))
        else:
            size = await self.phase(m, "tftp", tftp_get(m.ip, server, loader, port=a.tftp_port,
                                                        hasher=hasher))
        self.note_file(loader, size, hasher)
        offer2 = await self.phase(m, "dhcp2", self.dhcp(m, True, "dhcp2"))
        script_url = offer2.bootfile
        if not script_url.startswith("http"):
            raise StepFailed("dhcp2", f"iPXE was offered {script_url!r}, not a script URL")
        async with self.session(m) as http:
            kernel, initrds = await self.phase(m, "script", self.scripts(m, http, script_url))
            t = time.monotonic()
            sem = self.sem("images")
            if sem is not None:
                await sem.acquire()
            try:
                for url in [kernel[0], *initrds]:
                    hasher = hashlib.sha256() if a.hash else None
                    size = await http_fetch(m.ip, url, "images", timeout=a.http_timeout,
                                            hasher=hasher)
                    self.note_file(urlsplit(url).path, size, hasher)
            finally:
                if sem is not None:
                    sem.release()
            m.phases["images"] = time.monotonic() - t
            await self.callback(m, http, kernel[1:])

    def session(self, m: Machine) -> aiohttp.ClientSession:
        a = self.args
        conn = aiohttp.TCPConnector(local_addr=(m.ip, 0), limit=2)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=a.http_timeout,
                                        sock_read=a.http_timeout)
        return aiohttp.ClientSession(connector=conn, timeout=timeout,
                                     headers={"User-Agent": "iPXE/1.0.0+ (storm)"})

    async def callback(self, m: Machine, http: aiohttp.ClientSession, args: list[str]) -> None:
        """What the booted OS does: POST to the netboot.callback= URL of its command line."""
        url = next((w.split("=", 1)[1] for w in args if w.startswith("netboot.callback=")),
                   None)
        if url is None:
            if self.args.require_callback:
                raise StepFailed("callback", "no netboot.callback= on the kernel line")
            return
        t = time.monotonic()
        try:
            async with http.post(url, data=b"") as r:
                await r.read()
                if r.status != 200:
                    raise StepFailed("callback", f"HTTP {r.status}")
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise StepFailed("callback", f"{type(exc).__name__}: {exc}") from None
        m.phases["callback"] = time.monotonic() - t
        m.acked = True
        if self.args.progress:
            print(f"ACK {m.uuid}", flush=True)

    async def edk2_get(self, m: Machine, server: str, name: str, hasher: Any) -> int:
        port = self.args.tftp_port
        size = await tftp_get(m.ip, server, name, port=port, probe=True, windowsize=4)
        got = await tftp_get(m.ip, server, name, port=port, windowsize=4, hasher=hasher)
        if got != size:
            raise StepFailed("tftp", f"{name}: got {got} bytes, the size probe said {size}")
        return got

    async def pxelinux(self, m: Machine, server: str, loader: str) -> None:
        """pxelinux.0 from the PXE ROM, then what pxelinux fetches itself, all over TFTP."""
        a = self.args
        port = a.tftp_port

        async def stage1() -> str:
            hasher = hashlib.sha256() if a.hash else None
            self.note_file(loader, await tftp_get(m.ip, server, loader, port=port,
                                                  hasher=hasher), hasher)
            hasher = hashlib.sha256() if a.hash else None
            self.note_file("ldlinux.c32", await tftp_get(
                m.ip, server, "ldlinux.c32", port=port, tsize=True, blksize=PXELINUX_BLKSIZE,
                hasher=hasher), hasher)
            try:  # pxelinux asks for its UUID's config first: neither stack has one
                await tftp_get(m.ip, server, f"pxelinux.cfg/{m.uuid}", port=port, tsize=True,
                               blksize=PXELINUX_BLKSIZE)
            except StepFailed as exc:
                if "ERROR 1" not in exc.why:
                    raise
            else:
                raise StepFailed("tftp", "a config for the UUID: the storm expects none")
            cfg = Collect()
            await tftp_get(m.ip, server, "pxelinux.cfg/01-" + m.mac_text.replace(":", "-"),
                           port=port, tsize=True, blksize=PXELINUX_BLKSIZE, hasher=cfg)
            return cfg.buf.decode(errors="replace")

        text = await self.phase(m, "tftp", stage1())
        words = {ln.split(None, 1)[0].upper(): ln.split(None, 1)[1] for ln in
                 (x.strip() for x in text.splitlines()) if len(ln.split(None, 1)) == 2}
        if "KERNEL" not in words:
            raise StepFailed("tftp", f"pxelinux config boots nothing: {text[:100]!r}")

        async def images() -> None:
            for name in [words["KERNEL"], *words.get("INITRD", "").split(",")]:
                if not name:
                    continue
                hasher = hashlib.sha256() if a.hash else None
                self.note_file(name, await tftp_get(m.ip, server, name, port=port, tsize=True,
                                                    blksize=PXELINUX_BLKSIZE, hasher=hasher),
                               hasher)

        await self.phase(m, "images", images())
        async with self.session(m) as http:
            await self.callback(m, http, words.get("APPEND", "").split())

    async def scripts(self, m: Machine, http: aiohttp.ClientSession,
                      url: str) -> tuple[list[str], list[str]]:
        settings = m.settings()
        for _hop in range(4):  # boot.ipxe chains to the node script; allow a few hops
            text, _ = await self.get(http, url, "script")
            lines = script_lines(text)
            chain = next((ln for ln in lines if ln.split()[0] in ("chain", "chainload")), None)
            kernel = next((ln for ln in lines if ln.split()[0] in ("kernel", "imgexec")), None)
            if kernel is not None:
                words = expand(kernel, settings).split()[1:]
                words = [w for w in words if not w.startswith("--")]
                initrds = [expand(ln, settings).split()[-1] for ln in lines
                           if ln.split()[0] in ("initrd", "imgfetch", "module")]
                return words, initrds
            if chain is None:
                echo = next((ln for ln in lines if ln.startswith("echo")), lines[:1])
                raise StepFailed("script", f"script boots nothing: {echo!s:.100}")
            url = next(w for w in expand(chain, settings).split()[1:] if not w.startswith("--"))
        raise StepFailed("script", "too many chain hops")

    async def machine(self, m: Machine) -> None:
        a = self.args
        if a.spread:
            # the same power-on times for both stacks
            await asyncio.sleep(random.Random(f"{a.seed}-{m.index}").uniform(0, a.spread))
        while True:
            m.attempts += 1
            try:
                await self.boot_once(m)
                m.done_at = time.monotonic() - self.t0
                return
            except StepFailed as exc:
                m.errors.append(str(exc))
                self.attempt_failures[f"{exc.phase}: {_generic(exc.why)}"] += 1
            except Exception as exc:  # noqa: BLE001 - a client bug is a failed attempt, counted
                m.errors.append(f"client: {type(exc).__name__}: {exc}")
                self.attempt_failures[f"client: {type(exc).__name__}"] += 1
            if m.attempts > a.reboots:
                return
            await asyncio.sleep(a.reboot_delay)  # boot.ipxe's ":failed ... sleep; reboot"


def _generic(why: str) -> str:
    """Failure text without per-machine numbers, for counting."""
    return re.sub(r"\d+", "N", why)[:120]


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(p / 100 * (len(s) - 1)))))
    return s[k]


def parse_mix(text: str) -> dict[str, int]:
    """'bios=40,uefi=40,pxelinux=10,direct=10' -> weights by kind."""
    mix: dict[str, int] = {}
    for part in text.split(","):
        kind, _, weight = part.partition("=")
        if kind.strip() not in KINDS:
            raise ValueError(f"unknown machine kind {kind!r} (kinds: {', '.join(KINDS)})")
        mix[kind.strip()] = int(weight or 1)
    if sum(mix.values()) <= 0:
        raise ValueError(f"mix {text!r} has no machines")
    return mix


def kinds_for(n: int, mix: dict[str, int]) -> list[str]:
    """n kinds in the mix's proportions, evenly interleaved (machine i's kind depends
    only on i and the mix, so the server side can be told which are which)."""
    total = sum(mix.values())
    given = dict.fromkeys(mix, 0)
    out = []
    for i in range(n):
        kind = max(mix, key=lambda k: mix[k] * (i + 1) / total - given[k])
        given[kind] += 1
        out.append(kind)
    return out


def machine_mac(i: int, seed: int, kind: str) -> bytes:
    """pxelinux machines get their own OUI byte, so dnsmasq can tag them by MAC pattern."""
    return bytes((0x52, 0x54, 0x7A if kind == "pxelinux" else 0x79, seed & 0xFF,
                  i >> 8 & 0xFF, i & 0xFF))


def make_machines(n: int, seed: int, mix: str = "bios=1") -> list[Machine]:
    out = []
    for i, kind in enumerate(kinds_for(n, parse_mix(mix))):
        ip = f"10.79.{10 + i // 250}.{1 + i % 250}"
        uuid = str(uuidlib.uuid5(uuidlib.NAMESPACE_DNS, f"storm-{seed}-{i}"))
        out.append(Machine(i, ip, machine_mac(i, seed, kind), uuid, f"STORM-{seed}-{i:05d}",
                           kind))
    return out


def big_receive_buffer(sock: socket.socket, size: int = 16 << 20) -> None:
    """Every offer of the storm lands on one socket (the relay's, or udp/68): as root
    past net.core.rmem_max (SO_RCVBUF alone was capped at ~200 kB and dropped offers
    at N=10,000 while the client was busy)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def direct_socket(interface: str) -> socket.socket:
    """udp/68 on every address of the interface: where broadcast offers arrive."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, interface.encode() + b"\0")
    big_receive_buffer(sock)
    sock.bind(("0.0.0.0", 68))
    return sock


async def run(a: argparse.Namespace) -> dict[str, Any]:
    mux = DhcpMux()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    big_receive_buffer(sock)
    sock.bind((a.relay, a.relay_port))
    attach_batched(mux, sock)
    storm = Storm(a, mux)
    if a.phase_limit:
        storm.sems = {p: asyncio.Semaphore(a.phase_limit) for p in PHASES}
    machines = make_machines(a.n, a.seed, a.mix)[a.first:]
    if any(m.kind == "direct" for m in machines):
        storm.direct = DhcpMux()
        attach_batched(storm.direct, direct_socket(a.interface))
    storm.t0 = time.monotonic()
    await asyncio.gather(*(storm.machine(m) for m in machines))
    wall = time.monotonic() - storm.t0
    assert mux.transport is not None
    mux.transport.close()
    if storm.direct is not None and storm.direct.transport is not None:
        storm.direct.transport.close()
    done = [m for m in machines if m.done_at is not None]
    failed = [m for m in machines if m.done_at is None]
    phases = {}
    for p in PHASES:
        vals = [m.phases[p] for m in done if p in m.phases]
        phases[p] = {"n": len(vals), "p50_ms": round(1000 * percentile(vals, 50), 1),
                     "p99_ms": round(1000 * percentile(vals, 99), 1),
                     "max_ms": round(1000 * max(vals), 1) if vals else None}
    return {
        "n": len(machines), "completed": len(done), "failed": len(failed),
        "final_failures": dict(Counter(_generic(m.errors[-1]) for m in failed if m.errors)),
        "failed_examples": [f"{m.kind} {m.ip}: {m.errors[-1]}" for m in failed[:10] if m.errors],
        "attempt_failures": dict(storm.attempt_failures),
        "retried_ok": sum(1 for m in done if m.attempts > 1),
        "t_last_s": round(max((m.done_at for m in done), default=float("nan")), 3),
        "wall_s": round(wall, 3), "phases": phases,
        "files": {k: dict(v) for k, v in storm.files.items()},
        "acked": [m.uuid for m in machines if m.acked],
        "uuids": [m.uuid for m in machines],
        "stray_dhcp": mux.stray,
        "kinds": {k: kind_summary([m for m in machines if m.kind == k])
                  for k in KINDS if any(m.kind == k for m in machines)},
    }


def kind_summary(machines: list[Machine]) -> dict[str, Any]:
    done = [m for m in machines if m.done_at is not None]
    return {"n": len(machines), "completed": len(done),
            "failed": len(machines) - len(done),
            "t_last_s": round(max((m.done_at for m in done), default=float("nan")), 3),
            "p50_s": round(percentile([m.done_at for m in done], 50), 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="storm_client.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=100, help="machines")
    ap.add_argument("--first", type=int, default=0, help="skip machines below this index")
    ap.add_argument("--server", default="10.79.0.2",
                    help="where relayed DISCOVERs go; several, comma-separated: a relay "
                    "with several helper addresses (the first OFFER wins)")
    ap.add_argument("--relay", default="10.79.0.3", help="relay address (giaddr), udp/67 here")
    ap.add_argument("--relay-port", type=int, default=67)
    ap.add_argument("--dhcp-port", type=int, default=67)
    ap.add_argument("--proxy-port", type=int, default=4011)
    ap.add_argument("--tftp-port", type=int, default=69)
    ap.add_argument("--seed", type=int, default=1, help="varies MACs and UUIDs between runs")
    ap.add_argument("--spread", type=float, default=0.0,
                    help="power-on spread in seconds (0: all at once)")
    ap.add_argument("--phase-limit", type=int, default=0,
                    help="at most this many machines in any one phase (0: no limit)")
    ap.add_argument("--reboots", type=int, default=0,
                    help="a failed machine starts over this many times (as boot.ipxe reboots)")
    ap.add_argument("--reboot-delay", type=float, default=3.0)
    ap.add_argument("--http-timeout", type=float, default=60.0)
    ap.add_argument("--hash", action="store_true", help="sha256 every file fetched")
    ap.add_argument("--require-callback", action="store_true",
                    help="a kernel line without netboot.callback= is a failure")
    ap.add_argument("--progress", action="store_true", help="print 'ACK <uuid>' per callback")
    ap.add_argument("--mix", default="bios=1",
                    help=f"machine kinds and weights (e.g. {DEFAULT_MIX}); default all bios")
    ap.add_argument("--interface", default="eth0", help="where direct machines broadcast")
    ap.add_argument("--json", help="write the result here")
    a = ap.parse_args(argv)
    a.xid_salt = random.getrandbits(32) & 0xFF000000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop

        result = uvloop.run(run(a))
    except ImportError:
        result = asyncio.run(run(a))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    brief = {k: v for k, v in result.items() if k not in ("acked", "uuids")}
    print(json.dumps(brief, indent=1), file=sys.stderr)
    return 0 if result["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
