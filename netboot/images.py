"""Boot images: fetch Flatcar and Fedora CoreOS PXE kernels and initrds, verify
them, record them in ``images/manifest.json`` and carry them to offline sites.

Layout under ``images_dir``::

    manifest.json                      what is present, with sizes and digests
    flatcar/3975.2.0/flatcar_production_pxe.vmlinuz
    flatcar/3975.2.0/flatcar_production_pxe_image.cpio.gz
    flatcar/stable -> 3975.2.0         channel alias (relative symlink inside the root)
    fcos/39.20240210.3.0/...           fcos-aarch64/, flatcar-arm64/ for other arches

Profiles name images through the path (``kernel: flatcar/3975.2.0/...`` pinned,
or ``flatcar/stable/...`` to follow the last fetch of that channel).

Everything is downloaded into a staging directory *beside* images_dir (never
inside it, because HTTP and TFTP serve everything inside) and moved in only
after its digest, and its GPG signature when a keyring is given, checked out.
Anything that fails a check is deleted.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, Any, TextIO
from urllib.parse import urljoin

import aiohttp
from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter

from .config import Profile
from .util.confine import ConfineError, confine

MANIFEST = "manifest.json"
FLATCAR_BASE = "https://{channel}.release.flatcar-linux.net"
FCOS_BASE = "https://builds.coreos.fedoraproject.org"
FLATCAR_FILES = {"flatcar_production_pxe.vmlinuz": "kernel",
                 "flatcar_production_pxe_image.cpio.gz": "initrd"}
FLATCAR_CHANNELS = ("stable", "beta", "alpha", "lts")
FCOS_STREAMS = ("stable", "testing", "next")
FLATCAR_ARCHES = {"amd64": "amd64", "x86_64": "amd64", "arm64": "arm64", "aarch64": "arm64"}
FCOS_ARCHES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
DEFAULT_ARCH = {"flatcar": "amd64", "fcos": "x86_64"}
CHUNK = 1 << 20
# One path component of a name, version or file: no leading dot (so no "..").
_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


class ImageError(Exception):
    """A problem the user must act on; the text says what happened and what to do."""


# -- records ----------------------------------------------------------------------------

@dataclass
class FileRecord:
    path: str  # file name inside the image directory
    size: int
    sha256: str
    sha512: str
    kind: str = "other"  # kernel, initrd, rootfs, signature
    url: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class ImageRecord:
    name: str  # directory under images_dir: flatcar, flatcar-arm64, fcos, ...
    version: str
    arch: str
    os: str
    channel: str | None
    source: str
    verified_by: list[str]
    fetched: str
    files: list[FileRecord] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.name}/{self.version}"

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["files"] = [f.to_json() for f in self.files]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ImageRecord:
        try:
            files = [FileRecord(**f) for f in d["files"]]
            rec = cls(**{**d, "files": files})
        except (KeyError, TypeError) as exc:
            raise ImageError(f"malformed manifest entry {d.get('name')}/{d.get('version')}: "
                             f"{exc}") from None
        for part in (rec.name, rec.version, *(f.path for f in rec.files)):
            if not isinstance(part, str) or not _COMPONENT.match(part):
                raise ImageError(f"manifest entry {rec.name}/{rec.version}: unsafe name {part!r}")
        return rec


@dataclass
class Manifest:
    images: dict[str, ImageRecord] = field(default_factory=dict)  # key "name/version"
    aliases: dict[str, str] = field(default_factory=dict)  # "flatcar/stable" -> "3975.2.0"

    @classmethod
    def parse(cls, text: str, where: str) -> Manifest:
        try:
            data = json.loads(text)
            recs = [ImageRecord.from_json(d) for d in data.get("images", [])]
            aliases = {str(k): str(v) for k, v in data.get("aliases", {}).items()}
        except (ValueError, AttributeError) as exc:
            raise ImageError(f"{where}: not a netboot image manifest ({exc})") from None
        for alias, version in aliases.items():
            parts = alias.split("/")
            if len(parts) != 2 or not all(_COMPONENT.match(p) for p in [*parts, version]):
                raise ImageError(f"{where}: unsafe alias {alias!r} -> {version!r}")
        return cls({r.key: r for r in recs}, aliases)

    @classmethod
    def load(cls, images_dir: Path) -> Manifest:
        path = images_dir / MANIFEST
        try:
            return cls.parse(path.read_text(), str(path))
        except FileNotFoundError:
            return cls()

    def dumps(self) -> str:
        return json.dumps({"format": 1,
                           "images": [r.to_json() for _, r in sorted(self.images.items())],
                           "aliases": dict(sorted(self.aliases.items()))}, indent=2) + "\n"

    def save(self, images_dir: Path) -> None:
        """Write atomically, so a reader never sees half a manifest."""
        _write_atomic(images_dir / MANIFEST, self.dumps().encode())

    def select(self, patterns: list[str]) -> list[ImageRecord]:
        """Images matching ``name`` or ``name/version`` (all when no pattern)."""
        out = [r for k, r in sorted(self.images.items())
               if not patterns or any(p in (r.name, k) for p in patterns)]
        unknown = [p for p in patterns if not any(p in (r.name, r.key) for r in out)]
        if unknown:
            have = ", ".join(sorted(self.images)) or "none"
            raise ImageError(f"no image {', '.join(unknown)} in the manifest (have: {have})")
        return out


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def hash_file(path: Path) -> tuple[int, str, str]:
    """(size, sha256, sha512) in one pass."""
    h256, h512, size = hashlib.sha256(), hashlib.sha512(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h256.update(chunk)
            h512.update(chunk)
            size += len(chunk)
    return size, h256.hexdigest(), h512.hexdigest()


def staging_dir(images_dir: Path) -> Path:
    """Beside images_dir, on the same filesystem (atomic rename), but never served."""
    images_dir = images_dir.resolve()
    return images_dir.parent / f".{images_dir.name}.staging"


@contextlib.contextmanager
def locked(images_dir: Path) -> Iterator[Path]:
    """One writer at a time per images_dir (fetch, import); yields the staging dir."""
    stage = staging_dir(images_dir)
    stage.mkdir(parents=True, exist_ok=True)
    images_dir.mkdir(parents=True, exist_ok=True)
    with open(stage / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another netboot images command (lock {stage / '.lock'})",
                  file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield stage


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


# -- progress -----------------------------------------------------------------------------

def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


class Progress:
    """A bar on a terminal, plain lines every few seconds elsewhere (logs, CI)."""

    def __init__(self, out: TextIO | None = None, tty: bool | None = None,
                 interval: float | None = None) -> None:
        self.out = out or sys.stderr
        self.tty = self.out.isatty() if tty is None else tty
        self.interval = interval if interval is not None else (0.1 if self.tty else 5.0)
        self.label, self.total, self.done, self.started, self.last = "", 0, 0, 0.0, 0.0
        self.resumed_from = 0
        self.midline = False  # a bar is drawn and the cursor is still on its line

    def start(self, label: str, total: int | None, done: int = 0) -> None:
        self.label, self.total, self.done = label, total or 0, done
        self.resumed_from = done
        self.started = self.last = time.monotonic()
        if not self.tty:
            extra = f", resuming at {_mb(done)}" if done else ""
            size = _mb(self.total) if self.total else "unknown size"
            self.out.write(f"fetch {label}: {size}{extra}\n")
            self.out.flush()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._show(now)

    def _show(self, now: float, end: str = "") -> None:
        rate = (self.done - self.resumed_from) / max(now - self.started, 1e-6)
        pct = 100 * self.done / self.total if self.total else 0.0
        if self.tty:
            width = 24
            fill = int(width * pct / 100)
            room = max(16, shutil.get_terminal_size((100, 24)).columns - 66)
            label = self.label if len(self.label) <= room else "…" + self.label[1 - room:]
            text = (f"\r{label:<{room}} {pct:5.1f}% [{'#' * fill}{'.' * (width - fill)}] "
                    f"{_mb(self.done)}/{_mb(self.total)} {_mb(rate)}/s")
            self.out.write(text + end)
            self.midline = not end
        else:
            self.out.write(f"fetch {self.label}: {pct:.0f}% {_mb(self.done)} of "
                           f"{_mb(self.total)}, {_mb(rate)}/s\n")
        self.out.flush()

    def finish(self) -> None:
        self._show(time.monotonic(), end="\n")

    def note(self, text: str) -> None:
        self.out.write(("\n" if self.midline else "") + text + "\n")
        self.midline = False
        self.out.flush()


# -- fetching -----------------------------------------------------------------------------

@dataclass
class Artifact:
    path: str
    kind: str
    url: str
    sha256: str | None = None
    sha512: str | None = None
    signature_url: str | None = None


@dataclass
class Release:
    name: str
    os: str
    version: str
    arch: str
    channel: str
    source: str
    artifacts: list[Artifact]
    latest: bool  # resolved from the channel's "current", so the channel alias follows it


async def _get_bytes(session: aiohttp.ClientSession, url: str, what: str) -> bytes:
    try:
        async with session.get(url) as resp:
            if resp.status != 200:
                raise ImageError(f"cannot fetch {what}: GET {url} answered HTTP {resp.status}; "
                                 "check the version/channel, or --base-url for a mirror")
            return await resp.read()
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise ImageError(f"cannot fetch {what}: GET {url}: {exc or type(exc).__name__}; "
                         "check the network or give a mirror with --base-url") from None


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


def _check_choice(osname: str, what: str, channel: str, channels: tuple[str, ...], arch: str,
                  arches: dict[str, str]) -> str:
    """The OS's own name for ``arch``, after checking the channel/stream exists."""
    if channel not in channels:
        raise ImageError(f"unknown {osname} {what} {channel!r}; choose one of "
                         f"{', '.join(channels)}")
    if arch not in arches:
        raise ImageError(f"{osname} has no arch {arch!r}; choose one of "
                         f"{', '.join(sorted(set(arches.values())))}")
    return arches[arch]


