"""`python -m netboot.tftp`: the standalone server (same as `python -m netboot.tftp.server`)."""

from netboot.tftp.server import main

main()
