"""The running ProxyDHCP server, seen from a client namespace on the lab bridge.

`netboot serve` runs in its own namespace beside dnsmasq (the site DHCP);
requests are built by scapy and sent from a client namespace, so the path is
the real one: kernel, sockets bound to the device, uvloop, codec, policy.
"""

from __future__ import annotations

import re
import select
import socket
import time
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.lab import REPO, VENV_BIN, Lab, can_run_lab, site_lease_in

pytestmark = pytest.mark.lab

CLIENT_ADDR_SUFFIX = 50
OFF_MAC = "52:54:00:00:00:0f"  # machine file with netboot: false


def pxe_discover(*, mac: str = "52:54:00:aa:00:01", xid: int = 0x11223344,
                 vendor: bytes | None = b"PXEClient:Arch:00000:UNDI:002001",
                 mtype: str = "discover", ciaddr: str = "0.0.0.0") -> bytes:
    """A DISCOVER as a BIOS PXE ROM sends it (or a plain one with ``vendor=None``)."""
    from scapy.layers.dhcp import BOOTP, DHCP

    opts: list = [("message-type", mtype)]
    if vendor is not None:
        opts += [("vendor_class_id", vendor), (93, b"\0\0"), (94, b"\x01\x02\x01"),
                 (97, b"\0" + uuidlib.UUID(int=xid).bytes_le)]
    opts.append("end")
    chaddr = bytes.fromhex(mac.replace(":", "")) + b"\0" * 10
    return bytes(BOOTP(op=1, xid=xid, flags=0x8000, chaddr=chaddr, ciaddr=ciaddr)
                 / DHCP(options=opts))


def write_config(root: Path) -> Path:
    """The bundled profiles, one machine that must never boot, and a private data dir."""
    cfg = root / "configs"
    (cfg / "machines").mkdir(parents=True)
    (cfg / "profiles").mkdir()
    for p in (REPO / "configs" / "profiles").glob("*.yaml"):
        (cfg / "profiles" / p.name).write_text(p.read_text())
    (cfg / "machines" / "off.yaml").write_text(f'mac: "{OFF_MAC}"\nnetboot: false\n')
    (cfg / "netboot.yaml").write_text(
        f"data_dir: {root / 'data'}\nimages_dir: {REPO / 'images'}\n"
        "default_profile: default\n")
    return cfg / "netboot.yaml"


@dataclass
class Served:
    lab: Lab
    client_ns: str
    pid: int

    @property
    def client_addr(self) -> str:
        return f"{self.lab.net}.{CLIENT_ADDR_SUFFIX}"

    def metrics(self) -> str:
        return self.lab.ns(self.lab.ns_boot, "curl", "-sf",
                           f"http://{self.lab.boot_addr}:8080/metrics").stdout

    def metric(self, name: str, **labels: str) -> float:
        text = self.metrics()
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            m = re.match(rf"netboot_{name}(?:{{(.*)}})? (\S+)$", line)
            if m and (m.group(1) or "") == want:
                return float(m.group(2))
        return 0.0

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")


def netboot_pid(launcher_pid: int) -> int:
    """The python process under `ip netns exec` (which execs, so usually the same pid)."""
    comm = Path(f"/proc/{launcher_pid}/comm").read_text().strip()
    if comm != "ip":
        return launcher_pid
    kids = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    return int(kids[0])


def start_served(tmp: Path, *, site_dhcp: bool, log_level: str) -> tuple[Lab, Served]:
    images = REPO / "images"
    if not images.exists():
        images.mkdir()
    lab = Lab(tmp)
    try:
        lab.up()
        if site_dhcp:
            lab.start_site_dhcp()
        proc = lab.start_netboot(write_config(tmp), "--log-level", log_level)
        client = lab.add_client("cli", addr=f"{lab.net}.{CLIENT_ADDR_SUFFIX}")
    except BaseException:
        lab.down_all()
        raise
    return lab, Served(lab, client, netboot_pid(proc.pid))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    reason = can_run_lab()
    if reason:
        pytest.skip(reason)
    lab, s = start_served(tmp_path_factory.mktemp("dhcpsrv"), site_dhcp=True,
                          log_level="debug")
    try:
        yield s
    finally:
        lab.down_all()
        assert "Traceback" not in lab.netboot_log(), lab.netboot_log()[-4000:]


def collect(sock: socket.socket, seconds: float, xid: int | None = None
            ) -> list[tuple[bytes, tuple[str, int]]]:
    """Every datagram for ``xid`` (or any) until ``seconds`` pass."""
    out = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([sock], [], [], left)
        if not ready:
            break
        data, src = sock.recvfrom(4096)
        if xid is None or (len(data) >= 8 and int.from_bytes(data[4:8], "big") == xid):
            out.append((data, src))
    return out


