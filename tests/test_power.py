"""netboot.power against real BMC peers: OpenIPMI's ipmi_sim (IPMI over LAN)
and sushy-tools' sushy-emulator (Redfish, fake systems). 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from netboot.power import BmcConfig, BmcError, BootDevice, PowerService, PowerState
from netboot.power.driver import open_driver
from netboot.power.ipmi import IpmiDriver
from tests.bmc_sim import IpmiSim, SushyEmulator, eventually, free_port, keep_root_logs

pytestmark = pytest.mark.skipif(not shutil.which("ipmi_sim") or not shutil.which("ipmitool"),
                                reason="needs openipmi and ipmitool (scripts/setup.sh test)")

IPMI_PW = "Ipmi-Secret-4711"
IPMI_PW_B = "Ipmi-Other-Sec-12"
RF_PW = "Rf-Secret-0815"
WRONG_PW = "Wrong-Secret-999"
SECRETS = (IPMI_PW, IPMI_PW_B, RF_PW, WRONG_PW)
EMULATOR = Path(sys.executable).parent / "sushy-emulator"


@pytest.fixture(scope="module", autouse=True)
def all_logs():
    """Every log record of the module, at DEBUG, for the password check at the end."""
    with keep_root_logs() as keep:
        yield keep


@pytest.fixture(scope="module")
def sims(tmp_path_factory):
    base = tmp_path_factory.mktemp("ipmi")
    a = IpmiSim(base / "a", name="bmca", username="admin", password=IPMI_PW)
    b = IpmiSim(base / "b", name="bmcb", username="admin", password=IPMI_PW_B)
    try:
        yield a.start(), b.start()
    finally:
        a.stop()
        b.stop()


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    emu = SushyEmulator(tmp_path_factory.mktemp("redfish"), systems=3, username="admin",
                        password=RF_PW).start(EMULATOR)
    yield emu
    emu.stop()


def ipmi(sim: IpmiSim, password: str | None = None) -> BmcConfig:
    return BmcConfig(driver="ipmi", address="127.0.0.1", port=sim.port,
                     username=sim.username, password=password or sim.password)


def dead_ipmi() -> BmcConfig:
    """An IPMI address nothing answers on (a free UDP port)."""
    return BmcConfig(driver="ipmi", address="127.0.0.1", port=free_port(socket.SOCK_DGRAM),
                     username="admin", password=IPMI_PW)


def redfish(emu: SushyEmulator, system: str | None, password: str = RF_PW) -> BmcConfig:
    return BmcConfig(driver="redfish", address=emu.url, username="admin",
                     password=password, system=system)


async def until_state(svc: PowerService, key, cfg, want: PowerState) -> None:
    """Read the state until it is `want` (the fake Redfish driver applies power
    changes 1-11 s later, on a read)."""
    for _ in range(300):
        if (await svc.status(key, cfg)).state == want:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{key} never became {want}: {svc.last(key)}")


async def until_file(check, what: str) -> None:
    await asyncio.to_thread(eventually, check, what, 10)


# -- BmcConfig -----------------------------------------------------------------

def test_config_repr_and_from_mapping():
    cfg = BmcConfig.from_mapping({"driver": "redfish", "address": "bmc1.example",
                                  "username": "root", "password": IPMI_PW, "system": "1"})
    assert IPMI_PW not in repr(cfg) and IPMI_PW not in str(cfg)
    assert cfg.base_url == "https://bmc1.example" and cfg.endpoint == "https://bmc1.example"
    assert BmcConfig(driver="ipmi", address="::1", username="u",
                     password="p").endpoint == "ipmi://[::1]:623"
    assert BmcConfig(driver="redfish", address="http://10.0.0.5:8000", username="u",
                     password="p", port=9000).base_url == "http://10.0.0.5:9000"
    for bad, words in [
        ({"driver": "ipmi", "address": "h"}, "missing key(s) username, password"),
        ({"driver": "amt", "address": "h", "username": "u", "password": IPMI_PW},
         "driver must be one of ipmi, redfish"),
        ({"driver": "ipmi", "address": "h", "username": "u", "password": IPMI_PW,
          "port": 70000}, "port must be an integer"),
        ({"driver": "ipmi", "address": "h", "username": "u", "password": IPMI_PW,
          "pasword": "x"}, "unknown key(s) pasword"),
        ({"driver": "redfish", "address": "https://u:x@h", "username": "u",
          "password": IPMI_PW}, "not in the URL"),
        ({"driver": "ipmi", "address": "https://h", "username": "u", "password": "p"},
         "only for the redfish driver"),
        ({"driver": "ipmi", "address": "h", "username": "u", "password": "x" * 21},
         "at most 20 bytes"),
        ("ipmi://h", "must be a mapping"),
    ]:
        with pytest.raises(ValueError) as e:
            BmcConfig.from_mapping(bad)
        assert words in str(e.value) and IPMI_PW not in str(e.value)


# -- IPMI ------------------------------------------------------------------------

async def test_ipmi_power_and_boot(sims):
    a, _ = sims
    cfg = ipmi(a)
    svc = PowerService(workers=4, timeout=5)
    try:
        assert (await svc.status("a", cfg)).state == PowerState.OFF
        a.clear_calls()
        await svc.act("a", cfg, "on", boot="network")
        assert a.power() == "1" and a.boot() == "pxe"
        calls = a.calls()
        assert calls.index("set boot pxe") < calls.index("set power 1"), calls
        st = await svc.status("a", cfg)
        assert st.state == PowerState.ON and st.reason is None and svc.last("a") == st

        await svc.act("a", cfg, "cycle")            # on: a hard reset, power stays on
        assert "set reset 1" in a.calls() and a.power() == "1"
        await svc.act("a", cfg, "soft")              # ACPI: the script's OS obeys at once
        assert "set shutdown 1" in a.calls()
        await until_file(lambda: a.power() == "0", "soft off")
        assert (await svc.status("a", cfg)).state == PowerState.OFF
        await svc.act("a", cfg, "cycle")             # off: cycle powers on
        assert a.power() == "1"
        await svc.act("a", cfg, "off", boot="disk")
        assert a.power() == "0" and a.boot() == "default"  # ipmi_sim maps hd to default
        assert (await svc.status("a", cfg)).state == PowerState.OFF
        stats = svc.stats()
        assert stats.errors == 0 and stats.max_running_per_bmc == 1
    finally:
        await svc.close()


async def test_ipmi_wrong_password_is_clear_and_other_bmc_unaffected(sims):
    a, b = sims
    good, bad = ipmi(a), ipmi(b, password=WRONG_PW)
    svc = PowerService(workers=4, timeout=5)
    try:
        results = await asyncio.gather(svc.status("bad", bad),
                                       *(svc.status("good", good) for _ in range(5)))
        bad_st, good_sts = results[0], results[1:]
        assert bad_st.state == PowerState.UNKNOWN
        assert "refused the login as 'admin'" in bad_st.reason
        assert "check bmc.username and bmc.password" in bad_st.reason
        assert all(s.state in (PowerState.ON, PowerState.OFF) for s in good_sts), good_sts
        with pytest.raises(BmcError) as e:
            await svc.act("bad", bad, "on")
        assert e.value.kind == "auth" and b.power() == "0"
        assert svc.stats().timeouts == 0  # refused at once by the BMC, not timed out
    finally:
        await svc.close()


async def test_ipmi_no_answer_is_unknown_within_timeout_and_loop_free(sims):
    a, _ = sims
    dead = dead_ipmi()
    svc = PowerService(workers=4, timeout=2.0)
    try:
        pending = asyncio.create_task(svc.status("dead", dead))
        await asyncio.sleep(0)
        # the loop and other BMCs go on while the dead one is waited for
        ok = await svc.status("a", ipmi(a))
        assert ok.state in (PowerState.ON, PowerState.OFF) and not pending.done()
        st = await pending
        assert st.state == PowerState.UNKNOWN and "no answer within 2 s" in st.reason
        s = svc.stats()
        # the caller has its answer; the driver kills its ipmitool a second later
        assert s.timeouts == 1 and s.stuck == 1
        assert (await svc.status("a", ipmi(a))).reason is None
        await asyncio.to_thread(eventually, lambda: svc.stats().stuck == 0, "thread end", 20)
        assert svc.stats().running == 0 and not ipmitool_processes(dead.port)
    finally:
        await svc.close()


def ipmitool_processes(port: int) -> list[str]:
    """Command lines of running ipmitool processes aimed at `port` on this host."""
    found = []
    for d in Path("/proc").iterdir():
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"ipmitool") and str(port).encode() in argv:
            found.append(b" ".join(argv).decode(errors="replace"))
    return found


def test_ipmi_driver_alone_is_killed_at_its_deadline_and_keeps_the_password_off_argv(
        sims, monkeypatch):
    """The driver's own bound (a caller without PowerService): a BMC that never
    answers costs timeout + 1 s, and the process is gone afterwards. The password
    travels in the environment, never on the command line."""
    dead = dead_ipmi()
    drv = open_driver(dead, timeout=0.5)
    seen: list[tuple[list[str], dict[str, str]]] = []
    real_run = subprocess.run

    def spy(argv, **kw):  # what the process really gets
        seen.append((list(argv), dict(kw.get("env") or {})))
        return real_run(argv, **kw)

    monkeypatch.setattr(subprocess, "run", spy)
    with pytest.raises(BmcError) as e:
        drv.state()
    (argv, env), = seen
    assert argv[0] == "ipmitool" and "-E" in argv and dead.password not in " ".join(argv)
    assert env["IPMI_PASSWORD"] == dead.password
    assert e.value.kind == "timeout" and "no answer within 1.5 s" in str(e.value)
    assert not ipmitool_processes(dead.port)
    missing = IpmiDriver(ipmi(sims[0]), exe="ipmitool-not-installed")
    with pytest.raises(BmcError) as e:
        missing.state()
    assert e.value.kind == "config" and "apt-get install ipmitool" in str(e.value)


async def test_ipmi_many_calls_at_once_to_good_wrong_and_dead_bmcs(sims):
    """Calls share nothing: a wrong password and a dead BMC in the same moment as
    forty reads of a good one, on eight workers, leave every good read answered
    and the wrong one refused (not timed out)."""
    a, b = sims
    good, bad, dead = ipmi(a), ipmi(b, password=WRONG_PW), dead_ipmi()
    svc = PowerService(workers=8, timeout=5)
    try:
        keys = [f"good{i}" for i in range(40)]
        results = await asyncio.gather(svc.status("bad", bad), svc.status("dead", dead),
                                       *(svc.status(k, good) for k in keys))
        bad_st, dead_st, good_sts = results[0], results[1], results[2:]
        assert all(s.state in (PowerState.ON, PowerState.OFF) for s in good_sts), good_sts
        assert "refused the login" in bad_st.reason, bad_st
        assert dead_st.state == PowerState.UNKNOWN and "no answer" in dead_st.reason
        assert svc.stats().timeouts == 1
    finally:
        await svc.close()


async def test_ipmi_poller_records_each_bmc(sims):
    a, b = sims
    dead = dead_ipmi()
    targets = {"a": ipmi(a), "bad": ipmi(b, password=WRONG_PW), "dead": dead}
    rounds: list[tuple[int, int]] = []
    two = asyncio.Event()

    def on_round(n: int, polled: int) -> None:
        rounds.append((n, polled))
        if n == 2:
            two.set()

    async def no_wait(_: float) -> None:
        await asyncio.sleep(0)

    svc = PowerService(workers=4, timeout=3.0, sleep=no_wait)
    poller = asyncio.create_task(svc.poll_forever(lambda: targets, interval=30,
                                                  on_round=on_round))
    try:
        await asyncio.wait_for(two.wait(), 60)
        assert rounds[0] == (1, 3)
        assert rounds[1] == (2, 2)  # "dead" skipped: its timed-out thread still runs
        assert svc.last("a").state in (PowerState.ON, PowerState.OFF)
        assert "refused the login" in svc.last("bad").reason
        assert "no answer within 3 s" in svc.last("dead").reason
        s = svc.stats()
        assert s.polls_skipped >= 1 and s.max_running_per_bmc == 1
    finally:
        poller.cancel()
        await asyncio.gather(poller, return_exceptions=True)
        await svc.close()


async def test_bulk_staggers_and_reports(sims):
    a, b = sims
    now = [1000.0]
    slept: list[float] = []

    async def fake_sleep(s: float) -> None:
        slept.append(s)
        now[0] += s
        await asyncio.sleep(0)

    svc = PowerService(workers=4, timeout=5, clock=lambda: now[0], sleep=fake_sleep)
    seen = []
    try:
        items = [("a", ipmi(a)), ("bad", ipmi(b, password=WRONG_PW)), ("a2", ipmi(a))]
        res = await svc.bulk(items, "on", "network", concurrency=1, delay=2.5,
                             progress=seen.append)
        assert list(res) == ["a", "bad", "a2"]
        assert res["a"].ok and res["a2"].ok and not res["bad"].ok
        assert "refused the login" in res["bad"].reason
        starts = [res[k].started for k in ("a", "bad", "a2")]
        assert all(y - x >= 2.5 for x, y in zip(starts, starts[1:]))
        assert slept == [2.5, 2.5] and len(seen) == 3
        assert svc.stats().max_running == 1  # concurrency=1
        assert a.power() == "1"
    finally:
        await svc.close()


# -- Redfish -----------------------------------------------------------------

async def test_redfish_power_and_boot(emulator):
    uuid = emulator.uuids[0]
    cfg = redfish(emulator, uuid)
    svc = PowerService(workers=4, timeout=10)
    try:
        assert (await svc.status("r", cfg)).state == PowerState.OFF
        await svc.act("r", cfg, "on", boot=BootDevice.NETWORK)
        boot = emulator.system_json(uuid)["Boot"]
        assert boot["BootSourceOverrideTarget"] == "Pxe"
        await until_state(svc, "r", cfg, PowerState.ON)
        await svc.act("r", cfg, "off")
        await until_state(svc, "r", cfg, PowerState.OFF)
        await svc.act("r", cfg, "cycle")              # off: cycle is On
        await until_state(svc, "r", cfg, PowerState.ON)
        await svc.act("r", cfg, "soft", boot="disk")
        assert emulator.system_json(uuid)["Boot"]["BootSourceOverrideTarget"] == "Hdd"
        await until_state(svc, "r", cfg, PowerState.OFF)
        # no system named: the first one (sorted) is used
        first = redfish(emulator, None)
        assert (await svc.status("first", first)).reason is None
        assert svc.stats().errors == 0
    finally:
        await svc.close()


async def test_redfish_errors_are_clear(emulator):
    svc = PowerService(workers=4, timeout=3)
    try:
        st = await svc.status("w", redfish(emulator, emulator.uuids[1], password=WRONG_PW))
        assert st.state == PowerState.UNKNOWN
        assert "refused the login as 'admin' (HTTP 401)" in st.reason
        st = await svc.status("n", redfish(emulator, "no-such-system"))
        assert "no Redfish system 'no-such-system'" in st.reason
        closed = BmcConfig(driver="redfish", address=f"http://127.0.0.1:{free_port()}",
                           username="admin", password=RF_PW)
        with pytest.raises(BmcError) as e:
            await svc.act("c", closed, "on")
        assert e.value.kind == "unreachable" and "cannot connect" in str(e.value)
        assert svc.stats().timeouts == 0
    finally:
        await svc.close()


async def test_redfish_stuck_bmc_times_out_and_loop_goes_on(emulator):
    async def silent(reader, writer):  # accepts, reads, never answers
        await reader.read(-1)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    stuck = BmcConfig(driver="redfish", address=f"http://127.0.0.1:{port}",
                      username="admin", password=RF_PW)
    svc = PowerService(workers=2, timeout=1.0)
    try:
        pending = asyncio.create_task(svc.status("stuck", stuck))
        await asyncio.sleep(0)
        ok = await svc.status("r", redfish(emulator, emulator.uuids[2]))
        assert ok.reason is None and not pending.done()
        st = await pending
        assert st.state == PowerState.UNKNOWN and "no answer within 1 s" in st.reason
        # sushy's read timeout is the service timeout, so the thread ends soon after
        await asyncio.to_thread(eventually, lambda: svc.stats().stuck == 0, "thread end", 20)
    finally:
        await svc.close()
        server.close()


async def test_redfish_poll_of_1000_systems_stays_within_bounds(tmp_path):
    emu = SushyEmulator(tmp_path / "rf1000", systems=1000, username="admin",
                        password=RF_PW).start(EMULATOR)
    try:
        targets = {f"n{i}": redfish(emu, u) for i, u in enumerate(emu.uuids)}
        done = asyncio.Event()
        rounds: list[int] = []
        at_two = []

        def on_round(n: int, polled: int) -> None:
            rounds.append(polled)
            if n == 2:
                at_two.append(svc.stats())  # a third round may start before the cancel
                done.set()

        async def no_wait(_: float) -> None:
            await asyncio.sleep(0)

        svc = PowerService(workers=16, timeout=30, sleep=no_wait)
        poller = asyncio.create_task(svc.poll_forever(lambda: targets, 5, on_round=on_round))
        try:
            await asyncio.wait_for(done.wait(), 900)
        finally:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
        s = at_two[0]
        unknown = {k: v.reason for k, v in svc.statuses().items() if v.reason}
        assert not unknown, list(unknown.items())[:5]
        assert rounds[:2] == [1000, 1000]
        assert s.max_running_per_bmc == 1           # never two polls to one BMC
        assert 1 < s.max_running <= svc.poll_workers <= svc.workers
        assert s.calls == 2000 and s.errors == 0 and s.timeouts == 0
        st = svc.statuses()
        assert len(st) == 1000 and all(v.state == PowerState.OFF for v in st.values())
        await svc.close()
    finally:
        emu.stop()


# -- secrets -----------------------------------------------------------------

def test_drivers_repr_hide_password(sims, emulator):
    for cfg in (ipmi(sims[0]), redfish(emulator, None)):
        d = open_driver(cfg)
        assert cfg.password not in repr(d) and cfg.password not in repr(cfg)
        d.close()


def test_zz_no_password_in_any_log_record(all_logs):
    assert all_logs.records, "the module logged nothing at all?"
    for r in all_logs.records:
        text = r.getMessage() + (logging.Formatter().formatException(r.exc_info)
                                 if r.exc_info else "")
        for secret in SECRETS:
            assert secret not in text, (r.name, r.levelname, text[:300])
