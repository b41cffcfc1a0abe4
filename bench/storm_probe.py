"""Probes shared by tests/test_hostile.py and tests/test_faults.py: a netboot subprocess in a
two-namespace lab (bench/storm_lab.py), raw UDP probes, a plain TFTP client."""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

from bench.storm_lab import RELAY_ADDR, SERVER_ADDR, NetbootServer, netns_socket


def udp(server: NetbootServer, data: bytes, port: int, wait: float = 0.5,
        src: tuple[str, int] = (RELAY_ADDR, 0)) -> list[bytes]:
    """Send one datagram from the client namespace; every reply until ``wait`` of silence."""
    s = netns_socket(server.lab.ns_cli, bind=src, timeout=wait)
    try:
        s.sendto(data, (SERVER_ADDR, port))
        out = []
        while True:
            try:
                out.append(s.recvfrom(70000)[0])
            except TimeoutError:
                return out
            except ConnectionRefusedError:
                return out
    finally:
        s.close()


def rrq(name: bytes | str, mode: bytes = b"octet", **opts: str) -> bytes:
    if isinstance(name, str):
        name = name.encode()
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in opts.items())
    return b"\0\x01" + name + b"\0" + mode + b"\0" + body


def tftp_fetch(server: NetbootServer, name: str, *, blksize: int = 1468, timeout: float = 0.3,
               retries: int = 40, src: str = RELAY_ADDR) -> bytes:
    """A plain lock-step TFTP client (not the storm's): whole file, or AssertionError."""
    s = netns_socket(server.lab.ns_cli, bind=(src, 0), timeout=timeout)
    try:
        last = rrq(name, blksize=str(blksize), tsize="0")
        dest = (SERVER_ADDR, 69)
        s.sendto(last, dest)
        peer = None
        blk, expected, tries, got = 512, 1, 0, bytearray()
        tsize = None
        while True:
            try:
                data, addr = s.recvfrom(70000)
            except TimeoutError:
                tries += 1
                assert tries <= retries, f"{name}: gave up at block {expected}"
                s.sendto(last, dest)
                continue
            if peer is None:
                peer = dest = addr
            elif addr != peer:
                continue
            op = int.from_bytes(data[:2], "big")
            assert op != 5, f"{name}: ERROR {data[2:4].hex()} {data[4:]!r}"
            if op == 6 and expected == 1:
                parts = data[2:].split(b"\0")
                opts = {parts[i].decode(): parts[i + 1].decode()
                        for i in range(0, len(parts) - 1, 2)}
                blk = int(opts.get("blksize", 512))
                tsize = int(opts["tsize"]) if "tsize" in opts else None
                last = b"\0\x04\0\0"
                s.sendto(last, dest)
                continue
            if op != 3:
                continue
            n = int.from_bytes(data[2:4], "big")
            if n == expected & 0xFFFF:
                got += data[4:]
                last = b"\0\x04" + data[2:4]
                s.sendto(last, dest)
                expected += 1
                tries = 0
                if len(data) - 4 < blk:
                    assert tsize is None or tsize == len(got)
                    return bytes(got)
            elif n == (expected - 1) & 0xFFFF:
                s.sendto(last, dest)
    finally:
        s.close()


def sha256(data: bytes | Path) -> str:
    if isinstance(data, Path):
        data = data.read_bytes()
    return hashlib.sha256(data).hexdigest()


def metric(text: str, name: str, **labels: str) -> float:
    """One Prometheus sample from /metrics text (0 if absent)."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def wait_for(cond, timeout: float = 10.0, step: float = 0.1):  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(step)
    return cond()
