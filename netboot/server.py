"""``netboot serve``: ProxyDHCP, TFTP and HTTP in one asyncio process."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import secrets
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from .boot.bmcs import Bmcs
from .boot.booter import Booter
from .boot.lifecycle import Lifecycle
from .boot.newnodes import NewNodeLimiter
from .boot.refusals import LoaderWatch
from .boot.sightings import Sightings
from .config import ConfigStore, ServerConfig
from .dhcp.proxy import ProxyDhcp
from .dhcp.server import start_dhcp
from .http.app import make_app
from .http.auth import Role, TokenTable
from .http.context import HttpContext
from .ignition.artifacts import Artifacts
from .images.verify import check_profile_images
from .loaders import LoaderTable
from .loaders import missing as missing_loaders
from .metrics import Counters, NodeMetrics
from .netutil import choose_interface, interface_ipv4, interfaces
from .power.service import PowerService
from .storage.db import ENGINE_ERRORS, redact
from .storage.registry import EventRetention, Registry, RegistryError
from .tftp.provider import RootResolver
from .tftp.router import TftpRouter
from .tftp.server import start_tftp
from .util.secretbox import SecretBox
from .webhooks import WebhookDispatcher

log = logging.getLogger("netboot")

#: listen(2) backlog of the HTTP socket (the kernel caps it at net.core.somaxconn)
HTTP_BACKLOG = 4096


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


class SecretError(SetupError):
    """No usable HMAC key: say where one goes."""


def given_secret(cfg: ServerConfig) -> bytes | None:
    """The HMAC key the operator gave (``api.secret``, ``api.secret_file``,
    ``$NETBOOT_SECRET``, in that order), or None."""
    if cfg.api.secret:
        return cfg.api.secret.encode()
    if cfg.api.secret_file is not None:
        try:
            key = cfg.api.secret_file.read_bytes().strip()
        except OSError as exc:
            raise SecretError(f"api.secret_file {cfg.api.secret_file}: {exc.strerror}") from None
        if not key:
            raise SecretError(f"api.secret_file {cfg.api.secret_file} is empty")
        return key
    if os.environ.get("NETBOOT_SECRET", "").strip():
        return os.environ["NETBOOT_SECRET"].strip().encode()
    return None


def load_secret(cfg: ServerConfig) -> bytes:
    """The HMAC key for node tokens and signed URLs: ``api.secret``, else the file
    ``api.secret_file``, else ``$NETBOOT_SECRET``, else generated once into data_dir.

    A fleet (a PostgreSQL registry) must share one key, so it is never generated there:
    every instance would make its own and refuse the others' tokens."""
    given = given_secret(cfg)
    if given is not None:
        return given
    if cfg.registry.url:
        raise SecretError(
            "a registry shared by several instances (registry: postgresql://...) needs one "
            "HMAC key on every instance, or tokens made by one fail on the others: set "
            "NETBOOT_SECRET, or api.secret_file (e.g. /run/secrets/netboot_secret), on each "
            "(generate one with: openssl rand -hex 32)")
    data_dir = cfg.data_dir
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
class Services:
    """Everything one netboot process runs, wired once (``serve`` and the tests use it)."""

    store: ConfigStore
    counters: Counters
    booter: Booter
    lifecycle: Lifecycle
    artifacts: Artifacts
    http: HttpContext
    tftp: TftpRouter
    registry: Registry | None = None
    hooks: WebhookDispatcher | None = None
    power: PowerService | None = None
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    def app(self) -> web.Application:
        return make_app(self.http)

    async def start(self) -> None:
        """Background work: first contacts, stuck nodes, Ignition upkeep, webhooks."""
        if self.hooks is not None:
            self.hooks.start()
        self.tasks += [asyncio.create_task(self.lifecycle.run(), name="lifecycle"),
                       asyncio.create_task(self.artifacts.run(), name="ignition-upkeep")]
        bmcs = self.lifecycle.bmcs
        if self.power is not None and bmcs is not None:
            self.tasks += [
                asyncio.create_task(self._enroll(), name="bmc-enroll"),
                asyncio.create_task(self.power.poll_forever(
                    bmcs.targets, self.store.server.bmc.poll_interval,
                    on_round=lambda n, polled: self.http.events.on_power(
                        self.power.statuses() if self.power else {})), name="bmc-poll")]

    async def _enroll(self, every: float = 1.0) -> None:
        """Machine files' BMCs into the registry, at start and after each config reload."""
        bmcs = self.lifecycle.bmcs
        assert bmcs is not None
        while True:
            try:
                if bmcs.enroll():
                    self.lifecycle.queue_commit()
            except Exception:
                log.exception("enrolling BMCs from machine files failed")
            await asyncio.sleep(every)

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.lifecycle.drain()
        if self.power is not None:
            await self.power.close()
        if self.hooks is not None:
            await self.hooks.close()
        if self.registry is not None:
            await self.registry.close()


