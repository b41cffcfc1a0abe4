"""TFTP server: a sans-I/O protocol core (packet, session) under a thin asyncio layer (server)."""

from __future__ import annotations

from netboot.tftp.provider import (
    BytesProvider,
    FileProvider,
    Provider,
    Resolver,
    RootResolver,
    TftpError,
    normalise_path,
)
from netboot.tftp.server import TftpServer, start_tftp

__all__ = ["BytesProvider", "FileProvider", "Provider", "Resolver", "RootResolver", "TftpError",
           "TftpServer", "normalise_path", "start_tftp"]
