"""U-Boot firmware (Debian's u-boot-qemu, qemu-x86 build) boots the amd64 demo OS
through netboot, with no hand-typed command.

U-Boot's autoboot takes the site DHCP's offer, asks its next-server (netboot) for
``boot.scr.uimg``; that script fetches ``uboot/<mac>.scr.uimg``, the node's own
script, which loads kernel and initrd over TFTP and runs ``zboot``. netboot's
ProxyDHCP stays silent towards U-Boot's DHCP (counted as ``u-boot``). U-Boot sends
no option 97, so the node is registered under the UUID made from its MAC.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from netboot.identity import node_uuid
from tests.e2e.conftest import LabEnv, lab_config, running_lab
from tests.e2e.test_uefi_http import metrics

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def lab_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabEnv]:
    """The site DHCP names netboot as next-server: U-Boot takes its boot server from
    the offer it binds, never from a ProxyDHCP offer."""
    root = tmp_path_factory.mktemp("ubootlab")
    with running_lab(root, lab_config(root), next_server=True) as env:
        yield env


def test_uboot_x86_boots_the_demo_os_by_mac(lab_env: LabEnv) -> None:
    mac = "52:54:00:0b:00:01"
    # the default profile is an iPXE one: U-Boot boots its kernel all the same
    lab_env.add_machine("uboot-x86", mac=mac, profile="default", hostname="uboot-x86")
    started = time.monotonic()
    guest = lab_env.lab.boot_guest("uboot", mac=mac, nic="e1000", nic_rom=False)
    console = lab_env.lab.wait_guest(guest, timeout=300)
    print(f"u-boot x86 guest: {time.monotonic() - started:.1f} s")
    assert "NETBOOT-TESTOS-DONE" in console, console[-4000:]
    assert f"fetching the boot script of {mac}" in console  # netboot's boot.scr.uimg
    assert "netboot: booting uboot-x86, profile default" in console  # the node's own
    assert "netboot.host=uboot-x86" in console and "NETBOOT-TESTOS callback ok" in console
    keyed = node_uuid(None, mac)
    node = lab_env.node_in(str(keyed), "installed", 15)
    assert mac in node["macs"], node
    states = [e["state"] for e in node["events"] if e.get("kind") == "state"]
    assert states[-3:] == ["booting", "deploying", "installed"], node["events"]
    m = metrics(lab_env)
    assert m.get('netboot_dhcp_ignored_total{reason="u-boot"}', 0) >= 1, \
        {k: v for k, v in m.items() if "dhcp" in k}
