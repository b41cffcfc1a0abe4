"""limits.new_nodes: token buckets with a hand-driven clock, the limiter, and the
lifecycle and HTTP paths that create nodes, against a real registry and server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from netboot.boot import ipxe
from netboot.boot.lifecycle import Lifecycle
from netboot.boot.newnodes import RETRY_MAX, RETRY_MIN, NewNodeLimiter, Source, retry_after
from netboot.boot.sightings import Sightings
from netboot.boot.spec import BootSpec, Client, Offer, Refusal
from netboot.config import Bucket, NewNodeLimits, ServerConfig
from netboot.metrics import Counters
from netboot.storage.registry import Registry
from netboot.tftp.packet import ERR_NOT_FOUND
from netboot.tftp.provider import TftpError
from netboot.util.tokenbucket import Buckets, TokenBucket
from tests.nodes import Clock
from tests.served import serving, write_config

ADDR = "10.0.0.66"
RELAY = bytes((10, 9, 0, 1))  # a giaddr


def _uuid(i: int) -> str:
    return f"00000000-0000-4000-8000-{i:012x}"


def _limits(source: tuple[float, int] = (1.0, 3), segment: tuple[float, int] = (1.0, 5),
            total: tuple[float, int] = (1.0, 8), sources: int = 100) -> NewNodeLimits:
    return NewNodeLimits(per_source=Bucket(rate=source[0], burst=source[1]),
                         per_segment=Bucket(rate=segment[0], burst=segment[1]),
                         total=Bucket(rate=total[0], burst=total[1]), sources=sources)


# -- the bucket -------------------------------------------------------------------------

def test_a_bucket_gives_its_burst_then_its_rate() -> None:
    b = TokenBucket(2.0, 3, stamp=100.0)
    assert [b.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert b.wait(100.0) == pytest.approx(0.5)
    assert not b.take(100.4)
    assert b.take(100.5) and not b.take(100.5)
    assert b.refill(1000.0) == 3  # never more than the burst
    assert b.wait(1000.0) == 0


def test_a_bucket_clock_stepping_back_refills_nothing() -> None:
    b = TokenBucket(1.0, 1, stamp=50.0)
    assert b.take(50.0)
    assert not b.take(10.0)  # stepped back: nothing
    assert not b.take(10.5)  # counted from the step, not from 50
    assert b.take(11.0)


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (1, 0)])
def test_bad_buckets_are_refused(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)
    with pytest.raises(ValueError):
        Buckets(rate, burst, 10)


def test_the_table_of_buckets_is_bounded_and_forgets_the_oldest() -> None:
    clock = Clock(0.0)
    table = Buckets(0.001, 1, 3, clock=clock)
    for key in ("a", "b", "c"):
        assert table.bucket(key).take(clock())
    assert not table.bucket("a").take(clock())  # used: "a" is now the newest
    table.bucket("d")
    assert len(table) == 3
    assert not table.bucket("a").take(clock())  # kept
    assert table.bucket("b").take(clock())  # forgotten ("b" was the oldest): full again


# -- the limiter ------------------------------------------------------------------------

def test_one_source_gets_its_burst_then_its_rate_and_others_are_not_hurt() -> None:
    clock, counters = Clock(0.0), Counters()
    lim = NewNodeLimiter(_limits(source=(0.5, 3)), counters, clock=clock)
    me, other = Source.address("10.0.0.5"), Source.address("10.0.0.6")
    assert [lim.take(me, "ipxe", _uuid(i)) for i in range(3)] == [None] * 3
    assert lim.take(me, "ipxe", _uuid(3)) == pytest.approx(2.0)  # 1 token at 0.5/s
    assert lim.check(me, "ipxe", _uuid(3)) == pytest.approx(2.0)
    assert lim.take(other, "ipxe", _uuid(4)) is None
    clock.t += 2
    assert lim.check(me, "ipxe", _uuid(5)) is None  # check takes nothing...
    assert lim.take(me, "ipxe", _uuid(5)) is None  # ...so the take after it succeeds
    assert lim.take(me, "ipxe", _uuid(6)) is not None
    assert counters.get("new_nodes_refused_total", path="ipxe", limit="source") == 3


def test_a_flooding_source_does_not_drain_the_total() -> None:
    clock, counters = Clock(0.0), Counters()
    lim = NewNodeLimiter(_limits(source=(0.001, 3), total=(0.001, 5)), counters, clock=clock)
    flood = Source.address("10.0.0.66")
    admitted = sum(lim.take(flood, "ipxe", _uuid(i)) is None for i in range(10_000))
    assert admitted == 3
    # the total keeps what the flood could not take: two more machines elsewhere
    assert [lim.take(Source.address(f"10.0.1.{i}"), "ipxe", None) is None
            for i in range(3)] == [True, True, False]
    assert counters.get("new_nodes_refused_total", path="ipxe", limit="source") == 9_997
    assert counters.get("new_nodes_refused_total", path="ipxe", limit="total") == 1


def test_a_dhcp_segment_has_its_own_larger_bucket() -> None:
    clock = Clock(0.0)
    lim = NewNodeLimiter(_limits(source=(0.001, 1), segment=(0.001, 4), total=(1, 100)),
                         Counters(), clock=clock)
    relay = Source.dhcp(bytes((10, 9, 0, 1)), None)
    assert sum(lim.take(relay, "dhcp", None) is None for _ in range(10)) == 4
    # the same text as an address is another source, another kind of bucket
    assert lim.take(Source.address(relay.key), "ipxe", None) is None
    assert lim.take(Source.dhcp(bytes(4), None), "dhcp", None) is None  # this link


def test_the_per_source_table_is_bounded() -> None:
    lim = NewNodeLimiter(_limits(sources=50), Counters(), clock=Clock(0.0))
    for i in range(1000):
        lim.check(Source.address(f"10.1.{i // 256}.{i % 256}"), "ipxe", None)
    assert len(lim._sources) == 50


def test_refusals_are_one_log_line_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock(0.0)
    lim = NewNodeLimiter(_limits(source=(0.001, 1)), Counters(), clock=clock)
    flood = Source.address(ADDR)
    with caplog.at_level(logging.WARNING, logger="netboot.lifecycle"):
        for i in range(5000):
            lim.take(flood, "ipxe", _uuid(i))
            clock.t += 0.01  # 50 s
        lines = [r for r in caplog.records if "limits.new_nodes" in r.getMessage()]
        assert len(lines) == 1 and "refused 1 new node(s)" in lines[0].getMessage()
        clock.t += 11
        lim.take(flood, "ipxe", _uuid(9999))
        lines = [r.getMessage() for r in caplog.records if "limits.new_nodes" in r.getMessage()]
    assert len(lines) == 2
    assert "refused 4999 new node(s)" in lines[1] and f"{_uuid(9999)} from {ADDR}" in lines[1]


def test_retry_is_bounded() -> None:
    assert retry_after(0.01) == RETRY_MIN
    assert retry_after(7.2) == 8
    assert retry_after(1e9) == RETRY_MAX


def test_the_defaults_take_a_rack_at_once() -> None:
    d = ServerConfig().limits.new_nodes
    assert d.total.burst >= 500 and d.per_segment.burst >= 500  # a rack behind one relay
    assert d.per_source.burst < 100 and d.per_source.rate <= 1  # one address is one machine


# -- the lifecycle: where nodes are created ---------------------------------------------

@pytest.fixture
async def life(tmp_path: Path) -> AsyncIterator[tuple[Lifecycle, Registry, Clock]]:
    clock = Clock(0.0)
    reg = await Registry.open(tmp_path, secret=b"s", clock=clock)
    counters = Counters()
    lim = NewNodeLimiter(_limits(source=(0.01, 3), segment=(0.01, 4), total=(0.01, 100)),
                         counters, clock=clock)
    lc = Lifecycle(reg, Sightings(), counters, clock=clock, limiter=lim)
    try:
        yield lc, reg, clock
    finally:
        await lc.drain()
        await reg.close()


def _spec(uuid: str) -> BootSpec:
    return BootSpec(uuid, None, "default", "n", "demo/vmlinuz", (), "quiet")


async def test_new_nodes_from_one_address_are_refused_past_the_limit_known_ones_never(
        life: tuple[Lifecycle, Registry, Clock]) -> None:
    lc, reg, clock = life
    served = 0
    for i in range(20):
        refusal = lc.admit(_uuid(i), None, ADDR, "ipxe")
        decision = refusal or _spec(_uuid(i))
        lc.served(decision, ADDR, "ipxe")
        served += refusal is None
        if refusal is not None:
            assert refusal.retry == RETRY_MAX and not refusal.failed  # 100 s to a token
    assert served == 3 and len(await reg.list()) == 3
    for _ in range(5):  # the known ones boot again, from the same exhausted address
        for i in range(3):
            assert lc.admit(_uuid(i), None, ADDR, "ipxe") is None
            lc.served(_spec(_uuid(i)), ADDR, "ipxe")
    assert reg.get(_uuid(0)).boot_count == 6 and len(await reg.list()) == 3
    assert lc.counters.get("new_nodes_refused_total", path="ipxe", limit="source") == 17
    clock.t += 100  # one token back
    assert lc.admit(_uuid(50), None, ADDR, "ipxe") is None


async def test_served_without_admit_still_creates_no_node_past_the_limit(
        life: tuple[Lifecycle, Registry, Clock]) -> None:
    lc, reg, _ = life
    for i in range(10):
        lc.served(_spec(_uuid(i)), ADDR, "tftp")
        lc.served(Refusal(_uuid(100 + i), None, "broken", failed=True), ADDR, "tftp")
    assert len(await reg.list()) == 3
    assert lc.counters.get("new_nodes_refused_total", path="tftp", limit="source") == 17


async def test_dhcp_over_the_limit_is_offered_but_not_recorded(
        life: tuple[Lifecycle, Registry, Clock]) -> None:
    lc, reg, _ = life
    offer = Offer("undionly.kpxe", profile="default")
    for i in range(10):
        for _ in range(3):  # repeated DISCOVERs: one token, once recorded
            lc.offered(Client(f"52:54:00:00:02:{i:02x}", _uuid(i), giaddr=RELAY), offer)
    for i in range(10, 13):  # another circuit of the same relay: its own segment
        lc.offered(Client(f"52:54:00:00:02:{i:02x}", _uuid(i), giaddr=RELAY,
                          agent=b"\x01\x02p7"), offer)
    await lc.drain()
    assert len(await reg.list()) == 4 + 3
    assert lc.sightings.uuid_for_mac("52:54:00:00:02:09") == _uuid(9)  # still sighted
    # 6 machines over the limit, each of their 3 DISCOVERs refused
    assert lc.counters.get("new_nodes_refused_total", path="dhcp", limit="segment") == 18
    # the machine DHCP did not record is taken on when it asks for its script
    assert lc.admit(_uuid(9), None, "10.9.0.109", "ipxe") is None
    lc.served(_spec(_uuid(9)), "10.9.0.109", "ipxe")
    assert reg.get(_uuid(9)).state == "booting"


# -- over HTTP, from a real server ------------------------------------------------------

async def test_boot_scripts_over_the_limit_ask_again_later(tmp_path: Path) -> None:
    config = write_config(tmp_path / "cfg", tmp_path / "data", {
        "default": {"kernel": "demo/vmlinuz", "cmdline": "quiet"}},
        default_profile="default", limits={"new_nodes": {
            "per_source": {"rate": 0.001, "burst": 2}, "total": {"rate": 0.001, "burst": 50}}})
    async with serving(config) as srv, aiohttp.ClientSession() as s:
        async def script(i: int) -> str:
            async with s.get(f"{srv.url}/ipxe/node", params={"uuid": _uuid(i)}) as r:
                assert r.status == 200
                return await r.text()

        texts = await asyncio.gather(*(script(i) for i in range(30)))
        booted = [t for t in texts if "\nkernel " in t]
        assert len(booted) == 2 and len(await srv.registry.list()) == 2
        retry = next(t for t in texts if "\nkernel " not in t)
        assert retry == ipxe.retry_script(
            Refusal(None, None, "too many new machines at once; asking again in 60 s",
                    retry=60), srv.booter.base_url)
        assert "sleep 60\nchain --replace --autofree " + srv.booter.base_url + \
            "/ipxe/node?uuid=${uuid}&mac=${netX/mac}&" in retry
        known = [i for i, t in enumerate(texts) if "\nkernel " in t]
        for i in known:  # never limited
            assert "\nkernel " in await script(i)
        async with s.get(f"{srv.url}/metrics") as r:
            metrics = await r.text()
    assert 'netboot_new_nodes_refused_total{limit="source",path="ipxe"} 28' in metrics


async def test_pxelinux_configs_over_the_limit_are_not_found(tmp_path: Path) -> None:
    config = write_config(tmp_path / "cfg", tmp_path / "data", {
        "classic": {"kernel": "demo/vmlinuz", "loader": "pxelinux", "cmdline": "quiet"}},
        default_profile="classic", limits={"new_nodes": {
            "per_source": {"rate": 0.001, "burst": 2}}})
    async with serving(config) as srv:
        router, counters = srv.services.tftp, srv.counters
        found = 0
        for i in range(5):
            mac = f"52:54:00:00:03:{i:02x}"
            srv.lifecycle.sightings.dhcp(mac, _uuid(i))  # DHCP told it the UUID
            try:
                router(f"pxelinux.cfg/01-{mac.replace(':', '-')}", (ADDR, 2000))
                found += 1
            except TftpError as exc:
                assert exc.code == ERR_NOT_FOUND
        assert found == 2 and len(await srv.registry.list()) == 2
        assert counters.get("new_nodes_refused_total", path="tftp", limit="source") == 3
        # a known node's config is always there
        router("pxelinux.cfg/01-52-54-00-00-03-00", (ADDR, 2000))


async def test_refusals_not_yet_logged_are_said_at_shutdown(
        life: tuple[Lifecycle, Registry, Clock], caplog: pytest.LogCaptureFixture) -> None:
    lc, _, _ = life
    with caplog.at_level(logging.WARNING, logger="netboot.lifecycle"):
        for i in range(50):
            lc.served(lc.admit(_uuid(i), None, ADDR, "ipxe") or _spec(_uuid(i)), ADDR, "ipxe")
        await lc.drain()
    lines = [r.getMessage() for r in caplog.records if "limits.new_nodes" in r.getMessage()]
    assert len(lines) == 2 and "refused 46 new node(s)" in lines[1], lines


def test_dhcp_leaves_half_the_total_for_boot_scripts() -> None:
    """Forged giaddrs make new segments, each with a full bucket: only the total holds
    them, and DHCP may not take its last half."""
    clock = Clock(0.0)
    lim = NewNodeLimiter(_limits(segment=(0.001, 500), total=(0.001, 10)), Counters(),
                         clock=clock)
    forged = [Source.dhcp(bytes((10, 66, i // 256, i % 256)), None) for i in range(1000)]
    assert sum(lim.take(s, "dhcp", None) is None for s in forged) == 5
    scripts = [Source.address(f"10.0.2.{i}") for i in range(10)]
    assert sum(lim.take(s, "ipxe", None) is None for s in scripts) == 5
