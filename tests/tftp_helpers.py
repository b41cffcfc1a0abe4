"""Shared pieces of the TFTP tests: a raw asyncio UDP client and a simulated RFC 7440 client."""

from __future__ import annotations

import asyncio
import random
import socket
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
