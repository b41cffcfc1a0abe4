"""Providers, path normalisation and root confinement, against a real filesystem."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from netboot.tftp.provider import (
    BytesProvider,
    FileProvider,
    NetasciiProvider,
    RootResolver,
    TftpError,
    normalise_path,
)

CLIENT = ("192.0.2.1", 1234)


@pytest.mark.parametrize(("raw", "want"), [
    ("pxelinux.0", "pxelinux.0"),
    ("/pxelinux.0", "pxelinux.0"),
    ("//boot//x", "boot/x"),
    ("boot\\ipxe.efi", "boot/ipxe.efi"),
    ("\\boot\\x", "boot/x"),
    ("./a/./b", "a/b"),
    ("pxelinux.cfg/01-52-54-00-12-34-56", "pxelinux.cfg/01-52-54-00-12-34-56"),
    ("a..b", "a..b"),
])
def test_normalise_ok(raw: str, want: str) -> None:
    assert normalise_path(raw) == want


@pytest.mark.parametrize(("raw", "code"), [
    ("../etc/passwd", 2), ("a/../../x", 2), ("..\\x", 2), ("/..", 2), ("a\0b", 2),
    ("", 1), ("/", 1), ("./", 1),
])
def test_normalise_refuses(raw: str, code: int) -> None:
    with pytest.raises(TftpError) as info:
        normalise_path(raw)
    assert info.value.code == code


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path, Path]:
    a, b, outside = tmp_path / "a", tmp_path / "b", tmp_path / "outside"
    for d in (a, b, outside):
        d.mkdir()
    (a / "both").write_bytes(b"from a")
    (b / "both").write_bytes(b"from b")
    (b / "only-b").write_bytes(b"b only")
    (a / "sub").mkdir()
    (a / "sub" / "f").write_bytes(b"nested")
    (outside / "secret").write_bytes(b"secret")
    (a / "link-in").symlink_to(a / "sub" / "f")
    (a / "link-out").symlink_to(outside / "secret")
    (a / "dir-out").symlink_to(outside)
    (a / "rel-out").symlink_to("../outside/secret")
    return a, b, outside


def read_all(p: FileProvider | BytesProvider) -> bytes:
    try:
        return p.read_at(0, 1 << 20)
    finally:
        p.close()


def test_first_root_wins_and_fallback(roots: tuple[Path, Path, Path]) -> None:
    a, b, _ = roots
    r = RootResolver([a, b])
    assert read_all(r("both", CLIENT)) == b"from a"
    assert read_all(r("only-b", CLIENT)) == b"b only"
    assert read_all(r("/sub/f", CLIENT)) == b"nested"
    assert read_all(r("sub\\f", CLIENT)) == b"nested"
    assert read_all(r("link-in", CLIENT)) == b"nested"


@pytest.mark.parametrize(("name", "code"), [
    ("missing", 1), ("sub", 1), ("../outside/secret", 2), ("link-out", 2), ("dir-out/secret", 2),
    ("rel-out", 2), ("sub/../../outside/secret", 2), ("both\0", 2),
])
def test_refusals(roots: tuple[Path, Path, Path], name: str, code: int) -> None:
    a, b, _ = roots
    with pytest.raises(TftpError) as info:
        RootResolver([a, b])(name, CLIENT)
    assert info.value.code == code


def test_absolute_path_is_relative_to_root(roots: tuple[Path, Path, Path]) -> None:
    a, _, outside = roots
    with pytest.raises(TftpError) as info:
        RootResolver([a])(str(outside / "secret"), CLIENT)
    assert info.value.code == 1  # looked up as a/<tmp>/outside/secret, which does not exist


def test_unreadable_is_access_violation(roots: tuple[Path, Path, Path]) -> None:
    a, _, _ = roots
    f = a / "noperm"
    f.write_bytes(b"x")
    f.chmod(0)
    if os.geteuid() == 0:
        pytest.skip("root reads files regardless of mode bits")
    with pytest.raises(TftpError) as info:
        RootResolver([a])("noperm", CLIENT)
    assert info.value.code == 2


def test_file_provider_random_access_across_chunks(tmp_path: Path) -> None:
    content = os.urandom(FileProvider.CHUNK * 3 + 1234)
    f = tmp_path / "f"
    f.write_bytes(content)
    p = FileProvider(f)
    assert p.size() == len(content)
    for off, n in [(0, 512), (FileProvider.CHUNK - 100, 512), (5, 7), (len(content) - 10, 512),
                   (len(content), 512), (len(content) + 99, 10), (100, FileProvider.CHUNK * 2)]:
        assert p.read_at(off, n) == content[off:off + n]
    p.close()
    p.close()  # idempotent
    assert p.read_at(FileProvider.CHUNK * 2 + 7, 10) == b""


def test_file_provider_survives_truncation(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x" * 10000)
    p = FileProvider(f)
    with open(f, "r+b") as fh:
        fh.truncate(100)
    assert p.read_at(5000, 512) == b""  # short read ends the transfer, no SIGBUS
    p.close()


def test_file_provider_rejects_directory(tmp_path: Path) -> None:
    with pytest.raises(TftpError):
        FileProvider(tmp_path)


def test_bytes_provider() -> None:
    p = BytesProvider(bytearray(b"abcdef"))
    assert p.size() == 6
    assert p.read_at(4, 10) == b"ef"
    assert p.read_at(10, 10) == b""


def test_netascii_conversion() -> None:
    p = NetasciiProvider(BytesProvider(b"a\nb\rc\r\n"))
    assert p.read_at(0, 100) == b"a\r\nb\r\0c\r\0\r\n"
    assert p.size() == 11
