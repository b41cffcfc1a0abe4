"""Image fetch/verify/export/import against a real local HTTP server, real digests
and real GPG signatures made with a key generated for this run."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import sys
import tarfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from netboot.config import Profile
from netboot.images.archive import export_images, import_images
from netboot.images.fetch import fetch
from netboot.images.manifest import ImageError, Manifest, staging_dir
from netboot.images.progress import Progress
from netboot.images.verify import check_profile_images, parse_digests, verify_record

from .test_images_helpers import (
    FCOS_RELEASE,
    FLATCAR_FILES,
    FLATCAR_VERSION,
    Gpg,
    ReleaseServer,
    build_tree,
)

KERNEL, INITRD = FLATCAR_FILES
FOLDER = f"stable/amd64-usr/{FLATCAR_VERSION}"


@pytest.fixture(scope="session")
def signer() -> Iterator[Gpg]:
    gpg = Gpg("netboot release test <release@example.invalid>")
    yield gpg
    gpg.close()


@pytest.fixture(scope="session")
def rogue() -> Iterator[Gpg]:
    gpg = Gpg("someone else <rogue@example.invalid>")
    yield gpg
    gpg.close()


@pytest.fixture
def tree(tmp_path: Path, signer: Gpg) -> Path:
    root = tmp_path / "mirror"
    build_tree(root, signer)
    return root


@pytest.fixture
async def server(tree: Path) -> AsyncIterator[ReleaseServer]:
    srv = await ReleaseServer(tree).start()
    yield srv
    await srv.stop()


@pytest.fixture
def keyring(tmp_path: Path, signer: Gpg) -> Path:
    return signer.export(tmp_path / "release-key.asc", armor=True)  # as Flatcar publishes it


@pytest.fixture
def images(tmp_path: Path) -> Path:
    return tmp_path / "site" / "images"


def quiet() -> Progress:
    return Progress(io.StringIO(), tty=False)


async def fetch_flatcar(server: ReleaseServer, images: Path, **kw: object) -> object:
    return await fetch(images, "flatcar", channel="stable", base_url=server.url + "/{channel}",
                       progress=kw.pop("progress", quiet()), backoff=0, **kw)  # type: ignore


def served_files(images: Path) -> set[str]:
    """Every regular file HTTP/TFTP could serve from images_dir."""
    return {str(p.relative_to(images)) for p in images.rglob("*") if p.is_file()}


def sha512(data: bytes) -> str:
    return hashlib.sha512(data).hexdigest()


# -- fetch -------------------------------------------------------------------------------

async def test_flatcar_fetch_verifies_digest_and_signature(
        server: ReleaseServer, images: Path, keyring: Path, tree: Path) -> None:
    rec = await fetch_flatcar(server, images, keyring=keyring)
    folder = images / "flatcar" / FLATCAR_VERSION
    for name in FLATCAR_FILES:
        assert (folder / name).read_bytes() == (tree / FOLDER / name).read_bytes()
    manifest = Manifest.load(images)
    entry = manifest.images[f"flatcar/{FLATCAR_VERSION}"]
    assert entry is not None and rec == entry
    assert entry.verified_by == ["digest:sha512", "gpg"]
    assert entry.channel == "stable" and entry.arch == "amd64"
    kernel = next(f for f in entry.files if f.path == KERNEL)
    assert kernel.sha512 == sha512((tree / FOLDER / KERNEL).read_bytes())
    assert kernel.kind == "kernel" and kernel.url == f"{server.url}/{FOLDER}/{KERNEL}"
    # "current" was resolved through version.txt, so the channel alias follows it.
    assert os.readlink(images / "flatcar" / "stable") == FLATCAR_VERSION
    assert (images / "flatcar" / "stable" / KERNEL).is_file()
    assert manifest.aliases == {"flatcar/stable": FLATCAR_VERSION}
    assert any(p.endswith("current/version.txt") for p, _ in server.requests)
    assert not [p for p in staging_dir(images).rglob("*") if p.is_file() and p.name != ".lock"]


async def test_fetch_again_is_a_no_op(server: ReleaseServer, images: Path) -> None:
    await fetch_flatcar(server, images)
    before = len(server.requests)
    out = io.StringIO()
    await fetch_flatcar(server, images, progress=Progress(out, tty=False))
    assert "already present and verified" in out.getvalue()
    assert not [p for p, _ in server.requests[before:] if p.endswith((KERNEL, INITRD))]


async def test_fetch_again_repairs_a_changed_file(server: ReleaseServer, images: Path,
                                                tree: Path) -> None:
    await fetch_flatcar(server, images)
    kernel = images / "flatcar" / FLATCAR_VERSION / KERNEL
    kernel.write_bytes(b"damaged")
    await fetch_flatcar(server, images)
    assert kernel.read_bytes() == (tree / FOLDER / KERNEL).read_bytes()
    assert verify_record(images, Manifest.load(images).images[f"flatcar/{FLATCAR_VERSION}"]) == []


async def test_fcos_fetch_uses_stream_sha256_and_mirror(
        server: ReleaseServer, images: Path, keyring: Path) -> None:
    rec = await fetch(images, "fcos", channel="stable", base_url=server.url, keyring=keyring,
                      progress=quiet())
    assert rec.key == f"fcos/{FCOS_RELEASE}" and rec.verified_by == ["digest:sha256", "gpg"]
    stream = json.loads((server.root / "streams/stable.json").read_text())
    pxe = stream["architectures"]["x86_64"]["artifacts"]["metal"]["formats"]["pxe"]
    for key, kind in (("kernel", "kernel"), ("initramfs", "initrd"), ("rootfs", "rootfs")):
        name = pxe[key]["location"].rsplit("/", 1)[1]
        path = images / "fcos" / FCOS_RELEASE / name
        assert hashlib.sha256(path.read_bytes()).hexdigest() == pxe[key]["sha256"]
        assert next(f for f in rec.files if f.path == name).kind == kind
    # The stream JSON names builds.coreos.fedoraproject.org; the mirror was asked instead.
    assert any(p.endswith("-live-kernel-x86_64") for p, _ in server.requests)
    assert os.readlink(images / "fcos" / "stable") == FCOS_RELEASE


async def test_pinned_version_leaves_channel_alias_alone(
        server: ReleaseServer, images: Path) -> None:
    await fetch_flatcar(server, images, version=FLATCAR_VERSION)
    assert (images / "flatcar" / FLATCAR_VERSION / KERNEL).is_file()
    assert not (images / "flatcar" / "stable").exists()
    assert not any(p.endswith("version.txt") for p, _ in server.requests)


async def test_corrupted_download_is_rejected_and_deleted(
        server: ReleaseServer, images: Path, tree: Path) -> None:
    initrd = tree / FOLDER / INITRD
    data = bytearray(initrd.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the mirror's copy no longer matches the DIGESTS
    initrd.write_bytes(bytes(data))
    with pytest.raises(ImageError) as exc:
        await fetch_flatcar(server, images)
    msg = str(exc.value)
    assert f"digest mismatch for {INITRD}: expected sha512 " in msg
    assert sha512(bytes(data)) in msg and "the file was deleted; re-run" in msg
    assert served_files(images) == set()  # not even the good kernel is servable
    assert not list(staging_dir(images).rglob(INITRD + "*"))
    assert Manifest.load(images).images == {}


async def test_missing_digest_line_refuses(server: ReleaseServer, images: Path,
                                           tree: Path) -> None:
    (tree / FOLDER / f"{KERNEL}.DIGESTS").write_text("# MD5 HASH\n00  " + KERNEL + "\n")
    with pytest.raises(ImageError, match=f"has no SHA512 line for {KERNEL}"):
        await fetch_flatcar(server, images)
    assert served_files(images) == set()


async def test_dropped_connection_resumes_with_range(
        server: ReleaseServer, images: Path, tree: Path) -> None:
    server.drop_after[f"{FOLDER}/{INITRD}"] = 1_500_000
    out = io.StringIO()
    await fetch_flatcar(server, images, retries=2, progress=Progress(out, tty=False))
    ranges = server.ranges(INITRD)
    assert ranges[0] is None and len(ranges) == 2, ranges
    assert ranges[1] is not None and ranges[1].startswith("bytes=")
    start = int(ranges[1][len("bytes="):].rstrip("-"))
    assert 0 < start <= 1_500_000
    assert (images / "flatcar" / FLATCAR_VERSION / INITRD).read_bytes() == \
        (tree / FOLDER / INITRD).read_bytes()
    assert "connection lost" in out.getvalue() and "resuming" in out.getvalue()


async def test_interrupted_run_resumes_next_run(server: ReleaseServer, images: Path,
                                                tree: Path) -> None:
    server.drop_after[f"{FOLDER}/{INITRD}"] = 2_000_000
    with pytest.raises(ImageError, match="re-run to resume") as exc:
        await fetch_flatcar(server, images, retries=0)
    part = staging_dir(images) / "flatcar" / FLATCAR_VERSION / (INITRD + ".part")
    assert str(part) in str(exc.value)
    assert 0 < part.stat().st_size <= 2_000_000
    assert served_files(images) == set()
    kernel_gets = len(server.ranges(KERNEL))
    have = part.stat().st_size
    await fetch_flatcar(server, images)
    assert server.ranges(INITRD)[-1] == f"bytes={have}-"
    # The kernel finished in the first run: it is resumed as complete, not fetched again.
    assert server.ranges(KERNEL)[kernel_gets:] == [f"bytes={3 << 20}-"]
    assert Manifest.load(images).images[f"flatcar/{FLATCAR_VERSION}"].files[1].sha512 == \
        sha512((tree / FOLDER / INITRD).read_bytes())


@pytest.mark.parametrize("how", ["other key", "other content"])
async def test_bad_signature_is_rejected_and_deleted(
        server: ReleaseServer, images: Path, keyring: Path, tree: Path, rogue: Gpg,
        signer: Gpg, tmp_path: Path, how: str) -> None:
    sig = tree / FOLDER / f"{KERNEL}.sig"
    if how == "other key":
        rogue.sign(tree / FOLDER / KERNEL, sig)
    else:
        other = tmp_path / "other"
        other.write_bytes(b"not the kernel")
        signer.sign(other, sig)
    with pytest.raises(ImageError) as exc:
        await fetch_flatcar(server, images, keyring=keyring)
    assert f"bad GPG signature for {KERNEL}" in str(exc.value)
    assert "the file was deleted" in str(exc.value)
    assert served_files(images) == set()
    assert not list(staging_dir(images).rglob(KERNEL + "*"))


async def test_binary_keyring_and_missing_signature(
        server: ReleaseServer, images: Path, signer: Gpg, tree: Path, tmp_path: Path) -> None:
    binary = signer.export(tmp_path / "key.gpg")
    (tree / FOLDER / f"{INITRD}.sig").unlink()
    with pytest.raises(ImageError, match=f"signature of {INITRD}.*HTTP 404"):
        await fetch_flatcar(server, images, keyring=binary)
    assert served_files(images) == set()


async def test_unknown_version_says_what_to_check(server: ReleaseServer, images: Path) -> None:
    with pytest.raises(ImageError, match="HTTP 404; check the version/channel"):
        await fetch_flatcar(server, images, version="1.2.3")


# -- verify, export, import ------------------------------------------------------------

async def test_verify_detects_a_changed_file(server: ReleaseServer, images: Path) -> None:
    rec = await fetch_flatcar(server, images)
    assert verify_record(images, rec) == []  # type: ignore[arg-type]
    path = images / "flatcar" / FLATCAR_VERSION / KERNEL
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    [problem] = verify_record(images, rec)  # type: ignore[arg-type]
    assert f"flatcar/{FLATCAR_VERSION}/{KERNEL}: content changed" in problem


async def fetch_both(server: ReleaseServer, images: Path, keyring: Path | None) -> None:
    await fetch_flatcar(server, images, keyring=keyring)
    await fetch(images, "fcos", base_url=server.url, keyring=keyring, progress=quiet())


async def test_export_import_round_trip(server: ReleaseServer, images: Path, keyring: Path,
                                        tmp_path: Path) -> None:
    await fetch_both(server, images, keyring)
    tar = tmp_path / "carry.tar"
    recs = export_images(images, tar, [])
    assert len(recs) == 2
    offline = tmp_path / "offline" / "images"
    imported = import_images(offline, tar, keyring)  # signatures re-checked at the far site
    assert sorted(r.key for r in imported) == sorted(r.key for r in recs)
    assert Manifest.load(offline).dumps() == Manifest.load(images).dumps()
    assert served_files(offline) == served_files(images)
    for rel in served_files(images) - {"manifest.json"}:
        assert (offline / rel).read_bytes() == (images / rel).read_bytes()
    assert os.readlink(offline / "flatcar" / "stable") == FLATCAR_VERSION
    for rec in Manifest.load(offline).images.values():
        assert verify_record(offline, rec, keyring) == []


async def test_export_of_one_image_and_refusal_of_changed_files(
        server: ReleaseServer, images: Path, tmp_path: Path) -> None:
    await fetch_both(server, images, None)
    tar = tmp_path / "one.tar"
    export_images(images, tar, ["fcos"])
    with tarfile.open(tar) as t:
        names = t.getnames()
    assert names[0] == "manifest.json"
    assert all(n.startswith(f"fcos/{FCOS_RELEASE}/") for n in names[1:]) and len(names) == 4
    (images / "flatcar" / FLATCAR_VERSION / KERNEL).write_bytes(b"changed")
    with pytest.raises(ImageError, match="not exporting images that fail verification"):
        export_images(images, tmp_path / "all.tar", [])
    assert not (tmp_path / "all.tar").exists()


def rewrite_tar(src: Path, dst: Path, change: dict[str, bytes | None],
                extra: list[tuple[tarfile.TarInfo, bytes | None]] = ()) -> None:  # type: ignore
    """Copy a tar, replacing (or dropping, with None) members' data."""
    with tarfile.open(src) as old, tarfile.open(dst, "w") as new:
        for m in old:
            data = old.extractfile(m).read()  # type: ignore[union-attr]
            if m.name in change:
                if change[m.name] is None:
                    continue
                data = change[m.name]  # type: ignore[assignment]
                m.size = len(data)
            new.addfile(m, io.BytesIO(data))
        for info, data in extra:
            new.addfile(info, io.BytesIO(data) if data is not None else None)


