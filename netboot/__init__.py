"""netboot: network-boot bare machines from one asyncio process."""

__version__ = "0.1.0"
