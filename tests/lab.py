"""A network-boot lab in network namespaces, as a real site is wired.

    [guest taps]--br0 (ns LAB)--+-- veth -- ns ROUTER: the site's DHCP (dnsmasq, addresses only)
                                +-- veth -- ns BOOT:   netboot
    (and optionally a second subnet behind a relay)

Only the lab's own addresses (10.77.x.0/24 inside these namespaces) are used.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(os.environ.get("NETBOOT_VENV_BIN", REPO / ".venv" / "bin"))


def sh(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=check, capture_output=True, text=True, **kw)


LEASE_LO, LEASE_HI = 100, 200
"""Host parts of the lab site DHCP's (dnsmasq's) range: it leases .100 to .200."""

RESERVED_LO, RESERVED_N = 10, 40
"""Guests get fixed addresses .10 to .49 from the site DHCP (dnsmasq --dhcp-hostsdir), as
racks usually do. Without them dnsmasq, which does not hold an address it offered, can
offer one address to several guests powered on together (its start address is a hash of
the MAC, and lab MACs differ in the last byte only); the losers get DHCPNAK, and iPXE
ignores NAKs and retries its REQUEST until it gives up."""


def site_lease_in(out: str, subnet: int) -> bool:
    """True if probe output shows an offer of a site lease on 10.<subnet>.0.0/24."""
    return any(LEASE_LO <= int(host) <= LEASE_HI
               for host in re.findall(rf"yiaddr 10\.{subnet}\.0\.(\d+)\b", out))


def can_run_lab() -> str | None:
    """None if a lab can be built here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "dnsmasq", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (make deps installs it)"
    return None


ARM64_FIRMWARE = ("uboot-arm64", "aavmf", "aavmf-sb")


def smbios_args(uuid: str, serial: str, vendor: str, product: str) -> list[str]:
    """The SMBIOS system identity QEMU gives a guest (dmidecode, iPXE's ${uuid})."""
    return ["-smbios", f"type=1,uuid={uuid},serial={serial},manufacturer={vendor},"
            f"product={product}"]


