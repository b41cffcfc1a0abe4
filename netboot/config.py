"""Configuration: pydantic models for netboot.yaml, profiles and machines, and
a store that reloads edited files while the server runs.

Each profile and machine file is parsed on its own and remembered as its last
good version: a broken edit is reported (log, ``/health``, ``netboot check``)
with file and line, and the previous version of that one file keeps serving.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import jinja2
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from .identity import Arch, IdentityError, normalise_mac, normalise_uuid
from .yamlsrc import SourceError, load_yaml, validate

log = logging.getLogger("netboot.config")
_WATCH_TIMEOUT_MS = 1000  # how often the watcher thread wakes with nothing to report

DEFAULT_LOADERS: dict[str, str] = {
    Arch.BIOS.value: "undionly.kpxe",
    Arch.UEFI_X64.value: "ipxe.efi",
    Arch.UEFI_X86.value: "ipxe-i386.efi",
    Arch.UEFI_ARM32.value: "ipxe-arm32.efi",
}
# uefi-arm64 has no default: Debian ships no arm64 iPXE, so arm64 UEFI machines boot
# GRUB (shim under Secure Boot) unless netboot.yaml or a profile names a loader.

# Where Debian's ipxe, pxelinux, syslinux-common, shim-signed and grub-efi-amd64-signed
# packages put the loaders.
DEFAULT_TFTP_ROOTS = ["/usr/lib/ipxe", "/usr/lib/PXELINUX", "/usr/lib/syslinux/modules/bios",
                      "/usr/lib/shim", "/usr/lib/grub/x86_64-efi-signed"]

#: served name -> the file name Debian's packages give it. Shim asks for ``grubx64.efi``
#: next to itself; Debian ships the network GRUB (built-in prefix ``/grub``, efinet and
#: tftp modules) as ``grubnetx64.efi.signed``.
DEFAULT_LOADER_ALIASES: dict[str, str] = {
    "shimx64.efi": "shimx64.efi.signed",
    "grubx64.efi": "grubnetx64.efi.signed",
    "shimaa64.efi": "shimaa64.efi.signed",  # arm64: scripts/arm64_os.py fetches them
    "grubaa64.efi": "grubnetaa64.efi.signed",
}


def _ipv4(v: str) -> str:
    ipaddress.IPv4Address(v)
    return v


#: a str that must be an IPv4 address (config, and what a commissioning OS reports)
IPv4Text = Annotated[str, AfterValidator(_ipv4)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DhcpSettings(_Strict):
    enabled: bool = True
    port: int = Field(67, ge=1, le=65535)
    proxy_port: int = Field(4011, ge=1, le=65535, description="PXE boot server port")
    max_queue_age: float = Field(
        0.25, ge=0.005, le=10.0,
        description="seconds a request may wait in the socket queue; older ones are "
        "dropped unanswered and counted (dhcp_overload_dropped_total)")
    pacing: bool = Field(
        True, description="pace replies per destination (a relay, or this link's broadcast) "
        "at 1.5x its recent demand, so a backlog does not leave in one burst; false sends "
        "each reply as soon as it is decided")
    refused_loader_window: float = Field(
        180.0, gt=0, le=3600,
        description="seconds after a UEFI firmware downloaded its loader within which a "
        "fresh PXE or HTTP Boot request from it (not from iPXE) means it refused the "
        "loader (Secure Boot): the node goes to 'error' (boot/refusals.py says why 180)")


class Dhcp6Assign(_Strict):
    """The address-assigning mode: IA_NA addresses from ``first``..``last``."""

    first: str
    last: str
    lifetime: int = Field(3600, ge=60, le=7 * 86400, description="valid lifetime, seconds")

    @field_validator("first", "last")
    @classmethod
    def _v6(cls, v: str) -> str:
        return str(ipaddress.IPv6Address(v))

    @model_validator(mode="after")
    def _order(self) -> Dhcp6Assign:
        lo, hi = int(ipaddress.IPv6Address(self.first)), int(ipaddress.IPv6Address(self.last))
        if hi < lo:
            raise ValueError("dhcp6.assign: last comes before first")
        if hi - lo >= 1 << 20:
            raise ValueError("dhcp6.assign: a range of more than 1,048,576 addresses")
        return self


class Dhcp6Settings(_Strict):
    """DHCPv6 (udp/547, and 4011 for EDK2's boot-service Request) plus TFTP and HTTP
    on IPv6. Off unless enabled. ``assign`` absent: proxy mode (boot URL only, the
    site's DHCPv6 server hands out addresses); present: netboot binds addresses too."""

    enabled: bool = False
    address: str | None = Field(
        None, description="IPv6 address to advertise (default: the interface's first "
        "global one)")
    port: int = Field(547, ge=1, le=65535)
    boot_port: int = Field(4011, ge=1, le=65535)
    assign: Dhcp6Assign | None = None

    @field_validator("address")
    @classmethod
    def _v6(cls, v: str | None) -> str | None:
        return None if v is None else str(ipaddress.IPv6Address(v))


class TftpSettings(_Strict):
    enabled: bool = True
    port: int = Field(69, ge=1, le=65535)
    single_port: bool = False
    roots: list[Path] = Field(default_factory=lambda: [Path(p) for p in DEFAULT_TFTP_ROOTS])
    max_transfers: int = Field(1000, ge=1)
    max_per_client: int = Field(16, ge=1)
    workers: int = Field(1, ge=0, le=1, description="file transfers in a second process "
                         "(1) or on the main event loop (0)")


class WebhookSettings(_Strict):
    url: str
    events: list[Literal["installed", "error", "stuck", "deploying", "discovered", "booting",
                         "commissioning", "ready"]] = (
        Field(default_factory=lambda: ["installed", "error", "stuck"]))
    format: Literal["json", "slack", "alertmanager"] = "json"


class ApiToken(_Strict):
    """A bearer token for people and scripts: ``viewer`` reads, ``operator`` also powers,
    deploys and re-arms, ``admin`` does everything."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")
    role: Literal["viewer", "operator", "admin"]
    token: str | None = Field(None, min_length=16, repr=False)
    token_file: Path | None = Field(None, description="a file holding the token (0600)")

    @model_validator(mode="after")
    def _one_source(self) -> ApiToken:
        if (self.token is None) == (self.token_file is None):
            raise ValueError("give exactly one of token and token_file")
        return self

    def value(self) -> str:
        """The token itself (read from token_file when given)."""
        if self.token is not None:
            return self.token
        assert self.token_file is not None
        text = self.token_file.read_text().strip()
        if len(text) < 16:
            raise ValueError(f"{self.token_file}: a token needs at least 16 characters")
        return text


class ApiSettings(_Strict):
    """Registry and API settings."""

    admin_token: str | None = Field(None, description="bearer token of role admin (named "
                                    "'admin'); falls back to $NETBOOT_ADMIN_TOKEN", repr=False)
    tokens: list[ApiToken] = Field(default_factory=list)
    open_reads: bool = Field(True, description="reads (nodes, dashboard) need no token; "
                             "false: a viewer token or above")
    secret: str | None = Field(None, repr=False,
                               description="HMAC key for node tokens and signed URLs; "
                               "else secret_file, else $NETBOOT_SECRET, else generated "
                               "into data_dir/secret (one instance only)")
    secret_file: Path | None = Field(None, description="file holding the HMAC key (e.g. a "
                                     "Docker secret); the instances of a fleet share one")
    stuck_after: float = Field(1800, gt=0, description="seconds in 'deploying' before 'stuck'")
    webhooks: list[WebhookSettings] = Field(default_factory=list)


class RegistrySettings(_Strict):
    """Where the registry lives and how much history it keeps (docs/registry.md: Storage
    and durability; docs/operations.md: Running a fleet). ``registry: postgresql://...``
    is short for ``registry: {url: postgresql://...}``."""

    url: str | None = Field(None, repr=False, description="postgresql://user@host/db: a "
                            "registry shared by several instances; default: SQLite in "
                            "data_dir")

    events_max_age: float = Field(30 * 86400, gt=0, description="seconds an event is kept "
                                  "(default 30 days)")
    events_max_rows: int = Field(1_000_000, ge=1000, description="events kept at most; the "
                                 "oldest go first")
    audit_max_age: float = Field(365 * 86400, gt=0, description="seconds an audit row (who "
                                 "changed what through the API) is kept (default a year)")
    audit_max_rows: int = Field(1_000_000, ge=1000, description="audit rows kept at most; "
                                "the oldest go first")
    prune_every: float = Field(60, gt=0, description="seconds between retention passes")

    @model_validator(mode="before")
    @classmethod
    def _url_alone(cls, v: Any) -> Any:
        return {"url": v} if isinstance(v, str) else v

    @field_validator("url")
    @classmethod
    def _postgresql(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("postgresql://", "postgres://")):
            raise ValueError("registry url must be postgresql://user@host/db (SQLite, the "
                             "default, needs no url: it lives in data_dir)")
        return v


class SiteConfig(_Strict):
    """Settings every node gets (sites cut off from the internet); a profile's
    ``site`` block overrides them key by key."""

    ntp: list[str] = Field(default_factory=list)
    registry_mirrors: list[str] = Field(default_factory=list)
    insecure_registries: list[str] = Field(default_factory=list)
    http_proxy: str | None = None
    https_proxy: str | None = None
    no_proxy: str | None = None


class SwarmConfig(_Strict):
    """Where join tokens come from: a manager's Docker API socket, or given here."""

    docker_socket: str | None = Field(None, description="e.g. /var/run/docker.sock")
    manager_addr: str | None = Field(None, description="host:2377, when not read from the socket")
    worker_token: str | None = None
    manager_token: str | None = None
    sweep_down_nodes: bool = False
    refresh_seconds: float = Field(60.0, ge=1, le=3600,
                                   description="how often the socket is read (and swept)")


class BmcCredentials(_Strict):
    """How to log in to a BMC; the password inline or, better, in a file (0600)."""

    driver: Literal["ipmi", "redfish"] = "ipmi"
    port: int | None = Field(None, ge=1, le=65535)
    username: str = Field("", max_length=64)
    password: str | None = Field(None, repr=False, max_length=256)
    password_file: Path | None = None
    system: str | None = Field(None, description="Redfish system id; default: the first")
    verify_tls: bool = False

    @model_validator(mode="after")
    def _one_password(self) -> BmcCredentials:
        if self.password is not None and self.password_file is not None:
            raise ValueError("give password or password_file, not both")
        return self

    def secret(self, base: Path | None = None) -> str:
        """The password (read from password_file, relative to ``base``); '' if none."""
        if self.password_file is None:
            return self.password or ""
        path = self.password_file if self.password_file.is_absolute() or base is None \
            else base / self.password_file
        return path.read_text().strip()


class MachineBmc(BmcCredentials):
    """A machine's BMC: where it is, and how to log in."""

    address: str = Field(min_length=1, max_length=256)


class BmcSettings(_Strict):
    """BMC control for the whole site."""

    credentials: BmcCredentials | None = Field(
        None, description="how to log in to BMCs that commissioning finds (or sets)")
    addresses: list[str] = Field(default_factory=list, description="BMC addresses to hand "
                                 "out to commissioned nodes (set in-band), in order")
    netmask: str | None = None
    gateway: str | None = None
    poll_interval: float = Field(60, gt=0, description="seconds between power-state polls")
    timeout: float = Field(10, gt=0, description="seconds one BMC call may take")
    workers: int = Field(16, ge=1, le=256, description="BMC calls in flight at once")
    stagger_concurrency: int = Field(4, ge=1, description="bulk power-on: at once")
    stagger_delay: float = Field(2.0, ge=0, description="bulk power-on: seconds between starts")

    @field_validator("addresses")
    @classmethod
    def _ipv4s(cls, v: list[str]) -> list[str]:
        for a in v:
            ipaddress.IPv4Address(a)
        return v


class Bucket(_Strict):
    """A token bucket: ``burst`` at once, then ``rate`` a second."""

    rate: float = Field(gt=0, description="tokens refilled a second")
    burst: int = Field(ge=1, description="tokens when full")


class NewNodeLimits(_Strict):
    """How fast machines the registry does not know yet may become nodes. Known nodes
    are never limited. ``per_source``: one client address (boot scripts, pxelinux
    configs); ``per_segment``: DHCP first contacts, per relay circuit (giaddr and
    option 82) or the local link, each a whole rack; ``total``: everyone together."""

    per_source: Bucket = Field(default_factory=lambda: Bucket(rate=0.2, burst=10))
    per_segment: Bucket = Field(default_factory=lambda: Bucket(rate=5, burst=500))
    total: Bucket = Field(default_factory=lambda: Bucket(rate=10, burst=1000))
    sources: int = Field(65536, ge=1, description="sources remembered (LRU); a forgotten "
                         "one starts again full")


class Limits(_Strict):
    new_nodes: NewNodeLimits = Field(default_factory=NewNodeLimits)


class ServerConfig(_Strict):
    """netboot.yaml. Relative paths are taken from the directory of the file."""

    interface: str | None = None
    address: IPv4Text | None = None
    http_port: int = Field(8080, ge=1, le=65535)
    http_host: str = "0.0.0.0"
    data_dir: Path = Path("../data")
    profiles_dir: Path = Path("profiles")
    machines_dir: Path = Path("machines")
    images_dir: Path = Path("../images")
    ignition_dir: Path = Path("../ignition")
    default_profile: str | None = "default"
    loaders: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_LOADERS))
    pxelinux_loader: str = "pxelinux.0"
    shim_loader: str = Field("shimx64.efi", description="boot file offered to UEFI x64 PXE "
                             "clients under Secure Boot (it loads grubx64.efi beside it)")
    grub_loader: str = Field("grubx64.efi", description="boot file offered to UEFI x64 PXE "
                             "clients of a loader: grub profile without Secure Boot")
    shim_loader_arm64: str = Field("shimaa64.efi", description="boot file offered to arm64 "
                                   "UEFI PXE clients under Secure Boot")
    grub_loader_arm64: str = Field("grubaa64.efi", description="boot file offered to other "
                                   "arm64 UEFI PXE clients (unless loaders names one)")
    loader_aliases: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_LOADER_ALIASES),
        description="served loader name -> file name in tftp.roots (added to the defaults)")
    secure_boot: bool = Field(False, description="site default: UEFI x64 PXE clients boot "
                              "shim -> GRUB -> a signed kernel (profiles and machine files "
                              "may say otherwise)")
    dhcp: DhcpSettings = Field(default_factory=DhcpSettings)
    dhcp6: Dhcp6Settings = Field(default_factory=Dhcp6Settings)
    tftp: TftpSettings = Field(default_factory=TftpSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    site: SiteConfig = Field(default_factory=SiteConfig)
    swarm: SwarmConfig = Field(default_factory=SwarmConfig)
    bmc: BmcSettings = Field(default_factory=BmcSettings)
    registry: RegistrySettings = Field(default_factory=RegistrySettings)
    instance: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                                 description="this instance's name in a fleet, recorded "
                                 "with the nodes it serves (default: the host name)")
    limits: Limits = Field(default_factory=Limits)
    signed_url_ttl: float = Field(3600, gt=0, description="seconds a signed Ignition/OEM URL "
                                  "stays valid")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("loaders")
    @classmethod
    def _arches(cls, v: dict[str, str]) -> dict[str, str]:
        known = {a.value for a in Arch} - {Arch.UNKNOWN.value}
        bad = set(v) - known
        if bad:
            raise ValueError(f"unknown arch {sorted(bad)}; known: {sorted(known)}")
        return {**DEFAULT_LOADERS, **v}

    @field_validator("loader_aliases")
    @classmethod
    def _aliases(cls, v: dict[str, str]) -> dict[str, str]:
        for name in (*v, *v.values()):
            if "/" in name or name in ("", ".", ".."):
                raise ValueError(f"{name!r}: loader names are bare file names")
        return {**DEFAULT_LOADER_ALIASES, **v}

    def resolve(self, base: Path) -> ServerConfig:
        """Make every path absolute against ``base`` (the config file's directory)."""

        def r(p: Path) -> Path:
            return p if p.is_absolute() else (base / p).resolve()

        tftp = self.tftp.model_copy(update={"roots": [r(p) for p in self.tftp.roots]})
        api = self.api.model_copy(update={"tokens": [
            t.model_copy(update={"token_file": r(t.token_file)}) if t.token_file else t
            for t in self.api.tokens]})
        return self.model_copy(update={
            "data_dir": r(self.data_dir), "profiles_dir": r(self.profiles_dir),
            "machines_dir": r(self.machines_dir), "images_dir": r(self.images_dir),
            "ignition_dir": r(self.ignition_dir), "tftp": tftp, "api": api,
        })


