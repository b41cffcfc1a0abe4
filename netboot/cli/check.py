"""``netboot check``: validate config, profiles, machines and images offline."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import ConfigStore, ServerConfig

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
    for warning in (loader_warnings(store.server) + secure_boot_warnings(store)
                    + bmc_warnings(store)):
        print(f"warning: {warning}", file=sys.stderr)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        print(f"{len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"ok: {args.config}: {len(snap.profiles)} profile(s), "
          f"{len(snap.machine_files)} machine(s)")
    return 0


def loader_warnings(cfg: ServerConfig) -> list[str]:
    """The loaders no TFTP root holds (the same list the server logs at start)."""
    from ..loaders import LoaderTable, missing

    absent = missing(cfg, LoaderTable(cfg.tftp.roots, cfg.loader_aliases))
    if not absent:
        return []
    return [f"no loader for {', '.join(absent)} in {', '.join(map(str, cfg.tftp.roots))}: "
            "such clients are not offered one"]


def secure_boot_warnings(store: ConfigStore) -> list[str]:
    """A profile booted under Secure Boot whose kernel carries no PE signature: shim
    and GRUB would refuse it."""
    from ..images.pe import NotPE, signed

    snap = store.snapshot
    by_machine = {m.profile or snap.server.default_profile for m in snap.machine_files
                  if m.secure_boot}
    out = []
    for name, prof in sorted(snap.profiles.items()):
        secure = prof.secure_boot if prof.secure_boot is not None else (
            snap.server.secure_boot or name in by_machine)
        if not secure:
            continue
        for kernel in (prof.kernel, *(a.kernel for a in prof.arches.values())):
            path = store.server.images_dir / kernel
            try:
                if signed(path):
                    continue
                why = "has no PE signature (certificate table)"
            except NotPE as exc:
                why = f"is not a PE image ({exc})"
            except OSError:
                continue  # missing: check_profile_images says so
            out.append(f"profile {name}: boots under Secure Boot, but its kernel {kernel} "
                       f"{why}: shim and GRUB will refuse it (use a signed kernel, e.g. "
                       "Debian's linux-image-amd64 or -arm64, or sign it with sbsign)")
    return out


def bmc_warnings(store: ConfigStore) -> list[str]:
    """IPMI BMCs are configured but ipmitool, which the IPMI driver runs, is not here."""
    snap = store.snapshot
    creds = snap.server.bmc.credentials
    users = [str(path) for m, path in snap.machine_files.items()
             if m.bmc is not None and m.bmc.driver == "ipmi"]
    if creds is not None and creds.driver == "ipmi":
        users.insert(0, "bmc.credentials")
    if not users or shutil.which("ipmitool"):
        return []
    more = f" and {len(users) - 3} more" if len(users) > 3 else ""
    return [f"{', '.join(users[:3])}{more} use the ipmi driver, but ipmitool is not "
            "installed: power control will fail (apt-get install ipmitool)"]
