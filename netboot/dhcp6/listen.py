"""``netboot serve``'s IPv6 side, started when ``dhcp6.enabled``: DHCPv6, and
TFTP and HTTP on second sockets bound to ``[::]`` with IPV6_V6ONLY (beside the
IPv4 ones, not one dual-stack socket: a dual-stack socket reports IPv4 clients
as ``::ffff:a.b.c.d``, which the registry, the sightings and the limiter would
take for other addresses)."""

from __future__ import annotations

import logging
import uuid as uuidlib
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..netutil import interface_ipv6, interface_mac
from ..tftp.server import start_tftp
from . import packet as P
from .responder import Dhcp6Responder, Leases
from .server import start_dhcp6

if TYPE_CHECKING:
    from ..config import ServerConfig
    from ..server import Services

log = logging.getLogger("netboot.dhcp6")


class Ipv6SetupError(Exception):
    pass


def server_duid(interface: str | None, address: str) -> bytes:
    """DUID-LL of the interface's MAC (stable across restarts), else a DUID-UUID
    made from the address."""
    mac = interface_mac(interface) if interface else None
    if mac is not None and len(mac) == 6:
        return P.duid_ll(mac)
    return b"\x00\x04" + uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"netboot:{address}").bytes


async def start_ipv6(services: Services, cfg: ServerConfig, interface: str | None,
                     runner: web.AppRunner, backlog: int) -> list[Any]:
    """Start the IPv6 listeners; returns their closers."""
    settings = cfg.dhcp6
    address = settings.address or (interface_ipv6(interface) if interface else None)
    if address is None:
        raise Ipv6SetupError(f"dhcp6.enabled, but interface {interface!r} has no global IPv6 "
                             "address: give one with dhcp6.address")
    booter6 = services.booter.over_ipv6(address)
    services.http.booter6 = booter6
    closers: list[Any] = []
    site = web.TCPSite(runner, "::", cfg.http_port, reuse_address=True, backlog=backlog)
    await site.start()  # asyncio sets IPV6_V6ONLY on AF_INET6 listeners
    log.info("HTTP listening on [::]:%d (advertised as %s)", cfg.http_port, booter6.base_url)
    if cfg.tftp.enabled:
        tftp = await start_tftp(services.tftp, "::", cfg.tftp.port, interface=interface,
                                single_port=cfg.tftp.single_port, counters=services.counters,
                                max_transfers=cfg.tftp.max_transfers,
                                max_per_client=cfg.tftp.max_per_client,
                                workers=cfg.tftp.workers)
        closers.append(tftp.close)
        log.info("TFTP listening on [::]:%d", cfg.tftp.port)
    leases = None
    if settings.assign is not None:
        a = settings.assign
        leases = Leases(a.first, a.last, a.lifetime)
    responder = Dhcp6Responder(booter6, address, server_duid(interface, address),
                               services.counters, leases=leases,
                               report=services.lifecycle.offered, boot_port=settings.boot_port)
    dhcp6 = await start_dhcp6(responder, [settings.port, settings.boot_port],
                              interface=interface, max_age=cfg.dhcp.max_queue_age,
                              pacing=cfg.dhcp.pacing, boot_port=settings.boot_port)
    closers.append(dhcp6.close)
    log.info("DHCPv6 listening on udp/%d and udp/%d%s, advertising %s, %s", settings.port,
             settings.boot_port, f" on {interface}" if interface else "", address,
             f"assigning {settings.assign.first}..{settings.assign.last}" if settings.assign
             else "proxy mode (boot information only; the site's DHCPv6 assigns addresses)")
    return closers
