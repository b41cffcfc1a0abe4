#!/usr/bin/env bash
# Install what netboot needs, idempotently: Debian packages (only the missing
# ones), then a virtualenv in .venv with the project and its test tools.
#   scripts/setup.sh run    what `make run` needs
#   scripts/setup.sh test   what `make test` needs (real peers: QEMU, dnsmasq, ...)
#   scripts/setup.sh bench  what `make bench` needs (peer servers and load tools)
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-test}

# ipmitool: the IPMI power driver runs it for every BMC call, and the commissioning OS
# (`make images`) carries a copy of it;
# shim-signed, grub-efi-amd64-signed: the Secure Boot chain (shimx64.efi.signed and
# grubnetx64.efi.signed) and the GRUB loader (docs/firmware.md);
# mmdebstrap, squashfs-tools: the stand-in Container Linux (`make coreos-image`);
# u-boot-qemu, u-boot-tools (tests): U-Boot firmware for QEMU, and mkimage as the oracle;
# qemu-system-arm, qemu-efi-aarch64 (tests): arm64 guests (AAVMF); nginx-light, tftpd-hpa:
# the storm test's peers (tests/test_faults.py); postgresql (tests): the registry tests' second
# engine, a cluster of its own made by the fixture (tests/pgsql.py; Debian's own cluster is
# not used); systemd (tests): systemd-analyze verify/security for deploy/netboot.service
RUN_PKGS=(ipxe pxelinux syslinux-common cpio busybox-static linux-image-amd64 iproute2 kmod gpgv
          ipmitool shim-signed grub-efi-amd64-signed mmdebstrap squashfs-tools)
TEST_PKGS=("${RUN_PKGS[@]}" qemu-system-x86 ipxe-qemu ovmf dnsmasq-base tftp-hpa atftp curl
           ignition docker.io chromium chromium-driver prometheus iptables nftables gnupg gpgv
           isc-dhcp-relay tcpdump tshark openipmi ipmitool u-boot-qemu u-boot-tools
           qemu-system-arm qemu-efi-aarch64 nginx-light tftpd-hpa postgresql
           systemd)
BENCH_PKGS=("${TEST_PKGS[@]}" wrk kea-admin gcc)

case "$what" in
  run) pkgs=("${RUN_PKGS[@]}") ;;
  test) pkgs=("${TEST_PKGS[@]}") ;;
  bench) pkgs=("${BENCH_PKGS[@]}") ;;
  *) echo "usage: $0 run|test|bench" >&2; exit 2 ;;
esac

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing Debian packages: ${missing[*]}" >&2
    echo "setup: run as root, or: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  # Services some packages ship (tftpd-hpa, nginx, docker) must not start here.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi

PY=${PYTHON:-python3}
stamp=.venv/.netboot-installed
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing Python dependencies into .venv"
  .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
  if ! .venv/bin/pip install -q -e '.[test]' > .venv/pip.log 2>&1; then
    cat .venv/pip.log >&2
    echo "setup: pip install failed (log above, also in .venv/pip.log)" >&2
    exit 1
  fi
  touch "$stamp"
fi
