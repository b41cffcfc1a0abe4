"""``netboot probe``: act like a PXE ROM on one interface and show who answers.

The packets are built and decoded with scapy, not with netboot's own codec, so
the probe is an independent witness of what the server puts on the wire.
scapy costs 0.3-1.5 s to import, so it is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Any

SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)

#: --arch -> (option 93 code, option 60 vendor class), as real firmware sends them
ARCHES: dict[str, tuple[int, bytes]] = {
    "bios": (0, b"PXEClient:Arch:00000:UNDI:002001"),
    "uefi-x86": (6, b"PXEClient:Arch:00006:UNDI:003016"),
    "uefi-x64": (7, b"PXEClient:Arch:00007:UNDI:003016"),
    "uefi-arm64": (11, b"PXEClient:Arch:00011:UNDI:003016"),
    "http-x64": (16, b"HTTPClient:Arch:00016:UNDI:003001"),
    "http-arm64": (19, b"HTTPClient:Arch:00019:UNDI:003001"),
}
MESSAGE_TYPES = {1: "DISCOVER", 2: "OFFER", 3: "REQUEST", 4: "DECLINE", 5: "ACK", 6: "NAK",
                 7: "RELEASE", 8: "INFORM"}
_IP_OPTIONS = {1, 3, 6, 28, 50, 54}
_TEXT_OPTIONS = {12, 15, 60, 66, 67, 77}
PROXY_PORT = 4011

NO_ANSWER = ("no answer at all: is the interface on the boot segment and up? no site DHCP "
             "server and no ProxyDHCP server answered (is a relay needed here?)")
NO_PROXY = ("no ProxyDHCP answer: is netboot running on this segment (or reachable through "
            "the relay)? is the machine's profile set (a machine file, or default_profile; "
            "not netboot: false)? netboot logs each 'boot decision'")
NO_ADDRESS = ("ProxyDHCP answered but no site DHCP server offered an address: the machine "
              "would get boot information but no IP (ProxyDHCP never hands out addresses)")


@dataclass
class Answer:
    """One datagram received, decoded; ``kind`` is how a PXE ROM would read it."""

    source: tuple[str, int]
    arch: str
    xid: int
    message_type: int | None
    yiaddr: str
    siaddr: str
    giaddr: str
    sname: str
    file: str
    options: list[tuple[int, str, Any]] = field(default_factory=list)
    kind: str = ""

    def option(self, code: int) -> Any:
        for c, _, v in self.options:
            if c == code:
                return v
        return None

    @property
    def server(self) -> str:
        sid = self.option(54)
        return sid if isinstance(sid, str) else self.source[0]

    @property
    def boot_file(self) -> str:
        opt67 = self.option(67)
        if isinstance(opt67, bytes):
            opt67 = opt67.rstrip(b"\0").decode(errors="replace")
        return self.file or opt67 or ""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "probe", help="send a PXE DISCOVER and show every DHCP/ProxyDHCP answer",
        description="Broadcast a PXE DHCPDISCOVER on one interface as a booting machine "
        "would, print every answer (the site DHCP server's address offer and ProxyDHCP boot "
        "offers) with options decoded, and say what is missing. Needs root (port 68).")
    p.add_argument("--interface", "-i", required=True, help="interface on the boot segment")
    p.add_argument("--arch", action="append", choices=sorted(ARCHES),
                   help="client architecture; repeat for several DISCOVERs (default: bios)")
    p.add_argument("--ipxe", action="store_true",
                   help="send as iPXE does (user class 'iPXE', option 175)")
    p.add_argument("--mac", help="client MAC (default: the interface's own)")
    p.add_argument("--uuid", help="SMBIOS UUID for option 97 (default: all zeros, 'unknown')")
    p.add_argument("--timeout", type=float, default=5.0,
                   help="seconds to collect answers; site DHCP servers often ping an address "
                   "for a few seconds before offering it (default: %(default)s)")
    p.add_argument("--request", action="store_true",
                   help="also send a DHCPREQUEST to port 4011 of each ProxyDHCP server "
                   "that answered (needs an IPv4 address on the interface)")
    p.add_argument("--no-broadcast-flag", dest="broadcast", action="store_false",
                   help="clear the BROADCAST flag, as iPXE does: answers then reach the "
                   "probe only if the server (or relay) broadcasts them")
    p.set_defaults(func=cmd_probe)


def _interface_mac(interface: str) -> str:
    with open(f"/sys/class/net/{interface}/address") as f:
        return f.read().strip()


def _interface_ipv4(interface: str) -> str | None:
    from ..netutil import interface_ipv4

    return interface_ipv4(interface)


def build_request(mtype: str, *, arch: str, mac: str, uuid: str | None, ipxe: bool, xid: int,
                  ciaddr: str = "0.0.0.0", broadcast: bool = True) -> bytes:
    """A DHCP packet as a PXE ROM (or iPXE) sends it, built by scapy."""
    from scapy.layers.dhcp import BOOTP, DHCP

    code, vendor = ARCHES[arch]
    u = uuidlib.UUID(uuid) if uuid else uuidlib.UUID(int=0)
    opts: list[Any] = [
        ("message-type", mtype),
        ("max_dhcp_size", 1464),
        ("param_req_list", [1, 3, 6, 43, 54, 60, 66, 67, 97, 128, 129, 175]),
        ("vendor_class_id", vendor),
        (93, code.to_bytes(2, "big")),
        (94, b"\x01\x02\x01" if code == 0 else b"\x01\x03\x10"),
        (97, b"\0" + u.bytes_le),
    ]
    if ipxe:
        opts += [("user_class", b"iPXE"),
                 (175, b"\xb1\x05\x01\x80\x86\x10\x0e\xeb\x03\x01\x00\x00")]
    opts.append("end")
    chaddr = bytes.fromhex(mac.replace(":", "").replace("-", "")) + b"\0" * 10
    pkt = BOOTP(op=1, htype=1, hlen=6, xid=xid, flags=0x8000 if broadcast else 0, ciaddr=ciaddr,
                chaddr=chaddr) / DHCP(options=opts)
    return bytes(pkt)


def decode(data: bytes, source: tuple[str, int], arch: str) -> Answer | None:
    """scapy's reading of a reply; None for what is not a BOOTREPLY."""
    from scapy.layers.dhcp import BOOTP, DHCP, DHCPRevOptions

    try:
        bootp = BOOTP(data)
    except Exception:  # noqa: BLE001 - any undecodable datagram is just not an answer
        return None
    if bootp.op != 2:
        return None
    opts: list[tuple[int, str, Any]] = []
    if DHCP in bootp:
        for o in bootp[DHCP].options:
            if not isinstance(o, tuple) or len(o) < 2:
                continue
            name, value = o[0], o[1] if len(o) == 2 else list(o[1:])
            if isinstance(name, int):
                code, name = name, f"option-{name}"
            else:
                code = DHCPRevOptions.get(name, (0,))[0]
            opts.append((code, name, value))
    mtype = next((v for c, _, v in opts if c == 53), None)
    ans = Answer(source, arch, bootp.xid, mtype if isinstance(mtype, int) else None,
                 bootp.yiaddr, bootp.siaddr, bootp.giaddr,
                 bootp.sname.rstrip(b"\0").decode(errors="replace"),
                 bootp.file.rstrip(b"\0").decode(errors="replace"), opts)
    ans.kind = classify(ans)
    return ans


