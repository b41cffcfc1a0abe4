"""``netboot check``: validate config, profiles, machines and images offline."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path("configs/netboot.yaml")


def add_parser(sub: Any) -> None:
    check = sub.add_parser("check", help="validate config, profiles and machines offline",
                           description="Validate netboot.yaml, every profile and machine "
                           "file, and that the images profiles name exist. Exits 1 on any "
                           "problem, printing file:line: field: message.")
    check.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    check.set_defaults(func=cmd_check)


def cmd_check(args: argparse.Namespace) -> int:
    """Validate everything offline, with the same messages the server logs."""
    from ..config import ConfigError, ConfigStore
    from ..images.verify import check_profile_images

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
