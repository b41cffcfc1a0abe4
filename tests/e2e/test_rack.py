"""Power on a small rack at once: four guests, mixed BIOS and UEFI, all booting
through netboot at the same time, all found registered and installed."""

from __future__ import annotations

import time
import uuid as uuidlib

import pytest

from tests.e2e.conftest import LabEnv

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def test_four_guests_at_once_all_registered(lab_env: LabEnv) -> None:
    lab = lab_env.lab
    plan = [("bios", "e1000", True), ("bios", "e1000", True),
            ("uefi", "e1000", True), ("uefi", "virtio-net-pci", False)]
    guests = []
    for i, (firmware, nic, rom) in enumerate(plan):
        guests.append(lab.boot_guest(firmware, uuid=str(uuidlib.uuid4()), nic=nic, nic_rom=rom,
                                     serial=f"SN-RACK-{i}"))
    for g in guests:
        console = lab.wait_guest(g, timeout=480)
        assert "NETBOOT-TESTOS callback ok" in console, f"{g.name}:\n{console[-2500:]}"
        assert f"uuid={g.uuid}" in console
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        nodes = {n["uuid"]: n for n in lab_env.api("/api/v1/nodes?state=installed")["nodes"]}
        if all(g.uuid in nodes for g in guests):
            break
        time.sleep(0.5)
    for i, g in enumerate(guests):
        node = nodes.get(g.uuid)
        assert node is not None, f"{g.name} not registered"
        assert node["state"] == "installed"
        assert node["serial"] == f"SN-RACK-{i}"
        assert g.mac in node["macs"]
