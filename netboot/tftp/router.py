"""What a TFTP path serves: generated pxelinux, GRUB and U-Boot configs, U-Boot's boot
script, OEM archives, images, loaders.

Admit (a new node), decide, render, record, as on the HTTP side: the lifecycle admits
a new node, the Booter decides, :mod:`netboot.boot.pxelinux`, :mod:`netboot.boot.grub`
or :mod:`netboot.boot.uboot` renders, the lifecycle records.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

from ..boot import grub, pxelinux, uboot
from ..boot.booter import Booter
from ..boot.lifecycle import Lifecycle
from ..boot.spec import Cpu, Decision, Loader
from ..identity import IdentityError, node_uuid, normalise_mac, normalise_uuid
from ..loaders import LoaderTable
from ..metrics import Counters
from .packet import ERR_ACCESS, ERR_NOT_FOUND
from .provider import BytesProvider, Provider, RootResolver, TftpError, normalise_path


@dataclass
class TftpRouter:
    booter: Booter
    lifecycle: Lifecycle
    counters: Counters
    images: RootResolver
    loaders: LoaderTable

    def __call__(self, path: str, client: tuple[str, int]) -> Provider:
        path = normalise_path(path)
        if path == uboot.SCRIPT_NAME:
            return BytesProvider(uboot.SCRIPT_IMAGE)
        if path.startswith(uboot.NODE_DIR):
            return self._uboot(path[len(uboot.NODE_DIR):], client[0])
        if path.startswith("pxelinux.cfg/"):
            return self._pxelinux(path[len("pxelinux.cfg/"):], client[0])
        if path == "grub/grub.cfg":
            return BytesProvider(grub.STUB.encode())
        if path.startswith(grub.ARM64_DIR):
            return self._grub("grub/" + path[len(grub.ARM64_DIR):], client[0], "arm64")
        if path.startswith((grub.MAC_DIR, grub.IP_DIR)):
            return self._grub(path, client[0])
        if path.startswith("oem/"):
            return self._oem(path[len("oem/"):], client[0])
        if path.startswith("images/"):
            provider = self.images(path[len("images/"):], client)
            self.lifecycle.fetched(client[0], "tftp")
            return provider
        return self.loaders(path, client)

    def transferred(self, path: str, peer: tuple[str, int], ok: bool) -> None:
        """A transfer ended (the server's ``on_transfer``): a loader sent in full is
        reported, so a firmware that will not run it can be told apart."""
        if ok and path in self.loaders.files:
            self.lifecycle.loader_sent(peer[0], path, "tftp")

    def _pxelinux(self, name: str, address: str) -> Provider:
        # pxelinux asks for 01-<mac> first, then UUID, hex IP forms and "default".
        if not name.startswith("01-"):
            raise TftpError(ERR_NOT_FOUND, "file not found")
        try:
            mac = normalise_mac(name[3:])
        except IdentityError:
            raise TftpError(ERR_NOT_FOUND, "file not found") from None
        uuid = self.lifecycle.sightings.uuid_for_mac(mac)
        return self._config(mac, uuid, address, "pxelinux", pxelinux.render)

    def _uboot(self, name: str, address: str) -> Provider:
        """A node's U-Boot script (``uboot/<mac>.scr.uimg``, ``uboot/arm64/<mac>...``).
        U-Boot sends no option 97 and netboot's DHCP never answered it, so unless the
        MAC was seen with a UUID before (this run, or in the registry), the node is keyed
        by its MAC (the UUID made from it)."""
        cpu: Cpu = "amd64"
        if name.startswith("arm64/"):
            name, cpu = name[len("arm64/"):], "arm64"
        try:
            mac = normalise_mac(uboot.node_mac(name) or "")
        except IdentityError:
            raise TftpError(ERR_NOT_FOUND, "file not found") from None
        uuid = self.lifecycle.sightings.uuid_for_mac(mac)
        if uuid is None and self.lifecycle.registry is not None:
            known = self.lifecycle.registry.by_mac(mac)  # booted here before (a restart)
            uuid = known.uuid if known is not None else None
        uuid = uuid or node_uuid(None, mac)
        return self._config(mac, uuid, address, "uboot", uboot.render_image, cpu)

    def _config(self, mac: str | None, uuid: str | None, address: str, loader: Loader,
                render: Callable[[Decision], str | bytes | None],
                cpu: Cpu = "amd64") -> Provider:
        """Admit, decide, render, record: a loader's config for this machine, or "file
        not found" when netboot does not serve it (the loader tries its next name)."""
        decision = self.lifecycle.admit(uuid, mac, address, "tftp") or self.booter.decide(
            mac, uuid, loader, cpu)
        text = render(decision)
        if text is None:
            raise TftpError(ERR_NOT_FOUND, "file not found")
        self.lifecycle.served(decision, address, "tftp")
        return BytesProvider(text.encode() if isinstance(text, str) else text)

    def _grub(self, path: str, address: str, cpu: Cpu = "amd64") -> Provider:
        """A node's GRUB config, by MAC (``grub/mac/<mac>.cfg``) or by its own address
        (``grub/ip/<address>.cfg``: only the client at that address, as the node it
        last booted as)."""
        name = path.rpartition("/")[2]
        if not name.endswith(".cfg"):
            raise TftpError(ERR_NOT_FOUND, "file not found")
        key = name.removesuffix(".cfg")
        if path.startswith(grub.MAC_DIR):
            try:
                mac: str | None = normalise_mac(key)
            except IdentityError:
                raise TftpError(ERR_NOT_FOUND, "file not found") from None
            uuid = self.lifecycle.sightings.uuid_for_mac(mac)
        else:
            try:
                asked = str(ipaddress.IPv4Address(key))
            except ValueError:
                raise TftpError(ERR_NOT_FOUND, "file not found") from None
            if asked != address:
                raise TftpError(ERR_NOT_FOUND, "file not found")
            uuid, mac = self.lifecycle.sightings.at(address)
            if mac is None:
                raise TftpError(ERR_NOT_FOUND, "file not found")
        return self._config(mac, uuid, address, "grub", grub.render, cpu)

    def _oem(self, name: str, address: str) -> Provider:
        """``oem/<uuid>.cpio.gz``: only to the address that just booted as that node.

        TFTP has no secrets to sign with, so the client's address is the credential:
        it must be the one netboot handed this node's pxelinux config or iPXE script.
        """
        artifacts = self.lifecycle.artifacts
        try:
            uuid = normalise_uuid(name.removesuffix(".cpio.gz")) if name.endswith(
                ".cpio.gz") else None
        except IdentityError:
            uuid = None
        if artifacts is None or uuid is None:
            raise TftpError(ERR_NOT_FOUND, "file not found")
        if not self.lifecycle.sightings.granted(address, uuid):
            artifacts.refused("address", "oem", uuid, address, "tftp")
            raise TftpError(ERR_ACCESS, "access violation")
        a = self.lifecycle.handed_out(uuid, address)
        if a is None or not a.ok or a.archive is None:
            raise TftpError(ERR_NOT_FOUND, "file not found")
        self.counters.inc("ignition_served_total", kind="oem", transport="tftp")
        self.lifecycle.fetched(address, "tftp")
        return BytesProvider(a.archive)
