"""U-Boot: the boot script every U-Boot gets, and a node's own script; render a
decision, nothing else.

U-Boot's autoboot (Debian 12's 2023.01, distro boot) takes the first DHCP offer,
the site's, and asks that offer's next-server over TFTP for ``boot.scr.uimg``
(seen on the qemu-x86, qemu-x86_64 and qemu_arm64 builds; docs/firmware.md). It does not use
a ProxyDHCP offer, so the site DHCP must name netboot as next-server, as for GRUB.

``boot.scr.uimg`` is one script for every machine: it loads and runs the node's own
script, ``uboot/<mac>.scr.uimg`` (the MAC as U-Boot's ``${ethaddr}``: lower case,
colons) on x86 (``${arch}`` is ``x86``), or ``uboot/arm64/<mac>.scr.uimg`` on a
64-bit ARM U-Boot (``${cpu}`` is ``armv8``), which boots the profile's
``arches.arm64``; any other U-Boot (32-bit ARM, RISC-V) is told it is not served. The node's
script loads the kernel and the initrd, sets the kernel arguments and boots with
``zboot`` (x86) or ``booti`` (arm64, with the device tree U-Boot was given).
Several initrds (the Ignition OEM archive is one more) are loaded one after the
other in memory, which Linux reads as one initramfs; that needs U-Boot's
``setexpr``, which Debian's x86 builds lack ("Unknown command", seen): there such
a profile fails with that message on the console.

Why not ``pxe get; pxe boot`` against a pxelinux config: U-Boot 2023.01's ``pxe``
loads one initrd only, and on x86 it handed the kernel that initrd with a size of
12 bytes ("Initramfs unpacking failed", seen on qemu-x86), so the demo OS never
started. A script of our own has neither problem.

Both are legacy U-Boot script images, what ``mkimage -A invalid -O linux -T script
-C none`` writes (tests compare them byte for byte).
"""

from __future__ import annotations

import string
import struct
import zlib

from .ipxe import refusal_lines, say_line
from .pxelinux import oem_path
from .spec import BootSpec, Decision, LocalBoot, Refusal

#: the name U-Boot asks for when DHCP names no boot file
SCRIPT_NAME = "boot.scr.uimg"
#: where a node's own script is (TFTP path, no leading '/'): NODE_DIR + mac + NODE_EXT
NODE_DIR = "uboot/"
NODE_EXT = ".scr.uimg"
#: what we let into an echo line: U-Boot's shell acts on quotes, ; & | < > # $ \\ ( )
_TEXT = frozenset(string.ascii_letters + string.digits + " ._:=/@+,-")
#: what a TFTP path in a tftpboot line may hold (it is not quoted)
_PATH = frozenset(string.ascii_letters + string.digits + "._/+-")

# The x86 builds define no fdt; the arm64 ones boot with the tree QEMU or the board
# gave U-Boot. Variables that may be unset are compared as x${var}: the x86 builds set
# no cpu, and a bare `test ${cpu} = armv8` was true there (seen). No quotes or
# apostrophes in echo lines: U-Boot's shell reads an apostrophe inside double quotes
# as the start of a quoted string (seen: the rest of the script became one echo).
SCRIPT = f"""\
echo netboot: U-Boot ${{arch}} ${{cpu}} ${{board}}, fetching the boot script of ${{ethaddr}}
setenv nb_dir none
if test x${{arch}} = xx86; then setenv nb_dir {NODE_DIR}; fi
if test x${{cpu}} = xarmv8; then setenv nb_dir {NODE_DIR}arm64/; fi
if test ${{nb_dir}} = none; then
  echo netboot: only x86 and 64-bit ARM U-Boot are served
elif tftpboot ${{scriptaddr}} ${{nb_dir}}${{ethaddr}}{NODE_EXT}; then
  source ${{scriptaddr}}
fi
echo netboot: no boot script for this machine, see the log of netboot
"""

_MAGIC = 0x27051956
_OS_LINUX, _ARCH_INVALID, _TYPE_SCRIPT, _COMP_NONE = 5, 0, 6, 0
_HEADER = struct.Struct(">7I4B32s")


