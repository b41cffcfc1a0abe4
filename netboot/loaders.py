"""First-stage loaders (iPXE, pxelinux and its modules) from the distribution's
package directories, served over TFTP and HTTP by bare file name.

Debian links some of them out of their directory (``/usr/lib/ipxe/ipxe.efi``
-> ``/boot/ipxe.efi``), so strict root confinement would refuse them. Instead
the table is built once from the top level of each configured directory: a
name maps to the regular file it resolves to, and nothing else (no
subdirectories, no ``..``, no names that were not there at start) is served.
"""

from __future__ import annotations

import os
from pathlib import Path

from .tftp.packet import ERR_NOT_FOUND
from .tftp.provider import FileProvider, Provider, TftpError


class LoaderTable:
    def __init__(self, roots: list[Path]):
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