def _template(v: str) -> str:
    try:
        jinja2.Environment().parse(v)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"template syntax: {exc.message} (template line {exc.lineno})") from None
    return v


def _inside_images(v: Any) -> Any:
    for item in [v] if isinstance(v, str) else v:
        if item.startswith("/") or ".." in Path(item).parts:
            raise ValueError(f"{item!r} must be a path inside images_dir")
    return v


class ArchImages(_Strict):
    """What a profile boots on another architecture than x86-64."""

    kernel: str
    initrds: list[str] = Field(default_factory=list)
    cmdline: str | None = Field(None, description="replaces the profile's cmdline (e.g. "
                                "another console=) when set")

    @field_validator("kernel", "initrds")
    @classmethod
    def _relative(cls, v: Any) -> Any:
        return _inside_images(v)

    @field_validator("cmdline")
    @classmethod
    def _cmdline(cls, v: str | None) -> str | None:
        return None if v is None else _template(v)


class Profile(_Strict):
    """What a class of machines boots."""

    name: str = ""
    description: str = ""
    kernel: str
    initrds: list[str] = Field(default_factory=list)
    cmdline: str = ""
    loader: Literal["ipxe", "pxelinux", "grub"] = Field(
        "ipxe", description="grub: UEFI x64 PXE clients boot GRUB and a per-node GRUB "
        "config over TFTP; other firmware boots through iPXE")
    secure_boot: bool | None = Field(
        None, description="true: UEFI x64 PXE clients boot shim -> GRUB -> a signed kernel "
        "(implies loader: grub); unset: the machine file's, else netboot.yaml's")
    ignition: str | None = Field(None, description="template in ignition_dir, e.g. swarm-worker")
    os: Literal["flatcar", "fcos", "other"] = Field(
        "other", description="which kernel arguments and OEM paths the Ignition config needs")
    role: Literal["worker", "manager"] = "worker"
    site: dict[str, Any] = Field(default_factory=dict, description="overrides of netboot.yaml site")
    ssh_keys: list[str] = Field(default_factory=list)
    boot: Literal["always", "once"] = "always"
    commission: bool = Field(False, description="a commissioning OS: the node is "
                             "'commissioning' while it runs, 'ready' when its inventory is in")
    loaders: dict[str, str] = Field(default_factory=dict, description="per-arch loader override")
    arches: dict[Literal["arm64"], ArchImages] = Field(
        default_factory=dict, description="kernel and initrds (and cmdline) per other "
        "architecture; kernel and initrds above are x86-64's")
    vars: dict[str, Any] = Field(default_factory=dict)

    @field_validator("cmdline")
    @classmethod
    def _cmdline(cls, v: str) -> str:
        return _template(v)

    @field_validator("kernel", "initrds")
    @classmethod
    def _relative(cls, v: Any) -> Any:
        return _inside_images(v)

    @model_validator(mode="after")
    def _secure_boot_loader(self) -> Profile:
        # Secure Boot has one path (shim -> GRUB); an explicit other loader contradicts it.
        if self.secure_boot and self.loader != "grub":
            if "loader" in self.model_fields_set:
                raise ValueError(f"secure_boot: true boots shim -> GRUB, not {self.loader}; "
                                 "set loader: grub (or leave loader out)")
            self.loader = "grub"
        return self


