"""GRUB configs: the stub every GRUB reads (``grub/grub.cfg``) and a node's own config
(``grub/mac/<mac>.cfg``, ``grub/ip/<address>.cfg``); render a decision, nothing else.

GRUB's network build (Debian's ``grubnetx64.efi.signed``, prefix ``/grub``) reads
``/grub/grub.cfg`` from the TFTP server it was loaded from. The stub hands over to
the node's file, by ``$net_default_mac`` and then by ``$net_default_ip``. Everything
else is fetched over TFTP relative to the TFTP root, as for pxelinux: the kernel and
initrds under ``images/``, the OEM archive as ``oem/<uuid>.cpio.gz`` (Debian 12's
signed GRUB has no ``http`` module, and Secure Boot forbids loading one).

A GRUB that was loaded over HTTP (a build with ``http``) gets the same files over
HTTP: its root is then ``(http,<netboot>)``, so the same absolute paths name the
HTTP server's ``/images/...``; only the OEM archive differs (``http=True``): its
signed URL's path and query, since HTTP serves OEM archives only by signed URL.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from .pxelinux import oem_path
from .spec import Decision, LocalBoot, Refusal

#: where GRUB finds a node's config (TFTP paths, no leading '/'); an arm64 GRUB
#: asks the same names under ARM64_DIR (its kernel is the profile's arches.arm64)
MAC_DIR = "grub/mac/"
IP_DIR = "grub/ip/"
ARM64_DIR = "grub/arm64/"

STUB = f"""\
# netboot: each machine's own config, by MAC, else by address
set timeout=0
set nb=/grub
if [ "$grub_cpu" = "arm64" ]; then
  set nb=/{ARM64_DIR.rstrip("/")}
fi
if [ -n "$net_default_mac" ]; then
  configfile ${{nb}}/mac/${{net_default_mac}}.cfg
fi
if [ -n "$net_default_ip" ]; then
  configfile ${{nb}}/ip/${{net_default_ip}}.cfg
fi
echo 'netboot: no boot configuration for this machine'
sleep 10
exit
"""

#: back to the firmware, which tries its next boot option (pxelinux's LOCALBOOT)
LOCAL = "set timeout=0\necho 'netboot: booting from the local disk'\nexit\n"


def quote(word: str) -> str:
    """``word`` as one GRUB script word, taken literally: GRUB expands nothing inside
    single quotes, and a single quote itself is closed, escaped and reopened."""
    return "'" + word.replace("'", "'\\''") + "'"


def _printable(text: str | None) -> str:
    return "".join(c if " " <= c < "\x7f" else " " for c in text or "")[:400]


def render(decision: Decision, *, http: bool = False) -> str | None:
    """The node's config for ``decision``; None when netboot does not serve it (the
    stub then tries its next name). ``http``: for a GRUB whose root is netboot's HTTP
    server (the OEM archive by its signed URL)."""
    if isinstance(decision, LocalBoot):
        return LOCAL
    if isinstance(decision, Refusal):
        if not decision.failed:
            return None
        return ("set timeout=0\n"
                "echo 'netboot: NOT BOOTING this machine: its boot configuration failed'\n"
                f"echo {quote('netboot: ' + _printable(decision.reason))}\n"
                "sleep 30\nexit\n")
    initrds = [f"/images/{i}" for i in decision.initrds]
    if decision.oem is not None:
        if http and decision.oem_url:
            url = urlsplit(decision.oem_url)
            initrds.append(f"{url.path}?{url.query}" if url.query else url.path)
        else:
            initrds.append("/" + oem_path(decision.oem.uuid))
    args = [*decision.os_args, *decision.cmdline.split()]
    lines = ["set timeout=0",
             f"echo {quote(f'netboot: {decision.hostname} ({decision.profile})')}",
             " ".join(["linux", quote(f"/images/{decision.kernel}"), *map(quote, args)])]
    if initrds:
        lines.append(" ".join(["initrd", *map(quote, initrds)]))
    lines.append("boot")
    return "\n".join(lines) + "\n"
