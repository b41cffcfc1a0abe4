"""ProxyDHCP on the plain L2 path: broadcast PXE DISCOVERs (giaddr 0, BROADCAST
flag set) from a client namespace on the lab bridge, broadcast offers back, as
a rack of ROMs powering on sees it. perfdhcp (bench/dhcp_bench.py) only speaks
as a relay, so this is the broadcast counterpart, measured the same way:
highest rate with under 0.1% unanswered, and latency at a moderate rate.

    .venv/bin/python bench/dhcp_load.py [--duration 3] [--pin]          # both servers
    ip netns exec NS .venv/bin/python bench/dhcp_load.py client --rate R # one run

The client is two processes (sender, receiver) sharing one socket bound to
port 68 on the interface (SO_BINDTODEVICE: the namespace has no default route).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import sys
import time
import uuid as uuidlib
from multiprocessing import Pipe
from pathlib import Path

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.dhcp_bench import MAX_DROP_PCT, Bench, Run  # noqa: E402
from bench.dhcp_bench import main as bench_main  # noqa: E402
from tests.lab import VENV_BIN  # noqa: E402

SO_BINDTODEVICE = 25
XID_BASE = 0x5A000000


def discover_template() -> bytes:
    """A BIOS PXE ROM's DISCOVER (built by scapy once; xid and MAC patched per packet)."""
    from scapy.layers.dhcp import BOOTP, DHCP

    u = uuidlib.UUID("8dc30e79-5115-44b3-a5e3-4e5cbc62d3a2")
    return bytes(BOOTP(op=1, xid=0, flags=0x8000, chaddr=b"\x52\x54\x00" + b"\0" * 13)
                 / DHCP(options=[("message-type", "discover"),
                                 ("vendor_class_id", b"PXEClient:Arch:00000:UNDI:002001"),
                                 (93, b"\0\0"), (94, b"\x01\x02\x01"), (97, b"\0" + u.bytes_le),
                                 "end"]))


def _receiver(sock: socket.socket, until: float, conn) -> None:  # noqa: ANN001
    got: dict[int, float] = {}
    buf = bytearray(2048)
    while True:
        left = until - time.monotonic()
        if left <= 0:
            break
        r, _, _ = select.select([sock], [], [], left)
        if not r:
            continue
        while True:
            try:
                n = sock.recv_into(buf)
            except BlockingIOError:
                break
            if n >= 240 and buf[0] == 2:
                xid = int.from_bytes(buf[4:8], "big") - XID_BASE
                got.setdefault(xid, time.monotonic())
    conn.send(got)
    conn.close()


def run_client(interface: str, rate: int, duration: float, clients: int) -> dict:
    """Send ``rate`` DISCOVERs a second for ``duration``; count and time the offers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, interface.encode() + b"\0")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.bind(("0.0.0.0", 68))
    sock.setblocking(False)
    total = int(rate * duration)
    tpl = bytearray(discover_template())
    packets = []
    for i in range(total):
        tpl[4:8] = (XID_BASE + i).to_bytes(4, "big")
        tpl[31:34] = (i % clients).to_bytes(3, "big")
        packets.append(bytes(tpl))
    start = time.monotonic() + 0.2
    parent, child = Pipe()
    pid = os.fork()
    if pid == 0:  # receiver
        parent.close()
        _receiver(sock, start + duration + 1.0, child)
        os._exit(0)
    child.close()
    sent_at = [0.0] * total
    dest = ("255.255.255.255", 67)
    while time.monotonic() < start:
        time.sleep(0.01)
    i = 0
    failed = 0
    while i < total:
        due = min(total, int((time.monotonic() - start) * rate) + 1)
        while i < due:
            try:
                sock.sendto(packets[i], dest)
                sent_at[i] = time.monotonic()
            except BlockingIOError:
                failed += 1
                sent_at[i] = -1.0
            i += 1
        time.sleep(0.0005)
    elapsed = time.monotonic() - start
    got = parent.recv()
    os.waitpid(pid, 0)
    lat = sorted(t - sent_at[x] for x, t in got.items() if 0 <= x < total and sent_at[x] > 0)
    received = len(lat)
    return {"rate": rate, "sent": total - failed, "send_failed": failed,
            "received": received, "send_rate": total / elapsed,
            "avg_ms": 1000 * sum(lat) / received if received else 0.0,
            "p99_ms": 1000 * lat[int(received * 0.99) - 1] if received else 0.0,
            "max_ms": 1000 * lat[-1] if received else 0.0}


class LoadBench(Bench):
    """dhcp_bench's lab, servers and search, with the broadcast client as the load.
    Broadcasts reach every server on the bridge, so only one runs at a time: the
    alternation restarts them."""

    exclusive = True

    def measure(self, server: str, rate: int) -> Run:
        before = self.rcvbuf_errors()
        r = self.lab.ns(self.client_ns, *(["taskset", "-c", "0"] if self.args.pin else []),
                        str(VENV_BIN / "python"), __file__, "client", "--rate", str(rate),
                        "--duration", str(self.args.duration), "--clients",
                        str(self.args.clients), check=False)
        try:
            d = json.loads(r.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise RuntimeError(f"load client failed: {r.stdout}{r.stderr}") from None
        sent = d["sent"] + d["send_failed"]
        drop = 100.0 * (sent - d["received"]) / sent if sent else 100.0
        run = Run(rate, sent, d["received"], drop, d["send_rate"], d["avg_ms"], d["max_ms"],
                  self.rcvbuf_errors() - before)
        print(f"    rate {rate:>6}/s: sent {sent:>7} received {d['received']:>7} "
              f"drops {drop:6.3f}% (client rcvbuf {run.client_rcvbuf_errors}) "
              f"sent at {d['send_rate']:8.0f}/s avg {d['avg_ms']:.3f} ms "
              f"p99 {d['p99_ms']:.2f} ms max {d['max_ms']:.1f} ms {'ok' if run.ok else 'FAIL'}",
              flush=True)
        return run


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["client"]:
        p = argparse.ArgumentParser(prog="dhcp_load.py client")
        p.add_argument("--interface", default="eth0")
        p.add_argument("--rate", type=int, required=True)
        p.add_argument("--duration", type=float, default=3.0)
        p.add_argument("--clients", type=int, default=100000)
        a = p.parse_args(argv[1:])
        print(json.dumps(run_client(a.interface, a.rate, a.duration, a.clients)))
        return 0
    return bench_main(argv, bench_class=LoadBench,
                      title=f"broadcast DISCOVERs on the bridge, drops < {MAX_DROP_PCT}%")


if __name__ == "__main__":
    sys.exit(main())
