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

# The asyncio layer is not imported with the package: import TftpServer and
# start_tftp from netboot.tftp.server. Importing it here would make the old
# entry point `python -m netboot.tftp.server` warn (runpy finds the module in
# sys.modules before it runs it as __main__).
__all__ = ["BytesProvider", "FileProvider", "Provider", "Resolver", "RootResolver", "TftpError",
           "normalise_path"]
