"""Real BMC peers for tests, on 127.0.0.1 only.

- `IpmiSim`: OpenIPMI's `ipmi_sim`, a real IPMI-over-LAN (RMCP+) BMC, with a
  `chassis_control` script that keeps the chassis' power and boot device in
  files instead of driving a QEMU guest.
- `SushyEmulator`: sushy-tools' `sushy-emulator` with its fake systems driver
  and HTTP basic auth (bcrypt htpasswd).
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHASSIS = r"""#!/bin/sh
# ipmi_sim's chassis_control: "get power", "set power 1|0", "set boot pxe|default",
# "set reset 1", "set shutdown 1". Output for get: "name:value" lines.
D='@DIR@'
echo "$*" >> "$D/calls"
if [ "$1" = get ]; then
  shift
  for n in "$@"; do
    case $n in
      power) echo "power:$(cat "$D/power")";;
      boot) echo "boot:$(cat "$D/boot")";;
    esac
  done
  exit 0
fi
case "$2" in
  power) echo "$3" > "$D/power";;
  boot) echo "$3" > "$D/boot";;
  shutdown) echo 0 > "$D/power";;   # the guest OS obeys the ACPI button at once
  reset) ;;
esac
exit 0
"""

LAN_CONF = """\
name "@NAME@"
set_working_mc 0x20
  startlan 1
    addr 127.0.0.1 @PORT@
    priv_limit admin
    allowed_auths_callback none md2 md5 straight
    allowed_auths_user none md2 md5 straight
    allowed_auths_operator none md2 md5 straight
    allowed_auths_admin none md2 md5 straight
    guid a123456789abcdefa123456789abcdef
  endlan
  chassis_control "@DIR@/chassis.sh"
  user 2 true "@USER@" "@PASSWORD@" admin 10 none md2 md5 straight
"""

EMU = """\
mc_setbmc 0x20
mc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr
sel_enable 0x20 1000 0x0a
mc_enable 0x20
"""


class LogKeeper(logging.Handler):
    """Every log record while installed, for the tests that grep them for passwords."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def text(self) -> list[str]:
        return [self.format(r) + repr(r.args) for r in self.records]


@contextmanager
def keep_root_logs() -> Iterator[LogKeeper]:
    """All records of the root logger at DEBUG, for the duration."""
    keep, root = LogKeeper(), logging.getLogger()
    old = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(keep)
    try:
        yield keep
    finally:
        root.removeHandler(keep)
        root.setLevel(old)


_handed_out: set[tuple[int, int]] = set()


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A free port on 127.0.0.1 that this process never handed out before, so a
    "dead" BMC's port can never be a live simulator's of an earlier test."""
    for _ in range(1000):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if (kind, port) not in _handed_out:
            _handed_out.add((kind, port))
            return port
    raise RuntimeError("no port on 127.0.0.1 that this process has not used yet")


def eventually(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """Poll `check` until it returns something true (a hang guard, not a timing test)."""
    end = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)


def wait_ready(proc: subprocess.Popen[bytes], check: Callable[[], Any], what: str,
               timeout: float) -> None:
    try:
        eventually(check, what, timeout)
    except BaseException:
        stop(proc)
        raise


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    """End a peer we started (by its own handle) and reap it."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class IpmiSim:
    def __init__(self, workdir: Path, *, name: str, username: str, password: str) -> None:
        self.dir = workdir
        self.name = name
        self.username = username
        self.password = password
        self.port = free_port(socket.SOCK_DGRAM)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> IpmiSim:
        if not shutil.which("ipmi_sim"):
            raise RuntimeError("ipmi_sim not found: apt-get install openipmi ipmitool")
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "state").mkdir(exist_ok=True)
        script = self.dir / "chassis.sh"
        script.write_text(CHASSIS.replace("@DIR@", str(self.dir)))
        script.chmod(0o755)
        (self.dir / "power").write_text("0\n")
        (self.dir / "boot").write_text("default\n")
        (self.dir / "calls").write_text("")
        conf = LAN_CONF
        for k, v in {"@NAME@": self.name, "@PORT@": str(self.port), "@DIR@": str(self.dir),
                     "@USER@": self.username, "@PASSWORD@": self.password}.items():
            conf = conf.replace(k, v)
        (self.dir / "lan.conf").write_text(conf)
        (self.dir / "bmc.emu").write_text(EMU)
        self.proc = spawn(["ipmi_sim", "-c", str(self.dir / "lan.conf"), "-f",
                           str(self.dir / "bmc.emu"), "-s", str(self.dir / "state"), "-n"],
                          self.dir / "sim.log")
        wait_ready(self.proc, self._answers, f"ipmi_sim on 127.0.0.1:{self.port}", 20)
        self.clear_calls()
        return self

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"ipmi_sim exited: {(self.dir / 'sim.log').read_text()}")
        r = subprocess.run(["ipmitool", "-I", "lanplus", "-H", "127.0.0.1", "-p",
                            str(self.port), "-U", self.username, "-P", self.password,
                            "-C", "3", "-N", "1", "-R", "1", "power", "status"],
                           capture_output=True, text=True, timeout=20)
        return r.returncode == 0 and "Chassis Power" in r.stdout

    def stop(self) -> None:
        stop(self.proc)

    def power(self) -> str:
        return (self.dir / "power").read_text().strip()

    def boot(self) -> str:
        return (self.dir / "boot").read_text().strip()

    def calls(self) -> list[str]:
        return (self.dir / "calls").read_text().splitlines()

    def clear_calls(self) -> None:
        (self.dir / "calls").write_text("")

    def set_power(self, value: str) -> None:
        (self.dir / "power").write_text(value + "\n")


