"""A real netboot (built by ``netboot.server.build``, as ``serve`` builds it) on
127.0.0.1 ephemeral ports, for tests that talk to it over HTTP and TFTP."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from netboot.config import ConfigStore
from netboot.http.auth import Role, TokenTable
from netboot.server import Services, build, event_retention
from netboot.storage.registry import Registry
from netboot.tftp.server import TftpServer, start_tftp

SECRET = b"api-test-secret"


@dataclass
class Served:
    url: str
    services: Services
    app: web.Application
    tftp: TftpServer | None = None

    @property
    def registry(self) -> Registry:
        assert self.services.registry is not None
        return self.services.registry

    @property
    def counters(self) -> Any:
        return self.services.counters

    @property
    def lifecycle(self) -> Any:
        return self.services.lifecycle

    @property
    def booter(self) -> Any:
        return self.services.booter

    @property
    def artifacts(self) -> Any:
        return self.services.artifacts

    @property
    def tftp_port(self) -> int:
        assert self.tftp is not None
        return self.tftp.port


@asynccontextmanager
async def serving(config: Path, *, secret: bytes = SECRET, admin_token: str | None = None,
                  registry: bool = True, tftp: bool = False,
                  clock: Callable[[], float] = time.time,
                  stuck_after: float | None = None,
                  tokens: dict[str, tuple[str, Role]] | None = None,
                  open_reads: bool = True) -> AsyncIterator[Served]:
    """netboot for ``config`` (a netboot.yaml): HTTP, and TFTP when asked."""
    store = ConfigStore(config)
    cfg = store.server
    reg = await Registry.open(cfg.data_dir, secret=secret, clock=clock,
                              retention=event_retention(cfg),
                              url=cfg.registry.url) if registry else None
    table = dict(tokens or {})
    if admin_token:
        table[admin_token] = ("admin", "admin")
    services = build(store, "127.0.0.1", registry=reg, secret=secret,
                     tokens=TokenTable(table, open_reads=open_reads),
                     clock=clock, registry_problem=None if reg else "registry not opened (test)")
    if stuck_after is not None:
        services.lifecycle.stuck_after = stuck_after
    await services.start()
    app = services.app()
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    tftp_server = None
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
        await site.start()
        port = runner.addresses[0][1]
        if tftp:
            tftp_server = await start_tftp(services.tftp, "127.0.0.1", 0,
                                           counters=services.counters)
        yield Served(f"http://127.0.0.1:{port}", services, app, tftp_server)
    finally:
        if tftp_server is not None:
            await tftp_server.close()
        await runner.cleanup()
        await services.close()


def write_config(root: Path, data_dir: Path, profiles: dict[str, dict[str, Any]] | None = None,
                 **server: Any) -> Path:
    """A netboot.yaml under ``root`` with ``profiles`` as profile files; returns its path."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "profiles").mkdir(exist_ok=True)
    (root / "machines").mkdir(exist_ok=True)
    for name, body in (profiles or {}).items():
        (root / "profiles" / f"{name}.yaml").write_text(yaml.safe_dump(body))
    settings = {"data_dir": str(data_dir), "images_dir": str(root / "images"),
                "address": "127.0.0.1", "default_profile": None, **server}
    (root / "netboot.yaml").write_text(yaml.safe_dump(settings))
    return root / "netboot.yaml"
