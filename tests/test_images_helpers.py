"""Real peers for the image tests: a local HTTP server holding a fake Flatcar and
Fedora CoreOS release tree built at test time, and real GPG keys."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

FLATCAR_VERSION = "3975.2.0"
FCOS_RELEASE = "40.20240416.3.1"
FCOS_OFFICIAL = "https://builds.coreos.fedoraproject.org"
FLATCAR_FILES = ("flatcar_production_pxe.vmlinuz", "flatcar_production_pxe_image.cpio.gz")


class Gpg:
    """A throwaway GNUPGHOME with a signing key; ``export`` gives a keyring file."""

    def __init__(self, uid: str) -> None:
        # Short path: gpg-agent's socket path must fit in sun_path.
        self.home = Path(tempfile.mkdtemp(prefix="gpg", dir="/tmp"))
        self.home.chmod(0o700)
        self.uid = uid
        self._gpg("--quick-gen-key", uid, "ed25519", "sign", "never")

    def _gpg(self, *args: str) -> bytes:
        return subprocess.run(["gpg", "--batch", "--pinentry-mode", "loopback", "--passphrase",
                               "", "--homedir", str(self.home), *args],
                              check=True, capture_output=True).stdout

    def sign(self, path: Path, out: Path | None = None) -> Path:
        out = out or path.with_name(path.name + ".sig")
        self._gpg("--yes", "-u", self.uid, "--detach-sign", "-o", str(out), str(path))
        return out

    def export(self, path: Path, armor: bool = False) -> Path:
        path.write_bytes(self._gpg(*(["--armor"] if armor else []), "--export", self.uid))
        return path

    def close(self) -> None:
        subprocess.run(["gpgconf", "--homedir", str(self.home), "--kill", "gpg-agent"],
                       check=False, capture_output=True)
        shutil.rmtree(self.home, ignore_errors=True)


def digests_file(path: Path) -> str:
    """The DIGESTS format Flatcar publishes (Gentoo catalyst style)."""
    data = path.read_bytes()
    out = []
    for algo in ("md5", "sha1", "sha512"):
        out.append(f"# {algo.upper()} HASH")
        out.append(f"{hashlib.new(algo, data).hexdigest()}  {path.name}")
    return "\n".join(out) + "\n"


def build_tree(root: Path, signer: Gpg | None, kernel_size: int = 3 << 20,
               initrd_size: int = 5 << 20) -> dict[str, bytes]:
    """Flatcar ``{channel}/amd64-usr/{version}/`` and FCOS ``streams/`` + ``prod/``."""
    contents: dict[str, bytes] = {}
    folder = root / "stable" / "amd64-usr" / FLATCAR_VERSION
    folder.mkdir(parents=True)
    (root / "stable" / "amd64-usr" / "current").mkdir()
    (root / "stable" / "amd64-usr" / "current" / "version.txt").write_text(
        f"FLATCAR_BUILD=3975\nFLATCAR_BRANCH=2\nFLATCAR_PATCH=0\n"
        f"FLATCAR_VERSION={FLATCAR_VERSION}\nFLATCAR_VERSION_ID={FLATCAR_VERSION}\n")
    for name, size in zip(FLATCAR_FILES, (kernel_size, initrd_size)):
        data = os.urandom(size)
        contents[name] = data
        (folder / name).write_bytes(data)
        (folder / f"{name}.DIGESTS").write_text(digests_file(folder / name))
        if signer:
            signer.sign(folder / name)

    build = f"prod/streams/stable/builds/{FCOS_RELEASE}/x86_64"
    (root / build).mkdir(parents=True)
    pxe = {}
    for key, fname, size in (
            ("kernel", f"fedora-coreos-{FCOS_RELEASE}-live-kernel-x86_64", 2 << 20),
            ("initramfs", f"fedora-coreos-{FCOS_RELEASE}-live-initramfs.x86_64.img", 3 << 20),
            ("rootfs", f"fedora-coreos-{FCOS_RELEASE}-live-rootfs.x86_64.img", 4 << 20)):
        data = os.urandom(size)
        contents[fname] = data
        (root / build / fname).write_bytes(data)
        if signer:
            signer.sign(root / build / fname)
        url = f"{FCOS_OFFICIAL}/{build}/{fname}"  # absolute, as the real stream JSON has
        pxe[key] = {"location": url, "signature": url + ".sig",
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "uncompressed-sha256": "0" * 64}
    stream = {"stream": "stable", "metadata": {"last-modified": "2024-04-30T00:00:00Z"},
              "architectures": {"x86_64": {"artifacts": {"metal": {
                  "release": FCOS_RELEASE,
                  "formats": {"pxe": pxe, "raw.xz": {"disk": {"location": "x",
                                                              "sha256": "0" * 64}}}}}}}}
    (root / "streams").mkdir()
    (root / "streams" / "stable.json").write_text(json.dumps(stream, indent=2))
    return contents


@dataclass
class ReleaseServer:
    """Serves ``root`` over real HTTP (aiohttp FileResponse: Range, 206/416), records
    every request, and can drop a connection midway once per path."""

    root: Path
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    drop_after: dict[str, int] = field(default_factory=dict)
    runner: web.AppRunner | None = None
    port: int = 0

    async def start(self) -> ReleaseServer:
        app = web.Application()
        app.router.add_get("/{path:.+}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ranges(self, suffix: str) -> list[str | None]:
        return [h.get("Range") for p, h in self.requests if p.endswith(suffix)]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        rel = request.match_info["path"]
        self.requests.append((rel, dict(request.headers)))
        path = self.root / rel
        if ".." in rel.split("/") or not path.is_file():
            raise web.HTTPNotFound()
        if rel in self.drop_after and "Range" not in request.headers:
            n = self.drop_after.pop(rel)
            data = path.read_bytes()
            resp = web.StreamResponse()
            resp.content_length = len(data)
            await resp.prepare(request)
            await resp.write(data[:n])
            assert request.transport is not None
            request.transport.close()  # flushes what was written, then the peer sees EOF
            return resp
        return web.FileResponse(path)