def classify(a: Answer) -> str:
    """Name an answer as a PXE client sees it: an address, boot information, or both."""
    vendor = a.option(60)
    pxe = isinstance(vendor, bytes) and vendor.startswith((b"PXEClient", b"HTTPClient"))
    has_address = a.yiaddr not in ("0.0.0.0", "")
    ack = a.message_type == 5
    if has_address:
        kind = "address ack (site DHCP)" if ack else "address offer (site DHCP)"
        if pxe or a.boot_file:
            kind += " with boot information"
        return kind
    if pxe:
        if ack:
            return f"ProxyDHCP boot ack (from port {a.source[1]})"
        return "ProxyDHCP boot offer"
    return "DHCP answer without address or PXE vendor class (ignored by PXE ROMs)"


def _format_value(code: int, value: Any) -> str:
    if code == 53 and isinstance(value, int):
        return f"{value} ({MESSAGE_TYPES.get(value, '?')})"
    if code == 97 and isinstance(value, bytes) and len(value) == 17:
        raw = value[1:]
        if raw in (b"\0" * 16, b"\xff" * 16):
            return f"type {value[0]}, unknown UUID"
        return f"type {value[0]}, {uuidlib.UUID(bytes_le=raw)}"
    if code == 43 and isinstance(value, bytes):
        subs = []
        pos = 0
        while pos + 1 < len(value) and value[pos] != 255:
            c, n = value[pos], value[pos + 1]
            subs.append(f"{c}={value[pos + 2:pos + 2 + n].hex()}")
            pos += 2 + n
        return "PXE sub-options " + (", ".join(subs) or "none") + f" (raw {value.hex()})"
    if code == 82 and isinstance(value, bytes):
        subs = []
        pos = 0
        while pos + 1 < len(value):
            c, n = value[pos], value[pos + 1]
            subs.append(f"{c}={value[pos + 2:pos + 2 + n]!r}")
            pos += 2 + n
        return "relay agent " + ", ".join(subs)
    if isinstance(value, bytes):
        if code in _TEXT_OPTIONS or all(32 <= b < 127 for b in value.rstrip(b"\0")):
            return repr(value.rstrip(b"\0").decode(errors="replace"))
        return value.hex()
    return str(value)


