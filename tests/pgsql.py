"""A real PostgreSQL for the tests: Debian's server binaries, a cluster made by initdb in a
temp dir and started with pg_ctl, reached on a unix socket in that dir only (no TCP port,
nothing left behind). As root the cluster runs as the ``postgres`` user (``runuser``),
which PostgreSQL requires; otherwise as the caller.

Each test gets its own database (``fresh_database``), so tests never see each other's rows.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path


def bin_dir() -> Path | None:
    """The newest installed server's bin dir (Debian: /usr/lib/postgresql/<major>/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name))
    return Path(found[-1]).parent if found else None


@dataclass
class PgServer:
    root: Path
    bin: Path

    @property
    def socket_dir(self) -> Path:
        return self.root

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@/{database}?host={self.socket_dir}"

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin / argv[0]), *argv[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=120)

    @classmethod
    def start(cls) -> PgServer:
        pg_bin = bin_dir()
        if pg_bin is None:
            raise FileNotFoundError("PostgreSQL server binaries are not installed "
                                    "(Debian: apt-get install postgresql; make deps-test does)")
        root = Path(tempfile.mkdtemp(prefix="netboot-pg-"))
        if os.geteuid() == 0:
            shutil.chown(root, "postgres", "postgres")
        server = cls(root, pg_bin)
        data = root / "data"
        try:
            server._run("initdb", "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync",
                        "-E", "UTF8")
            # fsync off: the tests' cluster is thrown away, and a commit that fsyncs costs
            # a suite on a slow disk minutes; the registry's own durability is PostgreSQL's
            server._run("pg_ctl", "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60",
                        "-o", f"-k {root} -c listen_addresses='' -c fsync=off "
                        "-c max_connections=200", "start")
        except subprocess.CalledProcessError as exc:
            log = (root / "log").read_text() if (root / "log").exists() else ""
            shutil.rmtree(root, ignore_errors=True)
            raise RuntimeError(f"PostgreSQL did not start: {exc.stderr}{log}") from exc
        return server

    def restart(self) -> None:
        """Stop the server (fast: every connection is cut) and start it again."""
        data = str(self.root / "data")
        self._run("pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
        self._run("pg_ctl", "-D", data, "-l", str(self.root / "log"), "-w", "-t", "60",
                  "-o", f"-k {self.root} -c listen_addresses='' -c fsync=off "
                  "-c max_connections=200", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop",
                  check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    async def fresh_database(self) -> str:
        """A new empty database; its URL."""
        import asyncpg

        name = f"t_{uuid.uuid4().hex[:16]}"
        conn = await asyncpg.connect(self.url())
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return self.url(name)
