"""The image manifest (``images/manifest.json``): records of what is present, with
sizes and digests, written atomically; one-writer lock and the staging directory
beside images_dir."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FLATCAR_CHANNELS = ("stable", "beta", "alpha", "lts")
FCOS_STREAMS = ("stable", "testing", "next")
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


def _install(stage: Path, final: Path, records: list[FileRecord]) -> None:
    """Move verified files in; each rename is atomic, so a reader sees old or new."""
    final.mkdir(parents=True, exist_ok=True)
    for rec in records:
        os.replace(stage / rec.path, final / rec.path)


def _link(link: Path, target: str) -> None:
    if link.exists() and not link.is_symlink():
        raise ImageError(f"{link} exists and is not a symlink; move it away to let netboot "
                         "maintain the channel alias")
    tmp = link.with_name(f".{link.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)
