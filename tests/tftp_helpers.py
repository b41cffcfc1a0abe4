"""Shared pieces of the TFTP tests: a raw asyncio UDP client and a simulated RFC 7440 client."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from netboot.tftp import packet as pk


class RawClient:
    """A bare UDP socket speaking TFTP by hand, for sequences real clients won't produce."""

    def __init__(self, host: str = "127.0.0.1"):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.bind((host, 0))
        self.loop = asyncio.get_running_loop()

    async def send(self, data: bytes, addr: tuple[str, int]) -> None:
        await self.loop.sock_sendto(self.sock, data, addr)

    async def recv(self, timeout: float = 3.0) -> tuple[bytes, tuple[str, int]]:
        return await asyncio.wait_for(self.loop.sock_recvfrom(self.sock, 65536), timeout)

    async def expect_silence(self, seconds: float) -> None:
        try:
            data, addr = await self.recv(seconds)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected packet {data[:16]!r} from {addr}")

    async def fetch(self, server: tuple[str, int], name: str,
                    options: dict[str, str] | None = None) -> bytes:
        """Lock-step download (windowsize 1); returns the content."""
        await self.send(pk.encode_request(pk.RRQ, name, "octet", options), server)
        blksize = 512
        out = bytearray()
        expected = 1
        while True:
            data, tid = await self.recv()
            op = pk.opcode_of(data)
            if op == pk.OACK:
                blksize = int(pk.parse_oack(data).get("blksize", 512))
                await self.send(pk.encode_ack(0), tid)
                continue
            if op == pk.ERROR:
                raise AssertionError(f"server error {pk.parse_error(data)}")
            block, payload = pk.parse_data(data)
            if block == expected & 0xFFFF:
                out += payload
                expected += 1
            await self.send(pk.encode_ack(block), tid)
            if block == (expected - 1) & 0xFFFF and len(payload) < blksize:
                return bytes(out)

    def close(self) -> None:
        self.sock.close()


@dataclass
class SimClient:
    """Receiver side of RFC 1350/7440 over a simulated lossy link (no sockets, no clock).

    ACKs the last in-order block at the end of each window, at a short final block,
    on an out-of-order block (once per gap), and again on its own timeout.
    """

    blksize: int
    windowsize: int
    data: bytearray = field(default_factory=bytearray)
    expected: int = 1  # absolute number of the next block wanted
    in_window: int = 0
    done: bool = False
    gap_acked: bool = False

    def on_packet(self, pkt: bytes) -> list[bytes]:
        block, payload = pk.parse_data(pkt)
        if block != self.expected & 0xFFFF:
            if self.gap_acked:
                return []
            self.gap_acked = True
            self.in_window = 0
            return [pk.encode_ack(self.expected - 1)]
        self.gap_acked = False
        self.data += payload
        self.expected += 1
        self.in_window += 1
        if len(payload) < self.blksize:
            self.done = True
            return [pk.encode_ack(self.expected - 1)]
        if self.in_window >= self.windowsize:
            self.in_window = 0
            return [pk.encode_ack(self.expected - 1)]
        return []

    def on_timeout(self) -> list[bytes]:
        self.in_window = 0
        return [pk.encode_ack(self.expected - 1)]


@dataclass
class AtftpClient:
    """Receiver side as atftp 0.8.0 (tftp_file.c) does it, for sequences no RFC client makes.

    It counts `windowsize` in-order blocks from its own last ACK (not from the sender's
    window) and then ACKs. A block that is not the next one gets one "extra" ACK of the
    last in-order block; every further wrong block is ignored, without an ACK, until an
    in-order block arrives or its own timer fires. That timer is a select() restarted by
    every packet received, so while a sender keeps retransmitting blocks it already has,
    it never fires: once that one extra ACK is lost, only `timeout` seconds of silence
    from the sender get the transfer going again. Wire block numbers are taken as
    absolute (no rollover: keep contents under 65535 blocks).
    """

    blksize: int
    windowsize: int
    timeout: float = 5.0  # atftp's default; --tftp-timeout sets it
    retries: int = 5  # NB_OF_RETRY: consecutive timeouts before it gives up
    data: bytearray = field(default_factory=bytearray)
    last: int = 0  # last block received in order
    in_window: int = 0
    extra_ack: bool = False
    done: bool = False
    aborted: bool = False
    timeouts: int = 0
    deadline: float = 0.0

    def on_packet(self, pkt: bytes, now: float) -> list[bytes]:
        if pk.opcode_of(pkt) == pk.ERROR:
            self.aborted = True
            return []
        self.deadline = now + self.timeout
        self.timeouts = 0
        block, payload = pk.parse_data(pkt)
        if block != self.last + 1:
            if self.extra_ack:
                return []
            self.extra_ack = True
            self.in_window = 0
            return [pk.encode_ack(self.last)]
        self.extra_ack = False
        self.data += payload
        self.last = block
        self.in_window += 1
        if len(payload) < self.blksize:
            self.done = True
            return [pk.encode_ack(self.last)]
        if self.in_window >= self.windowsize:
            self.in_window = 0
            return [pk.encode_ack(self.last)]
        return []

    def on_timer(self, now: float) -> list[bytes]:
        self.timeouts += 1
        if self.timeouts > self.retries:
            self.aborted = True
            return []
        self.extra_ack = False
        self.in_window = 0
        self.deadline = now + self.timeout
        return [pk.encode_ack(self.last)]