def probe(s: Served, *args: str) -> tuple[int, str]:
    r = s.lab.ns(s.client_ns, str(VENV_BIN / "netboot"), "probe", "--interface", "eth0",
                 *args, check=False)
    return r.returncode, r.stdout + r.stderr


def test_probe_shows_the_site_offer_and_the_proxy_offer_and_ack(served: Served) -> None:
    code, out = probe(served, "--request", "--timeout", "5", "--mac", "52:54:00:aa:00:07",
                      "--uuid", "8dc30e79-5115-44b3-a5e3-4e5cbc62d3a2")
    assert code == 0, out
    lab = served.lab
    assert re.search(rf"address offer \(site DHCP\): OFFER from {lab.router_addr}:67", out), out
    assert re.search(rf"ProxyDHCP boot offer: OFFER from {lab.boot_addr}:67", out), out
    assert re.search(rf"ProxyDHCP boot ack \(from port 4011\): ACK from {lab.boot_addr}:4011",
                     out), out
    assert "file 'undionly.kpxe'" in out
    assert "option  60 vendor_class_id: 'PXEClient'" in out
    assert "option  97 pxe_client_machine_identifier: type 0, " \
           "8dc30e79-5115-44b3-a5e3-4e5cbc62d3a2" in out  # echoed, in SMBIOS order
    assert site_lease_in(out, lab.subnet), out  # the site's lease
    assert "diagnosis: ok:" in out


def test_probe_as_ipxe_uefi_gets_the_script_url(served: Served) -> None:
    code, out = probe(served, "--arch", "uefi-x64", "--ipxe", "--timeout", "5")
    assert code == 0, out
    assert f"file 'http://{served.lab.boot_addr}:8080/boot.ipxe'" in out


def test_probe_diagnoses_a_machine_netboot_will_not_boot(served: Served) -> None:
    code, out = probe(served, "--mac", OFF_MAC, "--timeout", "5")
    assert code == 1, out
    assert "address offer (site DHCP)" in out  # the site DHCP still answers
    assert "ProxyDHCP boot offer" not in out
    assert "diagnosis: no ProxyDHCP answer" in out


def test_non_pxe_ignored_malformed_dropped_then_pxe_still_answered(served: Served) -> None:
    lab = served.lab
    sock = lab.udp_socket(served.client_ns, 68)
    try:
        ignored0 = served.metric("dhcp_ignored_total", reason="not-pxe")
        malformed0 = served.metric("dhcp_malformed_total")

        sock.sendto(pxe_discover(vendor=None, xid=0x0A0A0001), ("255.255.255.255", 67))
        answers = collect(sock, 5.0, 0x0A0A0001)
        sources = {src[0] for _, src in answers}
        assert lab.router_addr in sources  # the packet did go out: the site DHCP answered
        assert lab.boot_addr not in sources
        assert served.metric("dhcp_ignored_total", reason="not-pxe") == ignored0 + 1

        good = pxe_discover(xid=0x0A0A0002)
        garbage = [
            b"\x01" * 20,  # short
            good[:236] + b"\0\0\0\0" + good[240:],  # no magic cookie
            good[:240] + b"\x35\x09\x01",  # option length past the end
            good[:2] + b"\x20" + good[3:],  # hlen 32
        ]
        for g in garbage:
            sock.sendto(g, (lab.boot_addr, 67))
        sock.sendto(good[:240] + b"\x3c\xff" + good[242:], (lab.boot_addr, 4011))
        deadline = time.monotonic() + 5
        while served.metric("dhcp_malformed_total") < malformed0 + 5 and \
                time.monotonic() < deadline:
            time.sleep(0.1)
        assert served.metric("dhcp_malformed_total") == malformed0 + 5
        log = lab.netboot_log()
        assert re.search(rf"DEBUG +netboot\.dhcp: malformed packet from {served.client_addr}:68:"
                         r" no DHCP magic cookie", log), log[-3000:]
        assert "runs past the packet" in log and "hlen 32 > 16" in log

        offers0 = served.metric("dhcp_offers_total", arch="bios", ipxe="no")
        sock.sendto(good, ("255.255.255.255", 67))
        answers = collect(sock, 2.0, 0x0A0A0002)
        from_netboot = [d for d, src in answers if src[0] == lab.boot_addr]
        assert len(from_netboot) == 1
        from scapy.layers.dhcp import BOOTP

        reply = BOOTP(from_netboot[0])
        assert reply.op == 2 and reply.file.rstrip(b"\0") == b"undionly.kpxe"
        assert served.metric("dhcp_offers_total", arch="bios", ipxe="no") == offers0 + 1
    finally:
        sock.close()

