"""Boot policy through the real HTTP app and registry: `boot: once` keeps sending an
installed machine to its disk on every later boot, and a profile whose kernel
arguments do not render refuses with the reason instead of an HTTP 500."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from netboot.config import ConfigStore
from netboot.storage.registry import Registry
from tests.nodes import patch, transition
from tests.served import serving

UUID = "5db34dac-6aee-4034-9d7c-0037a295993e"
MAC = "52:54:00:00:07:01"


@pytest.fixture
async def app_url(config_tree: Path) -> AsyncIterator[tuple[str, Registry, Path]]:
    profiles = config_tree.parent / "profiles"
    (profiles / "once.yaml").write_text("kernel: demo/vmlinuz\nboot: once\n"
                                        "cmdline: 'host={{ hostname }}'\n")
    (profiles / "broken.yaml").write_text("kernel: demo/vmlinuz\ncmdline: 'x={{ nosuchvar }}'\n")
    machines = config_tree.parent / "machines"
    (machines / "once.yaml").write_text(f'mac: "{MAC}"\nprofile: once\n')
    (machines / "broken.yaml").write_text('mac: "52:54:00:00:07:02"\nprofile: broken\n')
    assert ConfigStore(config_tree).problems == []  # an undefined variable is found rendering
    async with serving(config_tree) as served:
        yield served.url, served.registry, config_tree


async def _script(session: aiohttp.ClientSession, url: str, mac: str, uuid: str) -> str:
    async with session.get(f"{url}/ipxe/node", params={"uuid": uuid, "mac": mac}) as r:
        assert r.status == 200
        return await r.text()


async def test_boot_once_stays_on_local_disk_on_every_later_boot(app_url) -> None:
    url, registry, _ = app_url
    async with aiohttp.ClientSession() as s:
        first = await _script(s, url, MAC, UUID)
        assert first.splitlines()[1].startswith("kernel ")
        await transition(registry, UUID, "installed", source="test")
        for _ in range(3):  # each later power cycle: local disk, and still 'installed'
            again = await _script(s, url, MAC, UUID)
            assert "booting from local disk" in again and "kernel " not in again
            assert registry.get(UUID).state == "installed"
        assert registry.get(UUID).boot_count == 1
        await patch(registry, UUID, rearm=True)  # an admin re-arms: it installs again
        assert (await _script(s, url, MAC, UUID)).splitlines()[1].startswith("kernel ")


async def test_undefined_cmdline_variable_refuses_with_the_reason(app_url) -> None:
    url, registry, _ = app_url
    uuid = "11111111-0000-4000-8000-000000000002"
    async with aiohttp.ClientSession() as s:
        script = await _script(s, url, "52:54:00:00:07:02", uuid)
    assert "NOT BOOTING" in script and "'nosuchvar' is undefined" in script
    assert script.rstrip().endswith("exit 1")
    node = registry.get(uuid)
    assert node.state == "error" and "nosuchvar" in (node.reason or "")


async def test_placeholder_uuids_are_not_identities(app_url) -> None:
    """Boards that all report one placeholder UUID are keyed by their boot MAC: two
    machines, two nodes, and the same machine again is the same node."""
    url, registry, _ = app_url
    placeholder = "03000200-0400-0500-0006-000700080009"
    macs = ["52:54:00:00:09:01", "52:54:00:00:09:02"]
    async with aiohttp.ClientSession() as s:
        for mac in [*macs, macs[0]]:
            await _script(s, url, mac, placeholder)
        await _script(s, url, "52:54:00:00:09:03", "00000000-0000-0000-0000-000000000000")
    nodes = await registry.list()
    assert registry.get(placeholder) is None and len(nodes) == 3
    assert sorted(n.macs[0] for n in nodes) == [*macs, "52:54:00:00:09:03"]
    assert [n.boot_count for n in nodes if n.macs == [macs[0]]] == [2]
