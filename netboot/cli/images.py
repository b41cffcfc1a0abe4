"""``netboot images``: fetch, list, verify, export and import boot images.

Works on the images_dir of ``--config`` (or ``--images-dir``) directly; it needs
no running server, and the server picks new files up on the next request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from ..images.archive import export_images, import_images
from ..images.fetch import fetch
from ..images.manifest import FCOS_STREAMS, FLATCAR_CHANNELS, ImageError, ImageRecord, Manifest
from ..images.progress import Progress
from ..images.verify import verify_record

DEFAULT_CONFIG = Path("configs/netboot.yaml")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``images fetch|list|verify|export|import``; handlers return an exit code."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="server config whose images_dir to use (default: %(default)s)")
    common.add_argument("--images-dir", type=Path,
                        help="images directory (overrides the config's images_dir)")
    keyring = argparse.ArgumentParser(add_help=False)
    keyring.add_argument("--keyring", type=Path,
                         help="OpenPGP public key(s) (binary or ASCII-armoured) that must have "
                         "signed each file; without it only digests are checked")

    images = subparsers.add_parser("images", help="fetch, list, verify, export, import images",
                                   description=__doc__.splitlines()[0])
    sub = images.add_subparsers(dest="images_command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "fetch", parents=[common, keyring], help="download and verify a Flatcar or FCOS release",
        description="Download a release's PXE kernel and initrd(s) into "
        "images_dir/<name>/<version>/, resuming interrupted downloads, check them against "
        "the release's published digests (and GPG signatures with --keyring), and record "
        "them in images_dir/manifest.json. Without --version the channel's current release "
        "is fetched and images_dir/<name>/<channel> is pointed at it.",
        epilog="examples:\n  netboot images fetch flatcar --channel stable\n"
        "  netboot images fetch flatcar --channel beta --version 4012.1.0 --arch arm64\n"
        "  netboot images fetch fcos --stream stable --keyring fedora.gpg\n"
        "  netboot images fetch flatcar --base-url http://mirror.lan/flatcar/{channel}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("os", choices=["flatcar", "fcos"])
    p.add_argument("--channel", choices=FLATCAR_CHANNELS, help="Flatcar channel (stable)")
    p.add_argument("--stream", choices=FCOS_STREAMS, help="Fedora CoreOS stream (stable)")
    p.add_argument("--version", help="release to fetch (default: the channel's current)")
    p.add_argument("--arch", help="amd64|arm64 (Flatcar), x86_64|aarch64 (FCOS)")
    p.add_argument("--base-url", help="mirror to fetch from; '{channel}' is replaced for "
                   "Flatcar (default https://{channel}.release.flatcar-linux.net, "
                   "https://builds.coreos.fedoraproject.org)")
    p.add_argument("--retries", type=int, default=3,
                   help="resume a dropped download this many times (default: %(default)s)")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("list", parents=[common], help="table of images in the manifest")
    p.add_argument("--json", action="store_true", help="print the manifest")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("verify", parents=[common, keyring],
                       help="re-hash images against the manifest")
    p.add_argument("image", nargs="*", help="name or name/version (default: all)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("export", parents=[common],
                       help="write images and their manifest to a tar for an offline site")
    p.add_argument("file", type=Path, help="tar file to write")
    p.add_argument("image", nargs="*", help="name or name/version (default: all)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", parents=[common, keyring],
                       help="install images from an exported tar, re-verifying every file")
    p.add_argument("file", type=Path, help="tar written by netboot images export")
    p.set_defaults(func=cmd_import)
    return images


def _images_dir(args: argparse.Namespace) -> Path:
    if args.images_dir is not None:
        return args.images_dir.resolve()
    from ..config import load_server_config
    from ..yamlsrc import SourceError

    try:
        return load_server_config(args.config).images_dir
    except SourceError as exc:
        raise ImageError(f"cannot read {args.config}: {exc.problems[0]}; give --config or "
                         "--images-dir") from None
    except FileNotFoundError:
        raise ImageError(f"no config file {args.config}; give --config or --images-dir") from None


def _keyring(args: argparse.Namespace, os_name: str | None) -> Path | None:
    """--keyring, else the config's ``image_keyrings[os]`` when the config has one."""
    if getattr(args, "keyring", None) is not None:
        return args.keyring
    if os_name is None or args.images_dir is not None:
        return None
    try:
        from ..config import load_server_config

        configured = getattr(load_server_config(args.config), "image_keyrings", None) or {}
    except Exception:  # noqa: BLE001 - no readable config means no configured keyring
        return None
    path = configured.get(os_name)
    return Path(path) if path else None


