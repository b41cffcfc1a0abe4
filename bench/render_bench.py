#!/usr/bin/env python3
"""Ignition rendering cost on the boot path: N distinct machines, then repeats.

Each distinct machine goes through ``Booter.decide`` and ``ipxe.render`` exactly
as a boot does: context, jinja2 render of the bundled ``swarm-worker`` template, YAML,
strict validation, canonical JSON, newc cpio + gzip -9, signed OEM URL. Then
an unchanged machine asks again: that must be a render-cache hit.

    .venv/bin/python bench/render_bench.py [--machines 1000] [--repeats 1000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid as uuidlib
from pathlib import Path

from netboot.boot import ipxe
from netboot.boot.booter import Booter
from netboot.boot.spec import BootSpec
from netboot.config import ConfigStore
from netboot.ignition.artifacts import Artifacts, NodeArtifacts

REPO = Path(__file__).resolve().parents[1]

PROFILE = """\
kernel: flatcar/vmlinuz
initrds: [flatcar/initrd.cpio.gz]
cmdline: "console=ttyS0 flatcar.autologin netboot.host={{ hostname }}"
os: flatcar
ignition: swarm-worker
ssh_keys: ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE2e bench@netboot"]
"""


def setup(root: Path) -> tuple[Booter, Artifacts]:
    (root / "profiles").mkdir()
    (root / "machines").mkdir()
    (root / "profiles" / "flatcar.yaml").write_text(PROFILE)
    (root / "netboot.yaml").write_text(
        f"address: 10.0.0.2\ndata_dir: data\nimages_dir: images\n"
        f"ignition_dir: {REPO / 'ignition'}\ndefault_profile: flatcar\n"
        "api: {secret: bench-secret}\n"
        "site: {ntp: [10.0.0.1], registry_mirrors: ['http://10.0.0.3:5000'],"
        " http_proxy: 'http://10.0.0.4:3128'}\n"
        "swarm: {manager_addr: '10.0.0.5:2377', worker_token: SWMTKN-1-bench-w,"
        " manager_token: SWMTKN-1-bench-m}\n")
    store = ConfigStore(root / "netboot.yaml")
    artifacts = Artifacts.from_config(store.server, b"bench-secret")
    return Booter(store, "10.0.0.2", 8080, artifacts=artifacts), artifacts


def script(booter: Booter, mac: str, uuid: str) -> BootSpec:
    """Decide and render one boot script, as /ipxe/node does; the decision."""
    d = booter.decide(mac, uuid)
    ipxe.render(d, booter.base_url)
    assert isinstance(d, BootSpec), d
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--machines", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=1000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        booter, artifacts = setup(Path(tmp))
        nodes = [(f"52:54:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}",
                  str(uuidlib.UUID(int=i + 1))) for i in range(args.machines)]
        script(booter, "52:54:ff:ff:ff:ff", str(uuidlib.UUID(int=1 << 100)))  # warm-up
        c = artifacts.counters
        renders0 = c.get("ignition_renders_total", result="ok")
        per: list[float] = []
        results: dict[str, NodeArtifacts] = {}
        t0 = time.perf_counter()
        for mac, uuid in nodes:
            t = time.perf_counter()
            d = script(booter, mac, uuid)
            per.append(time.perf_counter() - t)
            assert d.oem is not None and d.oem.ok
            results[uuid] = d.oem
        total = time.perf_counter() - t0
        renders = c.get("ignition_renders_total", result="ok") - renders0
        sizes = [len(results[u].archive or b"") for _, u in nodes]
        digests = {results[u].digest for _, u in nodes}

        mac, uuid = nodes[len(nodes) // 2]
        first = results[uuid]
        hits0 = c.get("ignition_cache_hits_total")
        hit_t: list[float] = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            d = script(booter, mac, uuid)
            hit_t.append(time.perf_counter() - t)
        hits = c.get("ignition_cache_hits_total") - hits0
        assert d.oem is first, "a repeat must be the cached object"

        # the render-cache lookup alone (what a repeat costs beyond building the script)
        profile = booter.config.snapshot.profiles["flatcar"]
        res = booter.resolve(mac, uuid)
        ctx = booter.context(res, mac, uuid)
        t = time.perf_counter()
        for _ in range(args.repeats):
            artifacts.render(profile, ctx, uuid)
        lookup = (time.perf_counter() - t) / args.repeats

    us = 1e6
    print(f"distinct machines: {args.machines} in {total:.3f} s = {total / args.machines * us:.0f}"
          f" µs/node (median {statistics.median(per) * us:.0f}, p99 "
          f"{sorted(per)[int(len(per) * 0.99) - 1] * us:.0f}); renders: {renders:g}; "
          f"distinct configs: {len(digests)}; OEM archive {min(sizes)}-{max(sizes)} bytes")
    print(f"unchanged machine x{args.repeats}: cache hits {hits:g}/{args.repeats}, boot script"
          f" {statistics.median(hit_t) * us:.1f} µs median; render-cache lookup alone"
          f" {lookup * us:.1f} µs")


if __name__ == "__main__":
    main()
