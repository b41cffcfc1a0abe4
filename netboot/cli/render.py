"""netboot render ignition|oem MAC|UUID: what a node would get, offline.

It builds the same Booter and Artifacts that ``netboot serve`` builds (same
config, secret, advertised address, registry and swarm facts) and asks them
for the node's artefacts, so the printed JSON and the written archive are
byte for byte what the server hands that node.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path("configs/netboot.yaml")


class RenderError(Exception):
    pass


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``render ignition`` and ``render oem``; handlers return an exit code."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("node", metavar="MAC|UUID", help="the machine's MAC or SMBIOS UUID")
    common.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="server config file (default: %(default)s)")
    common.add_argument("--interface", help="as for serve: the address URLs are built from")
    common.add_argument("--address", help="as for serve: the advertised address")
    common.add_argument("--http-port", type=int, help="as for serve")
    common.add_argument("--data-dir", type=Path, help="as for serve: registry and secret")
    render = subparsers.add_parser(
        "render", help="print a node's Ignition config or write its OEM archive",
        description=__doc__.splitlines()[0])
    sub = render.add_subparsers(dest="render_command", required=True, metavar="WHAT")
    p = sub.add_parser("ignition", parents=[common],
                       help="print the exact Ignition JSON the node would get")
    p.set_defaults(func=cmd_ignition)
    p = sub.add_parser("oem", parents=[common],
                       help="write the exact OEM archive (gzip'd cpio) the node would get")
    p.add_argument("-o", "--output", type=Path, required=True, help="file to write ('-': stdout)")
    p.set_defaults(func=cmd_oem)
    return render


async def node_artifacts(args: argparse.Namespace) -> Any:
    """The node's NodeArtifacts, built exactly as ``serve`` builds them."""
    from ..boot.booter import Booter
    from ..config import ConfigError, ConfigStore
    from ..identity import IdentityError, normalise_mac, normalise_uuid
    from ..ignition.artifacts import Artifacts
    from ..server import SetupError, load_secret, pick_address, registry_place
    from ..storage.registry import Registry

    try:
        store = ConfigStore(args.config, interface=args.interface, address=args.address,
                            http_port=args.http_port, data_dir=args.data_dir)
    except ConfigError as exc:
        raise RenderError("\n".join(exc.problems)) from None
    cfg = store.server
    try:
        _iface, addr = pick_address(cfg.interface, cfg.address)
    except SetupError as exc:
        raise RenderError(str(exc)) from None
    try:
        secret = load_secret(cfg)
    except SetupError as exc:
        raise RenderError(str(exc)) from None
    registry = await Registry.open(cfg.data_dir, secret=secret, **registry_place(cfg))
    try:
        artifacts = Artifacts.from_config(cfg, secret)
        await artifacts.swarm.refresh()
        booter = Booter(store, addr, cfg.http_port, registry=registry, artifacts=artifacts)
        snap = store.snapshot
        mac: str | None = None
        uuid: str | None = None
        try:
            mac = normalise_mac(args.node)
        except IdentityError:
            try:
                uuid = normalise_uuid(args.node)
            except IdentityError:
                raise RenderError(f"{args.node!r} is neither a MAC nor a UUID") from None
        if mac is not None:
            node = registry.by_mac(mac)
            machine = snap.machines_by_mac.get(mac)
            uuid = (node.uuid if node else None) or (machine.uuid if machine else None)
            if uuid is None:
                raise RenderError(f"no UUID known for {mac}: Ignition URLs and configs are "
                                  "per SMBIOS UUID; boot it once or give its UUID")
        else:
            assert uuid is not None
            node = registry.get(uuid)
            machine = snap.machines_by_uuid.get(uuid)
            if node is not None and node.macs:
                mac = node.macs[0]
            elif machine is not None and machine.all_macs:
                mac = machine.all_macs[0]
        if booter.resolve(mac, uuid).profile is None:
            raise RenderError(f"{args.node}: not booted by netboot: "
                              f"{booter.resolve(mac, uuid).reason}")
        a, why = booter.artifacts_for(mac, uuid)
        if a is None or not a.ok:
            raise RenderError(f"{args.node}: {why}")
        return a
    finally:
        await registry.close()


def _run(args: argparse.Namespace) -> Any:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(node_artifacts(args))
    except RenderError as exc:
        print(f"netboot render: {exc}", file=sys.stderr)
        return None


def cmd_ignition(args: argparse.Namespace) -> int:
    a = _run(args)
    if a is None:
        return 1
    sys.stdout.buffer.write(a.config)
    if sys.stdout.isatty():
        sys.stdout.buffer.write(b"\n")
    sys.stdout.flush()
    return 0


def cmd_oem(args: argparse.Namespace) -> int:
    a = _run(args)
    if a is None:
        return 1
    if str(args.output) == "-":
        sys.stdout.buffer.write(a.archive)
        sys.stdout.flush()
    else:
        args.output.write_bytes(a.archive)
        print(f"{args.output}: {len(a.archive)} bytes, config sha256 {a.digest}",
              file=sys.stderr)
    return 0
