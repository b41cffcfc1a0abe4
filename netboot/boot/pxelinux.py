"""pxelinux configs (``pxelinux.cfg/01-<mac>``): render a decision, nothing else.

Everything is fetched over TFTP, relative to the TFTP root: the kernel and
initrds under ``images/``, the OEM archive as ``oem/<uuid>.cpio.gz``.
"""

from __future__ import annotations

from .ipxe import refusal_lines
from .spec import Decision, LocalBoot, Refusal

LOCAL = "DEFAULT local\nPROMPT 0\nTIMEOUT 0\nLABEL local\n  LOCALBOOT 0\n"


def oem_path(uuid: str) -> str:
    return f"oem/{uuid}.cpio.gz"


def render(decision: Decision) -> str | None:
    """The config for ``decision``; None when netboot does not serve this machine."""
    if isinstance(decision, LocalBoot):
        return LOCAL
    if isinstance(decision, Refusal):
        if not decision.failed:  # not served, or not now (pxelinux asks its next name)
            return None
        # LOCALBOOT -1 hands the failure back to the firmware, after saying why.
        return (f"{refusal_lines(decision.reason, 'SAY')}DEFAULT failed\nPROMPT 0\n"
                "TIMEOUT 0\nLABEL failed\n  LOCALBOOT -1\n")
    initrds = [f"images/{i}" for i in decision.initrds]
    if decision.oem is not None:
        initrds.append(oem_path(decision.oem.uuid))
    args = " ".join([*decision.os_args, decision.cmdline])
    lines = ["DEFAULT netboot", "PROMPT 0", "TIMEOUT 0", "LABEL netboot",
             f"  KERNEL images/{decision.kernel}"]
    if initrds:
        lines.append(f"  INITRD {','.join(initrds)}")
    lines.append(f"  APPEND {args}")
    return "\n".join(lines) + "\n"
