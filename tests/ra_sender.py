"""Send IPv6 router advertisements on one link (a lab's far subnet), every 3 s.

    python tests/ra_sender.py DEV PREFIX     e.g. eth1 fd00:78::

Flags M (addresses by DHCPv6) and A (SLAAC for the demo OS, which has no DHCPv6
client); the router lifetime makes the sender the link's default router.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import sys
import time
from pathlib import Path


def advert(prefix: str, mac: bytes) -> bytes:
    head = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0x80, 1800, 0, 0)  # the kernel sums it
    info = struct.pack("!BBBBIII16s", 3, 4, 64, 0xC0, 86400, 14400, 0,
                       ipaddress.IPv6Address(prefix).packed)  # on-link + autonomous
    source = struct.pack("!BB6s", 1, 1, mac)
    return head + info + source


def main() -> None:
    dev, prefix = sys.argv[1], sys.argv[2]
    mac = bytes.fromhex(Path(f"/sys/class/net/{dev}/address").read_text().strip()
                        .replace(":", ""))
    sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    sock.setsockopt(socket.SOL_SOCKET, 25, dev.encode() + b"\0")  # SO_BINDTODEVICE
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)  # RFC 4861 §6.1.2
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, socket.if_nametoindex(dev))
    data = advert(prefix, mac)
    while True:
        sock.sendto(data, ("ff02::1", 0, 0, socket.if_nametoindex(dev)))
        time.sleep(3)


if __name__ == "__main__":
    main()