async def resolve_flatcar(session: aiohttp.ClientSession, channel: str, version: str | None,
                          arch: str, base_url: str | None) -> Release:
    farch = _check_choice("Flatcar", "channel", channel, FLATCAR_CHANNELS, arch, FLATCAR_ARCHES)
    base = (base_url or FLATCAR_BASE).replace("{channel}", channel).rstrip("/")
    latest = version in (None, "current")
    if latest:
        text = (await _get_bytes(session, f"{base}/{farch}-usr/current/version.txt",
                                 f"the current Flatcar {channel} version")).decode()
        found = re.search(r"^FLATCAR_VERSION=(\S+)$", text, re.MULTILINE)
        if not found:
            raise ImageError(f"{base}/{farch}-usr/current/version.txt names no FLATCAR_VERSION")
        version = found.group(1).strip("\"'")
    assert version is not None
    if not _COMPONENT.match(version):
        raise ImageError(f"unsafe Flatcar version {version!r}")
    folder = f"{base}/{farch}-usr/{version}/"
    artifacts = []
    for fname, kind in FLATCAR_FILES.items():
        text = (await _get_bytes(session, folder + fname + ".DIGESTS",
                                 f"the digests of {fname}")).decode("utf-8", "replace")
        digest = parse_digests(text, fname, "SHA512")
        if digest is None or not re.fullmatch(r"[0-9a-f]{128}", digest):
            raise ImageError(f"{folder}{fname}.DIGESTS has no SHA512 line for {fname}; "
                             "refusing an image that cannot be verified")
        artifacts.append(Artifact(fname, kind, folder + fname, sha512=digest,
                                  signature_url=folder + fname + ".sig"))
    name = "flatcar" if farch == "amd64" else f"flatcar-{farch}"
    return Release(name, "flatcar", version, farch, channel, folder, artifacts, latest)


