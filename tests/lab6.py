"""IPv6 on a lab (tests/lab.py): addresses, the site's DHCPv6 and router
advertisements from the router namespace, a DHCPv6 relay.

    br0 (ns LAB) -- ns ROUTER: fd00:<subnet>::1, dnsmasq --enable-ra (+ DHCPv6 range)
                 -- ns BOOT:   fd00:<subnet>::2, netboot

The segment is IPv6-only for guests (no IPv4 site DHCP), so every stage after the
firmware (iPXE, the demo OS) has to use IPv6 too.
"""

from __future__ import annotations

import time

from tests.lab import Lab


def net6(lab: Lab) -> str:
    return f"fd00:{lab.subnet}::"


def boot_addr6(lab: Lab) -> str:
    return f"{net6(lab)}2"


def router_addr6(lab: Lab) -> str:
    return f"{net6(lab)}1"


def enable_ipv6(lab: Lab, ns: str, dev: str = "eth0", addr: str | None = None,
                forwarding: bool = False) -> None:
    for key in ("all", "default", dev):
        lab.ns(ns, "sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=0")
    # fixed addresses only: an RA-made address could be the one a server picks
    lab.ns(ns, "sysctl", "-qw", f"net.ipv6.conf.{dev}.accept_ra=0")
    if forwarding:
        lab.ns(ns, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
    if addr:
        lab.ns(ns, "ip", "-6", "addr", "add", f"{addr}/64", "dev", dev, "nodad")


def up_ipv6(lab: Lab) -> None:
    """Addresses on the router and boot namespaces; the bridge floods multicast
    (no MLD querier in a lab, so snooping would only get in the way)."""
    lab.ns(lab.ns_lab, "ip", "link", "set", "br0", "type", "bridge", "mcast_snooping", "0")
    enable_ipv6(lab, lab.ns_router, addr=router_addr6(lab))
    enable_ipv6(lab, lab.ns_boot, addr=boot_addr6(lab))
    wait_link_local(lab, lab.ns_router)
    wait_link_local(lab, lab.ns_boot)


def wait_link_local(lab: Lab, ns: str, dev: str = "eth0", timeout: float = 10) -> None:
    """Until the link-local address has finished DAD (dnsmasq re-reads interfaces
    when it does; a server started before then loses its first packets)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = lab.ns(ns, "ip", "-6", "addr", "show", "dev", dev, "scope", "link").stdout
        if "fe80::" in out and "tentative" not in out:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{ns}/{dev}: no link-local IPv6 address after {timeout}s")


def start_site_dhcp6(lab: Lab, *, assign: bool = True, subnets: tuple[int, ...] = ()) -> None:
    """The site's router: RAs (M and A flags: stateful DHCPv6 and SLAAC, so the
    demo OS, which has no DHCPv6 client, gets an address) and, with ``assign``,
    DHCPv6 addresses from ::100 to ::1ff of our prefix and of ``subnets``' (relayed).
    Without ``assign`` it still advertises M but answers no DHCPv6 client
    (``--dhcp-ignore``): netboot must assign."""
    ranges = [f"--dhcp-range=fd00:{n}::100,fd00:{n}::1ff,slaac,64,1h"
              for n in (lab.subnet, *subnets)]
    args = ["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0",
            "--interface=eth0", "--bind-interfaces", "--enable-ra", "--ra-param=eth0,5",
            *ranges, f"--dhcp-leasefile={lab.workdir / 'dnsmasq6.leases'}", "--log-dhcp"]
    if not assign:
        args.append("--dhcp-ignore=tag:!known")
    lab.spawn(lab.ns_router, *args, log=lab.workdir / "dnsmasq6.log")


def add_far_subnet6(lab: Lab, far: Lab) -> None:
    """IPv6 on the relay namespace lab.add_far_subnet() made: fd00:<subnet>::3 on the
    near side, fd00:<far>::1 on the far side, forwarding; routes back from netboot."""
    ns = lab.ns_relay
    enable_ipv6(lab, ns, "eth0", f"{net6(lab)}3", forwarding=True)
    enable_ipv6(lab, ns, "eth1", router_addr6(far))
    far.ns(far.ns_lab, "ip", "link", "set", "br0", "type", "bridge", "mcast_snooping", "0")
    lab.ns(lab.ns_boot, "ip", "-6", "route", "add", f"{net6(far)}/64", "via", f"{net6(lab)}3")
    wait_link_local(lab, ns, "eth1")
    wait_link_local(lab, ns, "eth0")


def start_router_adverts(lab: Lab, ns: str, dev: str, prefix: str):
    """Router advertisements (M and A flags) on ``dev``, from tests/ra_sender.py:
    the far link's router is the relay namespace, whose udp/547 dhcrelay needs (a
    dnsmasq there would want it too)."""
    from tests.lab import REPO, VENV_BIN
    return lab.spawn(ns, str(VENV_BIN / "python"), str(REPO / "tests" / "ra_sender.py"), dev,
                     prefix, log=lab.workdir / f"ra-{dev}.log")


def start_relay6(lab: Lab, server: str):
    """dhcrelay -6 in the relay namespace: clients on eth1, ``server`` via eth0."""
    proc = lab.spawn(lab.ns_relay, "dhcrelay", "-d", "-6", "-pf",
                     str(lab.workdir / "dhcrelay6.pid"), "-l", "eth1", "-u", f"{server}%eth0",
                     log=lab.workdir / "relay6.log")
    time.sleep(1.0)
    if proc.poll() is not None:
        raise RuntimeError(f"dhcrelay -6 exited: {(lab.workdir / 'relay6.log').read_text()}")
    return proc
