"""Fetching: resolve a Flatcar channel or Fedora CoreOS stream to a release, download
its files with resumable Range requests, verify them and install them."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from urllib.parse import urljoin

import aiohttp

from .manifest import (
    _COMPONENT,
    CHUNK,
    FCOS_STREAMS,
    FLATCAR_CHANNELS,
    FileRecord,
    ImageError,
    ImageRecord,
    Manifest,
    _install,
    _link,
    hash_file,
    locked,
)
from .progress import Progress, _mb
from .verify import gpg_verify, parse_digests, verify_record

FLATCAR_BASE = "https://{channel}.release.flatcar-linux.net"
FCOS_BASE = "https://builds.coreos.fedoraproject.org"
FLATCAR_FILES = {"flatcar_production_pxe.vmlinuz": "kernel",
                 "flatcar_production_pxe_image.cpio.gz": "initrd"}
FLATCAR_ARCHES = {"amd64": "amd64", "x86_64": "amd64", "arm64": "arm64", "aarch64": "arm64"}
FCOS_ARCHES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
DEFAULT_ARCH = {"flatcar": "amd64", "fcos": "x86_64"}


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


def _set_alias(images_dir: Path, manifest: Manifest, rel: Release) -> None:
    """``<name>/<channel>`` -> the version just fetched, when it was the channel's latest."""
    if not rel.latest:
        return
    _link(images_dir / rel.name / rel.channel, rel.version)
    manifest.aliases[f"{rel.name}/{rel.channel}"] = rel.version


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
