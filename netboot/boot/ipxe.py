"""iPXE scripts: render a decision, nothing else."""

from __future__ import annotations

from ..ignition.artifacts import OEM_INITRD_NAME
from .spec import BootSpec, Decision, LocalBoot, Refusal

# What iPXE knows of the hardware, as the per-node script's query. uuid and mac
# print URL-safe as they are; a ":uristring" type override would reinterpret their
# raw bytes. Free-text SMBIOS strings need escaping.
NODE_QUERY = "uuid=${uuid}&mac=${netX/mac}&" + "&".join(
    f"{k}=${{{k}:uristring}}" for k in (
        "serial", "manufacturer", "product", "asset", "platform", "buildarch"))


def chain_script(base_url: str) -> str:
    """The first script iPXE fetches: it sends back what iPXE knows of the hardware."""
    return f"#!ipxe\nchain --autofree {base_url}/ipxe/node?{NODE_QUERY} || goto failed\n" \
           "exit\n" \
           ":failed\necho netboot: no boot script for this machine; retrying in 10s\n" \
           "sleep 10\nreboot\n"


def render(decision: Decision, base_url: str) -> str:
    """The per-node script for ``decision``."""
    if isinstance(decision, LocalBoot):
        return "#!ipxe\necho netboot: installed, booting from local disk\nexit\n"
    if isinstance(decision, Refusal):
        if decision.retry is not None:
            return retry_script(decision, base_url)
        if not decision.failed:
            return f"#!ipxe\necho netboot: not booting this machine: {decision.reason}\nexit\n"
        return f"#!ipxe\n{refusal_lines(decision.reason, 'echo')}exit 1\n"
    return _boot(decision, f"{base_url}/images")


def retry_script(refusal: Refusal, base_url: str) -> str:
    """Not now: wait, then ask for this machine's script again, in place of this one
    (``--replace``: however many times it is refused, the scripts do not nest)."""
    return (f"#!ipxe\n{say_line(refusal.reason)}sleep {refusal.retry:.0f}\n"
            f"chain --replace --autofree {base_url}/ipxe/node?{NODE_QUERY}\n")


def _boot(spec: BootSpec, images: str) -> str:
    initrds = [f"{images}/{i}" for i in spec.initrds]
    names = [f"initrd={n.rsplit('/', 1)[-1]}" for n in spec.initrds]
    if spec.oem_url is not None:
        # --name: the signed URL's basename is useless as a name, and UEFI kernels
        # only see initrds named on the command line.
        initrds.append(f"--name {OEM_INITRD_NAME} {spec.oem_url}")
        names.append(f"initrd={OEM_INITRD_NAME}")
    args = " ".join([*names, *spec.os_args, spec.cmdline])
    lines = ["#!ipxe", f"kernel {images}/{spec.kernel} {args}".rstrip()]
    lines += [f"initrd {i}" for i in initrds]
    lines.append("boot")
    return "\n".join(lines) + "\n"


def refusal_lines(reason: str | None, say: str, allow: frozenset[str] | None = None) -> str:
    """Two console lines (``say`` is iPXE's echo, pxelinux's SAY or U-Boot's echo)
    telling why not; ``allow``: the only characters the loader's shell takes as text."""
    return (f"{say} netboot: NOT BOOTING this machine: its boot configuration failed\n"
            f"{say_line(reason, say, allow)}")


def say_line(reason: str | None, say: str = "echo", allow: frozenset[str] | None = None) -> str:
    """One printable console line: no ${...} expansion, nothing that ends the command
    (with ``allow``, every other character is a space)."""
    text = "".join(c if " " <= c < "\x7f" and c != "$" and (allow is None or c in allow)
                   else " " for c in reason or "")[:400]
    return f"{say} netboot: {text}\n"
