"""``netboot serve``: run ProxyDHCP, TFTP and HTTP in one process."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..util.ratelimit import RateLimitedLog

DEFAULT_CONFIG = Path("configs/netboot.yaml")


def add_parser(sub: Any) -> None:
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
    from ..config import ConfigError, load_server_config
    from ..server import SetupError, serve

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