async def test_import_of_tampered_tar_is_refused(server: ReleaseServer, images: Path,
                                                 tmp_path: Path) -> None:
    await fetch_both(server, images, None)
    good = tmp_path / "good.tar"
    export_images(images, good, [])
    bad = tmp_path / "bad.tar"
    member = f"flatcar/{FLATCAR_VERSION}/{INITRD}"
    data = bytearray((images / member).read_bytes())
    data[12345] ^= 1
    rewrite_tar(good, bad, {member: bytes(data)})
    offline = tmp_path / "offline"
    with pytest.raises(ImageError) as exc:
        import_images(offline, bad)
    assert f"{member}: does not match the manifest" in str(exc.value)
    assert "nothing was imported" in str(exc.value)
    assert served_files(offline) == set()  # all or nothing: the good FCOS files too
    assert [p for p in staging_dir(offline).rglob("*") if p.name != ".lock"] == []

    missing = tmp_path / "missing.tar"
    rewrite_tar(good, missing, {member: None})
    with pytest.raises(ImageError, match=f"{member}: listed in the manifest but missing"):
        import_images(offline, missing)
    assert served_files(offline) == set()


@pytest.mark.parametrize("evil", ["../escaped", "/tmp/abs-escaped", "flatcar/link",
                                  f"flatcar/{FLATCAR_VERSION}/{KERNEL}"])
