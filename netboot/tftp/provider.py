"""Where transfer content comes from: providers, resolvers and path confinement.

The idea is fbtftp's ResponseData (the server asks an object for bytes, it does
not open files itself), made random access so a windowed transfer can restart
from any block after a loss. Resolvers are synchronous and fast: they run on
the event loop once per request.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from netboot.tftp.packet import ERR_ACCESS, ERR_NOT_FOUND
from netboot.util import confine as cf
from netboot.util.confine import ConfineError


class TftpError(Exception):
    """A refusal the client should see as an ERROR packet (RFC 1350 code + message)."""

    def __init__(self, code: int, message: str):
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"TFTP error {self.code}: {self.message}"


class Provider(Protocol):
    """Random-access content of one transfer."""

    def size(self) -> int | None:
        """Total size in bytes, or None if unknown (tsize is then not echoed)."""
        ...

    def read_at(self, offset: int, n: int) -> bytes:
        """Up to n bytes at offset; fewer only at the end of the content."""
        ...

    def close(self) -> None: ...


Resolver = Callable[[str, tuple[str, int]], Provider]


class BytesProvider:
    """Content generated in memory (pxelinux.cfg/01-<mac>, OEM cpio, ...)."""

    __slots__ = ("_data",)

    def __init__(self, data: bytes | bytearray | memoryview):
        self._data = bytes(data)

    def size(self) -> int:
        return len(self._data)

    def read_at(self, offset: int, n: int) -> bytes:
        return self._data[offset:offset + n]

    def close(self) -> None:
        pass


class FileProvider:
    """A file on disk, read with pread in large chunks.

    Not mmap: a file truncated by someone else while mapped raises SIGBUS and
    kills the whole server; a short pread merely ends the transfer early.
    """

    CHUNK = 256 * 1024
    __slots__ = ("_chunk", "_chunk_end", "_chunk_off", "_fd", "_size")

    def __init__(self, path: str | os.PathLike[str], *, fd: int | None = None):
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)) if fd is None else fd
        try:
            st = os.fstat(self._fd)
            if not stat.S_ISREG(st.st_mode):
                raise TftpError(ERR_NOT_FOUND, "not a regular file")
        except BaseException:
            os.close(self._fd)
            raise
        self._size = st.st_size
        self._chunk = b""
        self._chunk_off = 0
        self._chunk_end = 0

    def size(self) -> int:
        return self._size

    def fileno(self) -> int:
        """The open file (handed to the TFTP worker process, see offload.py)."""
        return self._fd

    def read_at(self, offset: int, n: int) -> bytes:
        end = offset + n
        if offset < self._chunk_off or end > self._chunk_end:
            if self._fd < 0:
                return b""
            self._chunk = os.pread(self._fd, max(self.CHUNK, n), offset)
            self._chunk_off = offset
            self._chunk_end = offset + len(self._chunk)
            if len(self._chunk) < n:  # end of file: serve what is there
                return self._chunk
        start = offset - self._chunk_off
        return self._chunk[start:start + n]

    def readinto_at(self, offset: int, buffers: list[memoryview]) -> int:
        """Fill `buffers` in order from offset with one preadv; returns the bytes read.

        Used by ReadSession to read a chunk straight into its framed DATA packets
        (no intermediate bytes objects); fewer bytes than asked only at the end of the file.
        """
        if self._fd < 0:
            return 0
        return os.preadv(self._fd, buffers, offset)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self._chunk = b""


def _tftp_error(exc: ConfineError) -> TftpError:
    """ERROR 1 (not found) for a name that is merely absent, ERROR 2 (access violation)
    for an escape, a NUL or a file the server may not read."""
    absent = exc.reason in (cf.EMPTY, cf.NOT_FOUND, cf.NOT_FILE)
    return TftpError(ERR_NOT_FOUND if absent else ERR_ACCESS, _MESSAGES[exc.reason])


_MESSAGES = {cf.ESCAPE: "path escapes root", cf.NUL: "NUL in file name",
             cf.EMPTY: "empty file name", cf.NOT_FOUND: "file not found",
             cf.NOT_FILE: "not a regular file", cf.DENIED: "access denied"}


def normalise_path(raw: str) -> str:
    """:func:`netboot.util.confine.normalise` with its refusals as TFTP errors."""
    try:
        return cf.normalise(raw)
    except ConfineError as exc:
        raise _tftp_error(exc) from None


class RootResolver:
    """Serve regular files under any of the roots (:func:`~netboot.util.confine.open_confined`
    rules); the first root holding a regular file at the path wins."""

    def __init__(self, roots: Iterable[Path | str]):
        self.roots = [os.path.realpath(r) for r in roots]

    def __call__(self, path: str, client: tuple[str, int]) -> Provider:
        for root in self.roots:
            try:
                return FileProvider(path, fd=cf.open_confined(root, path))
            except ConfineError as exc:
                if exc.reason not in (cf.NOT_FOUND, cf.NOT_FILE):  # absent here: try the next root
                    raise _tftp_error(exc) from None
        raise TftpError(ERR_NOT_FOUND, "file not found")


class NetasciiProvider(BytesProvider):
    """RFC 1350 netascii view of another provider (LF -> CR LF, CR -> CR NUL), held in memory."""

    MAX = 64 * 1024 * 1024

    def __init__(self, inner: Provider):
        try:
            size = inner.size()
            if size is not None and size > self.MAX:
                raise TftpError(ERR_ACCESS, "file too large for netascii")
            chunks: list[bytes] = []
            off = 0
            while True:
                piece = inner.read_at(off, 1 << 20)
                if not piece:
                    break
                chunks.append(piece)
                off += len(piece)
                if off > self.MAX:
                    raise TftpError(ERR_ACCESS, "file too large for netascii")
        finally:
            inner.close()
        raw = b"".join(chunks)
        super().__init__(raw.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n"))
