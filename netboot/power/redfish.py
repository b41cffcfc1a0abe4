"""Redfish through sushy, the client library of Ironic's redfish driver.

One `Sushy` root per driver (it logs in once: a Redfish session if the BMC
offers SessionService, else HTTP basic auth), and the system resource cached
and refreshed on each state read.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import sushy
from sushy import exceptions as sx
from sushy.auth import SessionOrBasicAuth

from netboot.power.bmc import BmcConfig
from netboot.power.driver import DEFAULT_TIMEOUT, BmcError, BootDevice, PowerState, scrub

ROOT = "/redfish/v1/"
_STATE = {
    sushy.PowerState.ON: PowerState.ON,
    sushy.PowerState.POWERING_OFF: PowerState.ON,  # still on, as Ironic reads it
    sushy.PowerState.OFF: PowerState.OFF,
    sushy.PowerState.POWERING_ON: PowerState.OFF,
}
_BOOT = {BootDevice.NETWORK: sushy.BootSource.PXE, BootDevice.DISK: sushy.BootSource.HDD}
# Older sushy has no connect_timeout; pass it only where it exists.
_HAS_CONNECT_TIMEOUT = "connect_timeout" in inspect.signature(sushy.Sushy).parameters


class RedfishDriver:
    """PowerDriver for a Redfish BMC; `timeout` bounds each HTTP request
    (connect and read), and sushy's own retries are off (one attempt)."""

    def __init__(self, cfg: BmcConfig, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        if cfg.driver != "redfish":
            raise ValueError("RedfishDriver needs a redfish BmcConfig")
        self.cfg = cfg
        self.timeout = timeout
        self._auth: Any = None
        self._root: Any = None
        self._system: Any = None

    def __repr__(self) -> str:
        return (f"RedfishDriver({self.cfg.endpoint}, system={self.cfg.system!r}, "
                f"user={self.cfg.username!r})")

    def _open(self) -> Any:
        if self._system is not None:
            return self._system
        kwargs: dict[str, Any] = {"read_timeout": self.timeout}
        if _HAS_CONNECT_TIMEOUT:
            kwargs["connect_timeout"] = min(self.timeout, 5.0)
        self._auth = SessionOrBasicAuth(username=self.cfg.username,
                                        password=self.cfg.password)
        self._root = sushy.Sushy(self.cfg.base_url, root_prefix=ROOT, auth=self._auth,
                                 verify=self.cfg.verify_tls, server_side_retries=1,
                                 server_side_retries_delay=1, **kwargs)
        path = self.cfg.system
        if path is None:
            members = sorted(self._root.get_system_collection().members_identities)
            if not members:
                raise BmcError(f"{self.cfg.endpoint}: the BMC lists no systems",
                               kind="config")
            path = members[0]
        elif "/" not in path:
            path = f"{ROOT}Systems/{path}"
        self._system = self._root.get_system(path)
        return self._system

    def _call(self, what: str, fn: Callable[[Any], Any], *, refresh: bool = False) -> Any:
        try:
            fresh = self._system is None
            system = self._open()
            if refresh and not fresh:
                system.refresh(force=True)
            return fn(system)
        except sx.SushyError as e:
            self._forget()
            raise self._error(what, e) from None
        except Exception:  # never keep a half-open session: the BMC's table is small
            self._forget()
            raise

    def _error(self, what: str, e: sx.SushyError) -> BmcError:
        where = self.cfg.endpoint
        text = scrub(e, self.cfg)
        if isinstance(e, sx.AccessError):
            return BmcError(f"{where}: the BMC refused the login as {self.cfg.username!r} "
                            f"(HTTP {e.status_code}); check bmc.username and bmc.password",
                            kind="auth")
        if isinstance(e, sx.ResourceNotFoundError):
            return BmcError(f"{where}: no Redfish system {self.cfg.system!r}; check "
                            "bmc.system (an id under /redfish/v1/Systems, or leave it "
                            "out for the first)", kind="config")
        if isinstance(e, sx.ConnectionError):
            if "timed out" in text.lower() or "timeout" in text.lower():
                return BmcError(f"{where}: no answer within {self.timeout:g} s ({what}); "
                                "check that the BMC is up and reachable", kind="timeout")
            return BmcError(f"{where}: cannot connect to the BMC; check the address, the "
                            "port and that HTTPS reaches it", kind="unreachable")
        if isinstance(e, sx.HTTPError):
            return BmcError(f"{where}: the BMC refused {what} (HTTP {e.status_code}): "
                            f"{scrub(e.detail, self.cfg) or text}", kind="refused")
        return BmcError(f"{where}: {what} failed: {text}", kind="protocol")

    def _forget(self) -> None:
        auth, self._auth, self._root, self._system = self._auth, None, None, None
        if auth is not None:
            try:
                auth.close()  # deletes the Redfish session, if one was made
            except Exception:  # noqa: BLE001 - close() never raises
                pass

    def state(self) -> PowerState:
        return self._call("reading the power state",
                          lambda s: _STATE.get(s.power_state, PowerState.UNKNOWN),
                          refresh=True)

    def _reset(self, what: str, reset: sushy.ResetType) -> None:
        self._call(what, lambda s: s.reset_system(reset))

    def on(self) -> None:
        self._reset("power on", sushy.ResetType.ON)

    def off(self) -> None:
        self._reset("power off", sushy.ResetType.FORCE_OFF)

    def soft(self) -> None:
        self._reset("soft power off", sushy.ResetType.GRACEFUL_SHUTDOWN)

    def cycle(self) -> None:
        # ForceRestart only restarts a machine that is on; an off one gets On.
        def go(s: Any) -> None:
            s.refresh(force=True)
            off = _STATE.get(s.power_state) == PowerState.OFF
            s.reset_system(sushy.ResetType.ON if off else sushy.ResetType.FORCE_RESTART)
        self._call("power cycle", go)

    def set_boot(self, device: BootDevice, persistent: bool) -> None:
        enabled = (sushy.BootSourceOverrideEnabled.CONTINUOUS if persistent
                   else sushy.BootSourceOverrideEnabled.ONCE)
        self._call(f"setting the boot device to {device}",
                   lambda s: s.set_system_boot_options(_BOOT[BootDevice(device)],
                                                       enabled=enabled))

    def close(self) -> None:
        self._forget()
