"""Config models, file:line errors, last-good reload, and `netboot check`."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from netboot.boot import ipxe, pxelinux
from netboot.boot.booter import Booter
from netboot.boot.spec import BootSpec
from netboot.config import ConfigError, ConfigStore


def test_loads_profiles_and_machines(store: ConfigStore) -> None:
    snap = store.snapshot
    assert sorted(snap.profiles) == ["classic", "default"]
    assert snap.machines_by_mac["52:54:00:00:00:01"].hostname == "n1"  # MAC normalised
    assert snap.machines_by_uuid["11111111-2222-3333-4444-555555555555"].hostname == "n2"
    assert store.problems == []
    assert store.server.images_dir == store.config_path.parent / "images"


def test_error_names_file_line_and_field(config_tree: Path) -> None:
    bad = config_tree.parent / "profiles" / "bad.yaml"
    bad.write_text("kernel: demo/vmlinuz\ninitrds: [a]\nloader: syslinux\n")
    store = ConfigStore(config_tree)
    [problem] = store.problems
    assert problem.startswith(f"{bad}:3: loader:"), problem
    assert "bad" not in store.snapshot.profiles


def test_yaml_syntax_error_has_line(config_tree: Path) -> None:
    bad = config_tree.parent / "machines" / "broken.yaml"
    bad.write_text('mac: "52:54:00:00:00:09"\nhostname: [unclosed\nprofile: default\n')
    store = ConfigStore(config_tree)
    [problem] = store.problems
    assert problem.startswith(f"{bad}:") and "YAML syntax" in problem


@pytest.mark.parametrize("body,field", [
    ('mac: "not-a-mac"\n', "mac"),
    ('uuid: "xyz"\n', "uuid"),
    ('hostname: x\n', "(top level)"),  # neither mac nor uuid
    ('mac: "52:54:00:00:00:08"\nprofle: default\n', "profle"),  # typo: unknown key
])
def test_machine_errors(config_tree: Path, body: str, field: str) -> None:
    path = config_tree.parent / "machines" / "m.yaml"
    path.write_text(body)
    problems = ConfigStore(config_tree).problems
    assert len(problems) == 1 and f": {field}:" in problems[0], problems


def test_unknown_profile_and_duplicate_mac(config_tree: Path) -> None:
    machines = config_tree.parent / "machines"
    (machines / "x.yaml").write_text('mac: "52:54:00:00:00:05"\nprofile: nope\n')
    (machines / "y.yaml").write_text('mac: "52:54:00:00:00:01"\n')  # n1's MAC
    problems = ConfigStore(config_tree).problems
    assert any("x.yaml:1: profile: no profile named 'nope'" in p for p in problems)
    assert any("y.yaml:1: mac/uuid: 52:54:00:00:00:01 already belongs to" in p
               for p in problems)


def test_bad_template_is_refused(config_tree: Path) -> None:
    p = config_tree.parent / "profiles" / "t.yaml"
    p.write_text('kernel: k\ncmdline: "a={{ unclosed"\n')
    [problem] = ConfigStore(config_tree).problems
    assert ":2: cmdline:" in problem and "template syntax" in problem


def test_broken_edit_keeps_last_good_version(store: ConfigStore) -> None:
    path = store.server.machines_dir / "n1.yaml"
    path.write_text('mac: "52:54:00:00:00:01"\nprofile: classic\nhostname: n1-renamed\n')
    store.reload()
    assert store.snapshot.machines_by_mac["52:54:00:00:00:01"].hostname == "n1-renamed"
    path.write_text('mac: "52:54:00:00:00:01"\nprofile: classic\nhostname: [broken\n')
    store.reload()
    assert store.snapshot.machines_by_mac["52:54:00:00:00:01"].hostname == "n1-renamed"
    assert any(str(path) in p for p in store.problems)
    path.write_text('mac: "52:54:00:00:00:01"\nprofile: classic\nhostname: fixed\n')
    store.reload()
    assert store.snapshot.machines_by_mac["52:54:00:00:00:01"].hostname == "fixed"
    assert store.problems == []


def test_deleted_file_stops_serving(store: ConfigStore) -> None:
    (store.server.machines_dir / "n1.yaml").unlink()
    store.reload()
    assert "52:54:00:00:00:01" not in store.snapshot.machines_by_mac


async def _loaded(store: ConfigStore, mac: str) -> bool:
    """Wait up to 5 s for the watcher to serve a machine file for ``mac``."""
    for _ in range(100):
        if mac in store.snapshot.machines_by_mac:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_watcher_applies_an_edit_without_restart(store: ConfigStore) -> None:
    booter = Booter(store, "10.0.0.2", 8080)
    watcher = asyncio.create_task(store.watch())
    try:
        await asyncio.sleep(0.3)
        (store.server.machines_dir / "new.yaml").write_text(
            'mac: "52:54:00:00:00:42"\nprofile: classic\nhostname: new\n')
        await _loaded(store, "52:54:00:00:00:42")
        assert booter.resolve("52:54:00:00:00:42", None).profile.name == "classic"
    finally:
        watcher.cancel()


async def test_watcher_loads_a_file_written_before_its_watch_was_set_up(
        store: ConfigStore) -> None:
    # the race CI hit: serve says it is listening, a machine file appears, and the
    # watcher's thread has not set up its inotify watch yet, so no event comes
    armed = asyncio.Event()
    watcher = asyncio.create_task(store.watch(armed))
    try:
        (store.server.machines_dir / "early.yaml").write_text(
            'mac: "52:54:00:00:00:43"\nprofile: classic\nhostname: early\n')
        await asyncio.wait_for(armed.wait(), 10)
        assert store.snapshot.machines_by_mac["52:54:00:00:00:43"].hostname == "early"
        # and once armed, an edit is seen by inotify, as before
        (store.server.machines_dir / "late.yaml").write_text(
            'mac: "52:54:00:00:00:44"\nprofile: classic\nhostname: late\n')
        assert await _loaded(store, "52:54:00:00:00:44")
    finally:
        watcher.cancel()


def test_server_config_error_is_fatal_with_line(tmp_path: Path) -> None:
    cfg = tmp_path / "netboot.yaml"
    cfg.write_text("http_port: 8080\ndhcp:\n  port: seventy\n")
    with pytest.raises(ConfigError) as exc:
        ConfigStore(cfg)
    assert f"{cfg}:3: dhcp.port:" in str(exc.value)


def test_event_retention_settings(tmp_path: Path) -> None:
    from netboot.server import event_retention

    cfg = tmp_path / "netboot.yaml"
    cfg.write_text("http_port: 8080\n")
    kept = event_retention(ConfigStore(cfg).server)
    assert (kept.max_age, kept.max_rows, kept.every) == (30 * 86400, 1_000_000, 60)
    cfg.write_text("registry:\n  events_max_age: 86400\n  events_max_rows: 5000\n")
    kept = event_retention(ConfigStore(cfg).server)
    assert (kept.max_age, kept.max_rows) == (86400, 5000)
    cfg.write_text("registry:\n  events_max_rows: 10\n")
    with pytest.raises(ConfigError) as exc:
        ConfigStore(cfg)
    assert f"{cfg}:2: registry.events_max_rows:" in str(exc.value)


def test_booter_scripts(store: ConfigStore) -> None:
    booter = Booter(store, "10.0.0.2", 8080)
    decision = booter.decide("52:54:00:99:99:99", "11111111-2222-3333-4444-555555555555")
    assert isinstance(decision, BootSpec) and decision.hostname == "n2"
    lines = ipxe.render(decision, booter.base_url).splitlines()
    assert lines[0] == "#!ipxe"
    assert lines[1] == ("kernel http://10.0.0.2:8080/images/demo/vmlinuz initrd=initrd.cpio.gz "
                        "initrd=oem.cpio.gz console=ttyS0 host=n2 rack=7 "
                        "cb=http://10.0.0.2:8080")
    assert lines[2:] == ["initrd http://10.0.0.2:8080/images/demo/initrd.cpio.gz",
                         "initrd http://10.0.0.2:8080/images/extra/oem.cpio.gz", "boot"]
    cfg = pxelinux.render(booter.decide("52:54:00:00:00:01", None, "pxelinux"))
    assert cfg is not None and "KERNEL images/demo/vmlinuz" in cfg
    assert "APPEND console=ttyS0 host=n1" in cfg
    # an ipxe profile: no pxelinux config
    assert pxelinux.render(booter.decide("52:54:00:99:99:99", None, "pxelinux")) is None


def _check(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "netboot", "check", "--config", str(config)],
                          capture_output=True, text=True)


def test_check_command(config_tree: Path) -> None:
    images = config_tree.parent / "images"
    for f in ("demo/vmlinuz", "demo/initrd.cpio.gz", "extra/oem.cpio.gz"):
        (images / f).parent.mkdir(parents=True, exist_ok=True)
        (images / f).write_bytes(b"x")
    ok = _check(config_tree)
    assert ok.returncode == 0, ok.stderr
    assert "2 profile(s), 3 machine(s)" in ok.stdout
    (config_tree.parent / "profiles" / "bad.yaml").write_text("kernel: k\nboot: twice\n")
    bad = _check(config_tree)
    assert bad.returncode == 1
    assert "bad.yaml:2: boot:" in bad.stderr
    (config_tree.parent / "profiles" / "bad.yaml").write_text("kernel: k\n")
    missing = _check(config_tree)
    assert missing.returncode == 1
    assert "profile bad: missing from" in missing.stderr and ": k;" in missing.stderr


def test_check_warns_when_ipmi_bmcs_have_no_ipmitool(config_tree: Path, tmp_path: Path) -> None:
    images = config_tree.parent / "images"
    for f in ("demo/vmlinuz", "demo/initrd.cpio.gz", "extra/oem.cpio.gz"):
        (images / f).parent.mkdir(parents=True, exist_ok=True)
        (images / f).write_bytes(b"x")
    (config_tree.parent / "machines" / "b1.yaml").write_text(
        'mac: "52:54:00:00:00:b1"\nbmc: {address: 10.9.0.1, username: u, password: p}\n')
    empty = tmp_path / "empty-path"
    empty.mkdir()
    without = subprocess.run([sys.executable, "-m", "netboot", "check", "--config",
                              str(config_tree)], capture_output=True, text=True,
                             env={**os.environ, "PATH": str(empty)})
    assert without.returncode == 0, without.stderr  # a warning, not a problem
    assert "b1.yaml use the ipmi driver, but ipmitool is not installed" in without.stderr
    assert "apt-get install ipmitool" in without.stderr
    if shutil.which("ipmitool"):
        assert "ipmitool" not in _check(config_tree).stderr


def test_bundled_config_is_valid() -> None:
    repo = Path(__file__).resolve().parents[1]
    store = ConfigStore(repo / "configs" / "netboot.yaml")
    assert store.problems == []
    assert "default" in store.snapshot.profiles