class Machine(_Strict):
    """One physical machine, found by MAC or SMBIOS UUID."""

    mac: str | None = None
    macs: list[str] = Field(default_factory=list)
    uuid: str | None = None
    profile: str | None = None
    hostname: str | None = None
    netboot: bool = True
    secure_boot: bool | None = Field(None, description="this machine boots under Secure "
                                     "Boot (wins over the profile's and netboot.yaml's)")
    bmc: MachineBmc | None = None
    vars: dict[str, Any] = Field(default_factory=dict)

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str | None) -> str | None:
        return normalise_mac(v) if v is not None else None

    @field_validator("macs")
    @classmethod
    def _macs(cls, v: list[str]) -> list[str]:
        return [normalise_mac(m) for m in v]

    @field_validator("uuid")
    @classmethod
    def _uuid(cls, v: str | None) -> str | None:
        return normalise_uuid(v) if v is not None else None

    @model_validator(mode="after")
    def _identified(self) -> Machine:
        if self.mac is None and not self.macs and self.uuid is None:
            raise ValueError("a machine needs mac, macs or uuid")
        return self

    @property
    def all_macs(self) -> list[str]:
        return ([self.mac] if self.mac else []) + [m for m in self.macs if m != self.mac]


class ConfigError(Exception):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class Snapshot:
    """An immutable view handed to readers; swapped whole on reload, so no locks."""

    server: ServerConfig
    profiles: dict[str, Profile]
    machines_by_mac: dict[str, Machine]
    machines_by_uuid: dict[str, Machine]
    machine_files: dict[Machine, Path] = field(default_factory=dict)
    generation: int = 0