def token_table(cfg: ServerConfig) -> TokenTable:
    """The API's bearer tokens: api.admin_token (or $NETBOOT_ADMIN_TOKEN) and api.tokens."""
    tokens: dict[str, tuple[str, Role]] = {}
    admin = cfg.api.admin_token or os.environ.get("NETBOOT_ADMIN_TOKEN")
    if admin:
        tokens[admin] = ("admin", "admin")
    for t in cfg.api.tokens:
        try:
            tokens[t.value()] = (t.name, t.role)
        except (OSError, ValueError) as exc:
            raise SetupError(f"api.tokens: {t.name}: {exc}") from None
    return TokenTable(tokens, open_reads=cfg.api.open_reads)


def build(store: ConfigStore, address: str, *, registry: Registry | None, secret: bytes,
          counters: Counters | None = None, tokens: TokenTable | None = None,
          registry_problem: str | None = None,
          clock: Callable[[], float] = time.time) -> Services:
    """Wire booter, lifecycle, HTTP and TFTP for one configuration."""
    cfg = store.server
    counters = counters if counters is not None else Counters()
    artifacts = Artifacts.from_config(cfg, secret, counters)
    booter = Booter(store, address, cfg.http_port, registry=registry, artifacts=artifacts)
    sightings = Sightings(grant_ttl=cfg.signed_url_ttl)
    power = bmcs = None
    if registry is not None:  # BMC credentials live (sealed) in the registry
        power = PowerService(workers=cfg.bmc.workers, timeout=cfg.bmc.timeout)
        bmcs = Bmcs(registry, store, SecretBox(secret))
    limiter = NewNodeLimiter(cfg.limits.new_nodes, counters)
    lifecycle = Lifecycle(registry, sightings, counters, booter=booter, artifacts=artifacts,
                          stuck_after=cfg.api.stuck_after, clock=clock,
                          problem=registry_problem, bmcs=bmcs, power=power, limiter=limiter,
                          loaders=LoaderWatch(cfg.dhcp.refused_loader_window))
    node_metrics = NodeMetrics()
    lifecycle.subscribe(node_metrics)
    hooks = None
    if cfg.api.webhooks:
        hooks = WebhookDispatcher(list(cfg.api.webhooks), counters=counters)
        lifecycle.subscribe(hooks.on_event)
    loaders = LoaderTable(cfg.tftp.roots, cfg.loader_aliases)
    http_ctx = HttpContext(booter, lifecycle, counters, node_metrics, cfg.images_dir, loaders,
                           registry=registry, artifacts=artifacts,
                           tokens=tokens if tokens is not None else TokenTable())
    lifecycle.subscribe(http_ctx.events.on_lifecycle)
    router = TftpRouter(booter, lifecycle, counters, RootResolver([cfg.images_dir]), loaders)
    return Services(store, counters, booter, lifecycle, artifacts, http_ctx, router,
                    registry=registry, hooks=hooks, power=power)


def event_retention(cfg: ServerConfig) -> EventRetention:
    """netboot.yaml's ``registry:`` settings, as the registry takes them."""
    kept = cfg.registry
    return EventRetention(max_age=kept.events_max_age, max_rows=kept.events_max_rows,
                          every=kept.prune_every, audit_max_age=kept.audit_max_age,
                          audit_max_rows=kept.audit_max_rows)


async def open_registry(cfg: ServerConfig) -> tuple[Registry | None, bytes]:
    """The registry and the HMAC secret from data_dir. A full, read-only or broken
    data dir must not stop machines from booting: netboot then serves without a
    registry (nothing is recorded) and with a secret that lasts until restart."""
    # a fleet's key is given, never generated (SecretError when it is not), and needs
    # no data dir; a single instance's may live in data_dir
    secret = load_secret(cfg) if cfg.registry.url else None
    try:
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        if secret is None:
            secret = load_secret(cfg)
    except OSError as exc:
        if secret is None:
            secret = given_secret(cfg)
        if secret is None:
            log.error("data_dir %s unusable: %s; signing with a temporary secret until "
                      "restart", cfg.data_dir, exc)
            secret = secrets.token_hex(32).encode()
        else:
            log.error("data_dir %s unusable: %s", cfg.data_dir, exc)
    try:
        registry = await Registry.open(cfg.data_dir, secret=secret,
                                       retention=event_retention(cfg), **registry_place(cfg))
    except (OSError, *ENGINE_ERRORS, RegistryError) as exc:
        if cfg.registry.url:
            log.error("registry %s unusable: %s; serving boot files without the registry "
                      "(boots are not recorded until it is reachable and netboot restarted)",
                      redact(cfg.registry.url), exc)
        else:
            log.error("data_dir %s unusable: %s%s; serving boot files without the registry "
                      "(boots are not recorded until it is fixed and netboot restarted)",
                      cfg.data_dir, exc, _write_probe(cfg.data_dir))
        return None, secret
    log.info("registry: %s (instance %s, %d nodes)", registry.location, registry.instance,
             sum(registry.counts_by_state().values()))
    return registry, secret


