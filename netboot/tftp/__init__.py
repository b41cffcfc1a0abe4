"""TFTP server: a sans-I/O protocol core (packet, session) under a thin asyncio layer (server)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from netboot.tftp.provider import (
    BytesProvider,
    FileProvider,
    Provider,
    Resolver,
    RootResolver,
    TftpError,
    normalise_path,
)

if TYPE_CHECKING:
    from netboot.tftp.server import TftpServer, start_tftp

__all__ = ["BytesProvider", "FileProvider", "Provider", "Resolver", "RootResolver", "TftpError",
           "TftpServer", "normalise_path", "start_tftp"]


def __getattr__(name: str) -> Any:
    # The server module is imported on first use, not with the package: importing it
    # here made `python -m netboot.tftp.server` warn (the module was already in
    # sys.modules when runpy came to execute it as __main__).
    if name in ("TftpServer", "start_tftp"):
        from netboot.tftp import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
