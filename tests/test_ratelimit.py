"""The one rate-limited logger (netboot/util/ratelimit.py), driven by a fake clock,
and each of its users: TFTP refusals, DHCP decisions, malformed HTTP requests,
Ignition/OEM refusals and dropped webhooks."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from netboot.util.ratelimit import RateLimitedLog

LOGGER = "netboot.test.ratelimit"
SUMMARY = "%d event(s) since the last report (%s); latest: %s"


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def lines(caplog: pytest.LogCaptureFixture, name: str = LOGGER) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == name]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def caplog_warn(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    return caplog


def test_record_logs_the_first_at_once_then_one_summary_per_interval(
        clock: Clock, caplog_warn: pytest.LogCaptureFixture) -> None:
    rl = RateLimitedLog(logging.getLogger(LOGGER), SUMMARY, every=10.0, clock=clock)
    rl.record("denied", "a")
    assert lines(caplog_warn) == ["1 event(s) since the last report (denied=1); latest: a"]
    for i in range(1000):  # a flood inside one interval: counted, not logged
        clock.t += 0.009
        rl.record("not_found" if i % 2 else "denied", f"n{i}")
    assert len(lines(caplog_warn)) == 1
    assert rl.pending == {"denied": 500, "not_found": 500}
    clock.t += 1.0  # 10 s since the first line: the next occurrence says them all
    rl.record("busy", "last")
    assert lines(caplog_warn)[1] == ("1001 event(s) since the last report "
                                     "(busy=1, denied=500, not_found=500); latest: last")
    assert rl.pending == {}
    assert caplog_warn.records[-1].levelno == logging.WARNING


def test_flush_says_what_is_held_back_and_nothing_when_there_is_none(
        clock: Clock, caplog_warn: pytest.LogCaptureFixture) -> None:
    rl = RateLimitedLog(logging.getLogger(LOGGER), SUMMARY, every=60.0, clock=clock,
                        level=logging.INFO)
    rl.flush()
    assert lines(caplog_warn) == []
    rl.record("x", 1)
    rl.record("x", 2)
    rl.flush()
    rl.flush()
    assert lines(caplog_warn) == ["1 event(s) since the last report (x=1); latest: 1",
                                  "1 event(s) since the last report (x=1); latest: 2"]
    assert caplog_warn.records[-1].levelno == logging.INFO


def test_quiet_after_the_interval_the_next_line_comes_at_once(
        clock: Clock, caplog_warn: pytest.LogCaptureFixture) -> None:
    rl = RateLimitedLog(logging.getLogger(LOGGER), SUMMARY, every=60.0, clock=clock)
    for _ in range(3):
        clock.t += 61
        rl.record("x", "y")
    assert len(lines(caplog_warn)) == 3


def test_allow_has_a_burst_then_a_rate_and_counts_what_it_holds(
        clock: Clock, caplog_warn: pytest.LogCaptureFixture) -> None:
    held: list[str] = []
    rl = RateLimitedLog(logging.getLogger(LOGGER), SUMMARY, every=2.0, burst=10, clock=clock,
                        on_held=held.append)
    assert sum(rl.allow(None, "flood", i) for i in range(25)) == 10
    assert held == ["flood"] * 15 and rl.pending == {"flood": 15}
    assert lines(caplog_warn) == []  # the caller writes its own lines; the summary waits
    clock.t += 0.2  # refilled at 5 a second: one more line
    assert rl.allow(None, "flood", "x") and not rl.allow(None, "flood", "y")
    clock.t += 1.0  # half full again: the summary comes first, then the line
    assert rl.allow(None, "flood", "z")
    assert lines(caplog_warn) == ["16 event(s) since the last report (flood=16); latest: y"]


def test_allow_keeps_a_key_quiet_for_its_period_without_counting_it(
        clock: Clock, caplog_warn: pytest.LogCaptureFixture) -> None:
    rl = RateLimitedLog(logging.getLogger(LOGGER), SUMMARY, every=1.0, burst=100, clock=clock,
                        quiet=60.0, keys=2)
    assert rl.allow("a") and not rl.allow("a") and rl.allow("b")
    clock.t += 59
    assert not rl.allow("a")
    clock.t += 2
    assert rl.allow("a")
    assert rl.allow("c") and rl.allow("d")  # the key memory is bounded (an LRU of 2) ...
    assert rl.allow("a")  # ... so a forgotten key may speak again early
    assert rl.pending == {}


def test_a_clock_stepping_back_refills_nothing(clock: Clock,
                                               caplog_warn: pytest.LogCaptureFixture) -> None:
    rl = RateLimitedLog(logging.getLogger(LOGGER), SUMMARY, every=10.0, clock=clock)
    rl.record("x", 1)
    clock.t -= 500
    rl.record("x", 2)
    clock.t += 5
    rl.record("x", 3)
    assert len(lines(caplog_warn)) == 1
    clock.t += 5
    rl.record("x", 4)
    assert len(lines(caplog_warn)) == 2


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        RateLimitedLog(logging.getLogger(LOGGER), SUMMARY, every=0)
    with pytest.raises(ValueError):
        RateLimitedLog(logging.getLogger(LOGGER), SUMMARY, burst=0)


async def test_in_a_loop_the_rest_is_said_when_the_flood_stops(
        caplog_warn: pytest.LogCaptureFixture) -> None:
    rl = RateLimitedLog(logging.getLogger(LOGGER), SUMMARY, every=0.2)
    for i in range(50):
        rl.record("x", i)
    assert len(lines(caplog_warn)) == 1
    await asyncio.sleep(0.4)  # nothing else happens: the timer says the other 49
    assert lines(caplog_warn)[1] == "49 event(s) since the last report (x=49); latest: 49"
    rl.record("x", "late")  # and the timer is re-armed by later floods, not left running
    rl.flush()
    assert len(lines(caplog_warn)) == 3


# -- its users ------------------------------------------------------------------------

def test_malformed_http_requests_become_one_line_an_interval(
        clock: Clock, caplog_warn: pytest.LogCaptureFixture) -> None:
    from aiohttp.http_exceptions import BadStatusLine

    from netboot.cli.serve import MalformedHttpSummary

    server_log = logging.getLogger("aiohttp.server")
    f = MalformedHttpSummary(every=60.0, clock=clock)
    server_log.addFilter(f)
    try:
        for i in range(100):
            try:
                raise BadStatusLine(f"bad line {i}\nmore")
            except BadStatusLine:
                server_log.exception("Error handling request")
        server_log.error("an unrelated error")  # passes untouched
        clock.t += 60
        try:
            raise BadStatusLine("last one")
        except BadStatusLine:
            server_log.exception("Error handling request")
    finally:
        server_log.removeFilter(f)
    got = lines(caplog_warn, "aiohttp.server")
    assert len(got) == 3, got
    assert got[0].startswith("1 malformed HTTP request(s) dropped since the last report "
                             "(BadStatusLine=1); latest: ")
    assert got[1] == "an unrelated error"
    assert got[2].startswith("100 malformed HTTP request(s) dropped since the last report "
                             "(BadStatusLine=100); latest: Bad status line 'last one'")
    assert not any(r.exc_info for r in caplog_warn.records if r.name == "aiohttp.server")


def test_forged_signed_urls_do_not_flood_the_log(tmp_path: Path,
                                                 caplog_warn: pytest.LogCaptureFixture) -> None:
    from netboot.ignition.artifacts import Artifacts
    from netboot.ignition.render import IgnitionRenderer

    clock = Clock()
    (tmp_path / "ign").mkdir()
    a = Artifacts(IgnitionRenderer(tmp_path / "ign"), b"secret", log_clock=clock)
    for i in range(500):
        a.refused("bad_signature" if i % 5 else "expired", "oem",
                  f"uuid-{i}", f"10.0.0.{i % 250}", "http")
    clock.t += 60
    a.refused("address", "oem", "uuid-last", "10.0.0.9", "tftp")
    got = lines(caplog_warn, "netboot.ignition")
    assert len(got) == 2, got
    assert got[0] == ("refused 1 Ignition/OEM request(s) since the last report (expired=1); "
                      "latest: refused oem for uuid-0 to 10.0.0.0 over http: expired")
    assert got[1] == ("refused 500 Ignition/OEM request(s) since the last report (address=1, "
                      "bad_signature=400, expired=99); latest: refused oem for uuid-last to "
                      "10.0.0.9 over tftp: address")
    assert a.counters.total("ignition_refused_total") == 501  # every one is counted


async def test_tftp_refusals_are_summed_up(tmp_path: Path,
                                           caplog_warn: pytest.LogCaptureFixture) -> None:
    from netboot.tftp import packet as pk
    from netboot.tftp.provider import RootResolver
    from netboot.tftp.server import start_tftp

    from .tftp_helpers import RawClient

    srv = await start_tftp(RootResolver([tmp_path]), "127.0.0.1", 0)
    client = RawClient()
    try:
        for i in range(20):
            await client.send(pk.encode_request(pk.RRQ, f"missing-{i}", "octet"),
                              ("127.0.0.1", srv.port))
            assert pk.opcode_of((await client.recv())[0]) == pk.ERROR
        await client.send(pk.encode_request(pk.RRQ, "../x", "octet"), ("127.0.0.1", srv.port))
        await client.recv()
        assert srv.refusals.pending == {"not_found": 19, "denied": 1}
    finally:
        client.close()
        await srv.close()  # says the rest
    got = lines(caplog_warn, "netboot.tftp")
    assert got == ["TFTP refused 1 request(s) since the last report (not_found=1); latest: "
                   "'missing-0' from 127.0.0.1 (not_found)",
                   "TFTP refused 20 request(s) since the last report (denied=1, not_found=19); "
                   "latest: '../x' from 127.0.0.1 (denied)"]


def test_dhcp_decisions_once_per_client_and_decision(store: object,
                                                     caplog_warn: pytest.LogCaptureFixture
                                                     ) -> None:
    from netboot.boot.booter import Booter
    from netboot.dhcp.proxy import ProxyDhcp

    from .test_dhcp_proxy import request

    clock = Clock()
    proxy = ProxyDhcp(Booter(store, "10.0.0.2", 8080), "10.0.0.2",  # type: ignore[arg-type]
                      clock=clock)
    for _ in range(5):  # a client retrying: one line
        proxy.handle(request(mac="52:54:00:00:00:77", uuid=None), 67, ("0.0.0.0", 68))
    clock.t += 61
    proxy.handle(request(mac="52:54:00:00:00:77", uuid=None), 67, ("0.0.0.0", 68))
    got = [m for m in lines(caplog_warn, "netboot.dhcp") if m.startswith("boot decision")]
    assert len(got) == 2 and "52:54:00:00:00:77" in got[0]
    assert proxy.counters.total("dhcp_log_suppressed_total") == 0


async def test_full_webhook_queue_is_one_line(caplog_warn: pytest.LogCaptureFixture) -> None:
    from netboot.config import WebhookSettings
    from netboot.webhooks import WebhookDispatcher

    from .test_webhooks import _node

    d = WebhookDispatcher([WebhookSettings(url="http://127.0.0.1:9/x")], queue_size=1)
    for _ in range(30):
        d.emit("installed", _node(state="installed"), source="t", time=0)
    d.dropped.flush()
    got = lines(caplog_warn, "netboot.webhooks")
    assert len(got) == 2, got
    assert got[1].startswith("webhook queue full: dropped 28 deliveries since the last "
                             "report (installed=28); latest: installed for ")
