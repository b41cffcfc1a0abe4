"""Booting from a second subnet through a DHCP relay agent.

    far subnet 10.78.0.0/24 -- relay ns (10.78.0.1 | 10.77.0.3) -- lab subnet 10.77.0.0/24
    client, QEMU guest         dnsmasq --dhcp-relay / dhcrelay -a   site DHCP .1, netboot .2

netboot answers relayed DISCOVERs by unicast to the relay's giaddr (port 67),
echoing option 82; the relay broadcasts them on the far subnet. The site DHCP
serves both subnets. Everything is real: kernel routing, two relay agents,
firmware in QEMU.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.e2e.conftest import lab_config
from tests.lab import VENV_BIN, Lab, site_lease_in

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

FAR = 78


@dataclass
class RelayLab:
    lab: Lab
    far: Lab
    client_ns: str
    relay: subprocess.Popen | None = None
    relay_kind: str = ""

    def use_relay(self, kind: str) -> None:
        """Run exactly one relay agent of ``kind`` in the relay namespace."""
        if self.relay_kind == kind and self.relay is not None and self.relay.poll() is None:
            return
        if self.relay is not None and self.relay.poll() is None:
            os.killpg(self.relay.pid, signal.SIGTERM)
            self.relay.wait(timeout=10)
        self.relay = self.lab.start_relay(self.far, kind)
        self.relay_kind = kind
        time.sleep(0.5)

    def probe(self, *args: str) -> tuple[int, str]:
        r = self.lab.ns(self.client_ns, str(VENV_BIN / "netboot"), "probe", "--interface",
                        "eth0", *args, check=False)
        return r.returncode, r.stdout + r.stderr


@pytest.fixture(scope="module")
def relay_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayLab]:
    root = tmp_path_factory.mktemp("relay")
    config = lab_config(root)
    lab = Lab(root)
    far: Lab | None = None
    try:
        lab.up()
        far = lab.add_far_subnet(FAR)
        lab.start_site_dhcp_for(FAR)
        lab.start_netboot(config)
        client = lab.add_client("fcl", lab_ns=far.ns_lab, addr=f"{far.net}.50",
                                gateway=far.router_addr)
        yield RelayLab(lab, far, client)
    finally:
        if far is not None:
            far.down()  # its QEMU guests
        lab.down_all()
        print("---- netboot log (tail) ----\n" + lab.netboot_log()[-4000:])


def test_dnsmasq_relay_carries_both_offers_and_the_4011_ack(relay_lab: RelayLab) -> None:
    relay_lab.use_relay("dnsmasq")
    code, out = relay_lab.probe("--request", "--timeout", "8")
    assert code == 0, out
    far = relay_lab.far
    lab = relay_lab.lab
    # both answers come out of the relay on the far subnet
    assert re.search(rf"address offer \(site DHCP\): OFFER from {far.router_addr}:67", out), out
    assert re.search(rf"ProxyDHCP boot offer: OFFER from {far.router_addr}:67", out), out
    assert re.search(rf"server {lab.boot_addr}  yiaddr 0\.0\.0\.0  siaddr {lab.boot_addr}  "
                     rf"giaddr {far.router_addr}", out), out
    assert site_lease_in(out, FAR), out  # a lease on the far subnet
    # the PXE REQUEST to 4011 is routed straight to netboot and answered by unicast
    assert re.search(rf"ProxyDHCP boot ack \(from port 4011\): ACK from {lab.boot_addr}:4011",
                     out), out
    assert "file 'undionly.kpxe'" in out
    assert "diagnosis: ok:" in out


def test_proxy_offer_reaches_a_client_that_clears_the_broadcast_flag(
        relay_lab: RelayLab) -> None:
    """iPXE clears BROADCAST; a relay then unicasts replies to yiaddr, which a proxy
    offer does not have, unless the server sets BROADCAST in its relayed offer."""
    relay_lab.use_relay("dnsmasq")
    code, out = relay_lab.probe("--no-broadcast-flag", "--timeout", "3", "--ipxe")
    assert re.search(rf"ProxyDHCP boot offer: OFFER from {relay_lab.far.router_addr}:67",
                     out), out
    assert f"file 'http://{relay_lab.lab.boot_addr}:8080/boot.ipxe'" in out


def test_option_82_from_dhcrelay_is_echoed(relay_lab: RelayLab, tmp_path) -> None:
    """dhcrelay -a adds option 82 (circuit id = its interface); netboot must echo it,
    and the relay must then deliver the offer to the client."""
    for tool in ("dhcrelay", "tcpdump"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (isc-dhcp-relay, tcpdump)")
    relay_lab.use_relay("dhcrelay")
    lab = relay_lab.lab
    pcap = tmp_path / "relay-eth0.pcap"
    dump = subprocess.Popen(["ip", "netns", "exec", lab.ns_relay, "tcpdump", "-n", "-i",
                             "eth0", "-U", "-w", str(pcap), "udp port 67"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # tcpdump attaches
        code, out = relay_lab.probe("--timeout", "8", "--arch", "uefi-x64")
    finally:
        time.sleep(0.3)
        dump.send_signal(signal.SIGINT)
        dump.wait(timeout=10)
    assert code == 0, out
    assert "ProxyDHCP boot offer" in out and "file 'ipxe.efi'" in out, out

    from scapy.layers.dhcp import BOOTP, DHCP
    from scapy.layers.inet import IP, UDP
    from scapy.utils import rdpcap

    def opt82(p) -> bytes | None:
        for o in p[DHCP].options:
            if isinstance(o, tuple) and o[0] == "relay_agent_information":
                return o[1]
        return None

    to_netboot = [p for p in rdpcap(str(pcap)) if IP in p and UDP in p and DHCP in p
                  and p[IP].dst == lab.boot_addr and p[BOOTP].op == 1]
    from_netboot = [p for p in rdpcap(str(pcap)) if IP in p and UDP in p and DHCP in p
                    and p[IP].src == lab.boot_addr and p[BOOTP].op == 2]
    assert to_netboot and from_netboot, (len(to_netboot), len(from_netboot))
    sent = opt82(to_netboot[0])
    assert sent is not None and b"eth1" in sent  # the relay added its circuit id
    reply = from_netboot[0]
    assert opt82(reply) == sent
    assert reply[UDP].dport == 67 and reply[IP].dst == relay_lab.far.router_addr


def test_bios_guest_boots_the_demo_os_through_the_relay(relay_lab: RelayLab) -> None:
    """SeaBIOS + iPXE on the far subnet: relayed ProxyDHCP, then HTTP across the router."""
    relay_lab.use_relay("dnsmasq")
    uuid = str(uuidlib.uuid4())
    guest = relay_lab.far.boot_guest("bios", uuid=uuid, serial="SN-RELAY")
    console = relay_lab.far.wait_guest(guest, timeout=400)
    assert "NETBOOT-TESTOS-DONE" in console, f"guest did not boot:\n{console[-3000:]}"
    assert f"uuid={uuid}" in console
    assert "NETBOOT-TESTOS callback ok" in console, console[-2000:]
    log = relay_lab.lab.netboot_log()
    assert re.search(rf"boot decision: mac={guest.mac} .*offered", log), log[-3000:]
