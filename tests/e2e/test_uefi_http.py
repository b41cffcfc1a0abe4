"""UEFI HTTP Boot and Secure Boot refusals, with real OVMF firmware.

Each test runs its own lab (its own netboot process), so netboot's process-wide
counters in /metrics are this one guest's: "TFTP served nothing" is read from them.
"""

from __future__ import annotations

import re
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import LabEnv, lab_config, running_lab

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

REFUSED = "firmware refused the loader (Secure Boot?)"


@pytest.fixture
def own_lab(tmp_path: Path) -> Iterator[LabEnv]:
    with running_lab(tmp_path, lab_config(tmp_path)) as env:
        yield env


def metrics(env: LabEnv) -> dict[str, float]:
    """netboot's /metrics as {series: value} (series with its labels, as written)."""
    out = env.lab.ns(env.lab.ns_boot, "curl", "-sf",
                     f"http://{env.lab.boot_addr}:8080/metrics").stdout
    values: dict[str, float] = {}
    for line in out.splitlines():
        m = re.match(r"^(netboot_[^ ]+) ([0-9.e+-]+)$", line)
        if m:
            values[m.group(1)] = float(m.group(2))
    return values


def node_when(env: LabEnv, uuid: str, state: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    node: dict = {}
    while time.monotonic() < deadline:
        node = env.api(f"/api/v1/nodes/{uuid}") if _known(env, uuid) else {}
        if node.get("state") == state:
            return node
        time.sleep(1)
    return node


def _known(env: LabEnv, uuid: str) -> bool:
    r = env.lab.ns(env.lab.ns_boot, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                   f"http://{env.lab.boot_addr}:8080/api/v1/nodes/{uuid}", check=False)
    return r.stdout.strip() == "200"


def _fields(response: str) -> dict[str, str]:
    """Header fields of a curl -D/-I dump, without Date (it may tick between the two)."""
    lines = [ln.strip() for ln in response.splitlines()[1:] if ":" in ln]
    return {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines)
            if k.lower() != "date"}


def test_uefi_http_boot_loads_ipxe_over_http_and_no_tftp(own_lab: LabEnv) -> None:
    """OVMF with PXE off: HTTP Boot DISCOVER -> URL + option 60 HTTPClient -> HEAD and GET
    of ipxe.efi -> iPXE's script -> the demo OS calls back. TFTP serves nothing."""
    env = own_lab
    uuid = str(uuidlib.uuid4())
    started = time.monotonic()
    guest = env.lab.boot_guest("uefi-http", uuid=uuid, serial="SN-HTTPBOOT",
                               nic="virtio-net-pci", nic_rom=False)
    console = env.lab.wait_guest(guest, timeout=300)
    took = time.monotonic() - started
    assert "NETBOOT-TESTOS callback ok" in console, console[-3000:]
    node = node_when(env, uuid, "installed", 15)
    assert node.get("state") == "installed", node
    m = metrics(env)
    # the loader went over HTTP: HEAD (counted apart) and GET
    assert m.get('netboot_loader_downloads_total{transport="http"}', 0) >= 1, m
    assert m.get('netboot_http_requests_total{route="loader"}', 0) >= 1, m
    # TFTP is listening (its counters are exported from the start) and served nothing
    assert m.get("netboot_tftp_requests") == 0, {k: v for k, v in m.items() if "tftp" in k}
    assert m.get("netboot_tftp_transfers_started") == 0, m
    assert 'netboot_loader_downloads_total{transport="tftp"}' not in m, m
    assert node.get("reason") in (None, ""), node
    # HEAD against the real server: GET's headers, no body
    url = f"http://{env.lab.boot_addr}:8080/loader/ipxe.efi"
    head = env.lab.ns(env.lab.ns_boot, "curl", "-sfI", url).stdout
    got = env.lab.ns(env.lab.ns_boot, "curl", "-sf", "-D", "-", "-o", "/dev/null", url).stdout
    size = Path("/usr/lib/ipxe/ipxe.efi").stat().st_size
    assert f"Content-Length: {size}" in head, head
    assert _fields(head) == _fields(got), (head, got)
    print(f"uefi-http guest installed in {took:.0f} s")


def test_secure_boot_refuses_unsigned_ipxe_and_netboot_says_so(own_lab: LabEnv) -> None:
    """OVMF with Secure Boot on (Microsoft keys) is offered the unsigned ipxe.efi: it
    downloads it, refuses it ("Access Denied") and tries its next boot option (HTTP Boot)
    from the same MAC; netboot marks the node 'error' with the reason."""
    env = own_lab
    uuid = str(uuidlib.uuid4())
    started = time.monotonic()
    guest = env.lab.boot_guest("uefi-sb", uuid=uuid, serial="SN-SECUREBOOT",
                               nic="virtio-net-pci", nic_rom=False)
    node = node_when(env, uuid, "error", 300)
    took = time.monotonic() - started
    console = guest.console()
    loader_metrics = {k: v for k, v in metrics(env).items() if "loader" in k or "tftp_tr" in k}
    assert node.get("state") == "error", (node, loader_metrics, console[-3000:])
    assert node.get("reason") == REFUSED, node
    events = [e for e in node["events"] if e.get("kind") == "state"]
    assert events[-1].get("state") == "error", events
    assert events[-1].get("detail") == REFUSED, events
    assert "NETBOOT-TESTOS-START" not in console
    m = metrics(env)
    assert m.get('netboot_loader_refused_total{transport="tftp"}', 0) >= 1, m
    print(f"uefi-sb guest marked refused {took:.0f} s after power-on; console:\n"
          + console[-1500:])
