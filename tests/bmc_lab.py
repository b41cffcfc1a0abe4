"""A QEMU guest behind a real IPMI BMC (OpenIPMI's ipmi_sim) on the lab bridge.

    ns BOOT: netboot 10.77.0.2 --veth--+
                                        br0 (ns LAB) --tapN-- QEMU guest (KCS at 0xca2:
                                        |                      ipmi-bmc-extern)
                                        +- 10.77.0.4 (on br0): ipmi_sim, UDP 623 (lanplus)
                                           serial 127.0.0.1:900N (VM codec) <- QEMU's chardev

ipmi_sim runs in the lab namespace, where QEMU runs; its ``chassis_control`` and
``lan_config_program`` are tests/bmc_control.py (power on starts QEMU, with ``-boot
order=n`` after ``chassis bootdev pxe``; an address set over IPMI, in band or out of
band, moves the BMC's address on br0). By default ipmi_sim listens on 0.0.0.0 so the
BMC answers at whatever address it was given (docs/bmc.md: why that needs the old
address off br0).

    with bmc_lab_up(tmp_path) as bl:          # or the ``bmc_lab`` fixture
        bl.lab.start_netboot(config)          # the server's ProxyDHCP, for PXE
        g = bl.guest                          # powered off; g.bmc_addr, g.bmc_port,
        g.ipmitool("chassis", "bootdev", "pxe")   # g.username, g.password
        g.ipmitool("power", "on")
        g.wait_console("NETBOOT-TESTOS-DONE"); g.wait_off()

Only the lab's own addresses: BMCs take 10.<subnet>.0.4 to .9 (tests/lab.py uses .1
router, .2 netboot, .3 relay, .10-.49 guests, .50 clients, .100-.200 leases).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid as uuidlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import bmc_control
from tests.lab import Lab, can_run_lab, smbios_args

BMC_HOSTS = range(4, 10)
USERNAME, PASSWORD = "admin", "password"
SERIAL_PORT_BASE = 9002

CONTROL = Path(__file__).with_name("bmc_control.py")

EMU = """mc_setbmc 0x20
mc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr
sel_enable 0x20 1000 0x0a
mc_enable 0x20
"""


def can_run_bmc_lab() -> str | None:
    """None if a BMC lab can be built here, else the reason it cannot."""
    reason = can_run_lab()
    if reason:
        return reason
    for tool in ("ipmi_sim", "ipmitool"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install openipmi ipmitool)"
    return None


@dataclass
class BmcGuest:
    """A guest and its BMC: ``bmc_addr`` (where the BMC answers now: its first
    address, or the one set over IPMI since), ``bmc_port``, ``username``, ``password``."""

    lab: Lab
    name: str
    state: Path
    mac: str
    uuid: str
    serial: str
    memory_mb: int
    tap: str
    first_addr: str
    bmc_port: int = 623
    username: str = USERNAME
    password: str = PASSWORD
    sim: subprocess.Popen | None = None
    stopped: bool = field(default=False)

    @property
    def bmc_addr(self) -> str:
        return json.loads((self.state / "lan.json").read_text())["ip_addr"]

    @property
    def log(self) -> Path:
        """The guest's serial console, across power cycles."""
        return self.state / "console.log"

    def console(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def ipmitool(self, *args: str, host: str | None = None, check: bool = True,
                 timeout: float = 60) -> subprocess.CompletedProcess:
        """Real ``ipmitool -I lanplus ... -C 3`` from the boot namespace (where netboot
        runs), against ``host`` (default: bmc_addr)."""
        return self.lab.ns(self.lab.ns_boot, "timeout", str(timeout), "ipmitool",
                           "-I", "lanplus", "-H", host or self.bmc_addr,
                           "-p", str(self.bmc_port), "-U", self.username, "-P", self.password,
                           "-C", "3", *args, check=check)

    def power_status(self, host: str | None = None) -> str:
        """"on" or "off", as the BMC answers out of band."""
        out = self.ipmitool("power", "status", host=host).stdout
        return out.strip().rsplit(" ", 1)[-1]

    def lan_print(self, host: str | None = None) -> dict[str, str]:
        """``lan print 1`` out of band, as {"IP Address": ..., "Subnet Mask": ...}."""
        out = self.ipmitool("lan", "print", "1", host=host).stdout
        fields = {}
        for line in out.splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip():
                fields[key.strip()] = value.strip()
        return fields

    def boots(self) -> list[dict]:
        """One record per power-on: {"time", "boot": "pxe"|"default"|..., "argv"}."""
        try:
            lines = (self.state / "boots.jsonl").read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines]

    def lan_sets(self) -> list[dict]:
        """Each LAN parameter set ipmi_sim handed to lan_config_program."""
        try:
            lines = (self.state / "lan.log").read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line)["set"] for line in lines]

    def qemu_running(self) -> bool:
        return bmc_control.qemu_pid(self.state) is not None

    def wait_console(self, marker: str, timeout: float = 240) -> str:
        """The console once it shows ``marker``, or when QEMU has stopped, or at timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.console()
            if marker in text:
                return text
            if self.boots() and not self.qemu_running():
                return self.console()
            time.sleep(0.5)
        return self.console()

    def wait_off(self, timeout: float = 60) -> bool:
        """True once QEMU has exited (the guest powered off or was powered off)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.qemu_running():
                return True
            time.sleep(0.2)
        return False

    def stop(self) -> None:
        """QEMU and ipmi_sim stopped, the BMC's addresses off br0, the tap and the disk
        removed (logs stay in ``state``)."""
        if self.stopped:
            return
        self.stopped = True
        bmc_control.power_off(self.state)
        if self.sim is not None and self.sim.poll() is None:
            os.killpg(self.sim.pid, signal.SIGTERM)  # its own session (Lab.spawn)
            try:
                self.sim.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.sim.pid, signal.SIGKILL)
                self.sim.wait()
        lan = json.loads((self.state / "lan.json").read_text())
        if lan.get("applied"):
            self.lab.ns(self.lab.ns_lab, "ip", "addr", "del", lan["applied"], "dev", "br0",
                        check=False)
        self.lab.ns(self.lab.ns_lab, "ip", "link", "del", self.tap, check=False)
        (self.state / "disk.img").unlink(missing_ok=True)