def script_image(text: str, *, name: str = "netboot", stamp: int = 0) -> bytes:
    """``text`` as a legacy U-Boot script image: a 64-byte header (CRCs of header and
    data), then the image's size table (one entry, then 0) and the script."""
    body = text.encode()
    data = struct.pack(">II", len(body), 0) + body  # a single file is not padded
    fields = [_MAGIC, 0, stamp, len(data), 0, 0, zlib.crc32(data),
              _OS_LINUX, _ARCH_INVALID, _TYPE_SCRIPT, _COMP_NONE, name.encode()[:32]]
    fields[1] = zlib.crc32(_HEADER.pack(*fields))
    return _HEADER.pack(*fields) + data


SCRIPT_IMAGE = script_image(SCRIPT)


def node_mac(name: str) -> str | None:
    """The MAC of a node script's name under NODE_DIR (``<mac>.scr.uimg``), else None."""
    return name[:-len(NODE_EXT)] if name.endswith(NODE_EXT) else None


def _parts(spec: BootSpec) -> tuple[str, str, list[str]]:
    """(kernel arguments, kernel path, initrd paths) as the script names them."""
    files = [f"images/{i}" for i in spec.initrds]
    if spec.oem is not None:
        files.append(oem_path(spec.oem.uuid))
    return " ".join([*spec.os_args, spec.cmdline]), f"images/{spec.kernel}", files


def unscriptable(spec: BootSpec) -> str | None:
    """Why ``spec`` cannot go into a U-Boot script, or None: its kernel arguments go in
    single quotes (no apostrophe or line break) and its paths unquoted."""
    args, kernel, files = _parts(spec)
    if any(c in args for c in "'\n\r"):
        return (f"profile {spec.profile}: the kernel arguments hold an apostrophe or a "
                "line break, which a U-Boot script cannot quote")
    if not all(set(f) <= _PATH for f in (kernel, *files)):
        return (f"profile {spec.profile}: a kernel or initrd path holds characters other "
                "than letters, digits and . _ / + -, which a U-Boot script would act on")
    return None


def render(decision: Decision) -> str | None:
    """A node's script for ``decision``; None when netboot does not serve it (U-Boot
    then says so and goes on with its other boot targets)."""
    if isinstance(decision, LocalBoot):
        return "echo netboot: boot from the local disk\n"
    if isinstance(decision, Refusal):
        if not decision.failed:
            return None
        return refusal_lines(decision.reason, "echo", _TEXT)
    why = unscriptable(decision)
    if why is not None:  # the Booter refuses these first; never render them
        return refusal_lines(why, "echo", _TEXT)
    args, kernel, files = _parts(decision)
    lines = [say_line(f"booting {decision.hostname}, profile {decision.profile}", "echo",
                      _TEXT).rstrip("\n")]
    if len(files) > 1:  # back to back in memory: needs setexpr, which some builds lack
        lines += ["if setexpr nb_rd ${ramdisk_addr_r}; then",
                  f"  echo netboot: {len(files)} initrds, one after the other",
                  "else",
                  f"  echo netboot: this U-Boot has no setexpr, which {len(files)} initrds "
                  "need, so give this machine a profile with one initrd",
                  "  exit",
                  "fi"]
    lines += [f"setenv bootargs '{args}'",
              f"tftpboot ${{kernel_addr_r}} {kernel} || exit"]
    if len(files) == 1:
        lines.append(f"tftpboot ${{ramdisk_addr_r}} {files[0]} || exit")
        zboot, booti = "${ramdisk_addr_r} ${filesize}", "${ramdisk_addr_r}:${filesize}"
    elif files:
        for f in files:
            lines += [f"tftpboot ${{nb_rd}} {f} || exit",
                      "setexpr nb_rd ${nb_rd} + ${filesize}"]
        lines.append("setexpr nb_rdsize ${nb_rd} - ${ramdisk_addr_r}")
        zboot, booti = "${ramdisk_addr_r} ${nb_rdsize}", "${ramdisk_addr_r}:${nb_rdsize}"
    else:
        zboot, booti = "0 0", "-"
    lines += ["if test x${arch} = xx86; then",
              f"  zboot ${{kernel_addr_r}} 0 {zboot}",
              "else",
              f"  booti ${{kernel_addr_r}} {booti} ${{fdtcontroladdr}}",
              "fi",
              "echo netboot: the kernel did not start"]
    return "\n".join(lines) + "\n"


def render_image(decision: Decision) -> bytes | None:
    """:func:`render` as the script image U-Boot's ``source`` runs."""
    text = render(decision)
    return None if text is None else script_image(text)