@dataclass
class _FileState:
    stamp: tuple[int, int] | None = None  # (mtime_ns, size) of the last parse attempt
    good: Any = None  # last good model
    problems: list[str] = field(default_factory=list)


def load_server_config(path: Path, **overrides: Any) -> ServerConfig:
    data, lines = load_yaml(path)
    cfg = validate(ServerConfig, path, data, lines)
    updates = {k: v for k, v in overrides.items() if v is not None}
    if updates:
        cfg = ServerConfig.model_validate({**cfg.model_dump(), **updates})
    return cfg.resolve(path.parent.resolve())


class ConfigStore:
    """Profiles and machines as of the last good parse of each file."""

    def __init__(self, config_path: Path, **overrides: Any):
        self.config_path = config_path
        try:
            self.server = load_server_config(config_path, **overrides)
        except SourceError as exc:
            raise ConfigError(exc.problems) from None
        except FileNotFoundError:
            raise ConfigError([f"{config_path}: no such file"]) from None
        self._profiles: dict[Path, _FileState] = {}
        self._machines: dict[Path, _FileState] = {}
        self._cross_problems: list[str] = []
        self.snapshot = Snapshot(self.server, {}, {}, {})
        self.reload()

    # -- reading -----------------------------------------------------------
    @property
    def problems(self) -> list[str]:
        out: list[str] = []
        for states in (self._profiles, self._machines):
            for st in states.values():
                out.extend(st.problems)
        return out + self._cross_problems

    # -- reloading ---------------------------------------------------------
    def reload(self) -> bool:
        """Re-read changed files; returns True if the served snapshot changed."""
        changed = self._scan(self.server.profiles_dir, self._profiles, self._parse_profile)
        changed |= self._scan(self.server.machines_dir, self._machines, self._parse_machine)
        if changed or self.snapshot.generation == 0:
            self._rebuild()
        return changed

    def _scan(self, directory: Path, states: dict[Path, _FileState], parse: Any) -> bool:
        changed = False
        present: set[Path] = set()
        try:
            entries = sorted(p for p in directory.iterdir()
                             if p.suffix in (".yaml", ".yml") and not p.name.startswith("."))
        except FileNotFoundError:
            entries = []
        for path in entries:
            present.add(path)
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            stamp = (st.st_mtime_ns, st.st_size)
            state = states.setdefault(path, _FileState())
            if state.stamp == stamp:
                continue
            state.stamp = stamp
            changed = True
            try:
                state.good = parse(path)
                if state.problems:
                    log.info("%s: fixed, now serving the new version", path)
                state.problems = []
            except SourceError as exc:
                state.problems = exc.problems
                keep = "keeping the last good version" if state.good else "not serving it"
                for p in exc.problems:
                    log.error("%s (%s)", p, keep)
        for gone in set(states) - present:
            del states[gone]
            changed = True
            log.info("%s: removed", gone)
        return changed

    @staticmethod
    def _parse_profile(path: Path) -> Profile:
        data, lines = load_yaml(path)
        prof = validate(Profile, path, data, lines)
        return prof.model_copy(update={"name": prof.name or path.stem})

    @staticmethod
    def _parse_machine(path: Path) -> Machine:
        data, lines = load_yaml(path)
        return validate(Machine, path, data, lines)

    def _rebuild(self) -> None:
        profiles: dict[str, Profile] = {}
        problems: list[str] = []
        for path, st in sorted(self._profiles.items()):
            if st.good is None:
                continue
            if st.good.name in profiles:
                problems.append(f"{path}:1: name: profile {st.good.name!r} defined twice")
                continue
            profiles[st.good.name] = st.good
        by_mac: dict[str, Machine] = {}
        by_uuid: dict[str, Machine] = {}
        files: dict[Machine, Path] = {}
        for path, st in sorted(self._machines.items()):
            m: Machine | None = st.good
            if m is None:
                continue
            if m.profile and m.profile not in profiles:
                problems.append(f"{path}:1: profile: no profile named {m.profile!r} "
                                f"(have: {', '.join(sorted(profiles)) or 'none'})")
                continue
            clash = [x for x in m.all_macs if x in by_mac] + (
                [m.uuid] if m.uuid and m.uuid in by_uuid else [])
            if clash:
                problems.append(f"{path}:1: mac/uuid: {clash[0]} already belongs to "
                                f"{files[by_mac.get(clash[0]) or by_uuid[clash[0]]]}")
                continue
            for mac in m.all_macs:
                by_mac[mac] = m
            if m.uuid:
                by_uuid[m.uuid] = m
            files[m] = path
        dp = self.server.default_profile
        if dp and dp not in profiles:
            problems.append(f"{self.config_path}:1: default_profile: no profile named {dp!r}")
        for p in problems:
            if p not in self._cross_problems:
                log.error("%s", p)
        self._cross_problems = problems
        self.snapshot = Snapshot(self.server, profiles, by_mac, by_uuid, files,
                                 self.snapshot.generation + 1)

    async def watch(self, armed: asyncio.Event | None = None) -> None:
        """Reload on every change in the profile and machine directories (inotify).

        The watch is set up in a thread some time after this task starts, and a
        file written before that sends no event: a machine file dropped in just
        after ``serve`` said it was listening was never loaded (seen in CI). So
        the first wake-up (its first timeout, after the watch exists) rescans
        once, and sets ``armed``; later timeouts do nothing.
        """
        import watchfiles

        dirs = [d for d in (self.server.profiles_dir, self.server.machines_dir) if d.is_dir()]
        if not dirs:
            if armed is not None:
                armed.set()
            return
        first = True
        async for changes in watchfiles.awatch(*dirs, debounce=50, step=20, recursive=False,
                                               rust_timeout=_WATCH_TIMEOUT_MS,
                                               yield_on_timeout=True):
            if not changes and not first:
                continue
            try:
                if self.reload():
                    log.info("configuration reloaded (generation %d)", self.snapshot.generation)
            except Exception:  # never let a reload kill the watcher
                log.exception("reload failed; keeping the previous configuration")
            if first:
                first = False
                if armed is not None:
                    armed.set()


def _machine_hash(self: Machine) -> int:
    return id(self)


Machine.__hash__ = _machine_hash  # type: ignore[method-assign]


__all__ = ["ConfigError", "ConfigStore", "IdentityError", "Machine", "Profile", "ServerConfig",
           "Snapshot", "load_server_config"]
