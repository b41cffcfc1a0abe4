"""Shared fixtures: a config tree on disk built per test."""

from __future__ import annotations

from pathlib import Path

import pytest

from netboot.config import ConfigStore

PROFILE_IPXE = """\
kernel: demo/vmlinuz
initrds: [demo/initrd.cpio.gz, extra/oem.cpio.gz]
cmdline: "console=ttyS0 host={{ hostname }} rack={{ rack | default('none') }} cb={{ base_url }}"
"""

PROFILE_PXELINUX = """\
loader: pxelinux
kernel: demo/vmlinuz
initrds: [demo/initrd.cpio.gz]
cmdline: "console=ttyS0 host={{ hostname }}"
"""


@pytest.fixture
def config_tree(tmp_path: Path) -> Path:
    (tmp_path / "profiles").mkdir()
    (tmp_path / "machines").mkdir()
    (tmp_path / "images").mkdir()
    (tmp_path / "profiles" / "default.yaml").write_text(PROFILE_IPXE)
    (tmp_path / "profiles" / "classic.yaml").write_text(PROFILE_PXELINUX)
    (tmp_path / "machines" / "n1.yaml").write_text(
        'mac: "52-54-00-00-00-01"\nprofile: classic\nhostname: n1\n')
    (tmp_path / "machines" / "n2.yaml").write_text(
        'uuid: "11111111-2222-3333-4444-555555555555"\nhostname: n2\nvars: {rack: "7"}\n')
    (tmp_path / "machines" / "off.yaml").write_text('mac: "52:54:00:00:00:0f"\nnetboot: false\n')
    (tmp_path / "netboot.yaml").write_text(
        "images_dir: images\ndata_dir: data\naddress: 10.0.0.2\n")
    return tmp_path / "netboot.yaml"


@pytest.fixture
def store(config_tree: Path) -> ConfigStore:
    return ConfigStore(config_tree)


@pytest.fixture(scope="session")
def postgres():
    """One real PostgreSQL server for the session (tests/pgsql.py); skipped, with the
    reason, where Debian's server is not installed."""
    from tests.pgsql import PgServer

    try:
        server = PgServer.start()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def regdb(request: pytest.FixtureRequest, tmp_path: Path):
    """A registry's place on each engine: a data dir (SQLite), or a fresh database on the
    session's PostgreSQL. Registry tests take this and run against both."""
    import asyncio

    from tests.nodes import RegistryPlace

    if request.param == "sqlite":
        return RegistryPlace("sqlite", tmp_path)
    server = request.getfixturevalue("postgres")
    url = asyncio.run(server.fresh_database())
    return RegistryPlace("postgresql", tmp_path, url)
