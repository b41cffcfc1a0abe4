#!/usr/bin/env python3
"""The lab BMC's hands: OpenIPMI's ipmi_sim runs this for power, boot device and LAN.

    bmc_control.py chassis STATE get power|boot ...
    bmc_control.py chassis STATE set power 1|0 | reset 1 | boot pxe|default|none ...
    bmc_control.py lan STATE get ip_addr|subnet_mask|... ...
    bmc_control.py lan STATE set ip_addr A.B.C.D subnet_mask M ...
    bmc_control.py lan STATE check ip_addr_src static

(lan.conf's ``chassis_control`` and ``lan_config_program``; ipmi_sim appends the
operation.) STATE is the BMC's directory, written by tests/bmc_lab.py: config.json
(the QEMU command, the boot arguments per boot device, the bridge). This program
keeps there: ``boot`` (the boot device for the next power-on; a one-shot override as
on real BMCs: back to ``default`` once used), ``qemu.pid``, ``boots.jsonl`` (one line
per power-on: time, boot device, QEMU arguments) and ``lan.json`` (LAN parameters;
``applied`` is the address with prefix that is on the bridge).

Answers go to stdout as ``parm:value``; ipmi_sim reads it to EOF, so QEMU is started
with its own stdin/stdout/stderr, no inherited descriptors and its own session.
Standard library only: it runs outside the test process.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

LAN_PARMS = ("ip_addr", "ip_addr_src", "mac_addr", "subnet_mask", "default_gw_ip_addr",
             "default_gw_mac_addr", "backup_gw_ip_addr", "backup_gw_mac_addr")


class Refused(Exception):
    pass


def _load(path: Path, default):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default


def _save(path: Path, value) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


# -- chassis ---------------------------------------------------------------------------
def qemu_pid(state: Path) -> int | None:
    """The pid of this BMC's QEMU if it runs (not a zombie, and its command line names
    this state directory: a reused pid is not ours)."""
    try:
        pid = int((state / "qemu.pid").read_text())
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
        return None
    return pid if str(state).encode() in cmdline else None


def power_on(state: Path) -> None:
    if qemu_pid(state) is not None:
        return
    cfg = _load(state / "config.json", {})
    boot = _read_boot(state)
    argv = [*cfg["qemu"], *cfg["boot_args"].get(boot, cfg["boot_args"]["default"])]
    with open(state / "qemu.log", "ab") as log, open(os.devnull, "rb") as null:
        proc = subprocess.Popen(argv, stdin=null, stdout=log, stderr=subprocess.STDOUT,
                                close_fds=True, start_new_session=True)
    (state / "qemu.pid").write_text(str(proc.pid))
    with open(state / "boots.jsonl", "a") as f:
        f.write(json.dumps({"time": time.time(), "boot": boot, "argv": argv}) + "\n")
    (state / "boot").write_text("default")  # a boot device override lasts one boot


def power_off(state: Path, timeout: float = 5) -> None:
    pid = qemu_pid(state)
    if pid is None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, timeout)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if qemu_pid(state) is None:
                return
            time.sleep(0.05)


def _read_boot(state: Path) -> str:
    try:
        return (state / "boot").read_text().strip() or "default"
    except FileNotFoundError:
        return "default"


def chassis(state: Path, op: str, args: list[str]) -> None:
    if op == "get":
        for parm in args:
            if parm == "power":
                print(f"power:{0 if qemu_pid(state) is None else 1}")
            elif parm == "boot":
                print(f"boot:{_read_boot(state)}")
            else:
                raise Refused(f"Invalid parameter: {parm}")
        return
    if op != "set":
        raise Refused(f"Unsupported operation: {op}")
    while args:
        parm, args = args[0], args[1:]
        if not args:
            raise Refused(f"No value present for parameter {parm}")
        val, args = args[0], args[1:]
        if parm == "power":
            power_on(state) if val == "1" else power_off(state)
        elif parm == "reset":
            if qemu_pid(state) is not None:
                power_off(state)
                power_on(state)
        elif parm == "boot":
            if val not in ("none", "pxe", "default", "cdrom", "bios"):
                raise Refused(f"Invalid boot value: {val}")
            (state / "boot").write_text(val)
        elif parm == "identify":
            args = args[1:]  # interval, then force
        else:
            raise Refused(f"Invalid parameter: {parm}")


# -- LAN -------------------------------------------------------------------------------
def _apply(lan: dict, bridge: str) -> None:
    """Put ip_addr/subnet_mask on the bridge (this runs in the BMC's namespace), new
    address first, then the old one off: with promote_secondaries on the bridge the new
    one is primary, so ipmi_sim's 0.0.0.0 socket answers from it."""
    addr = lan["ip_addr"]
    want = None
    if addr != "0.0.0.0":
        prefix = ipaddress.IPv4Network(f"0.0.0.0/{lan['subnet_mask']}").prefixlen
        want = f"{addr}/{prefix}"
    old = lan.get("applied")
    if want == old:
        return
    if want:
        r = subprocess.run(["ip", "addr", "add", want, "dev", bridge],
                           capture_output=True, text=True)
        if r.returncode != 0 and "exists" not in r.stderr:
            raise Refused(f"ip addr add {want}: {r.stderr.strip()}")
    if old:
        subprocess.run(["ip", "addr", "del", old, "dev", bridge], capture_output=True)
    lan["applied"] = want


def lan(state: Path, op: str, args: list[str]) -> None:
    cfg = _load(state / "config.json", {})
    path = state / "lan.json"
    values = _load(path, {})
    if op == "get":
        for parm in args:
            if parm not in LAN_PARMS:
                raise Refused(f"Invalid parameter: {parm}")
            print(f"{parm}:{values.get(parm, '0.0.0.0')}")
        return
    pairs = list(zip(args[::2], args[1::2]))
    if len(args) % 2:
        raise Refused(f"No value present for parameter {args[-1]}")
    if op == "check":
        for parm, val in pairs:
            if parm == "ip_addr_src" and val != "static":
                raise Refused(f"Invalid ip_addr_src: {val} (the lab BMC has no DHCP client)")
        return
    if op != "set":
        raise Refused(f"Unsupported operation: {op}")
    for parm, val in pairs:
        if parm not in LAN_PARMS:
            raise Refused(f"Invalid parameter: {parm}")
        values[parm] = val
    if any(parm in ("ip_addr", "subnet_mask") for parm, _ in pairs):
        _apply(values, cfg["bridge"])
    _save(path, values)
    with open(state / "lan.log", "a") as f:
        f.write(json.dumps({"time": time.time(), "set": dict(pairs)}) + "\n")


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[0] not in ("chassis", "lan"):
        print(__doc__.strip().splitlines()[2])
        return 2
    kind, state, op, args = argv[0], Path(argv[1]), argv[2], argv[3:]
    try:
        (chassis if kind == "chassis" else lan)(state, op, args)
    except Refused as exc:
        print(exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