def lossy(packets: list[bytes], rng: random.Random, loss: float, dup: float,
          reorder: float) -> list[bytes]:
    """Apply loss, duplication and adjacent swaps to a burst of packets."""
    out: list[bytes] = []
    for p in packets:
        if rng.random() < loss:
            continue
        out.append(p)
        if rng.random() < dup:
            out.append(p)
    for i in range(len(out) - 1):
        if rng.random() < reorder:
            out[i], out[i + 1] = out[i + 1], out[i]
    return out


class LossyRelay:
    """A UDP relay between TFTP clients and a server that loses, duplicates and reorders.

    Stands in for netem where the kernel lacks it. Clients talk to `port`; each client
    gets its own upstream socket, so the server sees distinct peers and real TIDs.
    A reordered packet is held back a few milliseconds, so later ones overtake it.
    Packets for which `spare` is true pass undamaged (see tests/test_tftp_lossy.py).
    """

    def __init__(self, server: tuple[str, int], *, loss: float, reorder: float, dup: float,
                 seed: int = 1, spare: Callable[[bytes], bool] | None = None):
        self.server = server
        self.loss, self.reorder, self.dup = loss, reorder, dup
        self.spare = spare
        self.rng = random.Random(seed)
        self.loop = asyncio.get_running_loop()
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.setblocking(False)
        self.front.bind(("127.0.0.1", 0))
        self.port: int = self.front.getsockname()[1]
        self.upstream: dict[tuple[str, int], socket.socket] = {}
        self.server_tid: dict[tuple[str, int], tuple[str, int]] = {}
        self.dropped = 0
        self.loop.add_reader(self.front.fileno(), self._from_client)

    def _deliver(self, sock: socket.socket, data: bytes, addr: tuple[str, int]) -> None:
        if self.spare is not None and self.spare(data):
            self._send(sock, data, addr)
            return
        rng = self.rng
        if rng.random() < self.loss:
            self.dropped += 1
            return
        copies = 2 if rng.random() < self.dup else 1
        for _ in range(copies):
            if rng.random() < self.reorder:
                self.loop.call_later(0.002 + rng.random() * 0.004, self._send, sock, data, addr)
            else:
                self._send(sock, data, addr)

    @staticmethod
    def _send(sock: socket.socket, data: bytes, addr: tuple[str, int]) -> None:
        try:
            sock.sendto(data, addr)
        except OSError:
            pass

    def _from_client(self) -> None:
        try:
            data, client = self.front.recvfrom(65536)
        except OSError:
            return
        up = self.upstream.get(client)
        if up is None:
            up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            up.setblocking(False)
            up.bind(("127.0.0.1", 0))
            self.upstream[client] = up
            self.loop.add_reader(up.fileno(), self._from_server, client, up)
        if pk.opcode_of(data) in (pk.RRQ, pk.WRQ):
            self.server_tid[client] = self.server
        self._deliver(up, data, self.server_tid.get(client, self.server))

    def _from_server(self, client: tuple[str, int], up: socket.socket) -> None:
        try:
            data, src = up.recvfrom(65536)
        except OSError:
            return
        self.server_tid[client] = src  # the transfer's TID, once the server answers
        self._deliver(self.front, data, client)

    def close(self) -> None:
        for s in [self.front, *self.upstream.values()]:
            self.loop.remove_reader(s.fileno())
            s.close()
