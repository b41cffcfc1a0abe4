"""One path confinement (netboot/util/confine.py) for TFTP and HTTP.

The same table of names is asked of a real netboot TFTP server and of the real
aiohttp app's /images/ route, both on 127.0.0.1 over real sockets and serving
the same root; each case must have the same outcome on both transports.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from netboot.config import ConfigStore
from netboot.server import build
from netboot.tftp import packet as pk
from netboot.tftp.provider import RootResolver
from netboot.tftp.server import start_tftp
from netboot.util.confine import (
    DENIED,
    EMPTY,
    ESCAPE,
    NOT_FILE,
    NOT_FOUND,
    NUL,
    ConfineError,
    confine,
    normalise,
    open_confined,
)
from tests.served import write_config

pytestmark = pytest.mark.timeout(60)

PLAIN, NESTED, INSIDE, CANARY = b"plain file", b"nested file", b"root's own etc/passwd", b"CANARY"


def make_tree(base: Path) -> Path:
    """``base/root`` to serve, with ``base/secret`` beside it (never to be served)."""
    root = base / "root"
    (root / "sub" / "dir").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "file").write_bytes(PLAIN)
    (root / "sub" / "file").write_bytes(NESTED)
    (root / "etc" / "passwd").write_bytes(INSIDE)
    (base / "secret").write_bytes(CANARY)
    os.symlink("sub/file", root / "inlink")  # stays inside: served
    os.symlink(base / "secret", root / "outlink")  # leaves the root: refused
    os.symlink("../../secret", root / "sub" / "uplink")  # relative, leaves: refused
    os.symlink(base, root / "sub" / "outdir")  # a directory outside: nothing under it
    return root


@dataclass(frozen=True)
class Case:
    name: str
    tftp: str  # the RRQ file name
    http: str  # the request target after /images/, as sent on the wire
    served: bytes | None  # the content, or None: refused
    tftp_code: int | None = None  # the ERROR code TFTP answers a refusal with


CASES = [
    Case("plain file", "file", "file", PLAIN),
    Case("nested file", "sub/file", "sub/file", NESTED),
    Case("../ traversal", "../secret", "../secret", None, pk.ERR_ACCESS),
    Case("deep ../ traversal", "../../../../etc/passwd", "../../../../etc/passwd", None,
         pk.ERR_ACCESS),
    Case(".. in the middle, even staying inside", "sub/../file", "sub/../file", None,
         pk.ERR_ACCESS),
    Case("url-encoded traversal", "%2e%2e%2fsecret", "%2e%2e%2fsecret", None, pk.ERR_NOT_FOUND),
    Case("url-encoded traversal, upper case", "%2E%2E/secret", "%2E%2E/secret", None,
         pk.ERR_NOT_FOUND),
    Case("backslash traversal", "..\\..\\etc\\passwd", "..%5C..%5Cetc%5Cpasswd", None,
         pk.ERR_ACCESS),
    Case("backslash-separated good path", "sub\\file", "sub%5Cfile", NESTED),
    Case("absolute path stays in the root", "/etc/passwd", "/etc/passwd", INSIDE),
    Case("NUL", "file\0../secret", "file%00../secret", None),
    Case("symlink inside pointing outside", "outlink", "outlink", None, pk.ERR_ACCESS),
    Case("relative symlink climbing out", "sub/uplink", "sub/uplink", None, pk.ERR_ACCESS),
    Case("through a symlinked directory outside", "sub/outdir/secret", "sub/outdir/secret",
         None, pk.ERR_ACCESS),
    Case("symlink inside pointing inside", "inlink", "inlink", NESTED),
    Case("directory", "sub", "sub", None, pk.ERR_NOT_FOUND),
    Case("directory with trailing slash", "sub/dir/", "sub/dir/", None, pk.ERR_NOT_FOUND),
    Case("missing file", "nope", "nope", None, pk.ERR_NOT_FOUND),
]


@dataclass
class Servers:
    tftp: tuple[str, int]
    http: tuple[str, int]


@pytest.fixture
async def servers(tmp_path: Path) -> AsyncIterator[Servers]:
    """netboot's HTTP app serving ``root`` as images_dir, and a TFTP server on the same root."""
    root = make_tree(tmp_path / "tree")
    config = write_config(tmp_path / "config", tmp_path / "data", images_dir=str(root))
    app = build(ConfigStore(config), "127.0.0.1", registry=None, secret=b"s").app()
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    tftp = await start_tftp(RootResolver([root]), "127.0.0.1", 0)
    try:
        yield Servers(("127.0.0.1", tftp.port), ("127.0.0.1", runner.addresses[0][1]))
    finally:
        await tftp.close()
        await runner.cleanup()


