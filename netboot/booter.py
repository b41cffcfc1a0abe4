"""The one place that answers "what does this machine boot now?".

DHCP, TFTP and HTTP all ask the Booter; none of them decides on its own. It
reads only in-memory state (the config snapshot and the registry's index), so
it is safe on the per-packet path.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

import jinja2

from .config import ConfigStore, Machine, Profile
from .identity import Arch
from .ignition.artifacts import OEM_INITRD_NAME, os_kernel_args

if TYPE_CHECKING:
    from .ignition.artifacts import Artifacts, NodeArtifacts
    from .registry import Node

log = logging.getLogger("netboot.booter")


class NodeIndex(Protocol):
    """What the Booter needs of the registry: synchronous, in-memory lookups."""

    def get(self, uuid: str) -> Node | None: ...
    def node_token(self, uuid: str) -> str: ...
    def note(self, uuid: str, **kw: Any) -> None: ...


@dataclass(frozen=True, slots=True)
class Client:
    """A booting machine as the network sees it."""

    mac: str
    uuid: str | None = None
    arch: Arch = Arch.BIOS
    http_boot: bool = False  # UEFI HTTP Boot (option 60 HTTPClient)
    ipxe: bool = False  # the request comes from iPXE, not from the ROM


@dataclass(frozen=True, slots=True)
class Offer:
    """A DHCP boot answer: ``filename`` is a TFTP path, or a URL when ``http``."""

    filename: str
    http: bool = False
    profile: str = ""
    machine: str = ""  # hostname or file that matched, for the log


@dataclass(frozen=True, slots=True)
class Ignore:
    reason: str


@dataclass
class Resolved:
    machine: Machine | None
    profile: Profile | None
    reason: str = ""
    #: the node's Ignition artefacts when its profile has ``ignition:``
    artifacts: NodeArtifacts | None = None
    #: why a profile with ``ignition:`` could not be served (the boot script says it too)
    ignition_error: str | None = None
    #: why the profile's kernel arguments could not be rendered (an undefined variable...)
    error: str | None = None
    #: ``boot: once`` and installed: the machine was sent to its local disk (not a boot)
    local_boot: bool = False
    #: template variables, built once per request (the node token is an HMAC)
    variables: dict[str, Any] | None = None


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
    #: MAC -> SMBIOS UUID as last seen in DHCP, for pxelinux (which only knows the MAC)
    #: (an OrderedDict: evicting the oldest of a plain dict slows as deletions pile up)
    _uuid_by_mac: OrderedDict[str, str] = field(default_factory=OrderedDict)
    max_remembered: int = 100_000

    def _remember(self, mac: str, uuid: str) -> None:
        seen = self._uuid_by_mac
        if seen.get(mac) == uuid:
            return
        seen[mac] = uuid
        seen.move_to_end(mac)
        if len(seen) > self.max_remembered:
            seen.popitem(last=False)

    def uuid_for_mac(self, mac: str) -> str | None:
        return self._uuid_by_mac.get(mac)

    @property
    def base_url(self) -> str:
        return f"http://{self.address}:{self.http_port}"

    # -- who is this -------------------------------------------------------
    def resolve(self, mac: str | None, uuid: str | None) -> Resolved:
        snap = self.config.snapshot
        machine = (snap.machines_by_mac.get(mac) if mac else None) or (
            snap.machines_by_uuid.get(uuid) if uuid else None)
        if machine is not None and not machine.netboot:
            return Resolved(machine, None, "machine has netboot: false")
        name = (machine.profile if machine else None) or snap.server.default_profile
        if name is None:
            return Resolved(machine, None, "no machine file and no default_profile")
        profile = snap.profiles.get(name)
        if profile is None:
            return Resolved(machine, None, f"profile {name!r} is not loaded")
        return Resolved(machine, profile)

    # -- DHCP --------------------------------------------------------------
    def dhcp(self, client: Client) -> Offer | Ignore:
        r = self.resolve(client.mac, client.uuid)
        if r.profile is None:
            return Ignore(r.reason)
        who = (r.machine.hostname or "machine file") if r.machine else "default"
        if client.uuid:
            self._remember(client.mac, client.uuid)
            if self.registry is not None and self.registry.get(client.uuid) is None:
                # first contact: 'discovered', queued so the reply never waits on disk
                self.registry.note(client.uuid, mac=client.mac, address=None, source="dhcp",
                                   profile=r.profile.name)
        snap = self.config.snapshot
        # pxelinux is BIOS-only; under UEFI a pxelinux profile boots through iPXE.
        if r.profile.loader == "pxelinux" and client.arch is Arch.BIOS:
            return Offer(snap.server.pxelinux_loader, profile=r.profile.name, machine=who)
        if client.ipxe:  # iPXE is running: hand it the script, never a loader (no loop)
            return Offer(f"{self.base_url}/boot.ipxe", http=True, profile=r.profile.name,
                         machine=who)
        if client.arch is Arch.UNKNOWN:
            return Ignore("unsupported client architecture")
        loader = r.profile.loaders.get(client.arch.value) or snap.server.loaders.get(
            client.arch.value)
        if not loader:
            return Ignore(f"no loader configured for {client.arch.value}")
        if client.http_boot:
            return Offer(f"{self.base_url}/loader/{quote(loader)}", http=True,
                         profile=r.profile.name, machine=who)
        return Offer(loader, profile=r.profile.name, machine=who)

    # -- templates ---------------------------------------------------------
    def context(self, r: Resolved, mac: str | None, uuid: str | None) -> dict[str, Any]:
        assert r.profile is not None
        machine_vars = dict(r.machine.vars) if r.machine else {}
        variables = {**r.profile.vars, **machine_vars}
        hostname = self.hostname(r, mac)
        node_urls: dict[str, str] = {}
        if uuid and self.registry is not None:
            token = self.registry.node_token(uuid)
            api = f"{self.base_url}/api/v1/nodes/{uuid}"
            node_urls = {k: f"{api}/{k}?token={token}" for k in (
                "installed", "failed", "profile", "detail", "register")}
        return {
            **variables,
            "vars": variables,
            "base_url": self.base_url,
            "images_url": f"{self.base_url}/images",
            "uuid": uuid or "",
            "mac": mac or "",
            "hostname": hostname,
            "profile": r.profile.name,
            "node_urls": node_urls,
        }

    def _variables(self, r: Resolved, mac: str | None, uuid: str | None) -> dict[str, Any]:
        """``context`` for this resolution, shared by the cmdline and Ignition renders."""
        if r.variables is None:
            r.variables = self.context(r, mac, uuid)
        return r.variables

    @staticmethod
    def hostname(r: Resolved, mac: str | None) -> str:
        """The machine file's hostname, else one made from the MAC."""
        if r.machine is not None and r.machine.hostname:
            return r.machine.hostname
        return f"node-{mac.replace(':', '')}" if mac else "node"

    def _local_boot(self, r: Resolved, uuid: str | None) -> bool:
        """``boot: once`` after ``installed`` (until an admin re-arms the node)."""
        assert r.profile is not None
        if r.profile.boot != "once" or not (self.registry and uuid):
            return False
        node = self.registry.get(uuid)
        r.local_boot = node is not None and node.state == "installed" and not node.armed
        return r.local_boot

    def _args(self, r: Resolved, mac: str | None, uuid: str | None) -> str | None:
        """The kernel arguments, or None with ``r.error`` set when the template fails."""
        try:
            return self.cmdline(r, mac, uuid)
        except jinja2.TemplateError as exc:
            assert r.profile is not None
            r.error = f"profile {r.profile.name}: cmdline template: {exc}"
            return None

    def _render(self, source: str, ctx: dict[str, Any]) -> str:
        tpl = self._templates.get(source)
        if tpl is None:
            tpl = self._templates[source] = self._env.from_string(source)
        return " ".join(tpl.render(ctx).split())

    def cmdline(self, r: Resolved, mac: str | None, uuid: str | None) -> str:
        assert r.profile is not None
        return self._render(r.profile.cmdline, self._variables(r, mac, uuid))

    # -- HTTP: iPXE scripts ------------------------------------------------
    def chain_script(self) -> str:
        """The first script iPXE fetches: it sends back what iPXE knows of the hardware."""
        # uuid and mac print URL-safe as they are; a ":uristring" type override
        # would reinterpret their raw bytes. Free-text SMBIOS strings need escaping.
        q = "uuid=${uuid}&mac=${netX/mac}&" + "&".join(
            f"{k}=${{{k}:uristring}}" for k in (
                "serial", "manufacturer", "product", "asset", "platform", "buildarch"))
        return f"#!ipxe\nchain --autofree {self.base_url}/ipxe/node?{q} || goto failed\nexit\n" \
               ":failed\necho netboot: no boot script for this machine; retrying in 10s\n" \
               "sleep 10\nreboot\n"

    def ipxe_script(self, mac: str | None, uuid: str | None) -> tuple[str, Resolved]:
        r = self.resolve(mac, uuid)
        if r.profile is None:
            return (f"#!ipxe\necho netboot: not booting this machine: {r.reason}\nexit\n", r)
        if self._local_boot(r, uuid):
            return ("#!ipxe\necho netboot: installed, booting from local disk\nexit\n", r)
        cmdline = self._args(r, mac, uuid)
        if cmdline is None:
            return f"#!ipxe\n{_refusal(r.error, 'echo')}exit 1\n", r
        images = f"{self.base_url}/images"
        initrds = [f"{images}/{i}" for i in r.profile.initrds]
        names = [f"initrd={n.rsplit('/', 1)[-1]}" for n in r.profile.initrds]
        os_args: list[str] = []
        if r.profile.ignition:
            a = self.ignition(r, mac, uuid)
            if a is None:
                return f"#!ipxe\n{_refusal(r.ignition_error, 'echo')}exit 1\n", r
            assert self.artifacts is not None
            # --name: the signed URL's basename is useless as a name, and UEFI kernels
            # only see initrds named on the command line.
            initrds.append(f"--name {OEM_INITRD_NAME} "
                           f"{self.artifacts.signed_url(self.base_url, 'oem', a.uuid)}")
            names.append(f"initrd={OEM_INITRD_NAME}")
            os_args = os_kernel_args(r.profile)
        args = " ".join([*names, *os_args, cmdline])
        lines = ["#!ipxe", f"kernel {images}/{r.profile.kernel} {args}".rstrip()]
        lines += [f"initrd {i}" for i in initrds]
        lines.append("boot")
        return "\n".join(lines) + "\n", r

    # -- Ignition ----------------------------------------------------------
    def ignition(self, r: Resolved, mac: str | None, uuid: str | None) -> NodeArtifacts | None:
        """The node's validated artefacts, remembered as issued; None with
        ``r.ignition_error`` set when it must not boot."""
        assert r.profile is not None and r.profile.ignition
        if self.artifacts is None:
            r.ignition_error = "Ignition is not set up in this server"
        elif not uuid:
            r.ignition_error = ("no SMBIOS UUID known for this machine; signed Ignition URLs "
                                "are per UUID")
        else:
            a = self.artifacts.render(r.profile, self._variables(r, mac, uuid), uuid)
            self.artifacts.issue(a)
            r.artifacts = a
            if a.ok:
                return a
            r.ignition_error = a.error or "Ignition config failed"
        return None

    def node_artifacts(self, mac: str | None, uuid: str) -> tuple[NodeArtifacts | None, Resolved]:
        """What ``netboot render`` prints and a fetch falls back to when nothing was issued."""
        r = self.resolve(mac, uuid)
        if r.profile is None:
            return None, r
        if not r.profile.ignition:
            r.ignition_error = f"profile {r.profile.name!r} has no ignition template"
            return None, r
        a = self.ignition(r, mac, uuid)
        return a, r

    # -- TFTP: pxelinux ----------------------------------------------------
    def pxelinux_config(self, mac: str) -> str | None:
        return self.pxelinux(mac)[0]

    def pxelinux(self, mac: str) -> tuple[str | None, Resolved, str | None]:
        """(config text or None, resolution, uuid) for ``pxelinux.cfg/01-<mac>``."""
        uuid = self.uuid_for_mac(mac)
        r = self.resolve(mac, uuid)
        if r.profile is None or r.profile.loader != "pxelinux":
            return None, r, uuid
        if self._local_boot(r, uuid):
            return ("DEFAULT local\nPROMPT 0\nTIMEOUT 0\nLABEL local\n  LOCALBOOT 0\n", r,
                    uuid)
        cmdline = self._args(r, mac, uuid)
        if cmdline is None:
            return _pxelinux_refusal(r.error), r, uuid
        initrds = [f"images/{i}" for i in r.profile.initrds]
        os_args: list[str] = []
        if r.profile.ignition:
            a = self.ignition(r, mac, uuid)
            if a is None:  # LOCALBOOT -1 hands the failure back to the firmware
                return _pxelinux_refusal(r.ignition_error), r, uuid
            initrds.append(f"oem/{a.uuid}.cpio.gz")
            os_args = os_kernel_args(r.profile)
        args = " ".join([*os_args, cmdline])
        lines = ["DEFAULT netboot", "PROMPT 0", "TIMEOUT 0", "LABEL netboot",
                 f"  KERNEL images/{r.profile.kernel}"]
        if initrds:
            lines.append(f"  INITRD {','.join(initrds)}")
        lines.append(f"  APPEND {args}")
        return "\n".join(lines) + "\n", r, uuid


def _refusal(reason: str | None, say: str) -> str:
    """Two console lines (``say`` is iPXE's echo or pxelinux's SAY) telling why not."""
    # One printable line: no iPXE ${...} expansion, nothing that ends the command.
    text = "".join(c if " " <= c < "\x7f" and c != "$" else " " for c in reason or "")[:400]
    return (f"{say} netboot: NOT BOOTING this machine: its boot configuration failed\n"
            f"{say} netboot: {text}\n")


def _pxelinux_refusal(reason: str | None) -> str:
    """LOCALBOOT -1 hands the failure back to the firmware, after saying why."""
    return (f"{_refusal(reason, 'SAY')}DEFAULT failed\nPROMPT 0\nTIMEOUT 0\n"
            "LABEL failed\n  LOCALBOOT -1\n")
