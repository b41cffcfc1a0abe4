"""Which MAC, UUID and address belong together, as the protocols saw them. Bounded.

- DHCP sees MAC and UUID (option 97); pxelinux later asks by MAC only.
- A boot script or pxelinux config ties a client address to a node; its kernel,
  initrd and OEM fetches come from that address.
- A firmware's own DHCPREQUEST to the site's server names the address it will use
  (option 50, or ciaddr): its loader download comes from that address, by MAC.
- A TFTP OEM fetch has no signature: the address that was just handed this
  node's config may fetch its archive (a grant, for ``grant_ttl`` seconds).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..util.lru import Lru


class Sightings:
    def __init__(self, limit: int = 100_000, *, grant_ttl: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic):
        self.grant_ttl = grant_ttl
        self._clock = clock
        self._uuid_by_mac: Lru[str, str] = Lru(limit)
        self._by_address: Lru[str, tuple[str | None, str | None]] = Lru(limit)
        self._grants: Lru[str, tuple[str, float]] = Lru(limit)
        self._mac_by_lease: Lru[str, str] = Lru(limit)

    def __repr__(self) -> str:
        return (f"Sightings(macs={len(self._uuid_by_mac)}, addresses={len(self._by_address)}, "
                f"grants={len(self._grants)}, leases={len(self._mac_by_lease)})")

    # -- DHCP: MAC -> UUID ----------------------------------------------------
    def dhcp(self, mac: str, uuid: str) -> None:
        if self._uuid_by_mac.get(mac) != uuid:
            self._uuid_by_mac.put(mac, uuid)

    def uuid_for_mac(self, mac: str) -> str | None:
        return self._uuid_by_mac.get(mac)

    # -- DHCP: the address a client asked the site's server for -> MAC -----------
    def leased(self, mac: str, address: str) -> None:
        if self._mac_by_lease.get(address) != mac:
            self._mac_by_lease.put(address, mac)

    def mac_leased(self, address: str) -> str | None:
        """The MAC whose DHCPREQUEST last asked for ``address``, or None."""
        return self._mac_by_lease.get(address)

    # -- a boot script or config: address -> node -------------------------------
    def booted(self, address: str, uuid: str | None, mac: str | None) -> None:
        self._by_address.put(address, (uuid, mac))

    def at(self, address: str) -> tuple[str | None, str | None]:
        """(uuid, mac) the address last booted as, or (None, None)."""
        return self._by_address.get(address) or (None, None)

    # -- OEM archives over TFTP ----------------------------------------------
    def grant(self, address: str, uuid: str) -> None:
        """``address`` just booted as ``uuid``: it may fetch that node's OEM archive."""
        self._grants.put(address, (uuid, self._clock()))

    def granted(self, address: str, uuid: str) -> bool:
        entry = self._grants.get(address)
        return (entry is not None and entry[0] == uuid
                and self._clock() - entry[1] <= self.grant_ttl)
