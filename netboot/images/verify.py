"""Checking images: GPG signatures (gpgv), published digests, files on disk against
the manifest, and the startup check that profiles' images exist."""

from __future__ import annotations

import base64
import contextlib
import re
import shutil
import subprocess
import tempfile
from pathlib import Path, PurePosixPath

from ..config import Profile
from ..util.confine import ConfineError, confine
from .manifest import FCOS_STREAMS, FLATCAR_CHANNELS, ImageError, ImageRecord, Manifest, hash_file

# -- GPG ----------------------------------------------------------------------------------

def _dearmor(data: bytes) -> bytes:
    """ASCII-armoured OpenPGP (as Flatcar publishes its key) to binary, which gpgv needs."""
    lines = data.decode("ascii", "replace").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith("-----BEGIN PGP"))
    except StopIteration:
        return data
    body: list[str] = []
    in_headers = True
    for line in lines[start + 1:]:
        if line.startswith("-----END PGP"):
            break
        if in_headers:
            if not line.strip():
                in_headers = False
            elif ":" not in line:  # no header block at all
                in_headers = False
                body.append(line)
            continue
        if line.startswith("="):  # CRC24 checksum line
            continue
        body.append(line.strip())
    return base64.b64decode("".join(body))


def gpg_verify(data: Path, signature: Path, keyring: Path) -> None:
    """Check a detached signature with ``gpgv``: it only verifies, needs no GNUPGHOME,
    agent or trust database, and trusts exactly the keys in ``keyring``."""
    gpgv = shutil.which("gpgv")
    if gpgv is None:
        raise ImageError("gpgv is not installed; install it (apt-get install gpgv) or drop "
                         "--keyring to rely on digests only")
    try:
        raw = keyring.read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read keyring {keyring}: {exc.strerror}") from None
    with tempfile.TemporaryDirectory(prefix="netboot-gpgv-") as tmp:
        ring = Path(tmp) / "keyring.gpg"
        ring.write_bytes(_dearmor(raw))
        proc = subprocess.run([gpgv, "--homedir", tmp, "--status-fd", "1", "--keyring",
                               str(ring), str(signature), str(data)],
                              check=False, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or "[GNUPG:] VALIDSIG" not in proc.stdout:
        said = " ".join(line.strip() for line in proc.stderr.splitlines() if line.strip())
        raise ImageError(f"bad GPG signature for {data.name}: gpgv said: {said or 'no output'}")


# -- digests ------------------------------------------------------------------------------

def parse_digests(text: str, filename: str, algorithm: str = "SHA512") -> str | None:
    """The ``algorithm`` digest of ``filename`` from a Flatcar/Gentoo DIGESTS file:
    sections headed ``# SHA512 HASH`` with ``<hex>  <name>`` lines below."""
    section = None
    for line in text.splitlines():
        line = line.strip()
        if m := re.match(r"^#\s*(\S+)\s+HASH\s*$", line, re.IGNORECASE):
            section = m.group(1).upper()
            continue
        if section != algorithm.upper() or not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == filename:
            return parts[0].lower()
    return None


def verify_record(images_dir: Path, rec: ImageRecord, keyring: Path | None = None) -> list[str]:
    """Problems with one image's files on disk (empty when all match the manifest)."""
    problems: list[str] = []
    folder = images_dir / rec.name / rec.version
    for f in rec.files:
        path = folder / f.path
        try:
            size, h256, h512 = hash_file(path)
        except FileNotFoundError:
            problems.append(f"{rec.key}/{f.path}: missing")
            continue
        if size != f.size or h256 != f.sha256 or h512 != f.sha512:
            problems.append(f"{rec.key}/{f.path}: content changed since it was verified "
                            f"(size {size}, expected {f.size}; sha256 {h256}, expected "
                            f"{f.sha256})")
    if keyring is not None and not problems:
        for f in rec.files:
            if f.kind == "signature":
                try:
                    gpg_verify(folder / f.path.removesuffix(".sig"), folder / f.path, keyring)
                except ImageError as exc:
                    problems.append(f"{rec.key}: {exc}")
    return problems


# -- startup check ----------------------------------------------------------------------

def check_profile_images(profiles: dict[str, Profile], images_dir: Path) -> list[str]:
    """One message per profile whose kernel or initrds are missing (or reach outside
    images_dir, which HTTP and TFTP refuse to serve), saying how to get them."""
    root = images_dir.resolve()
    manifest = None
    with contextlib.suppress(ImageError, OSError):
        manifest = Manifest.load(images_dir)
    messages = []
    for name, prof in sorted(profiles.items()):
        missing: list[str] = []
        other = [f for a in prof.arches.values() for f in (a.kernel, *a.initrds)]
        for item in [prof.kernel, *prof.initrds, *other]:
            try:
                path = confine(root, item)  # the rules HTTP and TFTP serve by
            except ConfineError:
                missing.append(item)
                continue
            if manifest is not None and (size := _recorded_size(manifest, root, path)) \
                    is not None and size != path.stat().st_size:
                missing.append(f"{item} (size differs from the manifest: run netboot images "
                               "verify)")
        if missing:
            hints = sorted({_hint(m) for m in missing})
            messages.append(f"profile {name}: missing from {root}: {', '.join(missing)}; "
                            + "; ".join(hints))
    return messages


def _recorded_size(manifest: Manifest, root: Path, path: Path) -> int | None:
    rel = path.relative_to(root).parts
    if len(rel) != 3:
        return None
    rec = manifest.images.get(f"{rel[0]}/{rel[1]}")
    for f in rec.files if rec else []:
        if f.path == rel[2]:
            return f.size
    return None


def _hint(item: str) -> str:
    parts = PurePosixPath(item).parts
    head = parts[0] if parts else ""
    osname, _, arch = head.partition("-")
    version = parts[1] if len(parts) > 2 else None
    arch_flag = f" --arch {arch}" if arch else ""
    if osname == "flatcar":
        if version in FLATCAR_CHANNELS:
            return f"fetch it with: netboot images fetch flatcar --channel {version}{arch_flag}"
        return ("fetch it with: netboot images fetch flatcar --channel stable|beta|alpha"
                f"{f' --version {version}' if version else ''}{arch_flag}")
    if osname == "fcos":
        stream = version if version in FCOS_STREAMS else "stable"
        return (f"fetch it with: netboot images fetch fcos --stream {stream}{arch_flag}"
                + ("" if version in FCOS_STREAMS or version is None else
                   f" (if {version} is still that stream's release)"))
    if head == "demo":
        return "make images builds the demo OS"
    if head == "arm64":
        return "make images fetches the arm64 demo OS (scripts/arm64_os.py)"
    if head == "commission":
        return "make images builds the commissioning OS (scripts/commission_os.py)"
    return "copy it there, or bring it with netboot images import FILE.tar"
