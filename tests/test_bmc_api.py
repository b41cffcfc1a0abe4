"""Power from the API, against real BMCs: OpenIPMI's ipmi_sim (a real IPMI-over-LAN
BMC on 127.0.0.1) behind a real netboot (registry, lifecycle, HTTP app), with
machine files, roles, audit, commissioning and deploy."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.bmc_sim import IpmiSim, LogKeeper, keep_root_logs
from tests.served import Served, serving, write_config

U1 = "4c4c4544-0042-3510-8052-b4c04f384d32"
U2 = "4c4c4544-0042-3510-8052-b4c04f384d33"
U3 = "4c4c4544-0042-3510-8052-b4c04f384d34"
PW = "bmc-s3cret-pw"
OPERATOR = "operator-token-0123456789"
VIEWER = "viewer-token-0123456789"
ADMIN = "admin-token-0123456789"
TOKENS = {OPERATOR: ("ops", "operator"), VIEWER: ("wall", "viewer")}


@pytest.fixture(scope="module", autouse=True)
def logs() -> Iterator[LogKeeper]:
    with keep_root_logs() as keep:
        yield keep


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[IpmiSim, IpmiSim]]:
    base = tmp_path_factory.mktemp("bmcs")
    a = IpmiSim(base / "a", name="bmca", username="admin", password=PW)
    b = IpmiSim(base / "b", name="bmcb", username="admin", password=PW)
    try:
        yield a.start(), b.start()
    finally:
        a.stop()
        b.stop()


def _machine(root: Path, name: str, uuid: str, mac: str, sim: IpmiSim, *,
             password: str = PW, **extra: Any) -> None:
    body = {"uuid": uuid, "mac": mac, "hostname": name,
            "bmc": {"driver": "ipmi", "address": "127.0.0.1", "port": sim.port,
                    "username": "admin", "password": password}, **extra}
    (root / "machines" / f"{name}.yaml").write_text(yaml.safe_dump(body))


@pytest.fixture(scope="module")
def bad_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IpmiSim]:
    """A BMC of its own for the node with the wrong password, as one real machine
    per BMC has."""
    sim = IpmiSim(tmp_path_factory.mktemp("badbmc"), name="bmcc", username="admin",
                  password=PW)
    try:
        yield sim.start()
    finally:
        sim.stop()


@pytest.fixture
async def net(tmp_path: Path, sims: tuple[IpmiSim, IpmiSim],
              bad_sim: IpmiSim) -> AsyncIterator[Served]:
    a, b = sims
    for sim in sims:
        sim.set_power("0")
        sim.clear_calls()
    root = tmp_path / "config"
    profiles = {"default": {"kernel": "demo/vmlinuz", "cmdline": "x"},
                "commission": {"kernel": "demo/vmlinuz", "commission": True,
                               "cmdline": "netboot.inventory={{ node_urls.inventory }}"}}
    config = write_config(root, tmp_path / "data", profiles,
                          bmc={"poll_interval": 0.3, "timeout": 5,
                               "credentials": {"username": "admin", "password": PW,
                                               "port": a.port},
                               "stagger_delay": 0.05})
    _machine(root, "blade1", U1, "52:54:00:00:0b:01", a)
    _machine(root, "blade2", U2, "52:54:00:00:0b:02", b)
    _machine(root, "badpw", U3, "52:54:00:00:0b:03", bad_sim, password="wrong-pw")
    async with serving(config, tokens=TOKENS, admin_token=ADMIN) as served:
        await eventually_async(lambda: served.registry.bmc(U1) is not None, "enrolled")
        yield served


async def eventually_async(check: Any, what: str, timeout: float = 30) -> Any:
    for _ in range(int(timeout / 0.1)):
        got = check()
        if got:
            return got
        await asyncio.sleep(0.1)
    raise AssertionError(f"never: {what}")


async def _call(method: str, url: str, token: str | None = None, **kw: Any) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as s, s.request(method, url, headers=headers, **kw) as r:
        body = await r.json() if r.content_type == "application/json" else await r.text()
        return r.status, body


async def test_machine_file_bmcs_are_enrolled_polled_and_never_show_the_password(
        net: Served) -> None:
    st, node = await _call("GET", f"{net.url}/api/v1/nodes/{U1}")
    assert st == 200 and node["bmc"]["address"] == "127.0.0.1" and node["bmc"]["source"] == "file"
    assert node["bmc"]["has_password"] is True
    for _ in range(100):  # the poller reads it (poll_interval 0.3 s)
        st, node = await _call("GET", f"{net.url}/api/v1/nodes/{U1}")
        if node["power"]["state"] != "unknown":
            break
        await asyncio.sleep(0.1)
    assert node["power"]["state"] == "off" and node["power"]["checked"]
    st, bad = await _call("GET", f"{net.url}/api/v1/nodes/{U3}")
    await eventually_async(lambda: net.lifecycle.last_power(U3) is not None, "polled")
    st, bad = await _call("GET", f"{net.url}/api/v1/nodes/{U3}")
    assert bad["power"]["state"] == "unknown" and bad["power"]["reason"]
    everything = json.dumps(await _call("GET", f"{net.url}/api/v1/nodes")) + repr(
        net.registry.bmc(U1)) + repr(net.lifecycle.bmcs.config_for(U1))
    assert PW not in everything and "wrong-pw" not in everything


async def test_power_on_off_cycle_with_roles_and_audit(net: Served,
                                                        sims: tuple[IpmiSim, IpmiSim]) -> None:
    a, _ = sims
    url = f"{net.url}/api/v1/nodes/{U1}/power"
    st, body = await _call("POST", url, json={"action": "on"})
    assert st == 401
    st, body = await _call("POST", url, VIEWER, json={"action": "on"})
    assert st == 403 and "operator" in body["error"]
    assert a.power() == "0"
    st, body = await _call("POST", url, OPERATOR, json={"action": "on", "boot": "network"})
    assert st == 200 and body["power"]["state"] == "on", body
    assert a.power() == "1" and a.boot() == "pxe"
    st, body = await _call("POST", url, OPERATOR, json={"action": "on", "boot": "disk",
                                                        "persistent": True})
    assert st == 200 and a.boot() == "default"  # ipmi_sim's name for the disk
    assert any("set boot" in c for c in a.calls())
    st, body = await _call("POST", url, OPERATOR, json={"action": "cycle"})
    assert st == 200
    st, body = await _call("POST", url, OPERATOR, json={"action": "off"})
    assert st == 200 and body["power"]["state"] == "off" and a.power() == "0"
    st, body = await _call("POST", url, OPERATOR, json={"action": "explode"})
    assert st == 400
    st, audit = await _call("GET", f"{net.url}/api/v1/audit?node={U1}")
    rows = [(r["actor"], r["action"], r["result"]) for r in audit["audit"]]
    assert rows[:5] == [("ops", "node_power", "400"), ("ops", "node_power", "ok"),
                        ("ops", "node_power", "ok"), ("ops", "node_power", "ok"),
                        ("ops", "node_power", "ok")]
    assert ("wall", "node_power", "403") in rows


async def test_wrong_credentials_are_a_clear_error_and_stall_nothing(net: Served) -> None:
    async def bad() -> tuple[int, Any]:
        return await _call("POST", f"{net.url}/api/v1/nodes/{U3}/power", OPERATOR,
                           json={"action": "on"})

    async def good() -> tuple[int, Any]:
        return await _call("GET", f"{net.url}/health")

    (st, body), (hst, _) = await asyncio.gather(bad(), good())
    assert st == 502 and "password" in body["error"].lower() or "credential" in \
        body["error"].lower(), body
    assert hst == 200
    st, body = await _call("POST", f"{net.url}/api/v1/nodes/{U3}/power", OPERATOR,
                           json={"action": "on"})
    assert "wrong-pw" not in json.dumps(body)
    st, body = await _call("POST", f"{net.url}/api/v1/nodes/00000000-0000-4000-8000-00000000000f"
                           "/power", OPERATOR, json={"action": "on"})
    assert st == 404


async def test_bulk_power_by_label_is_staggered_with_progress(
        net: Served, sims: tuple[IpmiSim, IpmiSim]) -> None:
    for uuid in (U1, U2):
        st, _ = await _call("PATCH", f"{net.url}/api/v1/nodes/{uuid}", OPERATOR,
                            json={"labels": {"rack": "r7"}})
        assert st == 200
    st, job = await _call("POST", f"{net.url}/api/v1/power", OPERATOR,
                          json={"action": "on", "label": "rack=r7", "concurrency": 1})
    assert st == 202 and job["total"] == 2
    for _ in range(200):
        st, job = await _call("GET", f"{net.url}/api/v1/power/jobs/{job['id']}")
        if job["finished"]:
            break
        await asyncio.sleep(0.1)
    assert job["done"] == 2 and job["failed"] == 0, job["items"]
    assert [s.power() for s in sims] == ["1", "1"]


INVENTORY: dict[str, Any] = {
    "smbios": {"uuid": "", "serial": "SN-C1", "vendor": "QEMU", "product": "Blade",
               "bios_version": "1.0"},
    "cpu": {"model": "QEMU Virtual CPU", "count": 1}, "memory_bytes": 512 << 20, "disks": [],
    "nics": [{"mac": "52:54:00:00:0c:01", "driver": "e1000", "link": True, "speed_mbps": 1000}],
    "lldp": None, "bmc": None}


async def _commissioning(net: Served, uuid: str, mac: str) -> str:
    """Boot ``uuid`` into the commissioning profile through the real boot script; its
    inventory URL."""
    (net.services.store.server.machines_dir / f"{uuid}.yaml").write_text(
        yaml.safe_dump({"mac": mac, "profile": "commission"}))
    await eventually_async(lambda: net.services.store.reload() or
                           net.booter.resolve(mac, uuid).profile is not None and
                           net.booter.resolve(mac, uuid).profile.commission, "loaded")
    st, script = await _call("GET", f"{net.url}/ipxe/node?uuid={uuid}&mac={mac}")
    assert st == 200 and "netboot.inventory=" in script, script
    assert net.registry.get(uuid).state == "commissioning"
    return script.split("netboot.inventory=", 1)[1].split()[0].replace(
        "http://127.0.0.1:8080", net.url)


async def test_commissioning_reports_inventory_checks_the_bmc_and_is_ready(
        net: Served) -> None:
    uuid, mac = "4c4c4544-0042-3510-8052-b4c04f3840c1", "52:54:00:00:0c:01"
    url = await _commissioning(net, uuid, mac)
    inv = {**INVENTORY, "bmc": {"address": "127.0.0.1", "netmask": "255.0.0.0",
                                "gateway": None, "mac": None, "source": "static"}}
    st, text = await _call("POST", url + "&format=sh", json=inv)
    assert st == 200 and text.splitlines() == ["NETBOOT_ACTION=poweroff"], text
    node = net.registry.get(uuid)
    assert node.state == "ready" and node.serial == "SN-C1"
    bmc = net.registry.bmc(uuid)
    assert bmc.source == "commissioning" and bmc.address == "127.0.0.1"
    st, got = await _call("GET", f"{net.url}/api/v1/nodes/{uuid}/inventory")
    assert st == 200 and got["inventory"]["memory_bytes"] == 512 << 20
    # a BMC nothing answers for out of band: the OS waits, the node stays commissioning
    uuid2, mac2 = "4c4c4544-0042-3510-8052-b4c04f3840c2", "52:54:00:00:0c:02"
    url2 = await _commissioning(net, uuid2, mac2)
    inv2 = {**inv, "bmc": {**inv["bmc"], "address": "127.0.0.2"}}
    st, body = await _call("POST", url2, json=inv2)
    assert st == 200 and body["action"] == "wait" and "not reachable" in body["note"], body
    assert net.registry.get(uuid2).state == "commissioning"


async def test_commissioning_hands_out_a_bmc_address_from_the_pool(
        tmp_path: Path, sims: tuple[IpmiSim, IpmiSim]) -> None:
    a, _ = sims
    root = tmp_path / "config"
    config = write_config(root, tmp_path / "data", {"commission": {
        "kernel": "k", "commission": True,
        "cmdline": "netboot.inventory={{ node_urls.inventory }}"}},
        default_profile="commission",
        bmc={"addresses": ["127.0.0.1"], "netmask": "255.0.0.0", "timeout": 5,
             "credentials": {"username": "admin", "password": PW, "port": a.port}})
    async with serving(config) as net:
        uuid, mac = "4c4c4544-0042-3510-8052-b4c04f3840c3", "52:54:00:00:0c:03"
        st, script = await _call("GET", f"{net.url}/ipxe/node?uuid={uuid}&mac={mac}")
        url = script.split("netboot.inventory=", 1)[1].split()[0].replace(
            "http://127.0.0.1:8080", net.url)
        st, text = await _call("POST", url + "&format=sh", json={
            **INVENTORY, "bmc": {"address": "10.9.9.9", "netmask": None, "gateway": None,
                                 "mac": None, "source": "dhcp"}})
        assert text.splitlines() == ["NETBOOT_ACTION=set-bmc", "NETBOOT_BMC_ADDRESS=127.0.0.1",
                                     "NETBOOT_BMC_NETMASK=255.0.0.0"], text
        assert net.registry.get(uuid).state == "commissioning"
        st, text = await _call("POST", url + "&format=sh", json={  # the OS set it in-band
            **INVENTORY, "bmc": {"address": "127.0.0.1", "netmask": "255.0.0.0",
                                 "gateway": None, "mac": None, "source": "static"}})
        assert text.splitlines() == ["NETBOOT_ACTION=poweroff"], text
        assert net.registry.get(uuid).state == "ready"


async def test_deploy_assigns_powers_on_into_the_profile(net: Served,
                                                          sims: tuple[IpmiSim, IpmiSim]) -> None:
    a, _ = sims
    st, node = await _call("POST", f"{net.url}/api/v1/nodes/{U1}/deploy", OPERATOR,
                           json={"profile": "nope"})
    assert st == 400 and "default" in node["error"]
    st, node = await _call("POST", f"{net.url}/api/v1/nodes/{U1}/deploy", OPERATOR,
                           json={"profile": "default"})
    assert st == 200 and node["assigned_profile"] == "default" and node["armed"]
    assert a.power() == "1" and a.boot() == "pxe"
    # the Booter now boots it into that profile
    d = net.booter.decide("52:54:00:00:0b:01", U1)
    assert d.profile == "default"


def test_zz_no_bmc_password_in_any_log_record(logs: LogKeeper) -> None:
    text = "\n".join(logs.text)
    assert text, "nothing was logged"
    assert PW not in text and "wrong-pw" not in text


def _click_power_on(url: str, token: str) -> dict[str, str]:
    """Headless Chromium on the node page: set the operator token for the tab, click
    'Power on', accept the confirm, and wait for the live power badge to say on."""
    import shutil
    import tempfile

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.test_dashboard import CHROMEDRIVER, CHROMIUM

    profile = tempfile.mkdtemp(prefix="netboot-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", "--window-size=1200,800"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    try:
        driver.get(url)
        badge = driver.find_element(By.CSS_SELECTOR, ".power-cell .power")
        before = badge.text
        driver.execute_script("sessionStorage.setItem('netboot-token', arguments[0])", token)
        driver.find_element(By.CSS_SELECTOR, "button[data-power=on]").click()
        WebDriverWait(driver, 10).until(ec.alert_is_present())
        alert = driver.switch_to.alert
        question = alert.text
        alert.accept()
        WebDriverWait(driver, 30).until(lambda d: d.find_element(
            By.CSS_SELECTOR, ".power-cell .power").text == "power on")
        return {"before": before, "question": question,
                "result": driver.find_element(By.ID, "action-result").text}
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


async def test_dashboard_power_on_in_headless_chromium(net: Served,
                                                       sims: tuple[IpmiSim, IpmiSim]) -> None:
    import os

    from tests.test_dashboard import CHROMEDRIVER, CHROMIUM
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip("needs apt-get install -y chromium chromium-driver")
    pytest.importorskip("selenium", reason="pip install selenium (test extra)")
    a, _ = sims
    await eventually_async(lambda: net.lifecycle.last_power(U1) is not None, "polled")
    got = await asyncio.to_thread(_click_power_on, f"{net.url}/nodes/{U1}", OPERATOR)
    assert got["before"] == "power off" and "Power on" in got["question"], got
    assert a.power() == "1"
    rows = await net.registry.audit(target=U1)
    assert (rows[0]["actor"], rows[0]["action"], rows[0]["result"]) == ("ops", "node_power", "ok")


async def test_redfish_bmc_driven_through_netboot(tmp_path: Path) -> None:
    """The same operations against sushy-tools' emulator (fake driver), through the API."""
    import sys

    from tests.bmc_sim import SushyEmulator

    rf_pw = "Rf-Api-Secret-31"
    exe = Path(sys.executable).parent / "sushy-emulator"
    if not exe.exists():
        pytest.skip("pip install sushy-tools (test extra)")
    emu = SushyEmulator(tmp_path / "rf", systems=2, username="admin", password=rf_pw).start(exe)
    try:
        system = emu.uuids[0]
        root = tmp_path / "config"
        config = write_config(root, tmp_path / "data", bmc={"poll_interval": 0.5, "timeout": 10})
        (root / "machines" / "rf1.yaml").write_text(yaml.safe_dump({
            "uuid": U1, "mac": "52:54:00:00:0d:01", "hostname": "rf1",
            "bmc": {"driver": "redfish", "address": emu.url, "username": "admin",
                    "password": rf_pw, "system": system}}))
        async with serving(config, tokens=TOKENS) as net:
            await eventually_async(lambda: net.registry.bmc(U1) is not None, "enrolled")
            url = f"{net.url}/api/v1/nodes/{U1}/power"
            st, body = await _call("POST", url, OPERATOR, json={"action": "on",
                                                                "boot": "network"})
            assert st == 200, body
            assert emu.system_json(system)["Boot"]["BootSourceOverrideTarget"] == "Pxe"

            async def state() -> str:  # the fake driver applies changes 1-11 s later
                _, n = await _call("GET", f"{net.url}/api/v1/nodes/{U1}")
                return n["power"]["state"]

            for want, action in (("on", None), ("off", "off"), ("on", "cycle")):
                if action:
                    st, body = await _call("POST", url, OPERATOR, json={"action": action})
                    assert st == 200, body
                for _ in range(300):
                    if await state() == want:
                        break
                    await asyncio.sleep(0.1)
                assert await state() == want, (action, want)
            st, body = await _call("GET", f"{net.url}/api/v1/nodes/{U1}")
            assert rf_pw not in json.dumps(body)
    finally:
        emu.stop()


