#!/usr/bin/env python3
"""Per-DISCOVER cost of the ProxyDHCP decision in-process: parse, decide, report to the
lifecycle, build the reply; no sockets. 10,000 new clients (each a first contact,
queued for the registry), then one client repeating 10,000 times.

    .venv/bin/python bench/dhcp_cost.py
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
import uuid as uuidlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from netboot.boot.booter import Booter  # noqa: E402
from netboot.boot.lifecycle import Lifecycle  # noqa: E402
from netboot.boot.sightings import Sightings  # noqa: E402
from netboot.config import ConfigStore  # noqa: E402
from netboot.dhcp.proxy import ProxyDhcp  # noqa: E402
from netboot.metrics import Counters  # noqa: E402
from netboot.storage.registry import Registry  # noqa: E402
from tests.test_dhcp_proxy import request  # noqa: E402


async def main() -> None:
    d = Path(tempfile.mkdtemp())
    (d / "profiles").mkdir()
    (d / "machines").mkdir()
    (d / "profiles" / "default.yaml").write_text("kernel: k\n")
    (d / "netboot.yaml").write_text(f"data_dir: {d / 'data'}\nimages_dir: {d}\n"
                                    "address: 10.0.0.2\n")
    store = ConfigStore(d / "netboot.yaml")
    reg = await Registry.open(d / "data", secret=b"s")
    counters = Counters()
    life = Lifecycle(reg, Sightings(), counters)
    proxy = ProxyDhcp(Booter(store, "10.0.0.2", 8080, registry=reg), "10.0.0.2", counters,
                      report=life.offered)
    pkts = [request(mac=f"52:54:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}",
                    uuid=str(uuidlib.UUID(int=i + 1))) for i in range(10_001)]
    for name, batch in (("new clients", pkts[:10_000]), ("repeat client", [pkts[-1]] * 10_000)):
        t = time.perf_counter()
        for p in batch:
            proxy.handle(p, 67, ("0.0.0.0", 68))
        print(f"{name}: {(time.perf_counter() - t) / len(batch) * 1e6:.2f} µs/packet")
    await reg.close()


if __name__ == "__main__":
    asyncio.run(main())
