"""Interface facts from the kernel (no subprocesses): names, IPv4 addresses, MTU."""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from pathlib import Path

SIOCGIFADDR = 0x8915
SIOCGIFMTU = 0x8921
SIOCGIFFLAGS = 0x8913
IFF_UP = 0x1
IFF_LOOPBACK = 0x8


def _ioctl(name: str, request: int) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return fcntl.ioctl(s.fileno(), request, struct.pack("256s", name.encode()[:15]))


def interface_ipv4(name: str) -> str | None:
    try:
        return socket.inet_ntoa(_ioctl(name, SIOCGIFADDR)[20:24])
    except OSError:
        return None


def interface_ipv6(name: str) -> str | None:
    """The interface's first global (non-link-local) IPv6 address, from
    /proc/net/if_inet6 (read once, at startup)."""
    try:
        lines = Path("/proc/net/if_inet6").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) == 6 and fields[5] == name and int(fields[3], 16) == 0:  # scope global
            return str(ipaddress.IPv6Address(bytes.fromhex(fields[0])))
    return None


def interface_mac(name: str) -> bytes | None:
    try:
        return bytes.fromhex(Path(f"/sys/class/net/{name}/address").read_text().strip()
                             .replace(":", ""))
    except (OSError, ValueError):
        return None


def interface_mtu(name: str) -> int | None:
    try:
        return struct.unpack("i", _ioctl(name, SIOCGIFMTU)[16:20])[0]
    except OSError:
        return None


def _flags(name: str) -> int:
    try:
        return struct.unpack("H", _ioctl(name, SIOCGIFFLAGS)[16:18])[0]
    except OSError:
        return 0


def interfaces() -> list[tuple[str, str | None, bool]]:
    """[(name, first IPv4 or None, is loopback)] for every interface that is up."""
    out = []
    for _, name in socket.if_nameindex():
        flags = _flags(name)
        if flags & IFF_UP:
            out.append((name, interface_ipv4(name), bool(flags & IFF_LOOPBACK)))
    return out


def choose_interface() -> tuple[str, str] | None:
    """The first up, non-loopback interface with an IPv4 address."""
    for name, addr, loopback in interfaces():
        if addr and not loopback:
            return name, addr
    return None