def _free_bmc_host(lab: Lab) -> int:
    out = lab.ns(lab.ns_lab, "ip", "-4", "-o", "addr", "show", "dev", "br0").stdout
    for host in BMC_HOSTS:
        if f" {lab.net}.{host}/" not in out:
            return host
    raise RuntimeError(f"no free BMC address in {lab.net}.{BMC_HOSTS[0]}-{BMC_HOSTS[-1]}")


def start_bmc_guest(lab: Lab, *, mac: str | None = None, uuid: str | None = None,
                    serial: str = "SN-BMC-1", vendor: str = "NetbootLab",
                    product: str = "BmcBlade", memory_mb: int = 512, firmware: str = "bios",
                    direct: tuple[Path, Path, str] | None = None, disk_mb: int = 64,
                    listen: str = "any", bmc_port: int = 623,
                    password: str = PASSWORD) -> BmcGuest:
    """A guest on ``lab``'s bridge, powered off, behind its own ipmi_sim.

    Powered on (over IPMI) it PXE-boots from the bridge when the boot device was set
    to pxe (``chassis bootdev pxe``), else it tries its blank disk first, then the
    network (``-boot order=cn``, as a blank machine does). ``direct=(kernel, initrd,
    cmdline)`` makes every power-on boot that kernel instead (QEMU ``-kernel``), for
    tests without a boot server. ``listen="any"``: ipmi_sim on 0.0.0.0, so an address
    set over IPMI becomes the BMC's address (one such BMC per lab: a second would
    answer from the first one's address); ``"own"``: only on its first address (any
    number of BMCs, but a new address set over IPMI does not answer).
    """
    host = _free_bmc_host(lab)
    bmc_addr = f"{lab.net}.{host}"
    idx, tap, mac = lab.new_tap(mac)
    uuid = uuid or str(uuidlib.uuid4())
    name = f"bmc{idx}"
    state = lab.workdir / name
    state.mkdir(parents=True)
    (state / "disk.img").write_bytes(b"")
    subprocess.run(["truncate", "-s", f"{disk_mb}M", str(state / "disk.img")], check=True)
    serial_port = SERIAL_PORT_BASE + idx
    qemu = ["qemu-system-x86_64", "-accel", "tcg", "-m", str(memory_mb), "-smp", "1",
            "-name", name, *smbios_args(uuid, serial, vendor, product),
            "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
            "-device", f"e1000,netdev=n0,mac={mac}",
            "-drive", f"file={state / 'disk.img'},if=virtio,format=raw",
            "-chardev", f"socket,id=ipmi0,host=127.0.0.1,port={serial_port},reconnect=10",
            "-device", "ipmi-bmc-extern,chardev=ipmi0,id=bmc0",
            "-device", "isa-ipmi-kcs,bmc=bmc0",
            "-chardev", f"file,id=con0,path={state / 'console.log'},append=on",
            "-serial", "chardev:con0", "-display", "none", "-monitor", "none",
            *lab.firmware_args(firmware, idx)]
    if direct:
        kernel, initrd, cmdline = direct
        kernel_args = ["-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline]
        boot_args = {"default": kernel_args, "pxe": kernel_args}
    else:
        boot_args = {"default": ["-boot", "order=cn"], "pxe": ["-boot", "order=n"]}
    (state / "config.json").write_text(json.dumps(
        {"qemu": qemu, "boot_args": boot_args, "bridge": "br0"}))
    br0_mac = lab.ns(lab.ns_lab, "cat", "/sys/class/net/br0/address").stdout.strip()
    (state / "lan.json").write_text(json.dumps({
        "ip_addr": bmc_addr, "ip_addr_src": "static", "subnet_mask": "255.255.255.0",
        "mac_addr": br0_mac, "default_gw_ip_addr": "0.0.0.0",
        "default_gw_mac_addr": "00:00:00:00:00:00", "backup_gw_ip_addr": "0.0.0.0",
        "backup_gw_mac_addr": "00:00:00:00:00:00", "applied": f"{bmc_addr}/24"}))
    # deleting a primary address takes its secondaries with it unless they are promoted
    lab.ns(lab.ns_lab, "sysctl", "-qw", "net.ipv4.conf.br0.promote_secondaries=1")
    lab.ns(lab.ns_lab, "ip", "addr", "add", f"{bmc_addr}/24", "dev", "br0")
    control = f"{sys.executable} {CONTROL}"
    listen_addr = "0.0.0.0" if listen == "any" else bmc_addr
    auths = "none md2 md5 straight"
    (state / "lan.conf").write_text(f"""name "{name}"
set_working_mc 0x20
  startlan 1
    addr {listen_addr} {bmc_port}
    priv_limit admin
    allowed_auths_callback {auths}
    allowed_auths_user {auths}
    allowed_auths_operator {auths}
    allowed_auths_admin {auths}
    guid {uuidlib.UUID(uuid).hex}
    lan_config_program "{control} lan {state}"
  endlan
  serial 15 127.0.0.1 {serial_port} codec VM
  chassis_control "{control} chassis {state}"
  user 2 true "{USERNAME}" "{password}" admin 10 {auths}
""")
    (state / "bmc.emu").write_text(EMU)
    (state / "sim").mkdir()
    g = BmcGuest(lab, name, state, mac, uuid, serial, memory_mb, tap, bmc_addr, bmc_port,
                 password=password)
    g.sim = lab.spawn(lab.ns_lab, "ipmi_sim", "-c", str(state / "lan.conf"),
                      "-f", str(state / "bmc.emu"), "-s", str(state / "sim"), "-n",
                      log=state / "ipmi_sim.log")
    deadline = time.monotonic() + 15
    while True:
        if g.sim.poll() is not None:
            raise RuntimeError(f"ipmi_sim exited {g.sim.returncode}: "
                               f"{(state / 'ipmi_sim.log').read_text(errors='replace')}")
        if g.ipmitool("power", "status", check=False, timeout=5).returncode == 0:
            return g
        if time.monotonic() > deadline:
            g.stop()
            raise RuntimeError("ipmi_sim did not answer on the lab bridge")
        time.sleep(0.2)


@dataclass
class BmcLab:
    lab: Lab
    guest: BmcGuest


@contextmanager
def bmc_lab_up(workdir: Path, **guest: object) -> Iterator[BmcLab]:
    """A lab (namespaces, the site's DHCP) with one BMC-backed guest, powered off
    (start_bmc_guest(**guest)); everything it made is gone afterwards. Skips the test
    if the machine cannot run it."""
    reason = can_run_bmc_lab()
    if reason:
        pytest.skip(reason)
    lab = Lab(workdir)  # a random tag: namespaces nb<tag>-*, apart from other labs
    g = None
    try:
        lab.up()
        lab.start_site_dhcp()
        g = start_bmc_guest(lab, **guest)  # type: ignore[arg-type]
        yield BmcLab(lab, g)
    finally:
        if g is not None:
            g.stop()
        lab.down()


@pytest.fixture
def bmc_lab(tmp_path: Path) -> Iterator[BmcLab]:
    """A lab with one BMC-backed guest that PXE-boots from the bridge when powered on
    with bootdev pxe; start netboot in ``bmc_lab.lab`` (start_netboot) to serve it."""
    with bmc_lab_up(tmp_path) as bl:
        yield bl


__all__ = ["BmcGuest", "BmcLab", "bmc_lab", "bmc_lab_up", "can_run_bmc_lab",
           "start_bmc_guest"]
