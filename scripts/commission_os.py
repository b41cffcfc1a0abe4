#!/usr/bin/env python3
"""Build the commissioning OS: the initramfs the bundled ``commission`` profile boots.

Debian's kernel (the demo OS's, images/demo/vmlinuz) plus a busybox initramfs
made here, with ``ipmitool`` and its libraries. On the machine it loads the NIC,
disk and in-band IPMI (KCS) drivers, takes an address with udhcpc, collects an
inventory (SMBIOS, CPU, memory, disks, NICs, the BMC's LAN settings read over
/dev/ipmi0) and POSTs it as JSON to the ``netboot.inventory=`` URL of its kernel
command line (with ``&format=sh``). The answer is plain text lines::

    NETBOOT_ACTION=poweroff|wait|set-bmc
    NETBOOT_BMC_ADDRESS=a.b.c.d       (set-bmc)
    NETBOOT_BMC_NETMASK=a.b.c.d       (set-bmc)
    NETBOOT_BMC_GATEWAY=a.b.c.d       (set-bmc, optional)

``set-bmc`` sets the BMC's LAN channel 1 to that static address in band and posts
again; ``wait`` sleeps 3 s and posts again; ``poweroff`` ends. The loop is bounded,
and any failure is printed (``NETBOOT-COMMISSION FAILED: ...``) before powering off.

    python3 scripts/commission_os.py images/commission
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from demo_os import DRIVERS, SECURE_BOOT_SH, cli, find_busybox, find_kernel, new_root, pack

# NICs as in the demo OS, disks (virtio, NVMe, SATA) and the in-band BMC interface.
COMMISSION_DRIVERS = (*DRIVERS, "virtio_blk", "nvme", "ahci", "sd_mod",
                      "ipmi_msghandler", "ipmi_devintf", "ipmi_si")

ROUNDS = 20
"""How many times the OS posts its inventory before it gives up and powers off."""

SHELL_FUNCS = SECURE_BOOT_SH + r"""T=${T:-/tmp}  # scratch files

# -- JSON, safely: strings escaped, control and non-ASCII bytes dropped
jstr() {  # a JSON string, or null if empty
  if [ -z "$1" ]; then printf null; return; fi
  printf '"%s"' "$(printf '%s' "$1" | tr '\t\n\r' '   ' | tr -d '\000-\037\177-\377' \
                  | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g')"
}
jint() {  # a JSON integer, or null
  case "$1" in ''|*[!0-9]*) printf null ;; *) printf '%s' "$1" ;; esac
}
rd() { [ -r "$1" ] && head -n 1 "$1" 2>/dev/null | sed 's/ *$//'; }

# -- inventory -----------------------------------------------------------------------
lan_get() {  # the value of one 'Key : value' line of "$T/lan"
  awk -v k="$1" '{ i = index($0, ":"); if (i == 0) next
    key = substr($0, 1, i - 1); sub(/ +$/, "", key)
    if (key == k) { v = substr($0, i + 1); sub(/^ +/, "", v); sub(/ +$/, "", v)
                    print v; exit } }' "$T/lan"
}
nz() { case "$1" in 0.0.0.0|00:00:00:00:00:00) ;; *) printf '%s' "$1" ;; esac; }

bmc_json() {
  if [ ! -e /dev/ipmi0 ]; then printf null; return; fi
  if ! ipmitool -I open lan print 1 > $T/lan 2> $T/lan.err; then
    say "ipmitool lan print 1 failed: $(head -n 1 $T/lan.err)" >&2
    printf null; return
  fi
  addr=$(lan_get "IP Address")
  if [ -z "$addr" ]; then printf null; return; fi
  printf '{"address": %s, "netmask": %s, "gateway": %s, "mac": %s, "source": %s}' \
    "$(jstr "$addr")" "$(jstr "$(nz "$(lan_get "Subnet Mask")")")" \
    "$(jstr "$(nz "$(lan_get "Default Gateway IP")")")" \
    "$(jstr "$(nz "$(lan_get "MAC Address")")")" "$(jstr "$(lan_get "IP Address Source")")"
}

