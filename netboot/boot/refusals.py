"""Knowing the firmware refused the loader it was handed. Bounded, clock injected.

UEFI firmware that will not run a boot file (Secure Boot and an unsigned
``ipxe.efi``: "Access Denied") says nothing to the network. It downloads the file in
full, refuses it, and goes on to its next boot option: PXE over IPv6, then HTTP Boot,
each starting with a fresh DHCP request from the same MAC. A loader that runs does
something else first: iPXE DHCPs as iPXE (user class ``iPXE``), shim asks for
``grubx64.efi``, a loader asks for its script or config. So:

    a loader download completed for MAC M (over TFTP or HTTP)
    then nothing showed the loader running
    then a fresh DHCP request from M's firmware (not iPXE, not BIOS), within ``window``
    => the firmware refused the loader.

BIOS is never judged: a PXE ROM that cannot run its NBP has no Secure Boot to refuse
it with, and nothing measured shows it retrying the same way. The download is tied to
a MAC by the address the client's own DHCPREQUEST asked the site's server for
(:meth:`.sightings.Sightings.leased`); the lifecycle does that join and moves the node.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from ..config import DhcpSettings
from ..identity import Arch
from ..util.lru import Lru
from .spec import Client

#: the default window. OVMF under Secure Boot, refusing ipxe.efi fetched over PXEv4, spent
#: about a minute on PXEv6 (no DHCPv6 server: its own retransmission timers, not CPU
#: speed) before its HTTP Boot DHCPDISCOVER; a server's reboot takes minutes.
#: docs/firmware.md has the measurements.
DEFAULT_WINDOW: float = DhcpSettings.model_fields["refused_loader_window"].default


@dataclass(frozen=True, slots=True)
class Download:
    """A loader that went in full to a client's firmware, not yet seen running."""

    name: str
    transport: str  # tftp | http
    at: float
    #: seconds from the download to the firmware's fresh attempt (set by ``attempt``)
    waited: float = 0.0


class LoaderWatch:
    """Per MAC, the last loader download not yet seen running (``limit`` MACs, LRU)."""

    def __init__(self, window: float = DEFAULT_WINDOW, limit: int = 100_000, *,
                 clock: Callable[[], float] = time.monotonic):
        self.window = window
        self._clock = clock
        self._pending: Lru[str, Download] = Lru(limit)

    def __len__(self) -> int:
        return len(self._pending)

    def sent(self, mac: str, name: str, transport: str) -> None:
        """Loader ``name`` was sent in full to ``mac``. Another loader after the one
        pending (shim's ``grubx64.efi``) shows the first one runs: nothing is pending."""
        pending = self._pending.get(mac)
        if pending is not None and pending.name != name:
            self._pending.pop(mac)
            return
        self._pending.put(mac, Download(name, transport, self._clock()))

    def ran(self, mac: str) -> None:
        """``mac``'s loader showed it runs (it asked for a script, or DHCPed as iPXE)."""
        self._pending.pop(mac)

    def attempt(self, client: Client) -> Download | None:
        """A DHCP request (a DISCOVER) that got an offer: the refused download if this is
        the firmware starting over within the window, else None. Either way the
        download is settled and forgotten."""
        pending = self._pending.pop(client.mac)
        if pending is None:
            return None
        if client.ipxe:  # the loader is iPXE, and it runs
            return None
        if client.arch in (Arch.BIOS, Arch.UNKNOWN):
            return None
        waited = self._clock() - pending.at
        if waited > self.window:
            return None
        return replace(pending, waited=waited)
