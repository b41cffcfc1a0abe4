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