@dataclass
class Guest:
    name: str
    mac: str
    uuid: str
    serial: str
    firmware: str  # "bios" or "uefi"
    log: Path
    proc: subprocess.Popen | None = None
    monitor: Path | None = None  # the QEMU monitor's UNIX socket, if it has one

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

    def start_site_dhcp(self, next_server: str | None = None) -> None:
        """The site's own DHCP server: addresses only, no boot information.

        dnsmasq puts its own address in siaddr (next-server). ``next_server`` puts that
        one there instead (no boot file), as sites do for a PXE server: Debian 12's GRUB
        takes its TFTP server from the DHCP ACK's siaddr, never from the ProxyDHCP offer.
        """
        leases = self.workdir / "dnsmasq.leases"
        self.spawn(self.ns_router, "dnsmasq", "--no-daemon", "--conf-file=/dev/null",
                   "--port=0", "--interface=eth0", "--bind-interfaces",
                   f"--dhcp-range={self.net}.{LEASE_LO},{self.net}.{LEASE_HI},255.255.255.0,1h",
                   f"--dhcp-hostsdir={self.hosts_dir()}",
                   f"--dhcp-leasefile={leases}", "--log-dhcp",
                   *([f"--dhcp-boot=,,{next_server}"] if next_server else []),
                   log=self.workdir / "dnsmasq.log")

    @property
    def hosts_path(self) -> Path:
        """dnsmasq's --dhcp-hostsdir (one file per guest reserving its address); it
        exists once this lab has started the site DHCP."""
        return self.workdir / "dhcp-hosts"

    def hosts_dir(self) -> Path:
        self.hosts_path.mkdir(exist_ok=True)
        return self.hosts_path

    def reserve(self, mac: str, idx: int) -> None:
        """A fixed address for a guest on this lab's subnet (see RESERVED_LO), if this
        lab runs the site DHCP (a relayed far lab does not)."""
        if self.hosts_path.is_dir() and idx < RESERVED_N:
            f = self.hosts_path / mac.replace(":", "-")
            if not f.exists():  # the same MAC booted again keeps its address
                f.write_text(f"{mac},{self.net}.{RESERVED_LO + idx}\n")

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
                   nic: str = "e1000", nic_rom: bool = True, memory_mb: int = 512,
                   monitor: bool = False, reboot: bool = False) -> Guest:
        """Start a guest that PXE-boots from the lab bridge.

        ``nic_rom=False`` drops the NIC's iPXE option ROM, so OVMF boots with its
        own EDK2 PXE client (over its built-in virtio-net driver) instead of iPXE.
        ``monitor=True`` gives it a QEMU monitor socket (see :meth:`monitor`).
        ``reboot=True``: a reboot restarts the firmware (default: QEMU exits, so a test
        sees a failed boot at once), for a guest that must retry its boot.
        """
        idx, tap, mac = self.new_tap(mac)
        uuid = uuid or str(uuidlib.uuid4())
        g = Guest(f"g{idx}", mac, uuid, serial, firmware, self.workdir / f"guest{idx}.log",
                  monitor=self.workdir / f"monitor{idx}.sock" if monitor else None)
        mon = f"unix:{g.monitor},server=on,wait=off" if g.monitor else "none"
        if firmware in ARM64_FIRMWARE:  # QEMU's virt board; virtio-net is what it has
            machine = ["qemu-system-aarch64", "-accel", "tcg", "-machine", "virt",
                       "-cpu", "cortex-a57", "-uuid", uuid]
            # without disable-legacy U-Boot gives every guest MAC 52:52:52:52:52:52
            device = f"virtio-net-pci,netdev=n0,mac={mac},disable-legacy=on,romfile="
        else:
            machine = ["qemu-system-x86_64", "-accel", "tcg", "-boot", "n"]
            device = f"{nic},netdev=n0,mac={mac}" + ("" if nic_rom else ",romfile=")
        cmd = [*machine, "-m", str(memory_mb), "-smp", "1",
               *smbios_args(uuid, serial, vendor, product),
               "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
               "-device", device, "-serial", f"file:{g.log}", "-display", "none",
               "-monitor", mon, *([] if reboot else ["-no-reboot"]),
               *self.firmware_args(firmware, idx)]
        g.proc = self.spawn(self.ns_lab, *cmd, log=self.workdir / f"qemu{idx}.log")
        self.guests.append(g)
        return g

    def new_tap(self, mac: str | None = None) -> tuple[int, str, str]:
        """A new tap device on br0 for a guest: (index, tap name, MAC: ``mac`` or one
        made from this lab's tag and the index), its address reserved (reserve())."""
        idx = self.taps
        self.taps += 1
        tap = f"tap{idx}"
        self.ns(self.ns_lab, "ip", "tuntap", "add", "dev", tap, "mode", "tap")
        self.ns(self.ns_lab, "ip", "link", "set", tap, "master", "br0", "up")
        mac = mac or f"52:54:00:{int(self.tag[:2], 16):02x}:{idx // 256:02x}:{idx % 256:02x}"
        self.reserve(mac, idx)
        return idx, tap, mac

    def firmware_args(self, firmware: str, idx: int) -> list[str]:
        """QEMU arguments for a firmware:

        - ``bios``: SeaBIOS, its console mirrored to serial;
        - ``uboot``: U-Boot (u-boot-qemu's qemu-x86 build, which boots an amd64
          kernel; its qemu-x86_64 build resets in ``zboot``) as the firmware;
        - ``uboot-arm64``, ``aavmf``, ``aavmf-sb``: an arm64 guest (QEMU's virt board,
          virtio-net) with U-Boot's qemu_arm64 build or AAVMF (UEFI, its own variable
          store; ``-sb``: the store with Microsoft's keys, Secure Boot on);
        - ``uefi``: OVMF (2 MB build) with its own copy of the variable store;
        - ``uefi-sb``: OVMF's Secure Boot build (4 MB) on q35 with SMM, its variable
          store a copy of the one with Microsoft's keys enrolled: Secure Boot on;
        - ``uefi-http``: OVMF (4 MB) with PXE off over IPv4 and IPv6, so it goes
          straight to UEFI HTTP Boot; ``uefi-sb-http``: the same under Secure Boot;
        - ``uefi-pxe6``: OVMF (4 MB) with PXE off over IPv4 only: it boots by PXE over
          IPv6 (DHCPv6, then TFTP over IPv6).

        All UEFI variants want ``nic="virtio-net-pci", nic_rom=False`` (LAB-NOTES:
        with QEMU's old iPXE option ROM, shim is handed a padded GRUB and hangs).
        """
        if firmware == "bios":  # SeaBIOS mirrors the BIOS console (and iPXE) to serial
            return ["-fw_cfg", "name=etc/sercon-port,string=1016"]
        if firmware == "uboot":  # console on serial; the x86_64 build resets in zboot
            return ["-bios", "/usr/lib/u-boot/qemu-x86/u-boot.rom"]
        if firmware == "uboot-arm64":
            return ["-bios", "/usr/lib/u-boot/qemu_arm64/u-boot.bin"]
        if firmware in ("aavmf", "aavmf-sb"):  # -sb: Microsoft's keys, Secure Boot on
            kind = ".ms" if firmware == "aavmf-sb" else ""
            vars_copy = self.workdir / f"AAVMF_VARS{idx}.fd"
            shutil.copy(f"/usr/share/AAVMF/AAVMF_VARS{kind}.fd", vars_copy)
            return ["-drive", "if=pflash,format=raw,unit=0,readonly=on,"
                    f"file=/usr/share/AAVMF/AAVMF_CODE{kind}.fd",
                    "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}"]
        ovmf = "/usr/share/OVMF"
        if firmware == "uefi":
            code, store, extra = f"{ovmf}/OVMF_CODE.fd", f"{ovmf}/OVMF_VARS.fd", []
        elif firmware in ("uefi-sb", "uefi-sb-http"):
            code, store = f"{ovmf}/OVMF_CODE_4M.secboot.fd", f"{ovmf}/OVMF_VARS_4M.ms.fd"
            extra = ["-machine", "q35,smm=on",
                     "-global", "driver=cfi.pflash01,property=secure,value=on"]
        elif firmware in ("uefi-http", "uefi-pxe6"):
            code, store, extra = f"{ovmf}/OVMF_CODE_4M.fd", f"{ovmf}/OVMF_VARS_4M.fd", []
        else:
            return []
        if firmware == "uefi-pxe6":
            extra += ["-fw_cfg", "name=opt/org.tianocore/IPv4PXESupport,string=no"]
        if firmware.endswith("-http"):
            extra += ["-fw_cfg", "name=opt/org.tianocore/IPv4PXESupport,string=no",
                      "-fw_cfg", "name=opt/org.tianocore/IPv6PXESupport,string=no"]
        vars_copy = self.workdir / f"OVMF_VARS{idx}.fd"
        shutil.copy(store, vars_copy)
        return [*extra, "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
                "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}"]

    def monitor(self, g: Guest, command: str) -> str:
        """Send one command to a guest's QEMU monitor (e.g. ``system_powerdown``, ACPI's
        power button); what the monitor printed back."""
        if g.monitor is None:
            raise ValueError(f"guest {g.name} was started without monitor=True")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(g.monitor))
            out = b""
            while b"(qemu)" not in out:  # the banner and first prompt
                out += sock.recv(4096) or b"(qemu)"
            sock.sendall(command.encode() + b"\n")
            reply = b""
            while b"(qemu)" not in reply:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
        return reply.decode(errors="replace")

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

    # -- appended for the ProxyDHCP tests: clients, a far subnet behind a relay --------
    def add_client(self, name: str, *, lab_ns: str | None = None, addr: str | None = None,
                   gateway: str | None = None) -> str:
        """A namespace ``nb<tag>-<name>`` with eth0 on ``lab_ns``'s br0 (default: ours)."""
        ns = f"nb{self.tag}-{name}"
        sh("ip", "netns", "add", ns)
        outer = f"c{name[:4]}{self.tag}"
        sh("ip", "link", "add", outer, "netns", lab_ns or self.ns_lab, "type", "veth",
           "peer", "name", "eth0", "netns", ns)
        self.ns(lab_ns or self.ns_lab, "ip", "link", "set", outer, "master", "br0", "up")
        self.ns(ns, "ip", "link", "set", "eth0", "up")
        self.ns(ns, "ip", "link", "set", "lo", "up")
        if addr:
            self.ns(ns, "ip", "addr", "add", f"{addr}/24", "dev", "eth0")
        if gateway:
            self.ns(ns, "ip", "route", "add", "default", "via", gateway)
        return ns

    @property
    def ns_relay(self) -> str:
        return f"nb{self.tag}-rly"

    @property
    def relay_near_addr(self) -> str:
        return f"{self.net}.3"

    def add_far_subnet(self, subnet: int = 78) -> Lab:
        """A second subnet 10.<subnet>.0.0/24 on its own bridge, joined to ours by a
        router namespace (ns_relay: .3 here, .1 there) that will run the relay agent.

        Returns a Lab whose only namespace is the far bridge's, so its boot_guest()
        starts guests on the far subnet; the site DHCP and netboot get routes back.
        """
        far = Lab(self.workdir / f"far{subnet}", subnet=subnet, tag=f"{self.tag}f")
        far.workdir.mkdir(parents=True, exist_ok=True)
        sh("ip", "netns", "add", far.ns_lab)
        far.ns(far.ns_lab, "ip", "link", "add", "br0", "type", "bridge")
        far.ns(far.ns_lab, "ip", "link", "set", "br0", "up")
        far.ns(far.ns_lab, "ip", "link", "set", "lo", "up")
        sh("ip", "netns", "add", self.ns_relay)
        # No IPv6 here: a link-local address finishing DAD makes dnsmasq re-read its
        # interfaces, and a reply arriving meanwhile was dropped by its relay.
        for key in ("all", "default"):
            self.ns(self.ns_relay, "sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1")
        for lab_ns, outer, inner, addr in (
                (self.ns_lab, f"vn{self.tag}", "eth0", self.relay_near_addr),
                (far.ns_lab, f"vf{self.tag}", "eth1", far.router_addr)):
            sh("ip", "link", "add", outer, "netns", lab_ns, "type", "veth",
               "peer", "name", inner, "netns", self.ns_relay)
            self.ns(lab_ns, "ip", "link", "set", outer, "master", "br0", "up")
            self.ns(self.ns_relay, "ip", "addr", "add", f"{addr}/24", "dev", inner)
            self.ns(self.ns_relay, "ip", "link", "set", inner, "up")
        self.ns(self.ns_relay, "ip", "link", "set", "lo", "up")
        self.ns(self.ns_relay, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for ns in (self.ns_router, self.ns_boot):
            self.ns(ns, "ip", "route", "add", f"{far.net}.0/24", "via", self.relay_near_addr)
        return far

    def start_site_dhcp_for(self, *subnets: int) -> None:
        """The site's DHCP (addresses only) for our subnet and relayed ones; use
        instead of start_site_dhcp()."""
        ranges = [f"--dhcp-range=10.{n}.0.{LEASE_LO},10.{n}.0.{LEASE_HI},255.255.255.0,1h"
                  for n in (self.subnet, *subnets)]
        self.spawn(self.ns_router, "dnsmasq", "--no-daemon", "--conf-file=/dev/null",
                   "--port=0", "--interface=eth0", "--bind-interfaces", *ranges,
                   f"--dhcp-hostsdir={self.hosts_dir()}",
                   f"--dhcp-leasefile={self.workdir / 'dnsmasq.leases'}", "--log-dhcp",
                   log=self.workdir / "dnsmasq.log")

    def start_relay(self, far: Lab, kind: str = "dnsmasq") -> subprocess.Popen:
        """A DHCP relay agent in ns_relay forwarding the far subnet to netboot and the
        site DHCP. ``kind="dhcrelay"`` (isc-dhcp-relay) adds option 82 (-a), and
        drops replies whose option 82 does not come back."""
        servers = (self.boot_addr, self.router_addr)
        if kind == "dnsmasq":
            args = ["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0",
                    "--log-dhcp", *(f"--dhcp-relay={far.router_addr},{s}" for s in servers)]
        else:
            args = ["dhcrelay", "-d", "-4", "-a", "-pf", str(self.workdir / "dhcrelay.pid"),
                    "-iu", "eth0", "-id", "eth1", *servers]
        proc = self.spawn(self.ns_relay, *args, log=self.workdir / f"relay-{kind}.log")
        time.sleep(0.5)
        if proc.poll() is not None:
            raise RuntimeError(f"relay {kind} exited: "
                               f"{(self.workdir / f'relay-{kind}.log').read_text()}")
        return proc

    def down_all(self) -> None:
        """down(), then every other namespace carrying this lab's tag (clients, relay,
        far subnet)."""
        self.down()
        listed = sh("ip", "netns", "list", check=False).stdout.split("\n")
        for line in listed:
            name = line.split(" ", 1)[0]
            if name.startswith(f"nb{self.tag}"):
                sh("ip", "netns", "del", name, check=False)

    def udp_socket(self, ns: str, port: int = 68, interface: str = "eth0"):  # -> socket.socket
        """A broadcast UDP socket created inside namespace ``ns`` (bound to ``interface``
        and ``port``) for use from this process: sockets keep the namespace they were
        made in, so the test talks through the lab without a helper process."""
        import ctypes
        import socket

        libc = ctypes.CDLL(None, use_errno=True)
        clone_newnet = 0x40000000
        with open("/proc/thread-self/ns/net") as home, open(f"/var/run/netns/{ns}") as there:
            if libc.setns(there.fileno(), clone_newnet) != 0:
                raise OSError(ctypes.get_errno(), f"setns {ns}")
            try:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
                sock.setsockopt(socket.SOL_SOCKET, 25, interface.encode() + b"\0")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                sock.bind(("0.0.0.0", port))
            finally:
                if libc.setns(home.fileno(), clone_newnet) != 0:
                    raise OSError(ctypes.get_errno(), "setns back")
        return sock