async def test_a_node_without_a_bmc_is_a_conflict_and_deploy_changes_nothing(
        net: Served) -> None:
    from tests.nodes import observe

    bare = "4c4c4544-0042-3510-8052-b4c04f38ee01"
    await observe(net.registry, bare)
    st, body = await _call("POST", f"{net.url}/api/v1/nodes/{bare}/power", OPERATOR,
                           json={"action": "on"})
    assert st == 409 and "no BMC" in body["error"] and "bmc:" in body["error"]
    st, body = await _call("POST", f"{net.url}/api/v1/nodes/{bare}/deploy", OPERATOR,
                           json={"profile": "default"})
    assert st == 409
    assert net.registry.get(bare).assigned_profile is None


async def test_two_nodes_commissioning_at_once_get_different_bmc_addresses(
        tmp_path: Path, sims: tuple[IpmiSim, IpmiSim]) -> None:
    a, _ = sims
    config = write_config(tmp_path / "config", tmp_path / "data", {"commission": {
        "kernel": "k", "commission": True,
        "cmdline": "netboot.inventory={{ node_urls.inventory }}"}},
        default_profile="commission",
        bmc={"addresses": ["10.20.0.101", "10.20.0.102"], "netmask": "255.255.255.0",
             "credentials": {"username": "admin", "password": PW, "port": a.port}})
    async with serving(config) as net:
        answers = []
        for i in (1, 2):
            uuid, mac = f"4c4c4544-0042-3510-8052-b4c04f3841{i:02d}", f"52:54:00:00:0e:0{i}"
            st, script = await _call("GET", f"{net.url}/ipxe/node?uuid={uuid}&mac={mac}")
            url = script.split("netboot.inventory=", 1)[1].split()[0].replace(
                "http://127.0.0.1:8080", net.url)
            st, body = await _call("POST", url, json={**INVENTORY, "bmc": None})
            answers.append((body["action"], body["bmc_address"]))
        assert answers == [("set-bmc", "10.20.0.101"), ("set-bmc", "10.20.0.102")]


