"""IPMI over LAN (RMCP+) through ipmitool, one process per call, as Ironic's
`ipmitool` driver does.

Why a process and not a Python library: pyghmi (used here before) keeps every
session in process-wide tables served by one I/O thread. Against ipmi_sim it
hung a second login to a live BMC, handed dead sessions to new logins,
deadlocked on its two table locks, and under load let one BMC's login stall
another's past the timeout (docs/bmc.md). An ipmitool process shares nothing
with any other call, and a call that outlives its deadline is killed, so a
dead or slow BMC holds its worker for a bounded time and never touches the
others. A call costs one login (about 20 ms against ipmi_sim).

The contract, per call:
- argv: `ipmitool -I lanplus -H <addr> -p <port> -U <user> -E -C 3 -N 1 -R 3 -v
  <command>`. The password goes in the environment (`-E`, IPMI_PASSWORD),
  never on the command line, where any local user could read it in `ps`.
  `-v` is what makes ipmitool say why a login failed ("RAKP 2 HMAC is
  invalid" for a wrong password, "unauthorized name" for an unknown user);
  without it both read "Unable to establish IPMI v2 / RMCP+ session".
- The process is killed `timeout + KILL_GRACE` seconds after it started.
  PowerService bounds the same call by `timeout`, so the caller has its
  answer first and the worker is free a moment later.
- Cipher suite 3 (HMAC-SHA1, AES-128), what ipmi_sim and most BMCs offer and
  what pyghmi used.
"""

from __future__ import annotations

import os
import subprocess
import time

from netboot.power.bmc import IPMI_PORT, BmcConfig
from netboot.power.driver import DEFAULT_TIMEOUT, BmcError, BootDevice, PowerState, scrub

#: Seconds after `timeout` at which a still-running ipmitool is killed.
KILL_GRACE = 1.0
IPMITOOL = "ipmitool"

_BOOTDEV = {BootDevice.NETWORK: "pxe", BootDevice.DISK: "disk"}
_STATE = {"Chassis Power is on": PowerState.ON, "Chassis Power is off": PowerState.OFF}


class IpmiDriver:
    """PowerDriver for an IPMI BMC: each call runs ipmitool once (see above)."""

    def __init__(self, cfg: BmcConfig, *, timeout: float = DEFAULT_TIMEOUT,
                 exe: str = IPMITOOL) -> None:
        if cfg.driver != "ipmi":
            raise ValueError("IpmiDriver needs an ipmi BmcConfig")
        self.cfg = cfg
        self.timeout = timeout
        self.exe = exe

    def __repr__(self) -> str:
        return f"IpmiDriver({self.cfg.endpoint}, user={self.cfg.username!r})"

    def argv(self, *command: str) -> list[str]:
        """The command line for `command` (no secret in it)."""
        c = self.cfg
        return [self.exe, "-I", "lanplus", "-H", c.address, "-p", str(c.port or IPMI_PORT),
                "-U", c.username, "-E", "-C", "3", "-N", "1", "-R", "3", "-v", *command]

    def _call(self, what: str, *command: str, limit: float | None = None) -> str:
        """Run ipmitool once; ``limit``: seconds before it is killed (timeout + grace)."""
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C",
               "IPMI_PASSWORD": self.cfg.password}
        limit = self.timeout + KILL_GRACE if limit is None else limit
        try:
            r = subprocess.run(self.argv(*command), env=env, capture_output=True,
                               text=True, errors="replace", timeout=limit,
                               stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:  # run() has killed and reaped it
            raise BmcError(f"{self.cfg.endpoint}: no answer within {limit:g} s ({what}); "
                           "check that the BMC is up and reachable",
                           kind="timeout") from None
        except FileNotFoundError:
            raise BmcError(f"{self.cfg.endpoint}: {what}: {self.exe} not found; install "
                           "it (apt-get install ipmitool)", kind="config") from None
        except OSError as e:
            raise BmcError(f"{self.cfg.endpoint}: {what}: cannot run {self.exe}: "
                           f"{e.strerror}", kind="config") from None
        if r.returncode != 0:
            raise self._error(what, r.stderr)
        return r.stdout

    def _error(self, what: str, stderr: str) -> BmcError:
        lines = [ln.strip() for ln in stderr.splitlines()
                 if ln.strip() and not ln.startswith(("Loading IANA", "Running Get VSO",
                                                      "Discovered IPMB"))]
        text = scrub("; ".join(lines[-3:]), self.cfg)
        low = stderr.lower()
        ep = self.cfg.endpoint
        if "rakp 2 hmac is invalid" in low or "unauthorized name" in low:
            return BmcError(f"{ep}: the BMC refused the login as {self.cfg.username!r} "
                            f"({text}); check bmc.username and bmc.password", kind="auth")
        if "address lookup for" in low:
            return BmcError(f"{ep}: cannot resolve the BMC address; check bmc.address",
                            kind="unreachable")
        if "get auth capabilities error" in low or "no response" in low:
            return BmcError(f"{ep}: no answer from the BMC ({what}); check the address "
                            "and port, that its LAN channel is enabled and that UDP "
                            "reaches it", kind="unreachable")
        if "unable to establish" in low:
            return BmcError(f"{ep}: no IPMI v2 session ({text}); check that the BMC "
                            "offers RMCP+ with cipher suite 3", kind="protocol")
        return BmcError(f"{ep}: the BMC refused {what}: {text}", kind="refused")

    def state(self) -> PowerState:
        out = self._call("reading the power state", "power", "status").strip()
        return _STATE.get(out, PowerState.UNKNOWN)

    def on(self) -> None:
        self._call("power on", "power", "on")

    def off(self) -> None:
        self._call("power off", "power", "off")

    def soft(self) -> None:
        self._call("soft power off", "power", "soft")

    def cycle(self) -> None:
        """On if off, else a hard reset (chassis control 3): a power cycle of
        a machine that is off is refused by many BMCs. Two calls, killed together
        at one deadline (timeout + grace from the first)."""
        deadline = time.monotonic() + self.timeout + KILL_GRACE
        off = self.state() == PowerState.OFF
        left = max(0.1, deadline - time.monotonic())
        if off:
            self._call("power on", "power", "on", limit=left)
        else:
            self._call("power cycle (reset)", "power", "reset", limit=left)

    def set_boot(self, device: BootDevice, persistent: bool) -> None:
        dev = _BOOTDEV[BootDevice(device)]
        self._call(f"setting the boot device to {device}", "chassis", "bootdev", dev,
                   *(["options=persistent"] if persistent else []))

    def close(self) -> None:
        """Nothing to free: no call keeps a session. Never raises."""
