#!/usr/bin/env python3
"""A rack on one machine: `make demo` builds the lab (network namespaces, the
site's DHCP server, netboot) and powers on three QEMU guests (two BIOS, one
UEFI); the dashboard shows them come up. `make demo-down` removes it all.

The host reaches the lab through a veth into the lab bridge (10.77.0.254), so
the dashboard is at http://10.77.0.2:8080/ from this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.lab import Lab, can_run_lab, sh  # noqa: E402

STATE = Path(os.environ.get("NETBOOT_DEMO_DIR", "/tmp/netboot-demo"))
HOST_VETH = "nbdemo-host"


def up() -> int:
    reason = can_run_lab()
    if reason:
        print(f"demo: cannot build the lab: {reason}", file=sys.stderr)
        return 1
    if (STATE / "state.json").exists():
        print("demo: already running; `make demo-down` first", file=sys.stderr)
        return 1
    shutil.rmtree(STATE, ignore_errors=True)
    STATE.mkdir(parents=True)
    config = STATE / "configs" / "netboot.yaml"
    shutil.copytree(REPO / "configs", STATE / "configs")
    config.write_text(config.read_text()
                      .replace("data_dir: ../data", f"data_dir: {STATE / 'data'}")
                      .replace("images_dir: ../images", f"images_dir: {REPO / 'images'}")
                      .replace("ignition_dir: ../ignition", f"ignition_dir: {REPO / 'ignition'}")
                      .replace("admin_token: null", "admin_token: demo"))
    lab = Lab(STATE, tag="demo00")
    state = {"namespaces": [lab.ns_lab, lab.ns_router, lab.ns_boot], "pids": []}
    try:
        lab.up()
        # the host's own leg into the lab bridge, to browse the dashboard
        sh("ip", "link", "add", HOST_VETH, "type", "veth", "peer", "name", "hostleg",
           "netns", lab.ns_lab)
        lab.ns(lab.ns_lab, "ip", "link", "set", "hostleg", "master", "br0", "up")
        sh("ip", "addr", "add", f"{lab.net}.254/24", "dev", HOST_VETH)
        sh("ip", "link", "set", HOST_VETH, "up")
        lab.start_site_dhcp()
        lab.start_netboot(config)
        guests = [lab.boot_guest("bios", serial="DEMO-1", mac="52:54:00:00:01:01"),
                  lab.boot_guest("bios", serial="DEMO-2"),
                  lab.boot_guest("uefi", serial="DEMO-3", nic="virtio-net-pci", nic_rom=False)]
    finally:
        state["pids"] = [p.pid for p in lab.procs]
        (STATE / "state.json").write_text(json.dumps(state))
    print(f"""
demo: a lab rack is booting ({len(guests)} QEMU guests; about a minute under emulation).
  dashboard:   http://{lab.boot_addr}:8080/
  nodes:       curl -s http://{lab.boot_addr}:8080/api/v1/nodes
  netboot log: {STATE / 'netboot.log'}
  consoles:    {STATE}/guest*.log
  stop:        make demo-down
""")
    return 0


def down() -> int:
    path = STATE / "state.json"
    if not path.exists():
        print("demo: not running")
        return 0
    state = json.loads(path.read_text())
    for pid in state["pids"]:
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    time.sleep(1)
    for pid in state["pids"]:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    sh("ip", "link", "del", HOST_VETH, check=False)
    for ns in state["namespaces"]:
        sh("ip", "netns", "del", ns, check=False)
    shutil.rmtree(STATE, ignore_errors=True)
    print("demo: removed")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "down"])
    return up() if parser.parse_args().action == "up" else down()


if __name__ == "__main__":
    sys.exit(main())
