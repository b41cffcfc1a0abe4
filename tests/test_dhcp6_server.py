"""The DHCPv6 socket layer on [::1]: a Solicit in, the responder's Advertise out;
udp/4011 replies leave BOOT_REPLY_DELAY late (EDK2 reads them only after sending)."""

from __future__ import annotations

import asyncio
import socket
import time

from scapy.layers.dhcp6 import DHCP6_Request

from netboot.boot.booter import Booter
from netboot.config import ConfigStore
from netboot.dhcp6 import packet as P
from netboot.dhcp6.responder import Dhcp6Responder
from netboot.dhcp6.server import BOOT_REPLY_DELAY, start_dhcp6
from netboot.metrics import Counters
from tests.test_dhcp6 import SDUID, SERVER, message, solicit


def free_ports(n: int) -> list[int]:
    socks = [socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) for _ in range(n)]
    for s in socks:
        s.bind(("::1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


async def exchange(data: bytes, port: int, timeout: float = 2) -> tuple[bytes, float]:
    loop = asyncio.get_running_loop()
    client = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    client.bind(("::1", 0))
    client.setblocking(False)
    try:
        t0 = time.monotonic()
        await loop.sock_sendto(client, data, ("::1", port))
        reply = await asyncio.wait_for(loop.sock_recv(client, 2048), timeout)
        return reply, time.monotonic() - t0
    finally:
        client.close()


async def test_solicit_and_boot_service_request_over_real_sockets(store: ConfigStore) -> None:
    responder = Dhcp6Responder(Booter(store, "10.0.0.2", 8080).over_ipv6(SERVER), SERVER,
                               SDUID, Counters())
    port, boot_port = free_ports(2)
    server = await start_dhcp6(responder, [port, boot_port], host="::1", boot_port=boot_port)
    try:
        adv, fast = await exchange(solicit(), port)
        assert adv[0] == P.ADVERTISE and adv[1:4] == solicit()[1:4]
        rep, slow = await exchange(message(DHCP6_Request, ia=False), boot_port)
        assert rep[0] == P.REPLY
        assert (P.parse(rep).get(P.OPT_BOOTFILE_URL) or b"").startswith(b"tftp://[")
        assert slow >= BOOT_REPLY_DELAY > fast
        assert await _silent(b"\x01\x00", port)  # malformed: dropped, counted
        assert responder.counters.get("dhcp6_malformed_total") == 1
    finally:
        server.close()


async def _silent(data: bytes, port: int) -> bool:
    try:
        await exchange(data, port, timeout=0.5)
    except TimeoutError:
        return True
    return False
