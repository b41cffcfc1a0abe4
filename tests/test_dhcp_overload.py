"""The ProxyDHCP socket layer under overload: requests that waited in the socket
queue longer than ``max_age`` are dropped before decoding and counted; fresh ones
behind them are answered (real sockets on 127.0.0.1, the kernel's own stamps)."""

from __future__ import annotations

import asyncio
import socket
import time

from netboot.boot.booter import Booter
from netboot.config import ConfigStore
from netboot.dhcp.pacer import Pacer
from netboot.dhcp.proxy import ProxyDhcp
from netboot.dhcp.server import start_dhcp
from netboot.metrics import Counters
from tests.test_dhcp_proxy import request

#: an ephemeral port: not the DHCP port, so ProxyDhcp treats it as the PXE boot-server
#: port (4011) and answers a REQUEST to its source
ANY_PORT = 0


def _client() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


async def _replies(sock: socket.socket, settle: float = 0.3) -> list[bytes]:
    """Every reply that arrives until none has for ``settle`` seconds."""
    loop = asyncio.get_running_loop()
    got: list[bytes] = []
    while True:
        try:
            got.append(await asyncio.wait_for(loop.sock_recv(sock, 2048), settle))
        except TimeoutError:
            return got


async def _serve(store: ConfigStore, counters: Counters, **kw):
    proxy = ProxyDhcp(Booter(store, "10.0.0.2", 8080), "10.0.0.2", counters,
                      dhcp_port=67)
    server = await start_dhcp(proxy, [ANY_PORT], host="127.0.0.1", **kw)
    return server, ("127.0.0.1", server.ports[0])


def _requests(n: int, first: int = 0) -> list[bytes]:
    return [request("request", mac=f"52:54:00:00:10:{i:02x}", uuid=None)
            for i in range(first, first + n)]


async def _stall_between(server, addr: tuple[str, int]) -> list[bytes]:
    """20 requests, the loop (and so the server) stalled 0.5 s, 3 more: the replies."""
    client = _client()
    try:
        for pkt in _requests(20):
            client.sendto(pkt, addr)
        time.sleep(0.5)
        for pkt in _requests(3, first=20):
            client.sendto(pkt, addr)
        return await _replies(client)
    finally:
        client.close()
        server.close()


async def test_a_stalled_server_sheds_the_stale_queue_and_answers_the_fresh(
        store: ConfigStore) -> None:
    counters = Counters()
    server, addr = await _serve(store, counters, max_age=0.25)
    replies = await _stall_between(server, addr)
    assert counters.get("dhcp_overload_dropped_total") == 20
    assert len(replies) == 3
    answered = {r[28:34].hex(":") for r in replies}  # chaddr
    assert answered == {f"52:54:00:00:10:{i:02x}" for i in range(20, 23)}
    assert counters.get("dhcp_acks_total", arch="bios", ipxe="no") == 3


async def test_requests_within_the_age_are_all_answered(store: ConfigStore) -> None:
    """The same stall under a larger limit: nothing is dropped, all 23 are answered."""
    counters = Counters()
    server, addr = await _serve(store, counters, max_age=5.0)
    replies = await _stall_between(server, addr)
    assert counters.get("dhcp_overload_dropped_total") == 0
    assert len(replies) == 23


async def test_the_age_is_read_on_the_kernel_stamp_against_the_injected_wall_clock(
        store: ConfigStore) -> None:
    """A wall clock an hour ahead makes every datagram stale on arrival."""
    counters = Counters()
    server, addr = await _serve(store, counters, max_age=0.25,
                                wall=lambda: time.time() + 3600)
    client = _client()
    try:
        for pkt in _requests(5):
            client.sendto(pkt, addr)
        replies = await _replies(client)
    finally:
        client.close()
        server.close()
    assert replies == [] and counters.get("dhcp_overload_dropped_total") == 5


async def _burst(store: ConfigStore, counters: Counters, n: int, **kw) -> list[bytes]:
    """``n`` requests at once to a server started with ``kw``: the replies."""
    server, addr = await _serve(store, counters, **kw)
    client = _client()
    try:
        for pkt in _requests(n):
            client.sendto(pkt, addr)
        return await _replies(client)
    finally:
        client.close()
        server.close()


async def test_replies_over_the_bucket_leave_on_the_pacers_timer(store: ConfigStore) -> None:
    counters = Counters()
    replies = await _burst(store, counters, 20, max_age=5.0,
                           pacer=lambda: Pacer(burst=4, floor=50.0, max_age=5.0))
    assert len(replies) == 20  # 4 at once, 16 held and sent by the timer
    assert [r[28:34].hex(":") for r in replies] == [f"52:54:00:00:10:{i:02x}"
                                                     for i in range(20)]  # in order
    assert counters.get("dhcp_paced_dropped_total") == 0


async def test_a_reply_held_too_long_is_dropped_and_pacing_off_holds_none(
        store: ConfigStore) -> None:
    def tight() -> Pacer:  # 4 at once, then 20/s, and a held reply expires in 1 ms
        return Pacer(burst=4, floor=20.0, headroom=1e-6, max_age=0.001)

    counters = Counters()
    paced = await _burst(store, counters, 20, pacer=tight)
    assert len(paced) < 20
    assert len(paced) + counters.get("dhcp_paced_dropped_total") == 20
    counters = Counters()
    unpaced = await _burst(store, counters, 20, pacer=tight, pacing=False)
    assert len(unpaced) == 20 and counters.get("dhcp_paced_dropped_total") == 0