async def resolve_fcos(session: aiohttp.ClientSession, stream: str, version: str | None,
                       arch: str, base_url: str | None) -> Release:
    farch = _check_choice("Fedora CoreOS", "stream", stream, FCOS_STREAMS, arch, FCOS_ARCHES)
    base = (base_url or FCOS_BASE).rstrip("/")
    url = f"{base}/streams/{stream}.json"
    try:
        meta = json.loads(await _get_bytes(session, url, f"the FCOS {stream} stream metadata"))
        metal = meta["architectures"][farch]["artifacts"]["metal"]
        release, pxe = str(metal["release"]), metal["formats"]["pxe"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ImageError(f"{url}: no architectures.{farch}.artifacts.metal.formats.pxe "
                         f"({type(exc).__name__}: {exc})") from None
    if version not in (None, "current", release):
        raise ImageError(f"the {stream} stream's current release is {release}, not {version}; "
                         "stream metadata names only the latest release, so fetch that (drop "
                         "--version) or import an exported tar of the older one")
    if not _COMPONENT.match(release):
        raise ImageError(f"unsafe FCOS release {release!r}")
    artifacts = []
    for key, kind in (("kernel", "kernel"), ("initramfs", "initrd"), ("rootfs", "rootfs")):
        try:
            entry = pxe[key]
            location, sha256 = entry["location"], str(entry["sha256"]).lower()
        except (KeyError, TypeError):
            raise ImageError(f"{url}: pxe.{key} has no location/sha256") from None
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise ImageError(f"{url}: pxe.{key}.sha256 is not a SHA-256 digest")
        loc = _rebase(urljoin(url, location), base)
        fname = PurePosixPath(loc.split("?")[0]).name
        if not _COMPONENT.match(fname):
            raise ImageError(f"{url}: unsafe file name in {location!r}")
        sig = entry.get("signature")
        artifacts.append(Artifact(fname, kind, loc, sha256=sha256,
                                  signature_url=_rebase(urljoin(url, sig), base) if sig
                                  else loc + ".sig"))
    name = "fcos" if farch == "x86_64" else f"fcos-{farch}"
    return Release(name, "fcos", release, farch, stream, url, artifacts, version is None)


def _rebase(url: str, base: str) -> str:
    """Artifact URLs in stream JSON are absolute; point them at the mirror when one is used."""
    if base != FCOS_BASE and url.startswith(FCOS_BASE + "/"):
        return base + url[len(FCOS_BASE):]
    return url


async def download(session: aiohttp.ClientSession, url: str, part: Path, progress: Progress,
                   label: str, retries: int = 3, backoff: float = 1.0) -> None:
    """GET ``url`` into ``part``, resuming with ``Range`` from what ``part`` already holds
    (after a dropped connection here, or an earlier interrupted run)."""
    for attempt in range(retries + 1):
        have = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            async with session.get(url, headers=headers) as resp:
                if resp.status == 416 and have:
                    total = _range_total(resp.headers.get("Content-Range", ""))
                    if total == have:
                        return  # the part file is already complete
                    part.unlink()  # stale part larger than the file: start again
                    continue
                if resp.status == 206:
                    start = _range_start(resp.headers.get("Content-Range", ""))
                    if start != have:
                        raise ImageError(f"GET {url}: server answered range {start} for "
                                         f"bytes={have}-")
                    mode = "ab"
                    total = _range_total(resp.headers.get("Content-Range", ""))
                elif resp.status == 200:
                    mode, have = "wb", 0
                    total = resp.content_length
                else:
                    raise ImageError(f"cannot fetch {label}: GET {url} answered HTTP "
                                     f"{resp.status}")
                progress.start(label, total, have)
                with open(part, mode) as f:  # noqa: ASYNC230 - a CLI; local disk keeps up
                    async for chunk in resp.content.iter_chunked(CHUNK):
                        f.write(chunk)
                        progress.update(len(chunk))
                size = part.stat().st_size
                if total is not None and size != total:
                    raise aiohttp.ClientPayloadError(f"got {size} of {total} bytes")
                progress.finish()
                return
        except (TimeoutError, aiohttp.ClientError) as exc:
            got = part.stat().st_size if part.exists() else 0
            why = str(exc) or type(exc).__name__
            if attempt == retries:
                raise ImageError(f"download of {url} failed after {retries + 1} attempt(s): "
                                 f"{why}; the {_mb(got)} received are kept in {part}: re-run "
                                 "to resume") from None
            delay = backoff * 2 ** attempt
            progress.note(f"{label}: connection lost at {_mb(got)} ({why}); resuming with a "
                          f"Range request in {delay:.0f} s")
            await asyncio.sleep(delay)


def _range_start(value: str) -> int | None:
    m = re.match(r"bytes (\d+)-\d+/(?:\d+|\*)", value)
    return int(m.group(1)) if m else None


def _range_total(value: str) -> int | None:
    m = re.match(r"bytes (?:\d+-\d+|\*)/(\d+)", value)
    return int(m.group(1)) if m else None


def _check_digest(path: Path, art: Artifact) -> FileRecord:
    size, sha256, sha512 = hash_file(path)
    for algo, want, got in (("sha512", art.sha512, sha512), ("sha256", art.sha256, sha256)):
        if want is not None and want != got:
            path.unlink()
            raise ImageError(f"digest mismatch for {art.path}: expected {algo} {want}, got "
                             f"{got}; the file was deleted; re-run to fetch again")
    return FileRecord(art.path, size, sha256, sha512, art.kind, art.url)


async def fetch(images_dir: Path, os_name: str, *, channel: str = "stable",
                version: str | None = None, arch: str | None = None,
                base_url: str | None = None, keyring: Path | None = None,
                retries: int = 3, backoff: float = 1.0,
                progress: Progress | None = None) -> ImageRecord:
    """Fetch, verify and install one release; returns its manifest record."""
    progress = progress or Progress()
    arch = arch or DEFAULT_ARCH.get(os_name, "")
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
        if os_name == "flatcar":
            rel = await resolve_flatcar(session, channel, version, arch, base_url)
        elif os_name == "fcos":
            rel = await resolve_fcos(session, channel, version, arch, base_url)
        else:
            raise ImageError(f"unknown OS {os_name!r}: choose flatcar or fcos")
        with locked(images_dir) as stage_root:
            return await _fetch_release(session, images_dir, stage_root, rel, keyring, retries,
                                        backoff, progress)


async def _fetch_release(session: aiohttp.ClientSession, images_dir: Path, stage_root: Path,
                         rel: Release, keyring: Path | None, retries: int, backoff: float,
                         progress: Progress) -> ImageRecord:
    manifest = Manifest.load(images_dir)
    final = images_dir / rel.name / rel.version
    existing = manifest.images.get(f"{rel.name}/{rel.version}")
    if existing is not None and _matches(images_dir, existing, rel, keyring):
        progress.note(f"{rel.name} {rel.version} is already present and verified in {final}")
        _set_alias(images_dir, manifest, rel)
        manifest.save(images_dir)
        return existing
    stage = stage_root / rel.name / rel.version
    stage.mkdir(parents=True, exist_ok=True)
    progress.note(f"fetching {rel.name} {rel.version} ({rel.os} {rel.channel}, {rel.arch}) "
                  f"from {rel.source}")
    records: list[FileRecord] = []
    for art in rel.artifacts:
        part = stage / (art.path + ".part")
        if (stage / art.path).exists():  # complete in an interrupted earlier run
            os.replace(stage / art.path, part)  # resumes as a 416 or a short Range
        await download(session, art.url, part, progress, art.path, retries, backoff)
        record = await asyncio.to_thread(_check_digest, part, art)
        part.rename(stage / art.path)
        records.append(record)
        if keyring is not None and art.signature_url:
            sig = stage / (art.path + ".sig")
            sig.write_bytes(await _get_bytes(session, art.signature_url,
                                             f"the signature of {art.path}"))
            try:
                await asyncio.to_thread(gpg_verify, stage / art.path, sig, keyring)
            except ImageError as exc:
                for f in (stage / art.path, sig):
                    f.unlink(missing_ok=True)
                raise ImageError(f"{exc}; the file was deleted. Check that {keyring} holds "
                                 f"the {rel.os} release signing key") from None
            size, h256, h512 = hash_file(sig)
            records.append(FileRecord(sig.name, size, h256, h512, "signature",
                                      art.signature_url))
    verified = ["digest:" + ("sha512" if rel.os == "flatcar" else "sha256")]
    if keyring is not None:
        verified.append("gpg")
    else:
        progress.note(f"{rel.name} {rel.version}: verified by digest only (no --keyring): "
                      "this proves integrity, not who published it")
    record = ImageRecord(rel.name, rel.version, rel.arch, rel.os, rel.channel, rel.source,
                         verified, _now(), records)
    _install(stage, final, records)
    shutil.rmtree(stage_root / rel.name, ignore_errors=True)
    manifest = Manifest.load(images_dir)  # re-read: we hold the lock, but be exact
    manifest.images[record.key] = record
    _set_alias(images_dir, manifest, rel)
    manifest.save(images_dir)
    return record


def _matches(images_dir: Path, existing: ImageRecord, rel: Release,
             keyring: Path | None) -> bool:
    """True when the installed files are the release's files, unchanged on disk."""
    by_path = {f.path: f for f in existing.files}
    if keyring is not None and "gpg" not in existing.verified_by:
        return False
    for art in rel.artifacts:
        rec = by_path.get(art.path)
        if rec is None or (art.sha512 and rec.sha512 != art.sha512) or (
                art.sha256 and rec.sha256 != art.sha256):
            return False
    return not verify_record(images_dir, existing)


def _install(stage: Path, final: Path, records: list[FileRecord]) -> None:
    """Move verified files in; each rename is atomic, so a reader sees old or new."""
    final.mkdir(parents=True, exist_ok=True)
    for rec in records:
        os.replace(stage / rec.path, final / rec.path)


def _set_alias(images_dir: Path, manifest: Manifest, rel: Release) -> None:
    """``<name>/<channel>`` -> the version just fetched, when it was the channel's latest."""
    if not rel.latest:
        return
    _link(images_dir / rel.name / rel.channel, rel.version)
    manifest.aliases[f"{rel.name}/{rel.channel}"] = rel.version


def _link(link: Path, target: str) -> None:
    if link.exists() and not link.is_symlink():
        raise ImageError(f"{link} exists and is not a symlink; move it away to let netboot "
                         "maintain the channel alias")
    tmp = link.with_name(f".{link.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- verify, export, import -------------------------------------------------------------

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


def export_images(images_dir: Path, out: Path, patterns: list[str]) -> list[ImageRecord]:
    """Write verified images and their manifest entries into an uncompressed tar
    (kernels and initrds are compressed already)."""
    manifest = Manifest.load(images_dir)
    recs = manifest.select(patterns)
    if not recs:
        raise ImageError(f"no images in {images_dir / MANIFEST}; fetch some first")
    problems = [p for r in recs for p in verify_record(images_dir, r)]
    if problems:
        raise ImageError("not exporting images that fail verification:\n  " +
                         "\n  ".join(problems) + "\nre-fetch them (netboot images fetch ...)")
    keys = {(r.name, r.version) for r in recs}
    sub = Manifest({r.key: r for r in recs},
                   {a: v for a, v in manifest.aliases.items() if (a.split("/")[0], v) in keys})
    tmp = out.with_name(f".{out.name}.part")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        data = sub.dumps().encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
        tar.addfile(info, _BytesReader(data))
        for r in recs:
            for f in r.files:
                tar.add(images_dir / r.name / r.version / f.path,
                        arcname=f"{r.name}/{r.version}/{f.path}", recursive=False)
    os.replace(tmp, out)
    return recs


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n < 0 else self.pos + n
        chunk, self.pos = self.data[self.pos:end], min(end, len(self.data))
        return chunk


def import_images(images_dir: Path, tar_path: Path,
                  keyring: Path | None = None) -> list[ImageRecord]:
    """Install the images of an exported tar, all or nothing: every member must be a
    regular file the tar's manifest lists, with the size and digests it records.
    Members are never extracted by their own names, so no path in the tar can
    reach outside the staging directory."""
    try:
        tar = tarfile.open(tar_path, "r:*")  # noqa: SIM115 - closed by the with below
    except (OSError, tarfile.TarError) as exc:
        raise ImageError(f"cannot read {tar_path}: {exc}") from None
    with tar, locked(images_dir) as stage_root:
        stage = Path(tempfile.mkdtemp(prefix="import-", dir=stage_root))
        try:
            recs = _import_into(tar, tar_path, stage, keyring)
            manifest = Manifest.load(images_dir)
            for rec in recs:
                _install(stage / rec.name / rec.version, images_dir / rec.name / rec.version,
                         rec.files)
                manifest.images[rec.key] = rec
            tar_manifest = Manifest.parse(stage.joinpath(MANIFEST).read_text(), str(tar_path))
            for alias, version in tar_manifest.aliases.items():
                if f"{alias.split('/')[0]}/{version}" in manifest.images:
                    _link(images_dir / alias, version)
                    manifest.aliases[alias] = version
            manifest.save(images_dir)
            return recs
        finally:
            shutil.rmtree(stage, ignore_errors=True)


def _import_into(tar: tarfile.TarFile, tar_path: Path, stage: Path,
                 keyring: Path | None) -> list[ImageRecord]:
    manifest: Manifest | None = None
    expected: dict[str, FileRecord] = {}
    seen: set[str] = set()
    problems: list[str] = []
    for member in tar:
        if member.name == MANIFEST and manifest is None and member.isreg():
            if member.size > 16 << 20:
                raise ImageError(f"{tar_path}: manifest.json is implausibly large; refused")
            text = _read_member(tar, member).decode("utf-8", "replace")
            manifest = Manifest.parse(text, f"{tar_path}:{MANIFEST}")
            (stage / MANIFEST).write_text(text)
            expected = {f"{r.key}/{f.path}": f for r in manifest.images.values()
                        for f in r.files}
            continue
        if manifest is None:
            raise ImageError(f"{tar_path}: the first member must be manifest.json (was "
                             f"{member.name!r}); is this a netboot images export?")
        rec = expected.get(member.name)
        if rec is None or not member.isreg() or member.name in seen:
            problems.append(f"{member.name!r}: not a file the manifest lists; refused")
            continue
        seen.add(member.name)
        dest = stage / member.name  # member.name equals a key built from checked components
        dest.parent.mkdir(parents=True, exist_ok=True)
        h256, h512, size = hashlib.sha256(), hashlib.sha512(), 0
        src = tar.extractfile(member)
        assert src is not None
        with src, open(dest, "wb") as out:
            while chunk := src.read(CHUNK):
                h256.update(chunk)
                h512.update(chunk)
                size += len(chunk)
                out.write(chunk)
        if (size, h256.hexdigest(), h512.hexdigest()) != (rec.size, rec.sha256, rec.sha512):
            dest.unlink()
            problems.append(f"{member.name}: does not match the manifest (size {size}, "
                            f"expected {rec.size}; sha256 {h256.hexdigest()}, expected "
                            f"{rec.sha256})")
    if manifest is None:
        raise ImageError(f"{tar_path}: no manifest.json; is this a netboot images export?")
    problems += [f"{name}: listed in the manifest but missing from the tar"
                 for name in sorted(set(expected) - seen)]
    if keyring is not None and not problems:
        for rec in manifest.images.values():
            problems += verify_record(stage, rec, keyring)
    if problems:
        raise ImageError(f"refusing {tar_path}; nothing was imported:\n  " +
                         "\n  ".join(problems) + "\nexport it again from a good copy")
    return list(manifest.images.values())


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    f: IO[bytes] | None = tar.extractfile(member)
    assert f is not None
    with f:
        return f.read()


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
        for item in [prof.kernel, *prof.initrds]:
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
    return "copy it there, or bring it with netboot images import FILE.tar"


# -- serving ------------------------------------------------------------------------------

class ImageResponse(web.FileResponse):
    """aiohttp's FileResponse (Range, ETag, Last-Modified, If-None-Match, HEAD), with
    sendfile(2) under uvloop too, and If-Range by entity tag. uvloop has no
    ``loop.sendfile``, so aiohttp would copy each file through a thread pool: four
    times the CPU per byte, measured here."""

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        # aiohttp honours only dates in If-Range; with an ETag it always sent the range,
        # so a client resuming a replaced image would splice two files together.
        if_range = request.headers.get(hdrs.IF_RANGE, "")
        if hdrs.RANGE in request.headers and if_range.startswith(('"', "W/")):
            try:
                st = os.stat(self._path)
                current = f'"{st.st_mtime_ns:x}-{st.st_size:x}"'  # aiohttp's strong ETag
            except OSError:
                current = ""
            if if_range != current:  # weak tags never match (RFC 9110 13.1.5)
                headers = request.headers.copy()
                del headers[hdrs.RANGE]
                request = request.clone(headers=headers)
        return await super().prepare(request)

    async def _sendfile(self, request: web.BaseRequest, fobj: IO[Any], offset: int,
                        count: int) -> AbstractStreamWriter:
        loop = asyncio.get_running_loop()
        transport = request.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if (type(loop).sendfile is not asyncio.AbstractEventLoop.sendfile or sock is None
                or self.compression or transport is None):
            return await super()._sendfile(request, fobj, offset, count)
        writer = await web.StreamResponse.prepare(self, request)  # sends the headers
        assert writer is not None
        for _ in range(1000):  # headers normally leave at once; never send the file before
            if not transport.get_write_buffer_size():
                break
            await asyncio.sleep(0.001)
        else:
            raise ConnectionResetError("client is not reading the response headers")
        await _sendfile_fd(loop, sock.fileno(), fobj.fileno(), offset, count)
        await web.StreamResponse.write_eof(self)
        return writer


SENDFILE_CHUNK = 2 << 20  # per call, then yield: nginx's sendfile_max_chunk default


async def _sendfile_fd(loop: asyncio.AbstractEventLoop, sock_fd: int, file_fd: int,
                       offset: int, count: int) -> None:
    """os.sendfile on a non-blocking socket, waiting for writability on a dup of it:
    uvloop refuses add_writer on a descriptor its transport owns, and the dup is its
    own epoll entry, removed (remove_writer) before it is closed."""
    dup = os.dup(sock_fd)
    try:
        while count > 0:
            try:
                sent = os.sendfile(sock_fd, file_fd, offset, min(count, SENDFILE_CHUNK))
            except BlockingIOError:
                ready = loop.create_future()
                loop.add_writer(dup, _wake, ready)
                try:
                    await ready
                finally:
                    loop.remove_writer(dup)
                continue
            if sent == 0:
                raise ConnectionResetError("image file shrank while it was being sent")
            offset += sent
            count -= sent
            await asyncio.sleep(0)  # a fast client must not hold the loop DHCP and TFTP share
    finally:
        os.close(dup)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
