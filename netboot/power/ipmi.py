"""IPMI over LAN (RMCP+) through pyghmi, the library Ironic's and
confluent's IPMI code is built on.

pyghmi keeps its sessions in process-wide tables and a background thread sends
keep-alives, so a session is worth keeping. pyghmi 1.6.19 has three traps,
seen against ipmi_sim (docs/bmc.md), that this module steps around:

- A second `Command` for a BMC that already has a live session re-runs the
  login on the shared session object and hangs. So there is one `Command`
  per (address, port, user, password) in the process, shared by every driver
  for that BMC, its calls serialised by a lock.
- A session stays in `Session.initting_sessions` after its login, success or
  failure: the key is stored with str credentials and deleted with bytes ones.
  A later `Command` for that BMC gets the dead session back ("Session no
  longer connected", or a TypeError after a logout), so a BMC that failed once
  would never recover. `_end` removes the entry by the str key.
- `Command(...)` logs in at once and blocks; it is created lazily, in the
  worker thread, on the first call.
- Its two process-wide table locks are taken in both orders:
  `Session.send_payload` holds KEEPALIVE_SESSIONS and then takes
  WAITING_SESSIONS in `_xmit_packet`; `wait_for_rsp` and the timeout path take
  them the other way. Logins to two BMCs in two threads deadlocked for good
  (seen in tests/test_power.py beside test_bmc_api.py: every worker stuck in
  `protect.__enter__`, a hung pytest). Both names are made one RLock here, at
  import, so no order can invert; each holds it only around table updates and
  a sendto.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pyghmi.exceptions import IpmiException
from pyghmi.ipmi.private import session as _pyghmi_session

from netboot.power.bmc import IPMI_PORT, BmcConfig
from netboot.power.driver import DEFAULT_TIMEOUT, BmcError, BootDevice, PowerState, scrub

# one lock for both of pyghmi's session tables (see the module docstring); the
# functions look the names up at call time, so rebinding the module globals is enough
_pyghmi_session.WAITING_SESSIONS = _pyghmi_session.KEEPALIVE_SESSIONS

_BOOTDEV = {BootDevice.NETWORK: "network", BootDevice.DISK: "hd"}
_SessionKey = tuple[str, str, str, int]


@dataclass
class _Shared:
    cmd: Any = None
    refs: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


_table_lock = threading.Lock()
_table: dict[_SessionKey, _Shared] = {}


class IpmiDriver:
    """PowerDriver for an IPMI BMC. `timeout` is not passed to pyghmi, which
    has no per-call timeout: it gives up on an unanswered BMC after about
    5 s by itself (docs/bmc.md); PowerService bounds the wait from outside."""

    def __init__(self, cfg: BmcConfig, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        if cfg.driver != "ipmi":
            raise ValueError("IpmiDriver needs an ipmi BmcConfig")
        self.cfg = cfg
        self.timeout = timeout
        self._shared: _Shared | None = None

    def __repr__(self) -> str:
        return f"IpmiDriver({self.cfg.endpoint}, user={self.cfg.username!r})"

    def _session_key(self) -> _SessionKey:
        c = self.cfg
        return (c.address, c.username, c.password, c.port or IPMI_PORT)

    def _call(self, what: str, fn: Callable[[Any], Any]) -> Any:
        if self._shared is None:
            with _table_lock:
                self._shared = _table.setdefault(self._session_key(), _Shared())
                self._shared.refs += 1
        shared = self._shared
        with shared.lock:
            try:
                if shared.cmd is None:
                    shared.cmd = self._login()
                result = fn(shared.cmd)
            except IpmiException as e:
                err = self._error(what, e)
                if err.kind != "refused":  # the session is gone: start afresh next time
                    self._end_session(shared)
                raise err from None
            except socket.gaierror as e:
                self._end_session(shared)
                raise BmcError(f"{self.cfg.endpoint}: cannot resolve the BMC address "
                               f"({scrub(e.strerror, self.cfg)}); check bmc.address",
                               kind="unreachable") from None
            except OSError as e:
                self._end_session(shared)
                raise BmcError(f"{self.cfg.endpoint}: {what} failed: network error "
                               f"{scrub(e, self.cfg)}", kind="unreachable") from None
        if isinstance(result, dict) and "error" in result:
            raise BmcError(f"{self.cfg.endpoint}: the BMC refused {what}: "
                           f"{scrub(result['error'], self.cfg)}", kind="refused")
        return result

    def _login(self) -> Any:
        """A new Command (it logs in). pyghmi's session tables sometimes hand a
        new login a half-dead session (AttributeError 'errormsg', TypeError on
        `logoutexpiry`); nothing was sent to the machine yet, so clean the
        tables and log in once more."""
        from pyghmi.ipmi.command import Command

        for attempt in (1, 2):
            try:
                return Command(bmc=self.cfg.address, userid=self.cfg.username,
                               password=self.cfg.password, port=self.cfg.port or IPMI_PORT)
            except (AttributeError, TypeError, KeyError):
                _end(None, self._session_key())
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _end_session(self, shared: _Shared) -> None:
        """Under shared.lock: log out and make pyghmi forget the session."""
        cmd, shared.cmd = shared.cmd, None
        _end(cmd, self._session_key())

    def _error(self, what: str, e: IpmiException) -> BmcError:
        text = scrub(e, self.cfg) if e.args and e.args[0] is not None else ""
        low = text.lower()
        if "incorrect password" in low or "unauthorized name" in low:
            return BmcError(
                f"{self.cfg.endpoint}: the BMC refused the login as "
                f"{self.cfg.username!r} ({text}); check bmc.username and bmc.password",
                kind="auth")
        if not text or "timeout" in low or "timed out" in low:
            return BmcError(
                f"{self.cfg.endpoint}: no answer from the BMC; check the address and "
                "port, that its LAN channel is enabled and that UDP reaches it",
                kind="unreachable")
        return BmcError(f"{self.cfg.endpoint}: {what} failed: {text}", kind="refused")

    def state(self) -> PowerState:
        r = self._call("reading the power state", lambda c: c.get_power())
        return {"on": PowerState.ON, "off": PowerState.OFF}.get(
            r.get("powerstate"), PowerState.UNKNOWN)

    def _power(self, what: str, pyghmi_state: str) -> None:
        self._call(what, lambda c: c.set_power(pyghmi_state, wait=False))

    def on(self) -> None:
        self._power("power on", "on")

    def off(self) -> None:
        self._power("power off", "off")

    def soft(self) -> None:
        self._power("soft power off", "shutdown")

    def cycle(self) -> None:
        # pyghmi's "boot": on if off, else a hard reset (chassis control 3).
        self._power("power cycle", "boot")

    def set_boot(self, device: BootDevice, persistent: bool) -> None:
        dev = _BOOTDEV[BootDevice(device)]
        self._call(f"setting the boot device to {device}",
                   lambda c: c.set_bootdev(dev, persist=persistent))

    def close(self) -> None:
        """Release this driver's hold on the BMC's session; the last one out
        logs out. Never raises."""
        shared, self._shared = self._shared, None
        if shared is None:
            return
        key = self._session_key()
        with _table_lock:
            shared.refs -= 1
            last = shared.refs <= 0
            if last and _table.get(key) is shared:
                del _table[key]
        if last:
            with shared.lock:
                cmd, shared.cmd = shared.cmd, None
                _end(cmd, key)


def _end(cmd: Any, key: _SessionKey) -> None:
    """Log out (best effort) and remove pyghmi's stale login entry (see above)."""
    if cmd is not None:
        try:
            cmd.ipmi_session.logout()
        except Exception:  # noqa: BLE001 - the BMC may be gone; the session times out
            pass
    try:
        from pyghmi.ipmi.private.session import Session
        address, user, password, port = key
        Session.initting_sessions.pop((address, user, password, port, None), None)
    except Exception:  # noqa: BLE001 - a pyghmi without this table needs no help
        pass