def registry_place(cfg: ServerConfig) -> dict[str, Any]:
    """Where netboot.yaml puts the registry, and this instance's name (Registry.open)."""
    return {"url": cfg.registry.url, "instance": cfg.instance or socket.gethostname()}


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
    registry, secret = await open_registry(cfg)
    services = build(store, addr, registry=registry, secret=secret,
                     tokens=token_table(cfg),
                     registry_problem=None if registry is not None else
                     f"registry in {cfg.data_dir} could not be opened")
    counters, artifacts, booter = services.counters, services.artifacts, services.booter
    loaders = services.http.loaders
    if artifacts.swarm.socket:  # once at startup, so the first boots have facts; then background
        await artifacts.swarm.refresh()
    app = services.app()
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    stop = asyncio.Event()
    closers: list[Any] = []
    try:
        # A rack asks for its scripts within a second: aiohttp's default backlog (128)
        # overflowed, and each dropped SYN cost its machine a 1 s retransmit (the boot
        # scripts' p99 in the storm was 1.4-2 s against nginx's 0.3 s with 4096).
        site = web.TCPSite(runner, cfg.http_host, cfg.http_port, reuse_address=True,
                           backlog=HTTP_BACKLOG)
        await site.start()
        log.info("HTTP listening on %s:%d (advertised as http://%s:%d)", cfg.http_host,
                 cfg.http_port, addr, cfg.http_port)
        if cfg.tftp.enabled:
            tftp = await start_tftp(services.tftp, "0.0.0.0", cfg.tftp.port, interface=iface,
                                    single_port=cfg.tftp.single_port, counters=counters,
                                    max_transfers=cfg.tftp.max_transfers,
                                    max_per_client=cfg.tftp.max_per_client,
                                    workers=cfg.tftp.workers,
                                    on_transfer=services.tftp.transferred)
            closers.append(tftp.close)
            log.info("TFTP listening on udp/%d%s: %d loader(s) from %s; images/ from %s",
                     cfg.tftp.port, f" on {iface}" if iface else "", len(loaders.files),
                     ", ".join(map(str, loaders.roots)) or "nowhere", cfg.images_dir)
            absent = missing_loaders(cfg, loaders)
            if absent:  # Debian's ipxe has no arm or 32-bit UEFI build: usually expected
                log.info("no loader for %s in the TFTP roots: such clients are not offered "
                         "a loader (put the file in a tftp.roots directory, or install "
                         "the package named)", ", ".join(absent))
        if cfg.dhcp.enabled:
            proxy = ProxyDhcp(booter, addr, counters, dhcp_port=cfg.dhcp.port,
                              report=services.lifecycle.offered,
                              leased=services.lifecycle.leased)
            dhcp = await start_dhcp(proxy, [cfg.dhcp.port, cfg.dhcp.proxy_port], interface=iface,
                                    max_age=cfg.dhcp.max_queue_age, pacing=cfg.dhcp.pacing)
            closers.append(dhcp.close)
            log.info("ProxyDHCP listening on udp/%d and udp/%d%s, advertising %s",
                     cfg.dhcp.port, cfg.dhcp.proxy_port, f" on {iface}" if iface else "", addr)
        if cfg.dhcp6.enabled:
            from .dhcp6.listen import Ipv6SetupError, start_ipv6
            try:
                closers += await start_ipv6(services, cfg, iface, runner, HTTP_BACKLOG)
            except Ipv6SetupError as exc:
                raise SetupError(str(exc)) from None
        log.info("dashboard: http://%s:%d/  health: /health  metrics: /metrics", addr,
                 cfg.http_port)
        snap = store.snapshot
        log.info("serving %d profile(s) [%s], %d machine file(s), default profile: %s",
                 len(snap.profiles), ", ".join(sorted(snap.profiles)),
                 len(snap.machine_files), cfg.default_profile or "none")
        watcher = asyncio.create_task(store.watch())
        await services.start()
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
    finally:
        for close in closers:
            result = close()
            if asyncio.iscoroutine(result):
                await result
        await runner.cleanup()
        await services.close()
