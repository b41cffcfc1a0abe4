"""Per-node Ignition artefacts: render, validate, cache, sign and hand out.

A profile with ``ignition: <template>`` gets, per machine, a validated
Ignition config and the gzip'd OEM archive holding it. Both carry the swarm
join token, so they are handed out only to the machine they were made for:
over HTTP behind a URL signed for that machine's UUID (the URL appears only in
its own boot script), over TFTP only to the address netboot just saw boot as
that machine.

Everything on the boot path is synchronous and in memory: rendered configs
are cached by a hash of every input, OEM archives by the config's sha256
(:class:`~netboot.cpio.OemCache`), swarm facts and the template fingerprint
are refreshed by background tasks. A config that fails to render or validate
is never served; the caller gets the reason instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import jinja2
import jinja2.meta

from ..cpio import OemCache
from ..metrics import Counters
from ..util.lru import Lru
from ..util.ratelimit import RateLimitedLog
from .render import TEMPLATE_SUFFIX, IgnitionError, IgnitionRenderer, SiteSettings, SwarmFacts

if TYPE_CHECKING:
    from ..config import Profile, ServerConfig, SiteConfig, SwarmConfig

__all__ = [
    "OEM_INITRD_NAME",
    "OS_KERNEL_ARGS",
    "Artifacts",
    "NodeArtifacts",
    "SwarmSource",
    "sign",
]

log = logging.getLogger("netboot.ignition")

Kind = Literal["ignition", "oem"]
KINDS: tuple[Kind, ...] = ("ignition", "oem")
#: The name iPXE gives the OEM archive (``initrd --name``), so UEFI kernels can be
#: told ``initrd=<name>``; distinct from any profile initrd called oem.cpio.gz.
OEM_INITRD_NAME = "netboot-oem.cpio.gz"
#: Kernel arguments each OS needs to apply the config in the OEM archive at first boot.
#: Flatcar reads usr/share/oem/config.ign from the initrd when first_boot is set; no
#: ignition.config.url: the archive works without network in the initramfs, over TFTP
#: too, and keeps a signed URL out of /proc/cmdline and the journal.
OS_KERNEL_ARGS: dict[str, tuple[str, ...]] = {
    "flatcar": ("flatcar.first_boot=1",),
    "fcos": ("ignition.firstboot", "ignition.platform.id=metal"),
    "other": (),
}
SWARM_REFRESH = 60.0
#: How long a hostname booted with Ignition stays a sweep candidate: from its boot
#: script to its new node being Ready takes minutes (firmware, kernel, Docker), longer
#: than one refresh interval, so it is swept at every refresh in this window.
SWEEP_WINDOW = 1800.0
TEMPLATE_POLL = 2.0


def sign(secret: bytes, kind: str, uuid: str, exp: int) -> str:
    """HMAC-SHA256(secret, "kind:uuid:exp") as hex: binds a URL to one node, kind and expiry."""
    return hmac.new(secret, f"{kind}:{uuid}:{exp}".encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class NodeArtifacts:
    """What one machine gets: config and OEM archive, or why it gets nothing."""

    uuid: str
    template: str
    hostname: str
    config: bytes | None = None
    digest: str = ""  # sha256 hex of config: the ETag, and what the guest's sha256sum shows
    archive: bytes | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.config is not None and self.archive is not None

    def __repr__(self) -> str:  # never print the bytes: they hold join tokens
        state = f"digest={self.digest[:12]}" if self.ok else f"error={self.error!r}"
        return f"NodeArtifacts(uuid={self.uuid!r}, template={self.template!r}, {state})"


class SwarmSource:
    """Current swarm facts: static from netboot.yaml, or read from a manager's socket.

    The socket is read by :meth:`run` in the background; readers only look at
    :attr:`facts`, so no boot ever waits for Docker.
    """

    def __init__(self, cfg: SwarmConfig | None = None, *, interval: float | None = None):
        self.socket = cfg.docker_socket if cfg else None
        self.sweep = bool(cfg and cfg.sweep_down_nodes and cfg.docker_socket)
        self.interval = interval or (cfg.refresh_seconds if cfg else SWARM_REFRESH)
        self.facts: SwarmFacts | None = None
        self.error: str | None = None
        static = (cfg.manager_addr, cfg.worker_token, cfg.manager_token) if cfg else (None,) * 3
        if self.socket:
            self.error = "not read yet"
        elif any(static):
            if all(static):
                self.facts = SwarmFacts(*static)  # type: ignore[arg-type]
            else:
                self.error = ("swarm: manager_addr, worker_token and manager_token must be "
                              "given together")
        #: hostname -> when (monotonic) netboot last booted it with Ignition
        self.rebooted: dict[str, float] = {}

    @property
    def configured(self) -> bool:
        """Whether the site has a swarm at all (facts missing then means trouble)."""
        return self.socket is not None or self.facts is not None or self.error is not None

    async def refresh(self) -> None:
        """Read facts from the socket once; keep the last good ones if that fails."""
        if not self.socket:
            return
        from ..swarm import SwarmError, read_swarm_facts

        try:
            facts = await read_swarm_facts(self.socket)
        except SwarmError as exc:
            self.error = str(exc)
            log.warning("swarm facts: %s%s", exc,
                        "; keeping the last good ones" if self.facts else "")
            return
        self.facts, self.error = facts, None

    async def run(self) -> None:
        """Refresh every ``interval`` seconds and, if enabled, sweep stale nodes."""
        if not self.socket:
            return
        from ..swarm import SwarmError, sweep_down_nodes

        while True:  # serve already read once at startup
            await asyncio.sleep(self.interval)
            try:
                await self.refresh()
            except Exception as exc:  # keep refreshing; the type only (never a token)
                self.error = f"swarm facts refresh failed: {type(exc).__name__}"
                log.error("%s", self.error)
            if self.sweep and self.rebooted:
                # Not forgotten after one sweep: the node booted may not be Ready yet
                # (the old entry goes only once the new one is), so every sweep in the
                # window looks again; sweeping a host that has no down entry is a no-op.
                now = time.monotonic()
                self.rebooted = {h: t for h, t in self.rebooted.items()
                                 if now - t < SWEEP_WINDOW}
                try:
                    removed = await sweep_down_nodes(self.socket, set(self.rebooted))
                except SwarmError as exc:
                    log.warning("swarm sweep: %s", exc)
                else:
                    if removed:
                        log.info("swarm sweep removed %d stale node(s)", len(removed))


def _fingerprint(directory: Path) -> tuple[tuple[str, int, int], ...]:
    """(name, mtime_ns, size) of every template file: changes when any template is edited."""
    out = []
    try:
        with os.scandir(directory) as it:
            for entry in it:
                if entry.name.endswith(".j2") and entry.is_file():
                    st = entry.stat()
                    out.append((entry.name, st.st_mtime_ns, st.st_size))
    except FileNotFoundError:
        pass
    return tuple(sorted(out))


@dataclass
class Artifacts:
    """Renders and remembers each node's artefacts; signs and checks their URLs."""

    renderer: IgnitionRenderer
    secret: bytes = field(repr=False)
    site: dict[str, Any] = field(default_factory=dict)
    swarm: SwarmSource = field(default_factory=SwarmSource)
    ttl: float = 3600.0
    counters: Counters = field(default_factory=Counters)
    clock: Callable[[], float] = time.time
    #: the clock of the refusal log's interval (tests drive it)
    log_clock: Callable[[], float] = time.monotonic
    max_entries: int = 10_000
    oem: OemCache = field(default_factory=lambda: OemCache(max_entries=1024))

    def __post_init__(self) -> None:
        # input hash -> NodeArtifacts; uuid -> the last handed out (the TFTP address
        # grants are boot/sightings.py's)
        self._rendered: Lru[bytes, NodeArtifacts] = Lru(self.max_entries)
        self._issued: Lru[str, NodeArtifacts] = Lru(self.max_entries)
        #: refusals (forged or stale signed URLs, OEM archives asked by another address):
        #: every one counted, one summary line a minute; never a signature or token
        self.refusals = RateLimitedLog(
            log, "refused %d Ignition/OEM request(s) since the last report (%s); latest: "
            "refused %s for %s to %s over %s: %s", every=60.0, clock=self.log_clock)
        self._uses_swarm: dict[tuple[str, Any], bool] = {}
        self.fingerprint = _fingerprint(self.renderer.template_dir)
        for name, text in (
            ("ignition_renders_total", "Ignition configs rendered, by result"),
            ("ignition_cache_hits_total", "Ignition configs served from the render cache"),
            ("ignition_refused_total", "Ignition/OEM requests refused, by reason"),
            ("ignition_served_total", "Ignition configs and OEM archives served, by kind"),
        ):
            self.counters.describe(name, text)

    @classmethod
    def from_config(cls, cfg: ServerConfig, secret: bytes, counters: Counters | None = None,
                    swarm: SwarmSource | None = None) -> Artifacts:
        """The one way serve, the CLI and the bench build it, so their bytes agree."""
        return cls(IgnitionRenderer(cfg.ignition_dir), secret, site=_site_dict(cfg.site),
                   swarm=swarm or SwarmSource(cfg.swarm), ttl=cfg.signed_url_ttl,
                   counters=counters or Counters())

    # -- background -----------------------------------------------------------
    def refresh_templates(self) -> bool:
        """Re-stat the template directory; True if a template changed (cache keys move on)."""
        fp = _fingerprint(self.renderer.template_dir)
        if fp == self.fingerprint:
            return False
        self.fingerprint = fp
        self.renderer.load()
        self._uses_swarm.clear()
        log.info("Ignition templates changed in %s", self.renderer.template_dir)
        return True

    async def run(self) -> None:
        """Background upkeep: template changes and swarm facts (never on the boot path)."""
        swarm = asyncio.create_task(self.swarm.run(), name="swarm-facts")
        try:
            while True:
                await asyncio.sleep(TEMPLATE_POLL)
                try:
                    self.refresh_templates()
                except OSError as exc:  # e.g. permissions changed: keep the last fingerprint
                    log.warning("cannot scan %s: %s", self.renderer.template_dir, exc)
        finally:
            swarm.cancel()

    # -- rendering ------------------------------------------------------------
    def render(self, profile: Profile, context: dict[str, Any], uuid: str) -> NodeArtifacts:
        """The node's artefacts for ``context`` (Booter.context); cached by every input."""
        template = profile.ignition or ""
        site = {**self.site, **profile.site}
        swarm = self.swarm.facts
        key_src = [template, self.fingerprint, context, site, profile.ssh_keys, profile.role,
                   [swarm.manager_addr, swarm.worker_token, swarm.manager_token] if swarm else
                   None, self.swarm.configured]
        key = hashlib.sha256(json.dumps(key_src, sort_keys=True, default=str).encode()).digest()
        hit: NodeArtifacts | None = self._rendered.touch(key)
        if hit is not None and hit.uuid == uuid:
            self.counters.inc("ignition_cache_hits_total")
            return hit
        result = self._render(template, profile, context, site, swarm, uuid)
        self.counters.inc("ignition_renders_total", result="ok" if result.ok else "error")
        self._rendered.put(key, result)
        return result

    def _render(self, template: str, profile: Profile, context: dict[str, Any],
                site: dict[str, Any], swarm: SwarmFacts | None, uuid: str) -> NodeArtifacts:
        hostname = str(context.get("hostname", ""))

        def fail(reason: str) -> NodeArtifacts:
            return NodeArtifacts(uuid, template, hostname, error=reason)

        try:
            settings = SiteSettings(**site)
        except TypeError:
            unknown = sorted(set(site) - set(SiteSettings.__dataclass_fields__))
            return fail(f"profile {profile.name}: site: unknown key(s) {', '.join(unknown)}")
        except ValueError as exc:
            return fail(f"profile {profile.name}: {exc}")
        if swarm is None and self.swarm.configured and not context.get("swarm_init"):
            try:
                needs = self._template_uses_swarm(template)
            except IgnitionError as exc:
                return fail(f"Ignition template {exc}")
            if needs:
                return fail(f"Ignition template {template}: swarm facts unavailable "
                            f"({self.swarm.error or 'unknown reason'})")
        ctx = {**context, "swarm": swarm, "site": settings, "ssh_keys": list(profile.ssh_keys),
               "role": profile.role}
        try:
            config = self.renderer.render(template, ctx)
        except IgnitionError as exc:
            return fail(f"Ignition template {exc}")
        digest, archive = self.oem.get(config)
        return NodeArtifacts(uuid, template, hostname, config, digest, archive)

    def _template_uses_swarm(self, template: str) -> bool:
        """Whether the template or anything it extends/includes refers to ``swarm``."""
        cached = self._uses_swarm.get((template, self.fingerprint))
        if cached is not None:
            return cached
        env = self.renderer.env
        seen: set[str] = set()
        todo = [template if template.endswith(TEMPLATE_SUFFIX) else template + TEMPLATE_SUFFIX]
        uses = False
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            try:
                source, _, _ = env.loader.get_source(env, name)  # type: ignore[union-attr]
                ast = env.parse(source)
            except jinja2.TemplateNotFound:
                raise IgnitionError(template, f"template {name!r} not found in "
                                    f"{self.renderer.template_dir}") from None
            except jinja2.TemplateSyntaxError as exc:
                raise IgnitionError(template, f"{name} line {exc.lineno}: {exc.message}") from None
            uses |= "swarm" in jinja2.meta.find_undeclared_variables(ast)
            todo += [t for t in jinja2.meta.find_referenced_templates(ast) if t]
        self._uses_swarm[(template, self.fingerprint)] = uses
        return uses

    # -- handing out ------------------------------------------------------------
    def issue(self, result: NodeArtifacts) -> None:
        """Remember what a boot script promised this node, so its fetch serves exactly that."""
        self._issued.put(result.uuid, result)
        if result.ok and result.hostname:
            self.swarm.rebooted.pop(result.hostname, None)  # newest last
            self.swarm.rebooted[result.hostname] = time.monotonic()
            if len(self.swarm.rebooted) > self.max_entries:
                del self.swarm.rebooted[next(iter(self.swarm.rebooted))]

    def issued(self, uuid: str) -> NodeArtifacts | None:
        return self._issued.touch(uuid)

    def signed_url(self, base_url: str, kind: Kind, uuid: str) -> str:
        """URL of the node's config or archive, valid for ``ttl`` seconds."""
        exp = int(self.clock() + self.ttl)
        path = f"ignition/{uuid}.ign" if kind == "ignition" else f"oem/{uuid}.cpio.gz"
        return f"{base_url}/{path}?exp={exp}&sig={sign(self.secret, kind, uuid, exp)}"

    def check(self, kind: Kind, uuid: str, exp: str | None, sig: str | None) -> str | None:
        """None when the signature holds, else the refusal reason (a metric label)."""
        if not exp or not sig:
            return "unsigned"
        try:
            when = int(exp)
        except ValueError:
            return "malformed"
        expected = sign(self.secret, kind, uuid, when)
        if not hmac.compare_digest(expected.encode(), sig.lower().encode()):
            return "bad_signature"
        if when < self.clock():
            return "expired"
        return None

    def refused(self, reason: str, kind: str, uuid: str, address: str, transport: str) -> None:
        """Count a refusal, logged in a summary at most once a minute; the signature and
        token never reach the log."""
        self.counters.inc("ignition_refused_total", reason=reason)
        self.refusals.record(reason, kind, uuid, address or "?", transport, reason)


def _site_dict(site: SiteConfig) -> dict[str, Any]:
    return site.model_dump()


def os_kernel_args(profile: Profile) -> list[str]:
    """Kernel arguments the profile's OS needs for first boot with the OEM config."""
    return list(OS_KERNEL_ARGS.get(profile.os, ()))