async def test_import_refuses_path_traversal(server: ReleaseServer, images: Path,
                                             tmp_path: Path, evil: str) -> None:
    await fetch_flatcar(server, images)
    good = tmp_path / "good.tar"
    export_images(images, good, [])
    info = tarfile.TarInfo(evil)
    payload: bytes | None = b"pwned"
    if evil.startswith("flatcar/"):  # a symlink, even under a name the manifest lists
        info.type, info.linkname, payload = tarfile.SYMTYPE, "/etc/passwd", None
    else:
        info.size = len(payload)
    bad = tmp_path / "evil.tar"
    rewrite_tar(good, bad, {evil: None}, [(info, payload)])
    offline = tmp_path / "deep" / "offline"
    with pytest.raises(ImageError, match="not a file the manifest lists; refused"):
        import_images(offline, bad)
    assert not (tmp_path / "deep" / "escaped").exists()
    assert not Path("/tmp/abs-escaped").exists()
    assert served_files(offline) == set()


def test_import_refuses_a_manifest_naming_unsafe_paths(tmp_path: Path) -> None:
    manifest = {"images": [{"name": "..", "version": "1", "arch": "amd64", "os": "flatcar",
                            "channel": None, "source": "x", "verified_by": [], "fetched": "",
                            "files": [{"path": "passwd", "size": 1, "sha256": "", "sha512": ""}]}]}
    tar = tmp_path / "m.tar"
    with tarfile.open(tar, "w") as t:
        data = json.dumps(manifest).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    with pytest.raises(ImageError, match="unsafe name '..'"):
        import_images(tmp_path / "images", tar)


