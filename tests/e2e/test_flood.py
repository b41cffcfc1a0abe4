"""limits.new_nodes with real firmware (issue 17): a flood of made-up UUIDs while a
real machine boots, and a machine told to ask again later that does.

200,000 boot-script GETs with random UUIDs from one address on the lab bridge
(bench/flood.py: aiohttp, keep-alive, 64 connections), against the lab's real
``netboot serve``, while a SeaBIOS + iPXE guest in QEMU boots through it. The
registry may grow by no more than limits.new_nodes allows over the time the flood
took (burst + rate x elapsed, from the server's own netboot.yaml), the guest must
boot to its callback (the flood starts once its ROM made its DHCP first contact, so
its boot script and kernel come during the flood), and every other request must be
counted as refused.

A SeaBIOS guest whose boot script is refused (the total bucket is empty) runs
netboot's ask-again script in its own iPXE ROM: it sleeps, fetches its script again
in place of the refused one, and boots once it is let in.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.storm_probe import metric
from netboot.config import load_server_config
from netboot.storage.registry import make_node_token
from tests.e2e.conftest import LabEnv, lab_config, running_lab
from tests.e2e.test_boot import _booted, _registered
from tests.lab import REPO, VENV_BIN, sh

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

REQUESTS = 200_000
CONNECTIONS = 64


def _nodes(env: LabEnv) -> list[dict[str, Any]]:
    return env.api("/api/v1/nodes")["nodes"]  # type: ignore[no-any-return]


def _metrics(env: LabEnv) -> str:
    return env.lab.ns(env.lab.ns_boot, "curl", "-sf",
                      f"http://{env.lab.boot_addr}:8080/metrics").stdout


def _wait_discovered(env: LabEnv, uuid: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    url = f"http://{env.lab.boot_addr}:8080/api/v1/nodes/{uuid}"
    while env.lab.ns(env.lab.ns_boot, "curl", "-sf", url, check=False).returncode != 0:
        assert time.monotonic() < deadline, f"no DHCP first contact from the guest {uuid}"
        time.sleep(0.2)


def test_a_flood_of_new_uuids_is_bounded_and_a_real_guest_still_boots(
        lab_env: LabEnv) -> None:
    lab = lab_env.lab
    limits = load_server_config(lab_env.config).limits.new_nodes
    flood_addr = f"{lab.net}.60"
    ns = lab.add_client("flood", addr=flood_addr)
    out = lab.workdir / "flood.json"
    try:
        before = {n["uuid"] for n in _nodes(lab_env)}
        refused_before = metric(_metrics(lab_env), "netboot_new_nodes_refused_total",
                                path="ipxe")
        uuid = str(uuidlib.uuid4())
        guest_start = time.monotonic()
        guest = lab.boot_guest("bios", uuid=uuid, serial="SN-FLOOD", vendor="NetbootLab",
                               product="QemuBlade")
        _wait_discovered(lab_env, uuid)  # its ROM's DHCP: the script comes seconds later
        start = time.monotonic()
        flood = lab.spawn(ns, str(VENV_BIN / "python"), str(REPO / "bench" / "flood.py"),
                          "--url", f"http://{lab.boot_addr}:8080", "-n", str(REQUESTS),
                          "-c", str(CONNECTIONS), "--json", str(out),
                          log=lab.workdir / "flood.log")
        _booted(lab_env, guest, uuid, "default")
        guest_seconds = time.monotonic() - guest_start
        flood_running_at_guest_end = flood.poll() is None
        try:
            flood.wait(timeout=600)
        except subprocess.TimeoutExpired:
            flood.kill()
            raise
        elapsed = time.monotonic() - start
        flood_end = time.time()  # the server's clock, for its event times
        result = json.loads(out.read_text())
        node = _registered(lab_env, uuid, "SN-FLOOD")
        nodes = _nodes(lab_env)
        refused = metric(_metrics(lab_env), "netboot_new_nodes_refused_total",
                         path="ipxe") - refused_before
    finally:
        sh("ip", "netns", "del", ns, check=False)

    assert flood.returncode == 0, (lab.workdir / "flood.log").read_text()[-2000:]
    new = [n for n in nodes if n["uuid"] not in before]
    from_flood = [n for n in new if n["address"] == flood_addr]
    allowed = limits.per_source.burst + limits.per_source.rate * elapsed
    figures = {"requests": REQUESTS, "per_second": result["per_second"],
               "flood_seconds": result["seconds"], "elapsed": round(elapsed, 1),
               "registry_growth": len(new), "from_flood": len(from_flood),
               "allowed": round(allowed, 1), "refused": refused,
               "guest_boot_seconds": round(guest_seconds, 1),
               "flood_running_at_guest_end": flood_running_at_guest_end}
    print("flood figures:", json.dumps(figures))
    # every request got a boot script (a new node) or the ask-again-later script
    assert result.get("booted", 0) + result.get("retry", 0) == REQUESTS, result
    assert len(from_flood) == result["booted"]
    # the registry grew by the flood's admitted nodes and the guest, within the limits
    assert {n["uuid"] for n in new} == {uuid} | {n["uuid"] for n in from_flood}
    assert limits.per_source.burst <= len(from_flood) <= allowed, figures
    assert len(new) <= limits.total.burst + limits.total.rate * elapsed
    # and every other request was counted as refused
    assert refused == REQUESTS - len(from_flood), figures
    # the guest got its boot script while the flood was on (else raise REQUESTS)
    boot_at = next(e["time"] for e in node["events"] if e["kind"] == "boot")
    assert boot_at < flood_end, figures


# One token in total and almost no refill: a second new machine is refused for sure.
STINGY = "limits:\n  new_nodes:\n    total: {rate: 0.001, burst: 1}\n"


@pytest.fixture
def stingy_lab(tmp_path: Path) -> Iterator[LabEnv]:
    with running_lab(tmp_path, lab_config(tmp_path, STINGY)) as env:
        yield env


def _curl(env: LabEnv, *args: str) -> str:
    return env.lab.ns(env.lab.ns_boot, "curl", "-sf", *args).stdout


def test_a_refused_guest_asks_again_and_boots_once_let_in(stingy_lab: LabEnv) -> None:
    env, lab = stingy_lab, stingy_lab.lab
    base = f"http://{lab.boot_addr}:8080"
    script = _curl(env, f"{base}/ipxe/node?uuid={uuidlib.uuid4()}")  # the one token
    assert "\nkernel " in script
    uuid = str(uuidlib.uuid4())
    guest = lab.boot_guest("bios", uuid=uuid, serial="SN-RETRY", vendor="NetbootLab",
                           product="QemuBlade")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # its DHCP first contact and its script: refused
        m = _curl(env, f"{base}/metrics")
        if metric(m, "netboot_new_nodes_refused_total", path="ipxe", limit="total") >= 1:
            break
        time.sleep(1)
    else:
        raise AssertionError(f"the guest was never refused:\n{lab.netboot_log()[-3000:]}")
    assert metric(m, "netboot_new_nodes_refused_total", path="dhcp", limit="total") >= 1
    assert uuid not in {n["uuid"] for n in env.api("/api/v1/nodes")["nodes"]}
    # an admin lets it in: a node token from the server's secret, as the API takes it
    secret = (env.config.parent.parent / "data" / "secret").read_bytes().strip()
    _curl(env, "-X", "POST", "-H", "Content-Type: application/json", "-d", "{}",
          f"{base}/api/v1/nodes/{uuid}/register?token={make_node_token(secret, uuid)}")
    console = lab.wait_guest(guest, timeout=240)  # its next ask (at most 60 s) boots it
    assert "NETBOOT-TESTOS callback ok" in console, console[-2000:]
    node = _registered(env, uuid, "SN-RETRY")
    assert [e["state"] for e in node["events"] if e["kind"] == "state"][-3:] == [
        "booting", "deploying", "installed"]
