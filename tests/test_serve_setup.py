"""`netboot serve` refuses to start with a message that says what to do, not a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from netboot.server import SetupError, pick_address

REPO = Path(__file__).resolve().parents[1]


def test_unknown_interface_names_the_choices() -> None:
    with pytest.raises(SetupError) as exc:
        pick_address("nosuchif0", None)
    text = str(exc.value)
    assert "'nosuchif0' has no IPv4 address" in text
    assert "lo (127.0.0.1)" in text and "--interface" in text


def test_explicit_address_wins() -> None:
    assert pick_address("lo", "10.1.2.3") == ("lo", "10.1.2.3")
    assert pick_address(None, "10.1.2.3") == (None, "10.1.2.3")


def test_serve_without_a_usable_interface_exits_2_with_advice(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "netboot", "serve", "--config",
                        str(REPO / "configs/netboot.yaml"), "--interface", "nosuchif0",
                        "--data-dir", str(tmp_path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2
    assert "Choose one with --interface" in r.stderr
    assert "Traceback" not in r.stderr


def test_serve_refuses_a_profile_whose_image_is_missing(tmp_path: Path) -> None:
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "p.yaml").write_text("kernel: flatcar/1.2.3/vmlinuz\n")
    cfg = tmp_path / "netboot.yaml"
    cfg.write_text(f"images_dir: {tmp_path / 'images'}\ndefault_profile: p\n"
                   f"data_dir: {tmp_path / 'data'}\naddress: 127.0.0.1\n")
    r = subprocess.run([sys.executable, "-m", "netboot", "serve", "--config", str(cfg),
                        "--interface", "lo"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "profile p" in r.stderr and "flatcar/1.2.3/vmlinuz" in r.stderr
    assert "not starting" in r.stderr


def _cfg(tmp_path: Path, **settings: object):
    from netboot.config import ServerConfig

    return ServerConfig(data_dir=tmp_path / "data", **settings)


def test_the_secret_is_the_first_given_else_generated_once(tmp_path: Path,
                                                            monkeypatch) -> None:
    """api.secret, then api.secret_file, then $NETBOOT_SECRET, then data_dir/secret."""
    from netboot.server import load_secret

    monkeypatch.delenv("NETBOOT_SECRET", raising=False)
    (tmp_path / "key").write_text("from-file\n")
    assert load_secret(_cfg(tmp_path, api={"secret": "inline",
                                           "secret_file": tmp_path / "key"})) == b"inline"
    monkeypatch.setenv("NETBOOT_SECRET", "from-env")
    assert load_secret(_cfg(tmp_path, api={"secret_file": tmp_path / "key"})) == b"from-file"
    assert load_secret(_cfg(tmp_path)) == b"from-env"
    monkeypatch.delenv("NETBOOT_SECRET")
    made = load_secret(_cfg(tmp_path))
    assert len(made) == 64 and load_secret(_cfg(tmp_path)) == made  # kept in data_dir
    with pytest.raises(SetupError, match="empty"):
        (tmp_path / "empty").write_text("")
        load_secret(_cfg(tmp_path, api={"secret_file": tmp_path / "empty"}))


def test_a_fleet_never_generates_its_secret(tmp_path: Path, monkeypatch) -> None:
    """With a PostgreSQL registry the key must be given: a generated one would be this
    instance's alone, and the others would refuse its tokens."""
    from netboot.server import load_secret

    monkeypatch.delenv("NETBOOT_SECRET", raising=False)
    fleet = {"registry": "postgresql://netboot@db.example/netboot"}
    with pytest.raises(SetupError, match="NETBOOT_SECRET"):
        load_secret(_cfg(tmp_path, **fleet))
    assert not (tmp_path / "data" / "secret").exists()
    monkeypatch.setenv("NETBOOT_SECRET", "shared")
    assert load_secret(_cfg(tmp_path, **fleet)) == b"shared"


async def test_a_fleet_instance_keeps_its_given_secret_when_its_data_dir_is_unusable(
        tmp_path: Path, monkeypatch) -> None:
    """A data dir that cannot be made (here: a file in its way) must not swap the
    fleet's shared key for a temporary one."""
    from netboot.server import open_registry

    (tmp_path / "data").write_text("not a directory")
    monkeypatch.setenv("NETBOOT_SECRET", "shared")
    cfg = _cfg(tmp_path, registry="postgresql://netboot@/nowhere?host=/nonexistent")
    registry, secret = await open_registry(cfg)
    assert registry is None and secret == b"shared"


def test_the_registry_url_is_redacted_and_kept_out_of_reprs() -> None:
    from netboot.config import RegistrySettings
    from netboot.storage.db import redact

    for url, shown in (
            ("postgresql://nb:hunter2@db/netboot", "postgresql://nb:***@db/netboot"),
            ("postgresql://nb@db/netboot?password=hunter2&sslmode=require",
             "postgresql://nb@db/netboot?password=***&sslmode=require"),
            ("postgresql://nb:hunter2@h1:5432,h2:5433/netboot",
             "postgresql://nb:***@h1:5432,h2:5433/netboot")):
        assert redact(url) == shown
        assert "hunter2" not in repr(RegistrySettings(url=url))