# -- digests and the startup check -----------------------------------------------------

def test_parse_digests_reads_the_sha512_section() -> None:
    text = ("# MD5 HASH\naaaa  flatcar_production_pxe.vmlinuz\n"
            "# SHA1 HASH\nbbbb  flatcar_production_pxe.vmlinuz\n"
            "# SHA512 HASH\ncccc  flatcar_production_pxe.vmlinuz\n"
            "dddd  flatcar_production_pxe.vmlinuz.sig\n")
    assert parse_digests(text, "flatcar_production_pxe.vmlinuz") == "cccc"
    assert parse_digests(text, "flatcar_production_pxe.vmlinuz", "SHA1") == "bbbb"
    assert parse_digests(text, "other") is None


def profile(kernel: str, *initrds: str) -> Profile:
    return Profile(kernel=kernel, initrds=list(initrds))


async def test_check_profile_images(server: ReleaseServer, images: Path,
                                    tmp_path: Path) -> None:
    await fetch_flatcar(server, images)
    (tmp_path / "outside").write_text("x")
    os.symlink(tmp_path / "outside", images / "escape")
    profiles = {
        "pinned": profile(f"flatcar/{FLATCAR_VERSION}/{KERNEL}",
                          f"flatcar/{FLATCAR_VERSION}/{INITRD}"),
        "follows": profile(f"flatcar/stable/{KERNEL}", f"flatcar/stable/{INITRD}"),
        "old": profile(f"flatcar/3815.2.5/{KERNEL}", f"flatcar/3815.2.5/{INITRD}"),
        "beta": profile(f"flatcar-arm64/beta/{KERNEL}"),
        "coreos": profile("fcos/stable/k", "fcos/stable/i"),
        "demo": profile("demo/vmlinuz"),
        "escape": profile("escape"),
    }
    msgs = check_profile_images(profiles, images)
    by = {m.split(":")[0]: m for m in msgs}
    assert sorted(by) == ["profile beta", "profile coreos", "profile demo", "profile escape",
                          "profile old"]
    assert (f"flatcar/3815.2.5/{KERNEL}, flatcar/3815.2.5/{INITRD}" in by["profile old"]
            and "netboot images fetch flatcar --channel stable|beta|alpha --version 3815.2.5"
            in by["profile old"])
    assert "netboot images fetch flatcar --channel beta --arch arm64" in by["profile beta"]
    assert "netboot images fetch fcos --stream stable" in by["profile coreos"]
    assert "make images" in by["profile demo"]
    assert str(images.resolve()) in by["profile escape"]
    # A truncated file (e.g. a copy gone wrong) is caught by its manifest size.
    (images / "flatcar" / FLATCAR_VERSION / INITRD).write_bytes(b"short")
    [msg] = [m for m in check_profile_images({"pinned": profiles["pinned"]}, images)]
    assert "size differs from the manifest" in msg


