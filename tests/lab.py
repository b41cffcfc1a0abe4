"""A network-boot lab in network namespaces, as a real site is wired.

    [guest taps]--br0 (ns LAB)--+-- veth -- ns ROUTER: the site's DHCP (dnsmasq, addresses only)
                                +-- veth -- ns BOOT:   netboot
    (and optionally a second subnet behind a relay)

Only the lab's own addresses (10.77.x.0/24 inside these namespaces) are used.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(os.environ.get("NETBOOT_VENV_BIN", REPO / ".venv" / "bin"))


def sh(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=check, capture_output=True, text=True, **kw)


def can_run_lab() -> str | None:
    """None if a lab can be built here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "dnsmasq", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (make deps installs it)"
    return None


@dataclass
class Guest:
    name: str
    mac: str
    uuid: str
    serial: str
    firmware: str  # "bios" or "uefi"
    log: Path
    proc: subprocess.Popen | None = None

    def console(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""


@dataclass
class Lab:
    workdir: Path
    subnet: int = 77  # 10.<subnet>.0.0/24
    tag: str = field(default_factory=lambda: uuidlib.uuid4().hex[:6])
    procs: list[subprocess.Popen] = field(default_factory=list)
    guests: list[Guest] = field(default_factory=list)
    taps: int = 0

    @property
    def ns_lab(self) -> str:
        return f"nb{self.tag}-lab"

    @property
    def ns_router(self) -> str:
        return f"nb{self.tag}-rtr"

    @property
    def ns_boot(self) -> str:
        return f"nb{self.tag}-boot"

    @property
    def net(self) -> str:
        return f"10.{self.subnet}.0"

    @property
    def boot_addr(self) -> str:
        return f"{self.net}.2"

    @property
    def router_addr(self) -> str:
        return f"{self.net}.1"

    def ns(self, ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", ns, *args, check=check)

    def up(self) -> None:
        for ns in (self.ns_lab, self.ns_router, self.ns_boot):
            sh("ip", "netns", "add", ns)
        self.ns(self.ns_lab, "ip", "link", "add", "br0", "type", "bridge")
        self.ns(self.ns_lab, "ip", "link", "set", "br0", "up")
        self.ns(self.ns_lab, "ip", "link", "set", "lo", "up")
        for ns, addr, short in ((self.ns_router, self.router_addr, "r"),
                                (self.ns_boot, self.boot_addr, "b")):
            outer, inner = f"v{short}{self.tag}", "eth0"
            sh("ip", "link", "add", outer, "netns", self.ns_lab, "type", "veth",
               "peer", "name", inner, "netns", ns)
            self.ns(self.ns_lab, "ip", "link", "set", outer, "master", "br0", "up")
            self.ns(ns, "ip", "addr", "add", f"{addr}/24", "dev", inner)
            self.ns(ns, "ip", "link", "set", inner, "up")
            self.ns(ns, "ip", "link", "set", "lo", "up")

    def start_site_dhcp(self) -> None:
        """The site's own DHCP server: addresses only, no boot information."""
        leases = self.workdir / "dnsmasq.leases"
        self.spawn(self.ns_router, "dnsmasq", "--no-daemon", "--conf-file=/dev/null",
                   "--port=0", "--interface=eth0", "--bind-interfaces",
                   f"--dhcp-range={self.net}.100,{self.net}.200,255.255.255.0,1h",
                   f"--dhcp-leasefile={leases}", "--log-dhcp",
                   log=self.workdir / "dnsmasq.log")

    def spawn(self, ns: str, *args: str, log: Path, env: dict | None = None) -> subprocess.Popen:
        out = open(log, "ab")
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *args], stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start_netboot(self, config: Path, *extra: str) -> subprocess.Popen:
        log = self.workdir / "netboot.log"
        proc = self.spawn(self.ns_boot, str(VENV_BIN / "netboot"), "serve", "--config",
                          str(config), "--interface", "eth0", *extra, log=log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace") if log.exists() else ""
            if "ProxyDHCP listening" in text:
                return proc
            if proc.poll() is not None:
                raise RuntimeError(f"netboot exited {proc.returncode}:\n{text}")
            time.sleep(0.2)
        raise RuntimeError(f"netboot did not start:\n{log.read_text(errors='replace')}")

    def netboot_log(self) -> str:
        p = self.workdir / "netboot.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def boot_guest(self, firmware: str = "bios", *, mac: str | None = None,
                   uuid: str | None = None, serial: str = "SN-TEST-1",
                   vendor: str = "NetbootLab", product: str = "QemuBlade",
                   nic: str = "e1000", nic_rom: bool = True) -> Guest:
        """Start a guest that PXE-boots from the lab bridge.

        ``nic_rom=False`` drops the NIC's iPXE option ROM, so OVMF boots with its
        own EDK2 PXE client (over its built-in virtio-net driver) instead of iPXE.
        """
        idx = self.taps
        self.taps += 1
        tap = f"tap{idx}"
        self.ns(self.ns_lab, "ip", "tuntap", "add", "dev", tap, "mode", "tap")
        self.ns(self.ns_lab, "ip", "link", "set", tap, "master", "br0", "up")
        mac = mac or f"52:54:00:{int(self.tag[:2], 16):02x}:{idx // 256:02x}:{idx % 256:02x}"
        uuid = uuid or str(uuidlib.uuid4())
        g = Guest(f"g{idx}", mac, uuid, serial, firmware, self.workdir / f"guest{idx}.log")
        cmd = ["qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-smp", "1",
               "-smbios", f"type=1,uuid={uuid},serial={serial},manufacturer={vendor},"
               f"product={product}",
               "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
               "-device", f"{nic},netdev=n0,mac={mac}" + ("" if nic_rom else ",romfile="),
               "-boot", "n", "-serial", f"file:{g.log}", "-display", "none",
               "-monitor", "none", "-no-reboot"]
        if firmware == "bios":  # SeaBIOS mirrors the BIOS console (and iPXE) to serial
            cmd += ["-fw_cfg", "name=etc/sercon-port,string=1016"]
        if firmware == "uefi":
            vars_copy = self.workdir / f"OVMF_VARS{idx}.fd"
            shutil.copy("/usr/share/OVMF/OVMF_VARS.fd", vars_copy)
            cmd += ["-drive", "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE.fd",
                    "-drive", f"if=pflash,format=raw,file={vars_copy}"]
        g.proc = self.spawn(self.ns_lab, *cmd, log=self.workdir / f"qemu{idx}.log")
        self.guests.append(g)
        return g

    def wait_guest(self, g: Guest, marker: str = "NETBOOT-TESTOS-DONE",
                   timeout: float = 240) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = g.console()
            if marker in text:
                return text
            if g.proc is not None and g.proc.poll() is not None:
                return g.console()
            time.sleep(1)
        return g.console()

    def down(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for ns in (self.ns_lab, self.ns_router, self.ns_boot):
            sh("ip", "netns", "del", ns, check=False)
