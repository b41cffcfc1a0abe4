"""The one interface every BMC driver offers, and its error type."""

from __future__ import annotations

from enum import StrEnum
from typing import Protocol

from netboot.power.bmc import BmcConfig

#: Seconds a driver allows one BMC call (ipmitool is killed a second later; sushy's
#: connect and read timeouts) unless the caller says otherwise.
DEFAULT_TIMEOUT = 10.0


class PowerState(StrEnum):
    ON = "on"
    OFF = "off"
    UNKNOWN = "unknown"


class BootDevice(StrEnum):
    NETWORK = "network"
    DISK = "disk"


class BmcError(Exception):
    """A BMC call failed. `str(e)` is safe to log and says what to do.

    `kind` is one of: `auth` (wrong username or password), `unreachable`
    (nothing answered at the address), `timeout` (no answer in time),
    `busy` (a previous call to this BMC is still running), `config` (the
    BMC has no such system, or the setting is wrong), `refused` (the BMC
    answered but refused the request), `protocol` (anything else the library
    reported).
    """

    def __init__(self, message: str, *, kind: str = "protocol") -> None:
        super().__init__(message)
        self.kind = kind


def scrub(text: object, cfg: BmcConfig) -> str:
    """A library's text with the password blanked out, should it ever appear.

    Neither ipmitool nor sushy put the password into exception texts (see
    docs/bmc.md), but their texts go into our messages, so make sure.
    """
    s = "" if text is None else str(text)
    if cfg.password and len(cfg.password) >= 3:
        s = s.replace(cfg.password, "***")
    if len(s) > 300:
        s = s[:300] + "..."
    return s


class PowerDriver(Protocol):
    """A synchronous driver for one BMC. Not thread-safe: one call at a time.

    Actions return once the BMC accepted the request, not when the machine
    reached the state; read `state()` to see it. All failures raise BmcError.
    """

    def state(self) -> PowerState: ...

    def on(self) -> None: ...

    def off(self) -> None:
        """Hard power off."""

    def soft(self) -> None:
        """Ask the OS to shut down (ACPI power button)."""

    def cycle(self) -> None:
        """Power on if off, else a hard reset."""

    def set_boot(self, device: BootDevice, persistent: bool) -> None:
        """Boot from `device` on the next boot (or every boot, if persistent)."""

    def close(self) -> None:
        """Log out and free the session. Never raises."""


def open_driver(cfg: BmcConfig, *, timeout: float = DEFAULT_TIMEOUT) -> PowerDriver:
    """A driver for `cfg`. Connects lazily: the first call logs in."""
    if cfg.driver == "ipmi":
        from netboot.power.ipmi import IpmiDriver
        return IpmiDriver(cfg, timeout=timeout)
    if cfg.driver == "redfish":
        from netboot.power.redfish import RedfishDriver
        return RedfishDriver(cfg, timeout=timeout)
    raise ValueError(f"unknown bmc driver {cfg.driver!r}")
