"""The one place that decides what a machine boots now. It writes nothing.

DHCP, TFTP and HTTP all ask the Booter; none of them decides on its own.
``dhcp()`` answers a DHCP client with a loader or a script URL; ``decide()``
answers a loader (iPXE script, pxelinux or GRUB config) with a :class:`BootSpec`,
:class:`LocalBoot` or :class:`Refusal`. Rendering that into text is
:mod:`.ipxe`'s, :mod:`.pxelinux`'s and :mod:`.grub`'s job; recording what happened is
:mod:`.lifecycle`'s.

What it reads: the config snapshot and the registry's in-memory index, plus,
for a profile with ``ignition:``, the Ignition artefacts, whose render cache
is keyed by every input (a miss renders the template from memory: templates are
loaded when they change, never per request).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

import jinja2

from ..config import ConfigStore, Machine, Profile
from ..identity import Arch
from ..ignition.artifacts import os_kernel_args
from . import uboot
from .spec import BootSpec, Client, Cpu, Decision, Ignore, Loader, LocalBoot, Offer, Refusal

if TYPE_CHECKING:
    from ..ignition.artifacts import Artifacts, NodeArtifacts
    from ..storage.registry import Node

log = logging.getLogger("netboot.booter")


class NodeIndex(Protocol):
    """What the Booter needs of the registry: synchronous, in-memory lookups."""

    def get(self, uuid: str) -> Node | None: ...
    def node_token(self, uuid: str) -> str: ...


@dataclass
class Resolved:
    """Which machine file and profile a MAC/UUID comes to (or why none)."""

    machine: Machine | None
    profile: Profile | None
    reason: str = ""


@dataclass
class Booter:
    config: ConfigStore
    address: str
    http_port: int
    registry: NodeIndex | None = None
    artifacts: Artifacts | None = None
    _env: jinja2.Environment = field(default_factory=lambda: jinja2.Environment(
        undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False))
    _templates: dict[str, jinja2.Template] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://{self.address}:{self.http_port}"

    def over_ipv6(self, address6: str) -> Booter:
        """The same Booter (config, registry, caches) whose URLs name ``address6``,
        bracketed (RFC 3986), for clients that came over IPv6."""
        return replace(self, address=f"[{address6}]")

    # -- who is this -------------------------------------------------------
    def resolve(self, mac: str | None, uuid: str | None) -> Resolved:
        snap = self.config.snapshot
        machine = (snap.machines_by_mac.get(mac) if mac else None) or (
            snap.machines_by_uuid.get(uuid) if uuid else None)
        if machine is not None and not machine.netboot:
            return Resolved(machine, None, "machine has netboot: false")
        node = self.registry.get(uuid) if uuid and self.registry is not None else None
        # an operator's choice (netboot nodes deploy) wins over the machine file
        name = (node.assigned_profile if node is not None else None) or (
            machine.profile if machine else None) or snap.server.default_profile
        if name is None:
            return Resolved(machine, None, "no machine file and no default_profile")
        profile = snap.profiles.get(name)
        if profile is None:
            return Resolved(machine, None, f"profile {name!r} is not loaded")
        return Resolved(machine, profile)

    def secure_boot(self, r: Resolved) -> bool:
        """Whether this machine boots under Secure Boot: its machine file says so, else
        its profile, else netboot.yaml's ``secure_boot``."""
        for said in (r.machine.secure_boot if r.machine else None,
                     r.profile.secure_boot if r.profile else None):
            if said is not None:
                return said
        return self.config.snapshot.server.secure_boot

    def grub(self, r: Resolved) -> bool:
        """A UEFI x64 machine of this resolution boots GRUB (a grub profile, or Secure
        Boot, which has no other path)."""
        return r.profile is not None and (r.profile.loader == "grub" or self.secure_boot(r))

    @staticmethod
    def hostname(r: Resolved, mac: str | None) -> str:
        """The machine file's hostname, else one made from the MAC."""
        if r.machine is not None and r.machine.hostname:
            return r.machine.hostname
        return f"node-{mac.replace(':', '')}" if mac else "node"

    # -- DHCP --------------------------------------------------------------
    def dhcp(self, client: Client) -> Offer | Ignore:
        r = self.resolve(client.mac, client.uuid)
        if r.profile is None:
            return Ignore(r.reason)
        who = (r.machine.hostname or "machine file") if r.machine else "default"
        snap = self.config.snapshot
        # pxelinux is BIOS-only; under UEFI a pxelinux profile boots through iPXE.
        if r.profile.loader == "pxelinux" and client.arch is Arch.BIOS:
            return Offer(snap.server.pxelinux_loader, profile=r.profile.name, machine=who)
        if client.ipxe:  # iPXE is running: hand it the script, never a loader (no loop)
            return Offer(f"{self.base_url}/boot.ipxe", http=True, profile=r.profile.name,
                         machine=who)
        if client.arch is Arch.UNKNOWN:
            return Ignore("unsupported client architecture")
        # GRUB on UEFI x64 for grub profiles (other firmware of a grub profile boots
        # through iPXE); under Secure Boot shim comes first and loads grubx64.efi from
        # beside itself. arm64 UEFI boots GRUB (Debian has no arm64 iPXE) unless a
        # loader is named for it, and shim under Secure Boot whatever is named.
        srv = snap.server
        if client.arch is Arch.UEFI_X64 and not client.http_boot and self.grub(r):
            name = srv.shim_loader if self.secure_boot(r) else srv.grub_loader
            return Offer(name, profile=r.profile.name, machine=who)
        if client.arch is Arch.UEFI_ARM64 and not client.http_boot:
            secure = self.secure_boot(r)
            if secure or not (r.profile.loaders.get(client.arch.value)
                              or srv.loaders.get(client.arch.value)):
                name = srv.shim_loader_arm64 if secure else srv.grub_loader_arm64
                return Offer(name, profile=r.profile.name, machine=who)
        loader = r.profile.loaders.get(client.arch.value) or snap.server.loaders.get(
            client.arch.value)
        if not loader:
            return Ignore(f"no loader configured for {client.arch.value}")
        if client.http_boot:
            return Offer(f"{self.base_url}/loader/{quote(loader)}", http=True,
                         profile=r.profile.name, machine=who)
        return Offer(loader, profile=r.profile.name, machine=who)

    # -- a loader asks: what does this machine boot? -------------------------
    def decide(self, mac: str | None, uuid: str | None, loader: Loader = "ipxe",
               cpu: Cpu = "amd64") -> Decision:
        """The decision for a boot script (``ipxe``), a pxelinux config (``pxelinux``)
        or a GRUB config (``grub``).

        A pxelinux (GRUB) request for a machine whose profile does not boot pxelinux
        (GRUB) is a Refusal that is not a failure (the TFTP side answers "file not
        found"). U-Boot (``uboot``) boots any profile's kernel. ``cpu`` is what the
        loader runs on: ``arm64`` boots the profile's ``arches.arm64`` (a failed
        Refusal when it names none), and takes GRUB whatever the profile's loader.
        """
        r = self.resolve(mac, uuid)
        if r.profile is None:
            return Refusal(uuid, mac, r.reason)
        profile = r.profile
        if loader == "pxelinux" and profile.loader != "pxelinux":
            return Refusal(uuid, mac, f"profile {profile.name} does not boot pxelinux",
                           profile=profile.name)
        if loader == "grub" and cpu == "amd64" and not self.grub(r):
            return Refusal(uuid, mac, f"profile {profile.name} does not boot GRUB",
                           profile=profile.name)
        hostname = self.hostname(r, mac)
        if self._local_boot(profile, uuid):
            return LocalBoot(uuid, mac, profile.name, hostname)
        kernel, initrds, cmdline_src = profile.kernel, profile.initrds, profile.cmdline
        if cpu != "amd64":
            other = profile.arches.get(cpu)
            if other is None:
                return Refusal(uuid, mac, f"profile {profile.name} has no {cpu} kernel (give "
                               f"it arches: {{{cpu}: {{kernel: ..., initrds: [...]}}}})",
                               failed=True, profile=profile.name, hostname=hostname)
            kernel, initrds = other.kernel, other.initrds
            cmdline_src = other.cmdline if other.cmdline is not None else profile.cmdline
        ctx = self.context(r, mac, uuid)
        try:
            cmdline = self._render(cmdline_src, ctx)
        except jinja2.TemplateError as exc:
            return Refusal(uuid, mac, f"profile {profile.name}: cmdline template: {exc}",
                           failed=True, profile=profile.name, hostname=hostname)
        oem: NodeArtifacts | None = None
        oem_url = None
        os_args: tuple[str, ...] = ()
        if profile.ignition:
            oem, why = self._ignition(profile, ctx, uuid)
            if why is not None:
                return Refusal(uuid, mac, why, failed=True, profile=profile.name,
                               hostname=hostname, oem=oem)
            assert oem is not None and self.artifacts is not None
            oem_url = self.artifacts.signed_url(self.base_url, "oem", oem.uuid)
            os_args = tuple(os_kernel_args(profile))
        spec = BootSpec(uuid, mac, profile.name, hostname, kernel, tuple(initrds), cmdline,
                        os_args, oem, oem_url, profile.commission, cpu)
        if loader == "uboot" and (why := uboot.unscriptable(spec)) is not None:
            return Refusal(uuid, mac, why, failed=True, profile=profile.name,
                           hostname=hostname)
        return spec

    def artifacts_for(self, mac: str | None, uuid: str) -> tuple[NodeArtifacts | None, str]:
        """The node's Ignition artefacts as a boot would make them (``netboot render``,
        and a fetch whose boot-time artefacts were forgotten), or None and why not."""
        r = self.resolve(mac, uuid)
        if r.profile is None:
            return None, r.reason
        if not r.profile.ignition:
            return None, f"profile {r.profile.name!r} has no ignition template"
        a, why = self._ignition(r.profile, self.context(r, mac, uuid), uuid)
        return a, why or ""

    # -- templates ---------------------------------------------------------
    def context(self, r: Resolved, mac: str | None, uuid: str | None) -> dict[str, Any]:
        """Template variables of one request (built once: the node token is an HMAC)."""
        assert r.profile is not None
        machine_vars = dict(r.machine.vars) if r.machine else {}
        variables = {**r.profile.vars, **machine_vars}
        node_urls: dict[str, str] = {}
        if uuid and self.registry is not None:
            token = self.registry.node_token(uuid)
            api = f"{self.base_url}/api/v1/nodes/{uuid}"
            node_urls = {k: f"{api}/{k}?token={token}" for k in (
                "installed", "failed", "profile", "detail", "register", "inventory")}
        return {
            **variables,
            "vars": variables,
            "base_url": self.base_url,
            "images_url": f"{self.base_url}/images",
            "uuid": uuid or "",
            "mac": mac or "",
            "hostname": self.hostname(r, mac),
            "profile": r.profile.name,
            "node_urls": node_urls,
        }

    def _local_boot(self, profile: Profile, uuid: str | None) -> bool:
        """``boot: once`` after ``installed`` (until an admin re-arms the node)."""
        if profile.boot != "once" or not (self.registry and uuid):
            return False
        node = self.registry.get(uuid)
        return node is not None and node.state == "installed" and not node.armed

    def _render(self, source: str, ctx: dict[str, Any]) -> str:
        tpl = self._templates.get(source)
        if tpl is None:
            tpl = self._templates[source] = self._env.from_string(source)
        return " ".join(tpl.render(ctx).split())

    def _ignition(self, profile: Profile, ctx: dict[str, Any],
                  uuid: str | None) -> tuple[NodeArtifacts | None, str | None]:
        """(artefacts, None) when they may be served, else (artefacts or None, why not)."""
        if self.artifacts is None:
            return None, "Ignition is not set up in this server"
        if not uuid:
            return None, ("no SMBIOS UUID known for this machine; signed Ignition URLs "
                          "are per UUID")
        a = self.artifacts.render(profile, ctx, uuid)
        if a.ok:
            return a, None
        return a, a.error or "Ignition config failed"
