"""``netboot serve``: ProxyDHCP, TFTP and HTTP in one asyncio process."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import secrets
import signal
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from .booter import Booter, Resolved
from .config import ConfigStore, ServerConfig
from .dhcp.proxy import ProxyDhcp
from .dhcp.server import start_dhcp
from .http.app import HttpContext, boot_outcome, make_app
from .identity import IdentityError, normalise_mac, normalise_uuid
from .ignition.artifacts import Artifacts
from .images.verify import check_profile_images
from .loaders import LoaderTable
from .metrics import Counters
from .netutil import choose_interface, interface_ipv4, interfaces
from .registry import Registry, RegistryError
from .tftp.packet import ERR_ACCESS, ERR_NOT_FOUND
from .tftp.provider import BytesProvider, Provider, RootResolver, TftpError, normalise_path
from .tftp.server import start_tftp

log = logging.getLogger("netboot")


class SetupError(Exception):
    """Something the admin must fix before the server can start; the text says what."""


def pick_address(interface: str | None, address: str | None) -> tuple[str | None, str]:
    """(interface, address to advertise), or SetupError with the choices."""
    if interface:
        found = interface_ipv4(interface)
        if found is None and address is None:
            names = ", ".join(f"{n} ({a})" for n, a, _ in interfaces() if a) or "none"
            raise SetupError(f"interface {interface!r} has no IPv4 address (or does not exist). "
                             f"Interfaces with IPv4: {names}. Choose one with --interface.")
        return interface, address or found  # type: ignore[return-value]
    if address:
        return None, address
    chosen = choose_interface()
    if chosen is None:
        raise SetupError("no network interface with an IPv4 address besides loopback; "
                         "give one with --interface IF (and --address A to advertise "
                         "another address), e.g. a lab bridge.")
    return chosen


def load_secret(data_dir: Path, configured: str | None) -> bytes:
    """The HMAC key for node tokens: from config, else generated once into data_dir."""
    if configured:
        return configured.encode()
    path = data_dir / "secret"
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        data_dir.mkdir(parents=True, exist_ok=True)
        key = secrets.token_hex(32).encode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        return key


@dataclass
class TftpRouter:
    """Chooses what a TFTP path serves: generated pxelinux configs, OEM archives, images,
    loaders."""

    booter: Booter
    http: HttpContext
    images: RootResolver
    loaders: LoaderTable
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def __call__(self, path: str, client: tuple[str, int]) -> Provider:
        path = normalise_path(path)
        if path.startswith("pxelinux.cfg/"):
            return self._pxelinux(path[len("pxelinux.cfg/"):], client)
        if path.startswith("oem/"):
            return self._oem(path[len("oem/"):], client)
        if path.startswith("images/"):
            provider = self.images(path[len("images/"):], client)
            self._transition(client[0], "deploying", only_from="booting")
            return provider
        return self.loaders(path, client)

    def _pxelinux(self, name: str, client: tuple[str, int]) -> Provider:
        # pxelinux asks for 01-<mac> first, then UUID, hex IP forms and "default".
        if not name.startswith("01-"):
            raise TftpError(1, "file not found")
        try:
            mac = normalise_mac(name[3:])
        except IdentityError:
            raise TftpError(1, "file not found") from None
        text, resolved, uuid = self.booter.pxelinux(mac)
        if text is None:
            raise TftpError(1, "file not found")
        self.http.remember(client[0], uuid, mac)
        if resolved.local_boot:  # boot: once, installed: sent to its disk, not a boot
            return BytesProvider(text.encode())

        self._transition(client[0], "booting", boot=resolved, then=lambda: boot_outcome(
            self.http, resolved, uuid, client[0], "tftp"))
        if resolved.ignition_error is None and resolved.artifacts is not None \
                and self.http.artifacts is not None:
            self.http.artifacts.grant(client[0], resolved.artifacts.uuid)
        return BytesProvider(text.encode())

    def _oem(self, name: str, client: tuple[str, int]) -> Provider:
        """``oem/<uuid>.cpio.gz``: only to the address that just booted as that node.

        TFTP has no secrets to sign with, so the client's address is the credential:
        it must be the one netboot handed this node's pxelinux config or iPXE script.
        """
        artifacts = self.http.artifacts
        try:
            uuid = normalise_uuid(name.removesuffix(".cpio.gz")) if name.endswith(
                ".cpio.gz") else None
        except IdentityError:
            uuid = None
        if artifacts is None or uuid is None:
            raise TftpError(ERR_NOT_FOUND, "file not found")
        if not artifacts.granted(client[0], uuid):
            artifacts.refused("address", "oem", uuid, client[0], "tftp")
            raise TftpError(ERR_ACCESS, "access violation")
        a = artifacts.issued(uuid)
        if a is None:  # forgotten (LRU): the address booted as this node, render again
            a, _ = self.booter.node_artifacts(self.http.by_address.get(client[0], (None, None))[1],
                                              uuid)
        if a is None or not a.ok or a.archive is None:
            raise TftpError(ERR_NOT_FOUND, "file not found")
        artifacts.counters.inc("ignition_served_total", kind="oem", transport="tftp")
        return BytesProvider(a.archive)

    def _transition(self, address: str, state: str, only_from: str | None = None,
                    boot: Resolved | None = None, then: Any = None) -> None:
        """Move the node that booted from ``address`` to ``state``, off the reply path.

        ``boot``: the resolution a pxelinux config was just made from; that fetch is a
        boot, recorded with the profile and hostname it was given.
        """
        registry = self.http.registry
        uuid, mac = self.http.by_address.get(address, (None, None))
        if registry is None or uuid is None:
            if then is not None:  # still log a failed Ignition config
                self._spawn(then())
            return
        node = registry.get(uuid)
        if only_from and (node is None or node.state != only_from):
            return

        async def go() -> None:
            if boot is not None:
                hostname = self.booter.hostname(boot, mac) if boot.profile else None
                await self.http.record(registry.observe(
                    uuid, mac=mac, address=address, source="tftp", boot=True, hostname=hostname,
                    profile=boot.profile.name if boot.profile else None))
            await self.http.record(registry.transition(uuid, state, source="tftp",
                                                       address=address))
            if then is not None:
                await then()

        self._spawn(go())

    def _spawn(self, coro: Any) -> None:

        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


async def open_registry(cfg: ServerConfig, counters: Counters) -> tuple[Registry | None, bytes]:
    """The registry and the HMAC secret from data_dir. A full, read-only or broken
    data dir must not stop machines from booting: netboot then serves without a
    registry (nothing is recorded) and with a secret that lasts until restart."""
    try:
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        secret = load_secret(cfg.data_dir, cfg.api.secret)
    except OSError as exc:
        log.error("data_dir %s unusable: %s; signing with a temporary secret until restart",
                  cfg.data_dir, exc)
        secret = (cfg.api.secret or secrets.token_hex(32)).encode()
    try:
        registry = await Registry.open(cfg.data_dir, secret=secret, counters=counters,
                                       webhooks=cfg.api.webhooks, stuck_after=cfg.api.stuck_after)
    except (OSError, sqlite3.Error, RegistryError) as exc:
        log.error("data_dir %s unusable: %s%s; serving boot files without the registry "
                  "(boots are not recorded until it is fixed and netboot restarted)",
                  cfg.data_dir, exc, _write_probe(cfg.data_dir))
        return None, secret
    return registry, secret


def _write_probe(directory: Path) -> str:
    """SQLite says 'disk I/O error'; the OS says why (full, read-only...)."""
    probe = directory / f".netboot-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        return f" ({exc.strerror})"
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
    return ""


async def serve(config_path: Path, *, interface: str | None = None, address: str | None = None,
                http_port: int | None = None, data_dir: Path | None = None,
                ready: asyncio.Event | None = None) -> None:
    store = ConfigStore(config_path, interface=interface, address=address,
                        http_port=http_port, data_dir=data_dir)
    cfg = store.server
    for problem in store.problems:
        log.warning("config: %s", problem)
    iface, addr = pick_address(cfg.interface, cfg.address)
    missing = check_profile_images(store.snapshot.profiles, cfg.images_dir)
    if missing:
        raise SetupError("\n".join(missing) + "\nnot starting: fetch, build or import the "
                         "images above (netboot check lists the same problems)")
    counters = Counters()
    registry, secret = await open_registry(cfg, counters)
    artifacts = Artifacts.from_config(cfg, secret, counters)
    if artifacts.swarm.socket:  # once at startup, so the first boots have facts; then background
        await artifacts.swarm.refresh()
    booter = Booter(store, addr, cfg.http_port, registry=registry, artifacts=artifacts)
    loaders = LoaderTable(cfg.tftp.roots)
    http_ctx = HttpContext(booter, counters, cfg.images_dir, loaders, registry=registry,
                           artifacts=artifacts, data_dir=cfg.data_dir)
    if registry is None:
        http_ctx.registry_problem = f"registry in {cfg.data_dir} could not be opened"
    admin_token = cfg.api.admin_token or os.environ.get("NETBOOT_ADMIN_TOKEN")
    app = make_app(http_ctx, admin_token=admin_token)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    stop = asyncio.Event()
    closers: list[Any] = []
    try:
        site = web.TCPSite(runner, cfg.http_host, cfg.http_port, reuse_address=True)
        await site.start()
        log.info("HTTP listening on %s:%d (advertised as http://%s:%d)", cfg.http_host,
                 cfg.http_port, addr, cfg.http_port)
        if cfg.tftp.enabled:
            router = TftpRouter(booter, http_ctx, RootResolver([cfg.images_dir]), loaders)
            tftp = await start_tftp(router, "0.0.0.0", cfg.tftp.port, interface=iface,
                                    single_port=cfg.tftp.single_port, counters=counters,
                                    max_transfers=cfg.tftp.max_transfers,
                                    max_per_client=cfg.tftp.max_per_client)
            closers.append(tftp.close)
            log.info("TFTP listening on udp/%d%s: %d loader(s) from %s; images/ from %s",
                     cfg.tftp.port, f" on {iface}" if iface else "", len(loaders.files),
                     ", ".join(map(str, loaders.roots)) or "nowhere", cfg.images_dir)
            wanted = {**cfg.loaders, "pxelinux": cfg.pxelinux_loader}
            missing = sorted(f"{arch} ({name})" for arch, name in wanted.items()
                             if name not in loaders.files)
            if missing:  # Debian's ipxe has no arm or 32-bit UEFI build: usually expected
                log.info("no loader for %s in the TFTP roots: such clients are not offered "
                         "a loader (put the file in a tftp.roots directory)", ", ".join(missing))
        if cfg.dhcp.enabled:
            proxy = ProxyDhcp(booter, addr, counters, dhcp_port=cfg.dhcp.port)
            dhcp = await start_dhcp(proxy, [cfg.dhcp.port, cfg.dhcp.proxy_port], interface=iface)
            closers.append(dhcp.close)
            log.info("ProxyDHCP listening on udp/%d and udp/%d%s, advertising %s",
                     cfg.dhcp.port, cfg.dhcp.proxy_port, f" on {iface}" if iface else "", addr)
        log.info("dashboard: http://%s:%d/  health: /health  metrics: /metrics", addr,
                 cfg.http_port)
        snap = store.snapshot
        log.info("serving %d profile(s) [%s], %d machine file(s), default profile: %s",
                 len(snap.profiles), ", ".join(sorted(snap.profiles)),
                 len(snap.machine_files), cfg.default_profile or "none")
        watcher = asyncio.create_task(store.watch())
        upkeep = asyncio.create_task(artifacts.run(), name="ignition-upkeep")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if ready is not None:
            ready.set()
        # Move what startup built out of the collector's sight: full collections
        # over it stalled the loop 20-27 ms, longer than a DHCP reply takes.
        gc.freeze()
        await stop.wait()
        log.info("stopping")
        watcher.cancel()
        upkeep.cancel()
    finally:
        for close in closers:
            result = close()
            if asyncio.iscoroutine(result):
                await result
        await runner.cleanup()
        if registry is not None:
            await registry.close()
