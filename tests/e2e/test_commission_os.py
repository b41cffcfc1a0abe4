"""The commissioning OS on a QEMU guest behind a real IPMI BMC (OpenIPMI's ipmi_sim).

No netboot here: the guest boots the commissioning kernel directly (QEMU -kernel,
started by the BMC on ``power on``), and a stub in the boot namespace plays netboot's
inventory endpoint (tests/e2e/inventory_stub.py: set-bmc, then wait, then poweroff).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import uuid as uuidlib
from pathlib import Path

import pytest

from tests.bmc_lab import BmcLab, bmc_lab_up
from tests.e2e.conftest import build_demo_os, write_lab_config
from tests.lab import REPO, Lab

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

STUB = Path(__file__).with_name("inventory_stub.py")


def build_commission_os(out: Path | None = None) -> Path:
    """images/commission/initrd.cpio.gz (built if missing), or a fresh build in ``out``."""
    target = out or REPO / "images" / "commission"
    if out is not None or not (target / "initrd.cpio.gz").exists():
        subprocess.run([sys.executable, str(REPO / "scripts/commission_os.py"), str(target)],
                       check=True, capture_output=True)
    return target / "initrd.cpio.gz"


def test_initramfs_carries_a_working_ipmitool(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (chroot)")
    initrd = build_commission_os(tmp_path / "out")
    root = tmp_path / "root"
    root.mkdir()
    data = subprocess.run(["gzip", "-dc", str(initrd)], check=True, capture_output=True).stdout
    subprocess.run(["cpio", "-id", "--quiet"], cwd=root, input=data, check=True)
    # runs with only what the initramfs holds: its loader, its libraries
    out = subprocess.run(["chroot", str(root), "/usr/bin/ipmitool", "-V"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("ipmitool version"), out
    order = (root / "lib/modules.order").read_text().split()
    for mod in ("e1000.ko", "virtio_net.ko", "ipmi_msghandler.ko", "ipmi_devintf.ko",
                "ipmi_si.ko"):
        assert mod in order and (root / "lib" / mod).is_file(), mod
    # dependencies before their users (modinfo -F depends)
    assert order.index("ipmi_msghandler.ko") < order.index("ipmi_si.ko")
    assert order.index("virtio_ring.ko") < order.index("virtio_net.ko")
    assert os.access(root / "init", os.X_OK)
    assert "NETBOOT-COMMISSION" in (root / "init").read_text()


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_commissioning_sets_the_bmc_in_band_and_powers_off(tmp_path: Path) -> None:
    if shutil.which("ipmi_sim") is None:
        pytest.skip("ipmi_sim is not installed (apt-get install openipmi)")
    images = build_demo_os()
    initrd = build_commission_os()
    uuid, serial, token = str(uuidlib.uuid4()), "SN-COMMISSION-1", secrets.token_hex(12)
    boot_addr = Lab(tmp_path).boot_addr  # the lab's netboot address (10.77.0.2)
    url = f"http://{boot_addr}:8080/api/v1/nodes/{uuid}/inventory?token={token}"
    cmdline = f"console=ttyS0 panic=-1 netboot.inventory={url}"
    memory_mb = 384
    with bmc_lab_up(tmp_path, uuid=uuid, serial=serial, memory_mb=memory_mb,
                    direct=(images / "demo/vmlinuz", initrd, cmdline)) as bl:
        lab, g = bl.lab, bl.guest
        new_bmc, gateway = f"{lab.net}.60", lab.router_addr
        out = tmp_path / "inventory.jsonl"
        stub_log = tmp_path / "stub.log"
        stub = lab.spawn(lab.ns_boot, sys.executable, str(STUB), "--host", boot_addr,
                         "--port", "8080", "--uuid", uuid, "--token", token, "--out", str(out),
                         "--bmc-address", new_bmc, "--bmc-netmask", "255.255.255.0",
                         "--bmc-gateway", gateway, log=stub_log)
        deadline = time.monotonic() + 20
        while "listening" not in stub_log.read_text():
            assert stub.poll() is None and time.monotonic() < deadline, stub_log.read_text()
            time.sleep(0.2)

        before = g.lan_print()
        assert before["IP Address"] == g.first_addr
        assert g.power_status() == "off"
        g.ipmitool("chassis", "bootdev", "pxe")
        t0 = time.monotonic()
        g.ipmitool("power", "on")
        assert g.power_status() == "on"
        console = g.wait_console("NETBOOT-COMMISSION-DONE", timeout=300)
        assert g.wait_off(30), console[-3000:]
        took = time.monotonic() - t0
        print(f"commissioning: power on to power off {took:.1f} s")
        (tmp_path / "timing.txt").write_text(f"{took:.1f}\n")
        records = _records(out)
        assert "NETBOOT-COMMISSION-DONE" in console, (console[-4000:], records)

        assert [r["status"] for r in records] == [200, 200, 200], records
        assert [r["answer"].split("\n")[0] for r in records] == [
            "NETBOOT_ACTION=set-bmc", "NETBOOT_ACTION=wait", "NETBOOT_ACTION=poweroff"]
        assert all(r["query"]["token"] == token and r["query"]["format"] == "sh"
                   for r in records)
        first, second = records[0]["inventory"], records[1]["inventory"]
        assert first["smbios"]["uuid"].lower() == uuid
        assert first["smbios"]["serial"] == serial
        assert first["smbios"]["vendor"] == "NetbootLab"
        assert first["cpu"]["count"] == 1 and first["cpu"]["model"]
        assert 0.8 * memory_mb * 2**20 < first["memory_bytes"] <= memory_mb * 2**20
        [nic] = [n for n in first["nics"] if n["mac"] == g.mac]
        assert nic["driver"] == "e1000" and nic["link"] is True and nic["speed_mbps"] == 1000
        assert {"name": "vda", "size_bytes": 64 << 20, "model": None} in first["disks"]
        assert first["lldp"] is None
        # in band, as out of band: the same BMC
        assert first["bmc"]["address"] == before["IP Address"] == g.first_addr
        assert first["bmc"]["netmask"] == before["Subnet Mask"]
        assert first["bmc"]["mac"] == before["MAC Address"]
        assert first["bmc"]["source"] == before["IP Address Source"] == "Static Address"
        # set-bmc, in band: the next inventory shows it, and the BMC answers there
        assert second["bmc"]["address"] == new_bmc
        assert second["bmc"]["gateway"] == gateway
        assert {"ip_addr": new_bmc} in g.lan_sets()
        assert g.bmc_addr == new_bmc
        after = g.lan_print(host=new_bmc)
        assert after["IP Address"] == new_bmc and after["Default Gateway IP"] == gateway
        assert g.power_status(host=new_bmc) == "off"
        # the old address is gone, as on a real BMC
        assert g.ipmitool("power", "status", host=g.first_addr, check=False,
                          timeout=5).returncode != 0
        assert [b["boot"] for b in g.boots()] == ["pxe"]
        # the OS prints the URL without its query (the kernel itself logs its command
        # line, token included, unless the profile says quiet)
        ours = [line for line in console.splitlines() if "NETBOOT-COMMISSION" in line]
        assert ours and not any(token in line for line in ours)
        assert "IANA PEN registry open failed" not in console


def test_bmc_lab_guest_pxe_boots_through_netboot(bmc_lab: BmcLab, tmp_path: Path) -> None:
    """What the full commissioning e2e stands on: the BMC-backed guest, powered on over
    IPMI with bootdev pxe, PXE-boots from netboot's ProxyDHCP on the lab bridge."""
    images = build_demo_os()
    lab, g = bmc_lab.lab, bmc_lab.guest
    lab.start_netboot(write_lab_config(tmp_path / "netboot", images))
    g.ipmitool("chassis", "bootdev", "pxe")
    t0 = time.monotonic()
    g.ipmitool("power", "on")
    console = g.wait_console("NETBOOT-TESTOS-DONE", timeout=300)
    assert g.wait_off(30), console[-3000:]
    print(f"bmc lab: power on to power off through PXE {time.monotonic() - t0:.1f} s")
    assert "NETBOOT-TESTOS callback ok" in console, console[-3000:]
    assert f"identity uuid={g.uuid} mac={g.mac}" in console
    assert "netboot.profile=default" in console  # the kernel netboot's iPXE script named
    assert [b["boot"] for b in g.boots()] == ["pxe"]
    assert "-boot" in g.boots()[0]["argv"] and "order=n" in g.boots()[0]["argv"]
    assert g.power_status() == "off"


def test_commissioning_without_a_server_says_why_and_powers_off(tmp_path: Path) -> None:
    """Nothing answers the inventory URL: the guest prints why and powers off (a stuck
    node shows as stuck on the server; the guest never spins)."""
    images = build_demo_os()
    boot_addr = Lab(tmp_path).boot_addr
    url = f"http://{boot_addr}:8080/api/v1/nodes/x/inventory?token=t"
    with bmc_lab_up(tmp_path, direct=(images / "demo/vmlinuz", build_commission_os(),
                                      f"console=ttyS0 panic=-1 netboot.inventory={url}")) as bl:
        g = bl.guest
        g.ipmitool("power", "on")
        console = g.wait_console("NETBOOT-COMMISSION powering off", timeout=300)
        assert g.wait_off(30), console[-3000:]
        assert "NETBOOT-COMMISSION FAILED: could not POST the inventory" in console
        assert "NETBOOT-COMMISSION-DONE" not in console
        assert g.power_status() == "off"
