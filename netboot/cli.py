"""The ``netboot`` command."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .util.ratelimit import RateLimitedLog

DEFAULT_CONFIG = Path("configs/netboot.yaml")

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


class MalformedHttpSummary(logging.Filter):
    """aiohttp logs a full traceback for every malformed request; a flood of them
    would flood the log. Drop those records and keep one line a minute saying how
    many there were."""

    def __init__(self, every: float = 60.0, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.log = RateLimitedLog(
            logging.getLogger("aiohttp.server"),
            "%d malformed HTTP request(s) dropped since the last report (%s); latest: %s",
            every=every, clock=clock)

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        text = (exc.message or str(exc)).strip()  # str() starts "400, message:\n"
        self.log.record(type(exc).__name__, text.splitlines()[0][:200] if text else "-")
        return False


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()),
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    for noisy in ("aiosqlite", "asyncio", "watchfiles"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, logging.root.level))
    logging.getLogger("aiohttp.server").addFilter(MalformedHttpSummary())


def cmd_serve(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_server_config
    from .server import SetupError, serve

    try:
        level = args.log_level or load_server_config(args.config).log_level
    except Exception:
        level = args.log_level or "info"
    _setup_logging(level)
    log = logging.getLogger("netboot")
    try:
        import uvloop  # twice the UDP throughput of the default loop, measured here

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        runner(serve(args.config, interface=args.interface, address=args.address,
                     http_port=args.http_port, data_dir=args.data_dir))
    except ConfigError as exc:
        for p in exc.problems:
            log.error("%s", p)
        log.error("not starting: fix the configuration (netboot check --config %s)", args.config)
        return 2
    except SetupError as exc:
        log.error("%s", exc)
        return 2
    except PermissionError as exc:
        log.error("%s: ports 67, 69 and 4011 need root or CAP_NET_BIND_SERVICE", exc)
        return 2
    except OSError as exc:
        if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):  # e.g. ENOSPC in data_dir
            log.error("cannot start: %s", exc)
            return 2
        log.error("cannot listen: %s (is another DHCP/TFTP server running on this host? "
                  "dnsmasq often is)", exc)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Validate everything offline, with the same messages the server logs."""
    from .config import ConfigError, ConfigStore
    from .images import check_profile_images

    logging.disable(logging.CRITICAL)
    try:
        store = ConfigStore(args.config)
    except ConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 1
    problems = list(store.problems)
    snap = store.snapshot
    problems += check_profile_images(snap.profiles, store.server.images_dir)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        print(f"{len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"ok: {args.config}: {len(snap.profiles)} profile(s), "
          f"{len(snap.machine_files)} machine(s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="netboot", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"netboot {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run ProxyDHCP, TFTP and HTTP",
                           description="Run ProxyDHCP, TFTP and HTTP in one process. "
                           "Flags override netboot.yaml.")
    serve.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                       help="server config file (default: %(default)s)")
    serve.add_argument("--interface", help="interface to serve DHCP/TFTP on "
                       "(default: the first non-loopback interface with IPv4)")
    serve.add_argument("--address", help="address advertised to clients "
                       "(default: the interface's first IPv4)")
    serve.add_argument("--http-port", type=int, help="HTTP port (default 8080)")
    serve.add_argument("--data-dir", type=Path, help="where the registry and secrets live")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check", help="validate config, profiles and machines offline",
                           description="Validate netboot.yaml, every profile and machine "
                           "file, and that the images profiles name exist. Exits 1 on any "
                           "problem, printing file:line: field: message.")
    check.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    check.set_defaults(func=cmd_check)

    from . import cli_images, cli_nodes, cli_probe, cli_render

    for module in (cli_nodes, cli_render, cli_probe, cli_images):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