def _run(func: Any, args: argparse.Namespace) -> int:
    try:
        return int(func(args) or 0)
    except ImageError as exc:
        print(f"netboot images: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; re-run to resume", file=sys.stderr)
        return 130


def cmd_fetch(args: argparse.Namespace) -> int:
    def go(args: argparse.Namespace) -> int:
        if args.os == "flatcar" and args.stream:
            raise ImageError("--stream is for fcos; Flatcar has --channel")
        if args.os == "fcos" and args.channel:
            raise ImageError("--channel is for flatcar; Fedora CoreOS has --stream")
        channel = args.channel or args.stream or "stable"
        rec = asyncio.run(fetch(_images_dir(args), args.os, channel=channel,
                                version=args.version, arch=args.arch, base_url=args.base_url,
                                keyring=_keyring(args, args.os), retries=args.retries,
                                progress=Progress()))
        print(f"{rec.key}: verified by {', '.join(rec.verified_by)}")
        for f in rec.files:
            if f.kind != "signature":
                print(f"  {f.kind:<7} {rec.key}/{f.path}")
        return 0
    return _run(go, args)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def format_table(manifest: Manifest) -> str:
    rows = [("NAME", "VERSION", "ARCH", "CHANNEL", "FILES", "SIZE", "VERIFIED BY", "FETCHED")]
    for _key, rec in sorted(manifest.images.items()):
        aliases = [a.split("/")[1] for a, v in manifest.aliases.items()
                   if v == rec.version and a.split("/")[0] == rec.name]
        channel = (rec.channel or "-") + (f" ({','.join(aliases)})" if aliases else "")
        payload = [f for f in rec.files if f.kind != "signature"]
        rows.append((rec.name, rec.version, rec.arch, channel, str(len(payload)),
                     _human(sum(f.size for f in payload)), "+".join(rec.verified_by),
                     rec.fetched))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def cmd_list(args: argparse.Namespace) -> int:
    def go(args: argparse.Namespace) -> int:
        images_dir = _images_dir(args)
        manifest = Manifest.load(images_dir)
        if args.json:
            print(json.dumps(json.loads(manifest.dumps()), indent=2))
        elif not manifest.images:
            print(f"no images in {images_dir} (netboot images fetch flatcar --channel stable)")
        else:
            print(format_table(manifest))
        return 0
    return _run(go, args)


def cmd_verify(args: argparse.Namespace) -> int:
    def go(args: argparse.Namespace) -> int:
        images_dir = _images_dir(args)
        recs = Manifest.load(images_dir).select(args.image)
        bad = 0
        for rec in recs:
            problems = verify_record(images_dir, rec, _keyring(args, rec.os))
            bad += bool(problems)
            print(f"{rec.key}: {'ok' if not problems else 'FAILED'}")
            for p in problems:
                print(f"  {p}")
        if bad:
            print(f"{bad} image(s) failed verification; fetch them again "
                  "(netboot images fetch ...) or import a good export", file=sys.stderr)
        return 1 if bad else 0
    return _run(go, args)


def cmd_export(args: argparse.Namespace) -> int:
    def go(args: argparse.Namespace) -> int:
        recs: list[ImageRecord] = export_images(_images_dir(args), args.file, args.image)
        print(f"wrote {args.file}: {', '.join(r.key for r in recs)}")
        return 0
    return _run(go, args)


def cmd_import(args: argparse.Namespace) -> int:
    def go(args: argparse.Namespace) -> int:
        recs = import_images(_images_dir(args), args.file, args.keyring)
        print(f"imported and verified: {', '.join(r.key for r in recs)}")
        return 0
    return _run(go, args)
