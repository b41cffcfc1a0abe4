"""Power control of machines through their BMCs (IPMI over LAN, Redfish).

One small interface for the API, CLI, registry and dashboard:

- `BmcConfig` (bmc.py): where a BMC is and how to log in; its repr never
  shows the password.
- `PowerDriver` (driver.py): a synchronous driver for one BMC, opened by
  `open_driver(cfg)`; IPMI through ipmitool, a process per call (ipmi.py), Redfish through sushy
  (redfish.py). Every failure is a `BmcError` whose text is safe to log.
- `PowerService` (service.py): the async facade. Drivers run in a bounded
  thread pool, each call with a timeout, at most one call per BMC at a time;
  a poller, and staggered bulk actions.

See docs/bmc.md for what the real BMC peers do.
"""

from netboot.power.bmc import BmcConfig
from netboot.power.driver import BmcError, BootDevice, PowerDriver, PowerState, open_driver
from netboot.power.service import BulkResult, PowerService, PowerStats, PowerStatus

__all__ = [
    "BmcConfig",
    "BmcError",
    "BootDevice",
    "BulkResult",
    "PowerDriver",
    "PowerService",
    "PowerState",
    "PowerStats",
    "PowerStatus",
    "open_driver",
]