# -- the command line ------------------------------------------------------------------

async def run_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "netboot", "images", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


async def test_cli_fetch_list_verify(server: ReleaseServer, tmp_path: Path,
                                     keyring: Path) -> None:
    cfg = tmp_path / "netboot.yaml"
    cfg.write_text("images_dir: imgs\n")
    code, out, err = await run_cli("fetch", "flatcar", "--channel", "stable", "--config",
                                   str(cfg), "--base-url", server.url + "/{channel}",
                                   "--keyring", str(keyring))
    assert code == 0, err
    assert f"flatcar/{FLATCAR_VERSION}: verified by digest:sha512, gpg" in out
    assert f"fetching flatcar {FLATCAR_VERSION} (flatcar stable, amd64) from {server.url}" in err
    assert f"fetch {KERNEL}: 3.1 MB\n" in err  # plain lines, no tty
    assert f"fetch {KERNEL}: 100% 3.1 MB of 3.1 MB" in err
    code, out, err = await run_cli("list", "--config", str(cfg))
    header, row = out.splitlines()
    assert header.split()[:4] == ["NAME", "VERSION", "ARCH", "CHANNEL"]
    assert row.split()[:5] == ["flatcar", FLATCAR_VERSION, "amd64", "stable", "(stable)"]
    code, out, _ = await run_cli("verify", "--config", str(cfg), "--keyring", str(keyring))
    assert code == 0 and out.strip() == f"flatcar/{FLATCAR_VERSION}: ok"
    (tmp_path / "imgs" / "flatcar" / FLATCAR_VERSION / INITRD).write_bytes(b"x")
    code, out, err = await run_cli("verify", "--images-dir", str(tmp_path / "imgs"))
    assert code == 1 and "FAILED" in out and "fetch them again" in err
    code, _, err = await run_cli("fetch", "fcos", "--channel", "stable", "--config", str(cfg))
    assert code == 1 and "--channel is for flatcar" in err


def test_progress_bar_on_a_terminal_and_lines_elsewhere() -> None:
    tty = io.StringIO()
    bar = Progress(tty, tty=True, interval=0)
    bar.start("flatcar k", 4_000_000)
    bar.update(1_000_000)
    bar.update(3_000_000)
    bar.finish()
    frames = tty.getvalue().split("\r")[1:]
    assert " 25.0% [######..................]" in frames[0]
    assert "100.0% [########################] 4.0 MB/4.0 MB" in frames[-1]
    assert tty.getvalue().endswith("\n") and tty.getvalue().count("\n") == 1
    plain = io.StringIO()
    lines = Progress(plain, tty=False, interval=3600)
    lines.start("flatcar k", 4_000_000, done=1_000_000)
    lines.update(1_000_000)  # within the interval: no line
    lines.finish()
    assert plain.getvalue().splitlines() == [
        "fetch flatcar k: 4.0 MB, resuming at 1.0 MB",
        plain.getvalue().splitlines()[1]]
    assert plain.getvalue().splitlines()[1].startswith("fetch flatcar k: 50% 2.0 MB of 4.0 MB")
