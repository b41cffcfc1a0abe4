"""A lossy, reordering Ethernet wire between two tap devices in two namespaces.

This machine's kernel has no sch_netem (``tc qdisc ... netem`` answers "Unknown
device type") and no nfqueue, so the impairment is done in user space: each
namespace gets a tap device ``eth0`` instead of a veth end, and this process
carries frames between them, dropping ``loss`` % of them (every frame, both
ways, ARP included, as netem on both ends would) and holding back all but
``reorder`` % by ``delay`` ms, so the ``reorder`` % overtake the frames
before them -- netem's own definition of ``loss L% reorder R% delay D``.

    python bench/storm_wire.py NS_A NS_B --control FILE

FILE holds JSON {"loss": 10, "reorder": 25, "delay_ms": 2}; it is re-read when
it changes, so a test can turn the impairment on and off.
"""

from __future__ import annotations

import argparse
import fcntl
import heapq
import json
import os
import random
import select
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.storm_lab import in_netns  # noqa: E402

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000


def open_tap(ns: str, name: str) -> int:
    def make() -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
        return fd

    return in_netns(ns, make)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("ns_a")
    ap.add_argument("ns_b")
    ap.add_argument("--dev", default="eth0")
    ap.add_argument("--control", required=True)
    ap.add_argument("--seed", type=int, default=None)
    a = ap.parse_args(argv)
    rng = random.Random(a.seed)
    fa, fb = open_tap(a.ns_a, a.dev), open_tap(a.ns_b, a.dev)
    other = {fa: fb, fb: fa}
    print("wire up", flush=True)
    params = {"loss": 0.0, "reorder": 0.0, "delay_ms": 0.0}
    stamp = None
    heap: list[tuple[float, int, int, bytes]] = []
    seq = 0
    stats = {"frames": 0, "dropped": 0, "early": 0}
    next_check = 0.0
    while True:
        now = time.monotonic()
        if now >= next_check:
            next_check = now + 0.1
            try:
                st = os.stat(a.control)
                if (st.st_mtime_ns, st.st_size) != stamp:
                    stamp = (st.st_mtime_ns, st.st_size)
                    with open(a.control) as f:
                        params.update(json.load(f))
            except (OSError, ValueError):
                pass
        timeout = 0.05
        if heap:
            timeout = max(0.0, min(timeout, heap[0][0] - now))
        ready, _, _ = select.select([fa, fb], [], [], timeout)
        now = time.monotonic()
        loss, reorder = params["loss"] / 100, params["reorder"] / 100
        delay = params["delay_ms"] / 1000
        for fd in ready:
            for _ in range(64):
                try:
                    frame = os.read(fd, 65536)
                except BlockingIOError:
                    break
                except OSError:
                    break
                stats["frames"] += 1
                if loss and rng.random() < loss:
                    stats["dropped"] += 1
                    continue
                if delay and not (reorder and rng.random() < reorder):
                    seq += 1
                    heapq.heappush(heap, (now + delay, seq, other[fd], frame))
                    continue
                stats["early"] += 1
                try:
                    os.write(other[fd], frame)
                except OSError:
                    pass
        while heap and heap[0][0] <= now:
            _, _, out, frame = heapq.heappop(heap)
            try:
                os.write(out, frame)
            except OSError:
                pass


if __name__ == "__main__":
    sys.exit(main())