def render(a: Answer) -> str:
    mt = MESSAGE_TYPES.get(a.message_type or 0, "BOOTP")
    lines = [f"{a.kind}: {mt} from {a.source[0]}:{a.source[1]} (arch {a.arch}, xid {a.xid:#010x})",
             f"  server {a.server}  yiaddr {a.yiaddr}  siaddr {a.siaddr}  giaddr {a.giaddr}",
             f"  sname {a.sname!r}  file {a.file!r}"]
    for code, name, value in a.options:
        lines.append(f"  option {code:3d} {name}: {_format_value(code, value)}")
    return "\n".join(lines)


def diagnose(answers: list[Answer], requested: bool, have_address: bool) -> tuple[str, int]:
    """One line saying what a booting machine would lack, and the exit code."""
    sites = [a for a in answers if a.kind.startswith("address")]
    proxies = [a for a in answers if a.kind.startswith("ProxyDHCP boot offer")]
    acks = [a for a in answers if a.kind.startswith("ProxyDHCP boot ack")]
    if not answers:
        return NO_ANSWER, 1
    if not proxies:
        return NO_PROXY, 1
    if not sites:
        return NO_ADDRESS, 1
    p = proxies[0]
    msg = (f"ok: {sites[0].server} offers address {sites[0].yiaddr}; ProxyDHCP {p.server} "
           f"offers {p.boot_file or '(no file)'}")
    if requested and have_address and not acks:
        return msg + "; but no ProxyDHCP ack came back from port 4011", 1
    return msg, 0


def probe(interface: str, arches: list[str], *, mac: str, uuid: str | None, ipxe: bool,
          timeout: float, request: bool, broadcast: bool = True) -> tuple[list[Answer], bool]:
    """Broadcast one DISCOVER per arch and collect answers until ``timeout``."""
    our_ip = _interface_ipv4(interface)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        # Without this a namespace with no default route cannot broadcast at all.
        sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, interface.encode() + b"\0")
        sock.bind(("0.0.0.0", 68))
        base = int.from_bytes(os.urandom(4), "big") & 0xFFFFFF00
        xids = {base + i: a for i, a in enumerate(arches)}
        for xid, arch in xids.items():
            sock.sendto(build_request("discover", arch=arch, mac=mac, uuid=uuid, ipxe=ipxe,
                                      xid=xid, broadcast=broadcast), ("255.255.255.255", 67))
        answers: list[Answer] = []
        asked: set[tuple[str, int]] = set()
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([sock], [], [], left)
            if not ready:
                break
            data, src = sock.recvfrom(4096)
            arch = xids.get(int.from_bytes(data[4:8], "big")) if len(data) >= 8 else None
            if arch is None:
                continue  # another client's traffic
            ans = decode(data, src, arch)
            if ans is None:
                continue
            answers.append(ans)
            print(render(ans), flush=True)
            if request and our_ip and ans.kind == "ProxyDHCP boot offer" and \
                    (ans.server, ans.xid) not in asked:
                asked.add((ans.server, ans.xid))
                req = build_request("request", arch=arch, mac=mac, uuid=uuid, ipxe=ipxe,
                                    xid=ans.xid, ciaddr=our_ip)
                sock.sendto(req, (ans.server, PROXY_PORT))
                print(f"-> sent DHCPREQUEST to {ans.server}:{PROXY_PORT} from {our_ip}",
                      flush=True)
        return answers, our_ip is not None
    finally:
        sock.close()


def cmd_probe(args: argparse.Namespace) -> int:
    import logging

    logging.getLogger("scapy.runtime").setLevel(logging.ERROR)  # no import-time chatter
    try:
        mac = args.mac or _interface_mac(args.interface)
    except OSError:
        print(f"probe: no interface {args.interface!r}")
        return 2
    arches = args.arch or ["bios"]
    if args.request and _interface_ipv4(args.interface) is None:
        print(f"probe: {args.interface} has no IPv4 address; skipping the port {PROXY_PORT} "
              "request")
    print(f"probe: DHCPDISCOVER on {args.interface} as mac {mac}, arch {', '.join(arches)}"
          f"{', iPXE' if args.ipxe else ''}; listening {args.timeout:g}s", flush=True)
    try:
        answers, have_ip = probe(args.interface, arches, mac=mac, uuid=args.uuid,
                                 ipxe=args.ipxe, timeout=args.timeout, request=args.request,
                                 broadcast=args.broadcast)
    except PermissionError as exc:
        print(f"probe: {exc}: port 68 and SO_BINDTODEVICE need root")
        return 2
    except OSError as exc:
        print(f"probe: {exc} (is a DHCP client already bound to port 68 on this host?)")
        return 2
    line, code = diagnose(answers, args.request, have_ip)
    print(f"diagnosis: {line}")
    return code
