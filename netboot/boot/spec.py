"""What the Booter decides: plain values, rendered by :mod:`.ipxe`, :mod:`.pxelinux` or
:mod:`.grub` and recorded by :mod:`.lifecycle`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ..identity import Arch

if TYPE_CHECKING:
    from ..ignition.artifacts import NodeArtifacts

#: who asks for a decision: an iPXE script, a pxelinux config, a GRUB config or a
#: U-Boot script
Loader = Literal["ipxe", "pxelinux", "grub", "uboot"]
#: what the loader runs on, so which of a profile's kernels it boots
Cpu = Literal["amd64", "arm64"]


@dataclass(frozen=True, slots=True)
class Client:
    """A booting machine as DHCP sees it."""

    mac: str
    uuid: str | None = None
    arch: Arch = Arch.BIOS
    http_boot: bool = False  # UEFI HTTP Boot (option 60 HTTPClient)
    ipxe: bool = False  # the request comes from iPXE, not from the ROM
    #: where it came from: a relay's address (giaddr; zeros: this link) and that
    #: relay's option 82 as received (its circuit and remote ID), or None
    giaddr: bytes = b"\0\0\0\0"
    agent: bytes | None = None


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


@dataclass(frozen=True, slots=True)
class BootSpec:
    """Boot this kernel with these initrds and arguments."""

    uuid: str | None
    mac: str | None
    profile: str
    hostname: str
    kernel: str  # path under images/
    initrds: tuple[str, ...]  # paths under images/
    #: the profile's rendered cmdline, then what the OS needs for its OEM config
    cmdline: str
    os_args: tuple[str, ...] = ()
    #: the node's Ignition artefacts, when the profile has ``ignition:``
    oem: NodeArtifacts | None = None
    #: the OEM archive's signed HTTP URL (iPXE); pxelinux and GRUB fetch it over TFTP
    oem_url: str | None = None
    #: a commissioning OS (the node is 'commissioning' while it runs, not 'booting')
    commission: bool = False
    #: the CPU the kernel is for (the registry records it)
    cpu: Cpu = "amd64"


@dataclass(frozen=True, slots=True)
class LocalBoot:
    """``boot: once`` and installed: go to the local disk (not a boot)."""

    uuid: str | None
    mac: str | None
    profile: str
    hostname: str


@dataclass(frozen=True, slots=True)
class Refusal:
    """Not booting this machine. ``failed``: its configuration is broken (the node goes
    to 'error' with ``reason``); otherwise netboot is just not serving it."""

    uuid: str | None
    mac: str | None
    reason: str
    failed: bool = False
    profile: str | None = None
    hostname: str | None = None
    #: a failed Ignition render (remembered as issued, so a fetch says the same)
    oem: NodeArtifacts | None = None
    #: not now: a new node over the limits, to ask again in this many seconds
    retry: float | None = None


Decision = BootSpec | LocalBoot | Refusal
