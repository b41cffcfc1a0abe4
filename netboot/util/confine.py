"""One path confinement for everything served from a directory (TFTP and HTTP).

A client names a file relative to a root; the answer is a regular file inside
that root or a refusal. The rules, the same for every transport:

* NUL anywhere is refused (``nul``): no file name holds one, and the C layer
  would cut the name short.
* Backslash is a separator, like '/'. TFTP firmware sends ``boot\\x86\\wdsnbp.com``
  (WDS, some PXE ROMs); Linux allows a backslash inside a name, but a backslash
  name under a boot root is far rarer than a Windows-style path, and one rule
  for both transports means ``..\\..\\etc\\passwd`` cannot slip through either.
* Empty and '.' components are dropped, so a leading '/' (TFTP clients send
  ``/pxelinux.0``) is relative to the root: an absolute path never leaves it.
* A '..' component anywhere is refused (``escape``), even one that would stay
  inside: it is never needed, and refusing it is simpler to trust.
* Symlinks are followed only if the final real path is inside the root
  (``escape`` otherwise), so an alias like ``flatcar/stable -> 3975.2.0`` works.
* Only regular files are served (``not a file`` for directories, devices, FIFOs).
* :func:`open_confined` opens the resolved path with O_NOFOLLOW, so a final
  component swapped for a symlink after the check is not followed.

What is left: someone who can write inside the root could swap an intermediate
directory for a symlink between the check and the open; such a writer can put
any file in the root anyway.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

ESCAPE = "escape"
NUL = "nul"
EMPTY = "empty"
NOT_FOUND = "not found"
NOT_FILE = "not a file"
DENIED = "denied"

# O_NONBLOCK: opening a FIFO for reading would otherwise block until a writer
# appears (on the event loop); it means nothing for reads of a regular file.
_OPEN_FLAGS = (os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))


class ConfineError(Exception):
    """A path refused; ``reason`` is one of the module's constants (a metric label)."""

    def __init__(self, reason: str, path: str):
        super().__init__(reason, path)
        self.reason = reason
        self.path = path

    @property
    def hostile(self) -> bool:
        """The name itself is an attack (escape, NUL), not merely absent."""
        return self.reason in (ESCAPE, NUL)

    def __str__(self) -> str:
        return f"{self.reason}: {self.path[:80]!r}"


def normalise(rel: str) -> str:
    """``rel`` as 'a/b/c' under the rules above (lexical only: no file system access)."""
    if "\0" in rel:
        raise ConfineError(NUL, rel)
    parts = [p for p in rel.replace("\\", "/").split("/") if p and p != "."]
    if ".." in parts:
        raise ConfineError(ESCAPE, rel)
    if not parts:
        raise ConfineError(EMPTY, rel)
    return "/".join(parts)


_O_PATH = getattr(os, "O_PATH", 0)


def realpath(path: str | os.PathLike[str]) -> str:
    """``os.path.realpath``, resolved by the kernel when the path exists: an O_PATH open
    and a readlink of /proc/self/fd instead of an lstat per component in Python (the
    largest Python cost of serving an image in a storm, measured)."""
    if _O_PATH:
        try:
            fd = os.open(path, _O_PATH | os.O_CLOEXEC)
        except OSError:
            return os.path.realpath(path)  # missing: the lexical answer, as realpath gives
        try:
            real = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            real = ""
        finally:
            os.close(fd)
        if real.startswith("/") and not real.endswith(" (deleted)"):
            return real
    return os.path.realpath(path)


def _resolve(root: str | os.PathLike[str], rel: str) -> str:
    """The real path ``rel`` names under ``root``, refused unless it stays inside."""
    real_root = realpath(root)
    real = realpath(os.path.join(real_root, normalise(rel)))
    if real != real_root and not real.startswith(real_root.rstrip("/") + "/"):
        raise ConfineError(ESCAPE, rel)
    return real


def confine(root: str | os.PathLike[str], rel: str) -> Path:
    """The real path of the regular file ``rel`` names inside ``root``.

    For callers that hand a path on (aiohttp's FileResponse opens it itself);
    prefer :func:`open_confined` when the caller reads the file.
    """
    real = _resolve(root, rel)
    try:
        st = os.stat(real)
    except (FileNotFoundError, NotADirectoryError):
        raise ConfineError(NOT_FOUND, rel) from None
    except OSError:
        raise ConfineError(DENIED, rel) from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfineError(NOT_FILE, rel)
    return Path(real)


def open_confined(root: str | os.PathLike[str], rel: str) -> int:
    """A read-only fd (O_NOFOLLOW, O_CLOEXEC) of the regular file ``rel`` names inside
    ``root``; the caller closes it."""
    real = _resolve(root, rel)
    try:
        fd = os.open(real, _OPEN_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        raise ConfineError(NOT_FOUND, rel) from None
    except OSError:  # ELOOP: the final component became a symlink; EACCES...
        raise ConfineError(DENIED, rel) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfineError(NOT_FILE, rel)
    except BaseException:
        os.close(fd)
        raise
    return fd
