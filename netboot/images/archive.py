"""Carrying images to offline sites: export verified images to a tar, import one
all or nothing."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path
from typing import IO

from .manifest import (
    CHUNK,
    MANIFEST,
    FileRecord,
    ImageError,
    ImageRecord,
    Manifest,
    _install,
    _link,
    locked,
)
from .verify import verify_record


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