async def tftp_get(server: tuple[str, int], name: str) -> tuple[bytes | None, int | None]:
    """(content, None) or (None, ERROR code) for one octet RRQ, lock-step."""
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        s.bind(("127.0.0.1", 0))
        # Built by hand: a NUL in the name ends the field on the wire, as a client sends it.
        rrq = b"\0\x01" + name.encode("utf-8", "surrogateescape") + b"\0octet\0"
        await loop.sock_sendto(s, rrq, server)
        out = bytearray()
        while True:
            data, tid = await asyncio.wait_for(loop.sock_recvfrom(s, 65536), 3)
            if pk.opcode_of(data) == pk.ERROR:
                return None, pk.parse_error(data)[0]
            block, payload = pk.parse_data(data)
            out += payload
            await loop.sock_sendto(s, pk.encode_ack(block), tid)
            if len(payload) < 512:
                return bytes(out), None


async def http_get(server: tuple[str, int], target: str) -> tuple[int, bytes]:
    """Status and body of ``GET /images/<target>`` sent byte for byte (no client-side
    normalisation of '..' or percent escapes)."""
    reader, writer = await asyncio.open_connection(*server)
    try:
        writer.write(f"GET /images/{target} HTTP/1.1\r\nHost: x\r\n"
                     "Connection: close\r\n\r\n".encode())
        reply = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_same_outcome_on_tftp_and_http(servers: Servers, case: Case) -> None:
    content, code = await tftp_get(servers.tftp, case.tftp)
    status, body = await http_get(servers.http, case.http)
    assert CANARY not in (content or b"") and CANARY not in body
    if case.served is not None:
        assert (content, code) == (case.served, None), "tftp"
        assert (status, body) == (200, case.served), "http"
    else:
        assert content is None, "tftp served a refused path"
        if case.tftp_code is not None:
            assert code == case.tftp_code, "tftp error code"
        assert status in (400, 403, 404), f"http status {status}"


# -- the helper itself ------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "want"), [
    ("a", "a"), ("/a/b", "a/b"), ("a//b/./c/", "a/b/c"), ("a\\b\\c", "a/b/c"),
    ("\\a", "a"), ("./a", "a"), ("..a/b..", "..a/b.."), ("%2e%2e", "%2e%2e"),
])
def test_normalise(raw: str, want: str) -> None:
    assert normalise(raw) == want


@pytest.mark.parametrize(("raw", "reason"), [
    ("..", ESCAPE), ("a/../b", ESCAPE), ("a\\..\\b", ESCAPE), ("/..", ESCAPE),
    ("a\0b", NUL), ("", EMPTY), ("/", EMPTY), ("./.", EMPTY), ("\\\\", EMPTY),
])
def test_normalise_refuses(raw: str, reason: str) -> None:
    with pytest.raises(ConfineError) as exc:
        normalise(raw)
    assert exc.value.reason == reason
    assert exc.value.hostile == (reason in (ESCAPE, NUL))


@pytest.mark.parametrize(("rel", "reason"), [
    ("../secret", ESCAPE), ("outlink", ESCAPE), ("sub/uplink", ESCAPE),
    ("sub/outdir/secret", ESCAPE), ("nope", NOT_FOUND), ("file/below", NOT_FOUND),
    ("sub", NOT_FILE), ("a\0", NUL),
])
def test_confine_and_open_confined_agree_on_refusals(tmp_path: Path, rel: str,
                                                    reason: str) -> None:
    root = make_tree(tmp_path)
    for call in (confine, open_confined):
        with pytest.raises(ConfineError) as exc:
            call(root, rel)
        assert exc.value.reason == reason, call.__name__


def test_confine_gives_the_real_path(tmp_path: Path) -> None:
    root = make_tree(tmp_path)
    assert confine(root, "inlink") == (root / "sub" / "file").resolve()
    assert confine(str(root), "/sub\\file") == (root / "sub" / "file").resolve()
    fd = open_confined(root, "inlink")
    try:
        assert os.pread(fd, 100, 0) == NESTED
        assert os.get_inheritable(fd) is False  # O_CLOEXEC
    finally:
        os.close(fd)


def test_a_root_that_is_itself_a_symlink(tmp_path: Path) -> None:
    root = make_tree(tmp_path)
    os.symlink(root, tmp_path / "alias")
    assert confine(tmp_path / "alias", "file").read_bytes() == PLAIN


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    root = make_tree(tmp_path)
    os.mkfifo(root / "fifo")
    for call in (confine, open_confined):
        with pytest.raises(ConfineError) as exc:
            call(root, "fifo")
        assert exc.value.reason == NOT_FILE


def test_unreadable_file_is_denied(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads files regardless of mode bits")
    root = make_tree(tmp_path)
    (root / "file").chmod(0)
    with pytest.raises(ConfineError) as exc:
        open_confined(root, "file")
    assert exc.value.reason == DENIED


def test_error_text_is_short_and_names_the_reason() -> None:
    text = str(ConfineError(ESCAPE, "../" * 100))
    assert text.startswith("escape: ") and len(text) < 100