async def test_inventory_only_from_a_commissioning_node_and_checked(net: Served) -> None:
    """A node token alone must not steer a BMC record: only a node netboot is
    commissioning may report, its BMC address must be an IPv4 address, and a partial
    inventory still renders on the dashboard."""
    tok = net.registry.node_token(U1)  # blade1: known (machine file), not commissioning
    url = f"{net.url}/api/v1/nodes/{U1}/inventory?token={tok}"
    evil = {**INVENTORY, "bmc": {"address": "10.0.0.66"}}
    st, body = await _call("POST", url, json=evil)
    assert st == 409 and "not commissioning" in body["error"]
    assert net.registry.bmc(U1).address == "127.0.0.1"  # untouched
    uuid, mac = "4c4c4544-0042-3510-8052-b4c04f3840d1", "52:54:00:00:0d:11"
    url = await _commissioning(net, uuid, mac)
    for bad in ({"bmc": {"address": "http://10.0.0.66:8000"}}, {"bmc": {"address": ["x"]}},
                {"smbios": {"serial": {"a": 1}}}):
        st, body = await _call("POST", url, json={**INVENTORY, **bad})
        assert st == 400, (bad, body)
    st, text = await _call("POST", url + "&format=sh", json={"disks": [{"name": "sda"}],
                                                             "nics": [{"mac": mac}],
                                                             "secure_boot": True})
    assert st == 200
    assert net.registry.get(uuid).secure_boot is True  # from the inventory
    st, html = await _call("GET", f"{net.url}/nodes/{uuid}")
    assert st == 200 and "sda" in html
    assert "<dt>Secure Boot</dt><dd>on</dd>" in html


