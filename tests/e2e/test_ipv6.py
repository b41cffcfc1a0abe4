"""Booting over IPv6: OVMF with IPv4 PXE off, on an IPv6-only lab segment.

    guest (OVMF PXEv6) -- br0 -- router ns: RAs (dnsmasq --enable-ra), site DHCPv6 or none
                               -- boot ns:   netboot, DHCPv6 + TFTP/HTTP on [fd00:77::2]

- assign mode (a provisioning segment, netboot its only DHCPv6 server): firmware
  PXE over IPv6 -> TFTP ipxe.efi over IPv6 -> iPXE's DHCPv6 -> HTTP script over
  IPv6 -> the demo OS, which calls back over IPv6; once on this link, once from a
  far subnet through ``dhcrelay -6``;
- proxy mode beside the site's DHCPv6 (dnsmasq assigns): the firmware takes
  netboot's boot URL and loads iPXE, which then does not (see docs/firmware.md, IPv6).

Every DHCPv6 packet on netboot's link is captured; NETBOOT_SAVE_CAPTURES=DIR keeps
them as hex (tests/captures/ holds one such set, replayed by tests/test_dhcp6_captures.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import uuid as uuidlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.e2e.conftest import lab_config
from tests.lab import Lab
from tests.lab6 import (
    add_far_subnet6,
    boot_addr6,
    net6,
    start_relay6,
    start_router_adverts,
    start_site_dhcp6,
    up_ipv6,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

FAR = 78


def dhcp6_config(lab: Lab, assign: str | None) -> str:
    extra = f"dhcp6:\n  enabled: true\n  address: {boot_addr6(lab)}\n"
    if assign:
        extra += f"  assign:\n    first: {assign}1000\n    last: {assign}1fff\n"
    return extra


@contextmanager
def capture(lab: Lab, ns: str, pcap: Path) -> Iterator[None]:
    dump = subprocess.Popen(["ip", "netns", "exec", ns, "tcpdump", "-n", "-i", "eth0", "-U",
                             "-w", str(pcap), "udp port 546 or udp port 547 or udp port 4011"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    try:
        yield
    finally:
        time.sleep(0.3)
        dump.send_signal(signal.SIGINT)
        dump.wait(timeout=10)


def dhcp6_packets(pcap: Path) -> list[tuple[str, int, str, int, bytes]]:
    """(source, port, destination, port, UDP payload) of each DHCPv6 datagram."""
    from scapy.layers.inet import UDP
    from scapy.layers.inet6 import IPv6
    from scapy.utils import rdpcap

    return [(p[IPv6].src, p[UDP].sport, p[IPv6].dst, p[UDP].dport, bytes(p[UDP].payload))
            for p in rdpcap(str(pcap)) if IPv6 in p and UDP in p]


def ours(lab: Lab) -> set[str]:
    """netboot's addresses: the configured one and eth0's link-local (replies to
    link-local clients leave from it)."""
    out = lab.ns(lab.ns_boot, "ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope",
                 "link").stdout
    return {boot_addr6(lab), *re.findall(r"inet6 (fe80::[0-9a-f:]+)/", out)}


def keep_captures(name: str, pcap: Path, server: set[str]) -> None:
    """With NETBOOT_SAVE_CAPTURES=DIR: DIR/<name>.hex, one datagram a line,
    ``in <port it came from> <hex>`` for what reached netboot and
    ``out <port it went to> <hex>`` for netboot's answers (others' are left out)."""
    where = os.environ.get("NETBOOT_SAVE_CAPTURES")
    if not where:
        return
    lines = []
    for src, sport, dst, dport, data in dhcp6_packets(pcap):
        if src in server:
            lines.append(f"out {dport} {data.hex()}")
        elif dst in server or dst == "ff02::1:2":
            lines.append(f"in {sport} {data.hex()}")
    Path(where).mkdir(parents=True, exist_ok=True)
    (Path(where) / f"{name}.hex").write_text("\n".join(lines) + "\n")


def node(lab: Lab, uuid: str) -> dict:
    out = lab.ns(lab.ns_boot, "curl", "-sf", "-H", "Authorization: Bearer lab-admin-token",
                 f"http://{lab.boot_addr}:8080/api/v1/nodes/{uuid}", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else {}


def start(lab: Lab, config: Path) -> None:
    lab.start_netboot(config)
    deadline = time.monotonic() + 20
    while "DHCPv6 listening" not in lab.netboot_log():
        assert time.monotonic() < deadline, lab.netboot_log()
        time.sleep(0.2)


def boot(lab: Lab, on: Lab, pcap: Path) -> tuple[str, str, float]:
    """A uefi-pxe6 guest on ``on``'s bridge, DHCPv6 captured on netboot's link:
    (its UUID, its console at the end, when it started)."""
    uuid = str(uuidlib.uuid4())
    with capture(lab, lab.ns_boot, pcap):
        t0 = time.monotonic()
        guest = on.boot_guest("uefi-pxe6", uuid=uuid, nic="virtio-net-pci", nic_rom=False)
        console = on.wait_guest(guest, timeout=400)
    return uuid, console, t0


def assert_booted(lab: Lab, console: str, uuid: str, t0: float, prefix: str) -> None:
    took = time.monotonic() - t0
    assert "NETBOOT-TESTOS-DONE" in console, console[-3000:]
    assert "Start PXE over IPv6" in console and "Station IP address is FD00" in console, \
        console[-3000:]  # the firmware's own PXEv6, not HTTP Boot, did it
    assert f"identity uuid={uuid}" in console
    assert "NETBOOT-TESTOS callback ok" in console, console[-2000:]
    assert f"netboot.callback=http://[{boot_addr6(lab)}]:8080/" in console
    log = lab.netboot_log()
    assert re.search(rf"DHCPv6 boot decision: mac=\S+ uuid={uuid} arch=uefi-x64: "
                     r"(advertise|reply): ipxe\.efi", log), log[-3000:]
    assert re.search(rf"boot script: .*uuid={uuid} from {prefix}", log), log[-3000:]
    record = node(lab, uuid)
    assert record.get("state") == "installed", record
    assert str(record.get("address", "")).startswith(prefix), record
    print(f"IPv6 boot to the demo OS: {took:.0f} s under TCG")


def test_ovmf_boots_the_demo_os_over_ipv6_with_netboot_assigning(
        tmp_path: Path) -> None:
    config = lab_config(tmp_path, extra="")
    lab = Lab(tmp_path)
    try:
        lab.up()
        up_ipv6(lab)
        config.write_text(config.read_text() + dhcp6_config(lab, net6(lab)))
        start_site_dhcp6(lab, assign=False)  # RAs only: netboot is the DHCPv6 server
        start(lab, config)
        pcap = tmp_path / "direct.pcap"
        uuid, console, t0 = boot(lab, lab, pcap)
        assert_booted(lab, console, uuid, t0, net6(lab))
        assert f"Station IP address is {net6(lab).upper().replace('::', ':0:0:0:0:0:')}1" \
            in console  # from netboot's range, ::1000 and up
        keep_captures("ovmf-assign-direct", pcap, ours(lab))
    finally:
        lab.down()
        print("---- netboot log (tail) ----\n" + lab.netboot_log()[-5000:])


def test_ovmf_takes_the_boot_url_from_a_proxy_beside_the_site_dhcpv6(
        tmp_path: Path) -> None:
    """netboot offers no address; the site's dnsmasq does. The firmware takes its
    address from dnsmasq and its boot URL from netboot (Advertise, then a Request to
    udp/4011), and loads iPXE over TFTP/IPv6; iPXE then asks only the server that
    gave it an address, gets no boot URL from it, and has nothing to boot."""
    config = lab_config(tmp_path, extra="")
    lab = Lab(tmp_path)
    try:
        lab.up()
        up_ipv6(lab)
        config.write_text(config.read_text() + dhcp6_config(lab, None))
        start_site_dhcp6(lab, assign=True)
        start(lab, config)
        pcap = tmp_path / "proxy.pcap"
        with capture(lab, lab.ns_boot, pcap):
            guest = lab.boot_guest("uefi-pxe6", nic="virtio-net-pci", nic_rom=False)
            console = lab.wait_guest(guest, marker="Nothing to boot", timeout=300)
        station = re.search(r"Station IP address is FD00:77:0:0:0:0:0:([0-9A-F]+)", console)
        assert station and 0x100 <= int(station.group(1), 16) <= 0x1FF, console[-3000:]
        assert "iPXE initialising devices" in console, console[-3000:]
        log = lab.netboot_log()
        assert re.search(r"DHCPv6 boot decision: .*: reply: ipxe\.efi", log), log[-3000:]
        packets = dhcp6_packets(pcap)
        assert any(sport == 4011 and src == boot_addr6(lab)
                   for src, sport, _, _, _ in packets), packets  # the boot-service Reply
        assert "Nothing to boot" in console  # iPXE: the limit of proxy mode
        keep_captures("ovmf-proxy", pcap, ours(lab))
    finally:
        lab.down()
        print("---- netboot log (tail) ----\n" + lab.netboot_log()[-5000:])


def test_ovmf_boots_over_ipv6_through_dhcrelay(tmp_path: Path) -> None:
    """A far subnet behind dhcrelay -6: Relay-forward in, Relay-reply out (interface
    id echoed), then TFTP and HTTP routed across the relay namespace."""
    config = lab_config(tmp_path, extra="")
    lab = Lab(tmp_path)
    far: Lab | None = None
    try:
        lab.up()
        up_ipv6(lab)
        far = lab.add_far_subnet(FAR)
        add_far_subnet6(lab, far)
        config.write_text(config.read_text() + dhcp6_config(lab, net6(far)))
        start(lab, config)
        start_router_adverts(lab, lab.ns_relay, "eth1", net6(far))
        start_relay6(lab, boot_addr6(lab))
        pcap = tmp_path / "relay.pcap"
        uuid, console, t0 = boot(lab, far, pcap)
        assert_booted(lab, console, uuid, t0, net6(far))
        packets = dhcp6_packets(pcap)
        relay_in = [d for src, _, _, _, d in packets if d[:1] == b"\x0c"]
        relay_out = [d for src, _, _, _, d in packets if d[:1] == b"\x0d"]
        assert relay_in and relay_out, packets
        keep_captures("ovmf-assign-relay", pcap, ours(lab))
    finally:
        if far is not None:
            far.down()
        lab.down_all()
        print("---- netboot log (tail) ----\n" + lab.netboot_log()[-5000:])
