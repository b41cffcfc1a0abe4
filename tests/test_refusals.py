"""Knowing the firmware refused its loader: boot/refusals.py with an injected clock, the
lifecycle that moves the node, and ProxyDHCP's join of a REQUEST's address to its MAC."""

from __future__ import annotations

from pathlib import Path

import pytest

from netboot.boot import lifecycle as lifecycle_mod
from netboot.boot.booter import Booter
from netboot.boot.lifecycle import REFUSED_REASON
from netboot.boot.refusals import LoaderWatch
from netboot.boot.spec import BootSpec, Client, Offer
from netboot.config import ConfigStore
from netboot.dhcp.proxy import ProxyDhcp
from netboot.identity import Arch
from netboot.loaders import LoaderTable
from netboot.metrics import Counters
from netboot.tftp.router import TftpRouter
from tests.nodes import Clock, observe
from tests.test_dhcp_proxy import MAC, UUID, request
from tests.test_lifecycle import World, world  # noqa: F401  (world: a fixture)

ADDR = "10.77.0.10"
UEFI_PXE = Client(MAC, UUID, Arch.UEFI_X64)
UEFI_HTTP = Client(MAC, UUID, Arch.UEFI_X64, http_boot=True)
IPXE = Client(MAC, UUID, Arch.UEFI_X64, ipxe=True)
BIOS = Client(MAC, UUID, Arch.BIOS)


# -- the watch alone ------------------------------------------------------------------
Step = tuple[str, object]
SCENARIOS: dict[str, list[Step]] = {
    # within the window, and settled: the firmware's next retry is not a second refusal
    "refused-in-window": [("sent", "ipxe.efi"), ("wait", 59), ("attempt", UEFI_HTTP, True),
                          ("attempt", UEFI_HTTP, False)],
    "none-after-the-window": [("sent", "ipxe.efi"), ("wait", 61),
                              ("attempt", UEFI_PXE, False)],
    # a normal chain: iPXE (user class iPXE) DHCPs at once; a fast reboot is not judged
    "ipxe-re-dhcp-is-no-refusal": [("sent", "ipxe.efi"), ("wait", 2), ("attempt", IPXE, False),
                                   ("wait", 5), ("attempt", UEFI_PXE, False)],
    "bios-is-never-judged": [("sent", "undionly.kpxe"), ("wait", 1), ("attempt", BIOS, False)],
    # shim fetched by the firmware, then grubx64.efi by shim: shim runs
    "second-loader-shows-the-first-runs": [("sent", "shimx64.efi"), ("sent", "grubx64.efi"),
                                           ("wait", 3), ("attempt", UEFI_PXE, False)],
    "same-loader-again-restarts-the-window": [("sent", "ipxe.efi"), ("wait", 50),
                                              ("sent", "ipxe.efi"), ("wait", 50),
                                              ("attempt", UEFI_HTTP, True)],
    "ran-forgets-the-download": [("sent", "ipxe.efi"), ("ran", None),
                                 ("attempt", UEFI_PXE, False)],
}