inventory() {
  d=/sys/class/dmi/id
  model=$(grep -m 1 '^model name' /proc/cpuinfo | sed 's/^[^:]*: *//')
  count=$(grep -c '^processor' /proc/cpuinfo)
  mem=$(awk '/^MemTotal:/ { print $2 * 1024; exit }' /proc/meminfo)
  printf '{"smbios": {"uuid": %s, "serial": %s, "vendor": %s, "product": %s, ' \
    "$(jstr "$(rd $d/product_uuid)")" "$(jstr "$(rd $d/product_serial)")" \
    "$(jstr "$(rd $d/sys_vendor)")" "$(jstr "$(rd $d/product_name)")"
  printf '"bios_version": %s},\n' "$(jstr "$(rd $d/bios_version)")"
  printf ' "cpu": {"model": %s, "count": %s},\n' "$(jstr "$model")" "$(jint "$count")"
  printf ' "memory_bytes": %s,\n "disks": [' "$(jint "$mem")"
  sep=""
  for b in /sys/block/*; do
    [ -e "$b" ] || continue
    name=${b##*/}
    case "$name" in ram*|loop*|zram*) continue ;; esac
    sectors=$(rd "$b/size")
    size=""; case "$sectors" in ''|*[!0-9]*) ;; *) size=$((sectors * 512)) ;; esac
    printf '%s{"name": %s, "size_bytes": %s, "model": %s}' "$sep" "$(jstr "$name")" \
      "$(jint "$size")" "$(jstr "$(rd "$b/device/model")")"
    sep=", "
  done
  printf '],\n "nics": ['
  sep=""
  for n in /sys/class/net/*; do
    [ -e "$n/device" ] || continue
    drv=""; [ -e "$n/device/driver" ] && drv=$(basename "$(readlink "$n/device/driver")")
    link=false
    if [ "$(rd "$n/carrier")" = 1 ] || [ "$(rd "$n/operstate")" = up ]; then link=true; fi
    printf '%s{"mac": %s, "driver": %s, "link": %s, "speed_mbps": %s}' "$sep" \
      "$(jstr "$(rd "$n/address")")" "$(jstr "$drv")" "$link" "$(jint "$(rd "$n/speed")")"
    sep=", "
  done
  case "$(secure_boot)" in 1) sb=true ;; 0) sb=false ;; *) sb=null ;; esac
  printf '],\n "lldp": null,\n "secure_boot": %s,\n "bmc": %s}\n' "$sb" "$(bmc_json)"
}

# -- the answer: only these lines, each checked; never evaluated -----------------------
ipv4() {  # prints $1 if it is a dotted quad, else nothing
  case "$1" in ''|*[!0-9.]*|*..*|.*|*.) return ;; esac
  o=$(echo "$1" | awk -F. 'NF == 4 && $1 <= 255 && $2 <= 255 && $3 <= 255 && $4 <= 255 {
                            print "ok" }')
  [ "$o" = ok ] && printf '%s' "$1"
}
unq() {  # one pair of surrounding quotes off, as a shell-quoted value would carry
  v=$1
  case "$v" in \"*\") v=${v#\"}; v=${v%\"} ;; \'*\') v=${v#\'}; v=${v%\'} ;; esac
  printf '%s' "$v"
}
read_answer() {
  ACTION=""; B_ADDR=""; B_MASK=""; B_GW=""
  CR=$(printf '\r')
  while IFS= read -r line || [ -n "$line" ]; do
    line=${line%"$CR"}
    case "$line" in
      NETBOOT_ACTION=*)
        a=$(unq "${line#NETBOOT_ACTION=}")
        case "$a" in poweroff|wait|set-bmc) ACTION=$a ;; *) say "unknown action: $a" ;; esac ;;
      NETBOOT_BMC_ADDRESS=*) B_ADDR=$(ipv4 "$(unq "${line#*=}")") ;;
      NETBOOT_BMC_NETMASK=*) B_MASK=$(ipv4 "$(unq "${line#*=}")") ;;
      NETBOOT_BMC_GATEWAY=*) B_GW=$(ipv4 "$(unq "${line#*=}")") ;;
      ''|\#*) ;;
      *) say "ignored answer line: $(printf '%s' "$line" | cut -c 1-60 | tr -cd ' -~')" ;;
    esac
  done < $T/answer
}
"""
"""Shell functions of the init with no side effects but files in $T: tested on
the host by tests/test_commission_os.py."""

INIT = (r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin
mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

say() { echo "NETBOOT-COMMISSION $*"; }
off() { sync; poweroff -f; sleep 30; }
fail() { say "FAILED: $*"; say "powering off"; off; }
""" + SHELL_FUNCS + r"""
say "START"
for m in $(cat /lib/modules.order); do insmod "/lib/$m" 2>/dev/null; done

URL=""
for arg in $(cat /proc/cmdline); do
  case "$arg" in netboot.inventory=*) URL="${arg#netboot.inventory=}" ;; esac
done
[ -n "$URL" ] || fail "no netboot.inventory= on the kernel command line"
case "$URL" in http://*) ;; *) fail "netboot.inventory is not an http:// URL" ;; esac
# the URL carries the node's token: print it without its query
say "inventory URL ${URL%%\?*}"

# -- network -------------------------------------------------------------------------
i=0
while [ ! -e /dev/ipmi0 ] && [ $i -lt 5 ]; do sleep 1; i=$((i + 1)); done
ip link set lo up
IF=""
for n in $(ls /sys/class/net); do
  [ "$n" = lo ] && continue
  [ -e "/sys/class/net/$n/device" ] || continue
  ip link set "$n" up
  if udhcpc -i "$n" -s /bin/udhcpc.script -q -n -t 10 -T 2 >/dev/null 2>&1; then IF=$n; break; fi
done
[ -n "$IF" ] || fail "no address from DHCP on any NIC"
say "address $(ip -4 -o addr show dev "$IF" | awk '{print $4}') on $IF"

post() {
  inventory > $T/inventory.json
  say "inventory $(tr -d '\n' < $T/inventory.json)"
  tries=0
  while ! wget -q -O $T/answer --header 'Content-Type: application/json' \
          --post-file $T/inventory.json "$URL&format=sh" 2> $T/wget.err; do
    tries=$((tries + 1))
    [ $tries -ge 3 ] && return 1
    say "POST failed ($(head -n 1 $T/wget.err)); retrying"
    sleep 2
  done
}

set_bmc() {
  [ -e /dev/ipmi0 ] || fail "set-bmc asked, but there is no /dev/ipmi0"
  [ -n "$B_ADDR" ] || fail "set-bmc without a valid NETBOOT_BMC_ADDRESS"
  [ -n "$B_MASK" ] || fail "set-bmc without a valid NETBOOT_BMC_NETMASK"
  say "set-bmc address=$B_ADDR netmask=$B_MASK gateway=${B_GW:-none}"
  ipmitool -I open lan set 1 ipsrc static || fail "ipmitool lan set 1 ipsrc static"
  ipmitool -I open lan set 1 ipaddr "$B_ADDR" || fail "ipmitool lan set 1 ipaddr $B_ADDR"
  ipmitool -I open lan set 1 netmask "$B_MASK" || fail "ipmitool lan set 1 netmask $B_MASK"
  if [ -n "$B_GW" ]; then
    ipmitool -I open lan set 1 defgw ipaddr "$B_GW" || fail "ipmitool lan set 1 defgw ipaddr $B_GW"
  fi
}

round=1
while [ $round -le __ROUNDS__ ]; do
  say "round $round: posting the inventory"
  post || fail "could not POST the inventory: $(head -n 1 $T/wget.err)"
  read_answer
  say "answer: ${ACTION:-none}"
  case "$ACTION" in
    poweroff) say "DONE"; echo "NETBOOT-COMMISSION-DONE"; off ;;
    wait) sleep 3 ;;
    set-bmc) set_bmc ;;
    *) fail "the answer named no action" ;;
  esac
  round=$((round + 1))
done
fail "no poweroff after __ROUNDS__ rounds"
""").replace("__ROUNDS__", str(ROUNDS))


def bundle_ipmitool(root: Path) -> None:
    """/usr/bin/ipmitool with every library ``ldd`` names and the ELF interpreter,
    each at its own path (the loader finds them in its default directories)."""
    ipmitool = shutil.which("ipmitool")
    if ipmitool is None:
        sys.exit("commission_os: no ipmitool; install it with: apt-get install ipmitool")
    out = subprocess.run(["ldd", ipmitool], check=True, capture_output=True, text=True).stdout
    libs: list[str] = []
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts:  # libfoo.so.1 => /lib/.../libfoo.so.1 (0x...)
            target = parts[parts.index("=>") + 1]
            if target.startswith("/"):
                libs.append(target)
        elif parts and parts[0].startswith("/"):  # the interpreter, /lib64/ld-linux-x86-64.so.2
            libs.append(parts[0])
    if not any("ld-linux" in lib for lib in libs):
        sys.exit(f"commission_os: ldd named no ELF interpreter for {ipmitool}:\n{out}")
    for path in [ipmitool, *libs]:
        dest = root / path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dest)  # follows symlinks: the real file under the linked name
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    if Path(ipmitool) != Path("/usr/bin/ipmitool"):
        shutil.move(root / ipmitool.lstrip("/"), root / "usr/bin/ipmitool")
    # ipmitool opens IANA's enterprise numbers (4.7 MB) on every call and complains on
    # stderr without it: its header and first entry are enough to open and parse.
    pen = Path("/usr/share/misc/enterprise-numbers.txt")
    dest = root / pen.relative_to("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    head = pen.read_text(errors="replace").splitlines()[:20] if pen.exists() else []
    dest.write_text("\n".join(head) + "\n")


def build(out: Path) -> None:
    busybox = find_busybox()
    _, modules = find_kernel(COMMISSION_DRIVERS)
    missing = [m for m in ("ipmi_si", "ipmi_devintf")
               if not any(p.name.startswith(m + ".ko") for p in modules)]
    if missing:
        sys.exit(f"commission_os: kernel modules not found: {', '.join(missing)}")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        new_root(root, busybox, modules, INIT)
        bundle_ipmitool(root)
        pack(root, out / "initrd.cpio.gz")
    print(f"commission OS: {out}/initrd.cpio.gz ({len(modules)} modules, ipmitool)")


def main() -> None:
    cli(build, Path("images/commission"), __doc__)


if __name__ == "__main__":
    main()
