"""A fleet on one PostgreSQL registry (issue 15), end to end with QEMU guests.

    segment 1, 10.77.0.0/24: site DHCP .1, instances A (.2) and C (.4): an HA pair
    segment 2, 10.78.0.0/24: instance B (.2), reached from segment 1 through a routed
    namespace (.3 | .1) running dhcrelay, which relays to the site DHCP only

All three instances share one real PostgreSQL (the suite's, on a unix socket, which
reaches into every network namespace) and one secret ($NETBOOT_SECRET). Guests boot
through segment 1 and segment 2 at once; on segment 1 the half of the HA pair that
served a guest's boot script is killed with SIGKILL while the guest fetches its
kernel, and the guest completes through the other half (the iPXE chain script
reboots after a failed boot, and the next DHCP has one offer left).
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid as uuidlib
from pathlib import Path

import pytest

from tests.e2e.conftest import lab_config, write_lab_config
from tests.lab import VENV_BIN, Lab

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

SECRET = "lab-fleet-secret-0123456789abcdef"


def _psql(url: str, sql: str) -> list[list[str]]:
    out = subprocess.run(["psql", url, "-XAtqc", sql], check=True, capture_output=True,
                         text=True, timeout=30).stdout
    return [line.split("|") for line in out.splitlines() if line]


def _start(lab: Lab, ns: str, name: str, config: Path) -> subprocess.Popen:
    log = lab.workdir / f"netboot-{name}.log"
    proc = lab.spawn(ns, str(VENV_BIN / "netboot"), "serve", "--config", str(config),
                     "--interface", "eth0", log=log,
                     env={**os.environ, "NETBOOT_SECRET": SECRET})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if "ProxyDHCP listening" in text and "dashboard:" in text:
            return proc
        if proc.poll() is not None:
            raise RuntimeError(f"netboot {name} exited {proc.returncode}:\n{text}")
        time.sleep(0.2)
    raise RuntimeError(f"netboot {name} did not start:\n{log.read_text(errors='replace')}")


def _api(lab: Lab, ns: str, addr: str, path: str) -> dict:
    import json

    out = lab.ns(ns, "curl", "-sf", f"http://{addr}:8080{path}")
    return json.loads(out.stdout)


def test_a_fleet_boots_two_segments_and_survives_a_kill_9(postgres, tmp_path: Path) -> None:
    import asyncio

    url = asyncio.run(postgres.fresh_database())
    lab_config(tmp_path)  # skips where no lab can run; builds the demo OS
    images = Path(__file__).resolve().parents[2] / "images"
    configs = {name: write_lab_config(tmp_path / name, images,
                                      extra=f"registry: {url}\ninstance: {name}\n")
               for name in ("a", "b", "c")}
    lab = Lab(tmp_path / "lab")
    lab.workdir.mkdir()
    far = None
    procs: dict[str, subprocess.Popen] = {}
    try:
        lab.up()
        far = lab.add_far_subnet(78)
        lab.start_site_dhcp_for(78)
        relay = lab.spawn(lab.ns_relay, "dhcrelay", "-d", "-4", "-a", "-pf",
                          str(lab.workdir / "dhcrelay.pid"), "-iu", "eth0", "-id", "eth1",
                          lab.router_addr, log=lab.workdir / "dhcrelay.log")
        ns_c = lab.add_client("nbc", addr=f"{lab.net}.4")
        ns_b = lab.add_client("nbb", lab_ns=far.ns_lab, addr=f"{far.net}.2",
                              gateway=far.router_addr)
        procs["a"] = _start(lab, lab.ns_boot, "a", configs["a"])
        procs["c"] = _start(lab, ns_c, "c", configs["c"])
        procs["b"] = _start(lab, ns_b, "b", configs["b"])
        assert relay.poll() is None, (lab.workdir / "dhcrelay.log").read_text()
        addr = {"a": (lab.ns_boot, lab.boot_addr), "c": (ns_c, f"{lab.net}.4"),
                "b": (ns_b, f"{far.net}.2")}

        u1, u2 = str(uuidlib.uuid4()), str(uuidlib.uuid4())
        g1 = lab.boot_guest("bios", uuid=u1, serial="SN-FLEET-1", reboot=True)
        g2 = far.boot_guest("bios", uuid=u2, serial="SN-FLEET-2")

        # the half of the pair that served g1's boot script dies while g1 fetches its
        # kernel from it
        deadline = time.monotonic() + 300
        served_by = None
        while time.monotonic() < deadline and served_by is None:
            rows = _psql(url, f"SELECT state, instance FROM nodes WHERE uuid = '{u1}'")
            if rows and rows[0][0] in ("booting", "deploying"):
                served_by = rows[0][1]
            time.sleep(0.05)
        assert served_by in ("a", "c"), (rows, g1.console()[-2000:])
        survivor = "c" if served_by == "a" else "a"
        procs[served_by].kill()
        assert procs[served_by].wait(10) == -9
        print(f"g1's boot script came from {served_by}; killed it with SIGKILL")

        c1 = lab.wait_guest(g1, timeout=500)
        assert "NETBOOT-TESTOS-DONE" in c1, c1[-3000:]
        c2 = far.wait_guest(g2, timeout=300)
        assert "NETBOOT-TESTOS-DONE" in c2, c2[-3000:]

        # every guest installed, in the survivor's API, once each; B served g2 and the
        # survivor finished g1
        ns, ip = addr[survivor]
        deadline = time.monotonic() + 30
        while True:
            nodes = _api(lab, ns, ip, "/api/v1/nodes?limit=1000")["nodes"]
            by = {n["uuid"]: n for n in nodes}
            if all(by.get(u, {}).get("state") == "installed" for u in (u1, u2)):
                break
            assert time.monotonic() < deadline, nodes
            time.sleep(0.5)
        assert len(nodes) == len({n["uuid"] for n in nodes}) == 2, nodes
        assert by[u1]["instance"] == survivor and by[u2]["instance"] == "b"
        assert by[u1]["serial"] == "SN-FLEET-1" and by[u2]["serial"] == "SN-FLEET-2"
        assert _psql(url, "SELECT count(*), count(DISTINCT uuid) FROM nodes") == [["2", "2"]]
        # B's own API says the same of g1, which it never saw
        ns, ip = addr["b"]
        assert _api(lab, ns, ip, f"/api/v1/nodes/{u1}")["state"] == "installed"
        # g1's history: booted once through the dead half, then through the survivor
        events = _api(lab, *addr[survivor], f"/api/v1/nodes/{u1}")["events"]
        assert [e["state"] for e in events if e["kind"] == "state"][-1] == "installed"
    finally:
        for name in ("a", "b", "c"):
            log = lab.workdir / f"netboot-{name}.log"
            if log.exists():
                print(f"---- netboot {name} (tail) ----\n" + log.read_text()[-3000:])
        if far is not None:
            far.down()
        lab.down_all()
