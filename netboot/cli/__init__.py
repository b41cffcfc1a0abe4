"""The ``netboot`` command: the top-level parser; each verb is a module of this package."""

from __future__ import annotations

import argparse

from . import check, images, nodes, power, probe, render, serve

DESCRIPTION = """\
netboot boots bare machines over the network from one process: a ProxyDHCP
responder beside your site's DHCP server (udp/67 and udp/4011), a TFTP server
for first-stage loaders (udp/69) and an HTTP server for iPXE scripts, kernels,
initrds, Ignition, the node registry and the dashboard.
"""

EPILOG = """\
examples:
  netboot serve --config configs/netboot.yaml --interface br0
  netboot check --config configs/netboot.yaml
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="netboot", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"netboot {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    for module in (serve, check, nodes, power, render, probe, images):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)
