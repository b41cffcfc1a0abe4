"""`python -m netboot.tftp`: the standalone server for tests, benchmarks and labs."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from netboot.tftp.provider import RootResolver
from netboot.tftp.server import start_tftp


async def _serve(args: argparse.Namespace) -> None:
    server = await start_tftp(RootResolver([Path(r) for r in args.root]), args.host, args.port,
                              interface=args.interface, single_port=args.single_port,
                              max_transfers=args.max_transfers,
                              max_per_client=args.max_per_client, timeout=args.timeout)
    print(f"listening {server.host} {server.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.close()
    if args.stats:
        sys.stdout.write(server.counters.render())
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    """Standalone server for tests, benchmarks and labs: serve --root directories until SIGTERM."""
    ap = argparse.ArgumentParser(prog="python -m netboot.tftp")
    ap.add_argument("--root", action="append", required=True, help="directory to serve (repeat)")
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=69, help="0 picks a free port (printed)")
    ap.add_argument("--interface")
    ap.add_argument("--single-port", action="store_true")
    ap.add_argument("--max-transfers", type=int, default=1000)
    ap.add_argument("--max-per-client", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=1.0)
    ap.add_argument("--uvloop", action="store_true", help="run on uvloop instead of asyncio")
    ap.add_argument("--stats", action="store_true", help="print counters on exit")
    args = ap.parse_args(argv)
    if args.uvloop:
        import uvloop

        uvloop.run(_serve(args))
    else:
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
