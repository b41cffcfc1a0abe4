"""First-stage loaders (iPXE, pxelinux and its modules, shim and GRUB) from the
distribution's package directories, served over TFTP and HTTP by bare file name.

Debian links some of them out of their directory (``/usr/lib/ipxe/ipxe.efi``
-> ``/boot/ipxe.efi``), so strict root confinement would refuse them. Instead
the table is built once from the top level of each configured directory: a
name maps to the regular file it resolves to, and nothing else (no
subdirectories, no ``..``, no names that were not there at start) is served.

Some packages name a file otherwise than clients ask for it: shim asks for
``grubx64.efi`` beside itself, Debian ships ``grubnetx64.efi.signed``. ``aliases``
(served name -> file name) adds those names to the table, once, at start, and wins
over a file of the served name (shim-signed also ships an unsigned ``shimx64.efi``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from .tftp.packet import ERR_NOT_FOUND
from .tftp.provider import FileProvider, Provider, TftpError

if TYPE_CHECKING:
    from .config import ServerConfig


class LoaderTable:
    def __init__(self, roots: list[Path], aliases: Mapping[str, str] | None = None):
        self.roots = [r for r in roots if r.is_dir()]
        self.files: dict[str, Path] = {}
        for root in self.roots:
            for entry in sorted(root.iterdir()):
                if entry.name in self.files:
                    continue  # the first root holding a name wins
                try:
                    real = entry.resolve(strict=True)
                except (OSError, RuntimeError):
                    continue
                if real.is_file():
                    self.files[entry.name] = real
        for served, name in (aliases or {}).items():
            if name in self.files:  # wins: /usr/lib/shim has an unsigned shimx64.efi too
                self.files[served] = self.files[name]

    def path(self, name: str) -> Path | None:
        return self.files.get(name)

    def __call__(self, name: str, client: tuple[str, int]) -> Provider:
        """TFTP resolver: ``name`` is already normalised."""
        path = self.files.get(name)
        if path is None:
            raise TftpError(ERR_NOT_FOUND, "file not found")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            raise TftpError(ERR_NOT_FOUND, "file not found") from None
        return FileProvider(path, fd=fd)


def wanted(cfg: ServerConfig) -> dict[str, str]:
    """What each boot path needs from the table: purpose -> served name."""
    return {**cfg.loaders, "pxelinux": cfg.pxelinux_loader,
            "Secure Boot (shim-signed)": cfg.shim_loader,
            "GRUB (grub-efi-amd64-signed)": cfg.grub_loader,
            "arm64 Secure Boot (shim-signed:arm64)": cfg.shim_loader_arm64,
            "arm64 GRUB (grub-efi-arm64-signed:arm64)": cfg.grub_loader_arm64}


def missing(cfg: ServerConfig, table: LoaderTable) -> list[str]:
    """``purpose (name)`` for every loader netboot may offer that no root holds."""
    return sorted(f"{what} ({name})" for what, name in wanted(cfg).items()
                  if table.path(name) is None)