async def test_deploy_refuses_when_the_power_state_is_unknown(net: Served) -> None:
    st, body = await _call("POST", f"{net.url}/api/v1/nodes/{U3}/deploy", OPERATOR,
                           json={"profile": "default"})
    assert st == 502 and "cannot tell whether" in body["error"], body
    assert net.registry.get(U3).assigned_profile is None


async def test_bulk_normalises_and_deduplicates_uuids(net: Served,
                                                      sims: tuple[IpmiSim, IpmiSim]) -> None:
    st, job = await _call("POST", f"{net.url}/api/v1/power", OPERATOR,
                          json={"action": "on", "uuids": [U1.upper(), U1, U2]})
    assert st == 202 and job["total"] == 2
    for _ in range(200):
        st, job = await _call("GET", f"{net.url}/api/v1/power/jobs/{job['id']}")
        if job["finished"]:
            break
        await asyncio.sleep(0.1)
    assert job["failed"] == 0 and [s.power() for s in sims] == ["1", "1"], job["items"]
    st, body = await _call("POST", f"{net.url}/api/v1/power", OPERATOR,
                           json={"action": "on", "uuids": ["nope"]})
    assert st == 400


async def test_put_bmc_refuses_what_could_never_log_in(net: Served) -> None:
    url = f"{net.url}/api/v1/nodes/{U1}/bmc"
    st, body = await _call("PUT", url, ADMIN, json={"driver": "ipmi", "address": "10.0.0.5",
                                                    "username": "admin", "password": "x" * 21})
    assert st == 400 and "20 bytes" in body["error"]
    st, body = await _call("PUT", url, ADMIN, json={"driver": "ipmi", "address": "10.0.0.5",
                                                    "username": "admin"})
    assert st == 400 and "password" in body["error"]
    st, body = await _call("PUT", url, OPERATOR, json={"driver": "ipmi", "address": "10.0.0.5",
                                                       "username": "admin", "password": "p"})
    assert st == 403
    st, body = await _call("PUT", url, ADMIN, json={"driver": "redfish",
                                                    "address": "https://10.0.0.5",
                                                    "username": "admin", "password": "p",
                                                    "verify_tls": True})
    assert st == 200 and body["bmc"]["source"] == "api"
    cfg = net.lifecycle.bmcs.config_for(U1)
    assert cfg.verify_tls is True and cfg.driver == "redfish"


def test_the_server_secret_is_not_in_the_config_repr() -> None:
    from netboot.config import ApiSettings

    assert "top-secret-key" not in repr(ApiSettings(secret="top-secret-key"))