@pytest.mark.parametrize("steps", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_watch(steps: list[Step]) -> None:
    clock = Clock()
    w = LoaderWatch(60, clock=clock)
    for i, step in enumerate(steps):
        if step[0] == "sent":
            w.sent(MAC, str(step[1]), "tftp")
        elif step[0] == "wait":
            clock.t += float(step[1])  # type: ignore[arg-type]
        elif step[0] == "ran":
            w.ran(MAC)
        else:
            client, refused = step[1], step[2]  # type: ignore[misc]
            got = w.attempt(client)  # type: ignore[arg-type]
            assert (got is not None) is refused, (i, step)
            if got is not None:
                assert got.transport == "tftp" and got.name == steps[0][1]
                assert 0 < got.waited <= 60
    assert len(w) == 0  # every scenario ends settled


def test_memory_is_bounded() -> None:
    w = LoaderWatch(60, limit=100, clock=Clock())
    for i in range(10_000):
        w.sent(f"52:54:00:00:{i // 256:02x}:{i % 256:02x}", "ipxe.efi", "tftp")
    assert len(w) == 100
    newest = Client("52:54:00:00:27:0f", None, Arch.UEFI_X64)  # i = 9999
    oldest = Client("52:54:00:00:00:00", None, Arch.UEFI_X64)
    assert w.attempt(newest) is not None and w.attempt(oldest) is None


# -- the lifecycle moves the node ---------------------------------------------------------
@pytest.fixture
async def w(world: World) -> World:  # noqa: F811
    """test_lifecycle's world, its watch on the test's clock, the node first seen by DHCP."""
    world.lifecycle.loaders = LoaderWatch(60, clock=world.clock)
    await observe(world.registry, UUID, mac=MAC, source="dhcp")
    return world


OFFER = Offer("ipxe.efi", profile="default")


async def test_download_then_a_fresh_attempt_puts_the_node_in_error(w: World) -> None:
    life = w.lifecycle
    life.offered(UEFI_PXE, OFFER)
    life.leased(MAC, ADDR)
    life.loader_sent(ADDR, "ipxe.efi", "tftp")
    w.clock.t += 20  # PXEv6 times out, then HTTP Boot
    life.offered(UEFI_HTTP, Offer("http://x/loader/ipxe.efi", http=True, profile="default"))
    node = w.registry.get(UUID)
    assert node is not None and node.state == "error" and node.reason == REFUSED_REASON
    assert w.events[-1].kind == "error" and w.events[-1].source == "dhcp"
    assert w.counters.get("loader_refused_total", transport="tftp") == 1
    events = await w.registry.events(UUID)
    assert events[-1]["state"] == "error" and events[-1]["detail"] == REFUSED_REASON


async def test_a_rack_refused_at_once_is_a_few_log_lines(
        w: World, caplog: pytest.LogCaptureFixture) -> None:
    life = w.lifecycle
    caplog.set_level("WARNING", logger="netboot.lifecycle")
    for i in range(200):
        mac, addr = f"52:54:00:00:01:{i:02x}", f"10.77.1.{i}"
        life.leased(mac, addr)
        life.loader_sent(addr, "ipxe.efi", "tftp")
        life.offered(Client(mac, f"00000000-0000-0000-0000-{i:012x}", Arch.UEFI_X64,
                            http_boot=True), OFFER)
    assert w.counters.get("loader_refused_total", transport="tftp") == 200
    lines = [r for r in caplog.records if r.name == "netboot.lifecycle"]
    assert len(lines) == lifecycle_mod.REFUSAL_LOG_BURST
    await w.lifecycle.drain()  # the rest in one summary
    last = [r for r in caplog.records if r.name == "netboot.lifecycle"][-1].getMessage()
    assert last.startswith("180 more firmware refusal(s) not logged"), last


async def test_a_normal_ipxe_chain_stays_discovered(w: World) -> None:
    life = w.lifecycle
    life.offered(UEFI_PXE, OFFER)
    life.leased(MAC, ADDR)
    life.loader_sent(ADDR, "ipxe.efi", "tftp")
    w.clock.t += 1
    life.offered(IPXE, Offer("http://x/boot.ipxe", http=True, profile="default"))
    life.served(BootSpec(UUID, MAC, "default", "n1", "k", (), ""), ADDR, "ipxe")
    w.clock.t += 30
    life.offered(UEFI_PXE, OFFER)  # the machine rebooted (fast): not judged
    node = w.registry.get(UUID)
    assert node is not None and node.state == "booting", node
    assert w.counters.total("loader_refused_total") == 0


async def test_a_script_asked_from_the_address_shows_the_loader_runs(w: World) -> None:
    """A loader that DHCPs unseen (or not at all) but asks for its script from the
    address its firmware leased: it runs."""
    life = w.lifecycle
    life.leased(MAC, ADDR)
    life.loader_sent(ADDR, "ipxe.efi", "http")
    life.served(BootSpec(UUID, None, "default", "n1", "k", (), ""), ADDR, "ipxe")
    w.clock.t += 5
    life.offered(UEFI_HTTP, OFFER)
    assert w.registry.get(UUID).state == "booting"  # type: ignore[union-attr]


async def test_a_download_from_an_address_no_request_named_is_not_judged(w: World) -> None:
    life = w.lifecycle
    life.loader_sent(ADDR, "ipxe.efi", "tftp")
    w.clock.t += 5
    life.offered(UEFI_HTTP, OFFER)
    assert w.registry.get(UUID).state == "discovered"  # type: ignore[union-attr]
    assert w.counters.get("loader_downloads_unmatched_total") == 1


async def test_late_attempt_is_not_a_refusal(w: World) -> None:
    life = w.lifecycle
    life.leased(MAC, ADDR)
    life.loader_sent(ADDR, "ipxe.efi", "tftp")
    w.clock.t += 61
    life.offered(UEFI_HTTP, OFFER)
    assert w.registry.get(UUID).state == "discovered"  # type: ignore[union-attr]


# -- ProxyDHCP: the REQUEST to the site's server names the address ------------------------
def test_a_boot_clients_request_to_the_site_server_is_joined_not_answered(
        store: ConfigStore) -> None:
    seen: list[tuple[str, str]] = []
    proxy = ProxyDhcp(Booter(store, "10.0.0.2", 8080), "10.0.0.2", Counters(),
                      leased=lambda mac, addr: seen.append((mac, addr)))
    data = request("request", arch=7, vendor=b"HTTPClient:Arch:00016:UNDI:003000",
                   requested="10.0.0.50")
    assert proxy.handle(data, 67, ("0.0.0.0", 68)) is None
    assert seen == [(MAC, "10.0.0.50")]
    renewing = request("request", arch=7, ciaddr="10.0.0.51")
    assert proxy.handle(renewing, 67, ("10.0.0.51", 68)) is None
    assert seen[-1] == (MAC, "10.0.0.51")
    other = request("request", vendor=b"MSFT 5.0", requested="10.0.0.52")
    assert proxy.handle(other, 67, ("0.0.0.0", 68)) is None
    assert len(seen) == 2  # not a boot client: nothing joined
    assert proxy.counters.get("dhcp_ignored_total", reason="message-type") == 3


def test_proxy_reports_offers_and_requests_in_order(store: ConfigStore) -> None:
    """The wiring the lifecycle relies on: an offer to the firmware, its REQUEST."""
    calls: list[str] = []
    proxy = ProxyDhcp(Booter(store, "10.0.0.2", 8080), "10.0.0.2", Counters(),
                      report=lambda c, o: calls.append(f"offer {o.filename}"),
                      leased=lambda m, a: calls.append(f"lease {a}"))
    proxy.handle(request(arch=7, vendor=b"PXEClient:Arch:00007:UNDI:003000"), 67,
                 ("0.0.0.0", 68))
    proxy.handle(request("request", arch=7, vendor=b"PXEClient:Arch:00007:UNDI:003000",
                         requested="10.0.0.50"), 67, ("0.0.0.0", 68))
    assert calls == ["offer ipxe.efi", "lease 10.0.0.50"]



# -- TFTP: a loader transfer that completed is a download; others are not -----------------
class _Reports:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str, str]] = []

    def loader_sent(self, address: str, name: str, transport: str) -> None:
        self.sent.append((address, name, transport))


def test_tftp_reports_completed_loader_transfers_only(tmp_path: Path) -> None:
    (tmp_path / "ipxe.efi").write_bytes(b"MZ")
    reports = _Reports()
    router = TftpRouter(None, reports, Counters(), None, LoaderTable([tmp_path]))  # type: ignore[arg-type]
    router.transferred("ipxe.efi", (ADDR, 1234), False)  # timed out: not a download
    router.transferred("images/demo/vmlinuz", (ADDR, 1234), True)  # not a loader
    router.transferred("ipxe.efi", (ADDR, 1234), True)
    assert reports.sent == [(ADDR, "ipxe.efi", "tftp")]