def fake_system(i: int) -> dict[str, Any]:
    return {"uuid": f"00000000-0000-4000-8000-{i:012d}", "name": f"fake{i}",
            "power_state": "Off",
            "nics": [{"mac": f"52:54:00:00:{i // 256:02x}:{i % 256:02x}", "ip": "10.0.0.1"}]}


class SushyEmulator:
    def __init__(self, workdir: Path, *, systems: int, username: str, password: str) -> None:
        self.dir = workdir
        self.systems = [fake_system(i) for i in range(systems)]
        self.username = username
        self.password = password
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def uuids(self) -> list[str]:
        return [s["uuid"] for s in self.systems]

    def start(self, exe: Path) -> SushyEmulator:
        import bcrypt  # a dependency of sushy-tools

        self.dir.mkdir(parents=True, exist_ok=True)
        hashed = bcrypt.hashpw(self.password.encode(), bcrypt.gensalt(rounds=4)).decode()
        (self.dir / "htpasswd").write_text(f"{self.username}:{hashed}\n")
        (self.dir / "emulator.conf").write_text(
            "SUSHY_EMULATOR_FAKE_DRIVER = True\n"
            f"SUSHY_EMULATOR_FAKE_SYSTEMS = {self.systems!r}\n"
            f"SUSHY_EMULATOR_STATE_DIR = {str(self.dir / 'state')!r}\n"
            f"SUSHY_EMULATOR_AUTH_FILE = {str(self.dir / 'htpasswd')!r}\n")
        self.proc = spawn([str(exe), "--config", str(self.dir / "emulator.conf"), "-i",
                           "127.0.0.1", "-p", str(self.port)], self.dir / "emulator.log")
        wait_ready(self.proc, self._answers, f"sushy-emulator on {self.url}", 60)
        return self

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"sushy-emulator exited: "
                               f"{(self.dir / 'emulator.log').read_text()[-2000:]}")
        try:
            # The systems listing, not just the root: the emulator builds its fake
            # driver on the first request that touches systems, and 12 such
            # requests at once took 11 s there and lost one (docs/bmc.md).
            return len(self.get("/redfish/v1/Systems")["Members"]) == len(self.systems)
        except OSError:
            return False

    def get(self, path: str) -> dict[str, Any]:
        import base64
        import json

        req = urllib.request.Request(f"{self.url}{path}")
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)

    def system_json(self, uuid: str) -> dict[str, Any]:
        return self.get(f"/redfish/v1/Systems/{uuid}")

    def stop(self) -> None:
        stop(self.proc)
