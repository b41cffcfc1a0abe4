"""The commissioning OS's shell, run on this host with busybox (no QEMU): JSON
escaping, the inventory's shape, and the strict reading of netboot's answer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.inventory_stub import problems
from tests.lab import REPO

sys.path.insert(0, str(REPO / "scripts"))
from commission_os import SHELL_FUNCS  # noqa: E402

BUSYBOX = shutil.which("busybox")
pytestmark = pytest.mark.skipif(BUSYBOX is None, reason="busybox is not installed")


def run(tmp_path: Path, script: str) -> str:
    funcs = tmp_path / "funcs.sh"
    funcs.write_text('say() { echo "NETBOOT-COMMISSION $*"; }\n' + SHELL_FUNCS)
    out = subprocess.run([BUSYBOX, "sh", "-c", f". {funcs}\n{script}"], cwd=tmp_path,
                         env={"PATH": "/usr/bin:/bin", "T": str(tmp_path)},
                         capture_output=True, text=True, check=True)
    return out.stdout


@pytest.mark.parametrize("value", ['plain', 'a "quoted" \\ back\\slash', "tab\there",
                                   "new\nline", "ctrl\x01\x1f", "é non-ASCII", "$(id) `id`"])
def test_jstr_is_valid_json(tmp_path: Path, value: str) -> None:
    (tmp_path / "v").write_bytes(value.encode())
    got = json.loads(run(tmp_path, 'jstr "$(cat v)"'))
    want = "".join(c for c in value.replace("\t", " ").replace("\n", " ")
                   if 0x20 <= ord(c) < 0x7f)
    assert got == want


def test_jstr_and_jint_give_null_for_unknown(tmp_path: Path) -> None:
    assert run(tmp_path, 'jstr ""; echo; jint ""; echo; jint 12x; echo; jint 42') == \
        "null\nnull\nnull\n42"


def test_inventory_of_this_host_is_the_contract_shape(tmp_path: Path) -> None:
    inv = json.loads(run(tmp_path, "inventory"))
    assert problems(inv) == []
    assert inv["memory_bytes"] > 0 and inv["cpu"]["count"] >= 1
    assert inv["lldp"] is None
    # the SecureBoot EFI variable: this host's, if it has one (a BIOS host: null)
    efivars = Path("/sys/firmware/efi/efivars")
    if not efivars.is_dir():
        assert inv["secure_boot"] is None
    else:
        assert inv["secure_boot"] in (True, False, None)


ANSWER = ("NETBOOT_ACTION=set-bmc\r\n"
          "NETBOOT_BMC_ADDRESS='10.77.0.60'\n"
          'NETBOOT_BMC_NETMASK="255.255.255.0"\n'
          "NETBOOT_BMC_GATEWAY=$(touch pwned)\n"
          "touch pwned2\n"
          "# a comment\n")


def test_answer_is_read_strictly_never_run(tmp_path: Path) -> None:
    (tmp_path / "answer").write_text(ANSWER)
    out = run(tmp_path, 'read_answer; echo "A=$ACTION|$B_ADDR|$B_MASK|$B_GW"')
    assert out.splitlines()[-1] == "A=set-bmc|10.77.0.60|255.255.255.0|"
    assert "ignored answer line: touch pwned2" in out
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "pwned2").exists()


@pytest.mark.parametrize("answer,action", [
    ("NETBOOT_ACTION=poweroff", "poweroff"), ("NETBOOT_ACTION=wait\n", "wait"),
    ("NETBOOT_ACTION=reboot\n", ""), ("", ""), ("NETBOOT_ACTION=wait;reboot\n", "")])
def test_answer_actions(tmp_path: Path, answer: str, action: str) -> None:
    (tmp_path / "answer").write_text(answer)
    assert run(tmp_path, 'read_answer; echo "A=$ACTION"').splitlines()[-1] == f"A={action}"


@pytest.mark.parametrize("addr,ok", [("10.0.0.1", True), ("255.255.255.255", True),
                                     ("256.0.0.1", False), ("1.2.3", False), ("1..2.3", False),
                                     ("1.2.3.4.5", False), (" 1.2.3.4", False), ("", False)])
def test_ipv4(tmp_path: Path, addr: str, ok: bool) -> None:
    assert run(tmp_path, f'ipv4 "{addr}" || true') == (addr if ok else "")


def test_lan_print_fields(tmp_path: Path) -> None:
    (tmp_path / "lan").write_text(
        "IP Address Source       : Static Address\nIP Address              : 10.77.0.4\n"
        "Subnet Mask             : 255.255.255.0\nMAC Address             : 52:54:00:aa:bb:cc\n"
        "Default Gateway IP      : 0.0.0.0\n")
    out = run(tmp_path, 'for k in "IP Address" "IP Address Source" "MAC Address"; do '
                        'echo "[$(lan_get "$k")]"; done; echo "[$(nz "$(lan_get '
                        '"Default Gateway IP")")]"')
    assert out.split() == ["[10.77.0.4]", "[Static", "Address]", "[52:54:00:aa:bb:cc]", "[]"]
