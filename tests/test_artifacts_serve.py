"""Serving Ignition configs and OEM archives only to the node they were made for:
a real aiohttp server and the real TFTP server on 127.0.0.1, a real registry,
and the ``netboot render`` CLI giving the very bytes the server serves."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from netboot.boot.spec import Client, Offer
from netboot.ignition.artifacts import sign
from tests.served import Served as Netboot
from tests.served import serving
from tests.test_artifacts import (
    M1,
    M2,
    M3,
    M4,
    MANAGER_TOKEN,
    SECRET,
    U1,
    U2,
    U3,
    U4,
    WORKER_TOKEN,
    write_tree,
)


@dataclass
class Served:
    url: str
    config: Path
    net: Netboot

    def __getattr__(self, name: str) -> Any:  # registry, counters, artifacts, tftp ...
        return getattr(self.net, name)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    config = write_tree(tmp_path)
    async with serving(config, secret=SECRET.encode(), tftp=True) as net:
        yield Served(net.url, config, net)


def _dhcp_saw(served: Served, mac: str, uuid: str) -> None:
    """What the DHCP path reports for a PXE client: pxelinux then knows its UUID."""
    served.lifecycle.offered(Client(mac, uuid), Offer("pxelinux.0"))


def _local(url: str, served: Served) -> str:
    """A URL from a boot script (advertised base) pointed at the test server's port."""
    return served.url + url.split(":8080", 1)[1]


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with session.get(url) as resp:
        return resp.status, await resp.read()


async def _script(session: aiohttp.ClientSession, served: Served, mac: str, uuid: str) -> str:
    status, body = await _get(session, f"{served.url}/ipxe/node?uuid={uuid}&mac={mac}")
    assert status == 200
    return body.decode()


def _oem_url(script: str) -> str:
    m = re.search(r"^initrd --name netboot-oem\.cpio\.gz (\S+)$", script, re.MULTILINE)
    assert m, script
    return m.group(1)


async def test_http_only_the_node_itself_gets_its_config(
        served: Served, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    def refused(reason: str) -> float:
        return served.counters.get("ignition_refused_total", reason=reason)

    async with aiohttp.ClientSession() as s:
        script1 = await _script(s, served, M1, U1)
        script2 = await _script(s, served, M2, U2)
        own1, own2 = _oem_url(script1), _oem_url(script2)
        assert f"/oem/{U1}.cpio.gz?" in own1 and f"/oem/{U2}.cpio.gz?" in own2
        a1, a2 = served.artifacts.issued(U1), served.artifacts.issued(U2)
        assert a1 is not None and a2 is not None and a1.archive != a2.archive

        # each node's own URL works and gives exactly its archive
        assert await _get(s, _local(own1, served)) == (200, a1.archive)
        assert await _get(s, _local(own2, served)) == (200, a2.archive)

        future = int(time.time()) + 600
        u1_query = own1.split("?", 1)[1]
        attempts = {
            # forged: a random signature for node 2
            "forged": (f"/oem/{U2}.cpio.gz?exp={future}&sig={secrets.token_hex(32)}",
                       "bad_signature"),
            # someone else's: node 1's valid signature presented for node 2
            "other node's": (f"/oem/{U2}.cpio.gz?{u1_query}", "bad_signature"),
            "other node's, ignition": (f"/ignition/{U2}.ign?{u1_query}", "bad_signature"),
            # node 1's own oem signature is not one for its ignition config
            "other kind": (f"/ignition/{U1}.ign?{u1_query}", "bad_signature"),
            # a genuine signature that has expired
            "expired": ((f"/oem/{U2}.cpio.gz?exp={int(time.time()) - 5}"
                        f"&sig={sign(SECRET.encode(), 'oem', U2, int(time.time()) - 5)}"),
                        "expired"),
            "expired ignition": ((f"/ignition/{U2}.ign?exp=1000&sig="
                                 f"{sign(SECRET.encode(), 'ignition', U2, 1000)}"), "expired"),
            "unsigned": (f"/oem/{U2}.cpio.gz", "unsigned"),
            "garbage exp": (f"/oem/{U2}.cpio.gz?exp=soon&sig=00", "malformed"),
        }
        for name, (path, reason) in attempts.items():
            before = refused(reason)
            status, body = await _get(s, served.url + path)
            assert status == 403, (name, status)
            assert body not in (a1.archive, a2.archive) and WORKER_TOKEN.encode() not in body
            assert refused(reason) == before + 1, name
        assert served.counters.total("ignition_refused_total") == len(attempts)

        # the correct signed ignition URL for node 2 gives node 2's config
        good = served.artifacts.signed_url(served.url, "ignition", U2)
        status, body = await _get(s, good)
        assert status == 200 and body == a2.config
        assert hashlib.sha256(body).hexdigest() == a2.digest
        async with s.get(served.url + "/metrics") as resp:
            metrics = await resp.text()
        assert 'netboot_ignition_refused_total{reason="bad_signature"} 4' in metrics
    # nothing secret reached the log: not the token, not any signature
    text = caplog.text
    assert "refused oem for" in text
    assert WORKER_TOKEN not in text and MANAGER_TOKEN not in text
    for url in (own1, own2, good):
        assert url.split("sig=")[1] not in text


def tftp_fetch(server: tuple[str, int], name: str, source: str = "127.0.0.1") -> bytes | int:
    """A plain RFC 1350 client: the file's bytes, or the ERROR code the server sent."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.settimeout(3)
        sock.sendto(b"\0\1" + name.encode() + b"\0octet\0", server)
        data = bytearray()
        expect = 1
        while True:
            pkt, peer = sock.recvfrom(65536)
            op = struct.unpack("!H", pkt[:2])[0]
            if op == 5:
                return struct.unpack("!H", pkt[2:4])[0]
            assert op == 3, pkt[:4]
            block = struct.unpack("!H", pkt[2:4])[0]
            if block == expect:
                data += pkt[4:]
                expect += 1
            sock.sendto(struct.pack("!HH", 4, block), peer)
            if block == expect - 1 and len(pkt) - 4 < 512:
                return bytes(data)


async def test_tftp_oem_only_to_the_address_that_booted_as_the_node(served: Served) -> None:
    server = ("127.0.0.1", served.tftp.port)
    _dhcp_saw(served, M3, U3)  # the DHCP sighting pxelinux depends on

    async def fetch(name: str, src: str = "127.0.0.1") -> bytes | int:
        return await asyncio.to_thread(tftp_fetch, server, name, src)

    def refused() -> float:
        return served.counters.get("ignition_refused_total", reason="address")

    # nobody has booted yet: refused
    assert await fetch(f"oem/{U3}.cpio.gz") == 2
    assert refused() == 1
    # 127.0.0.1 boots as node 3 through pxelinux
    cfg = await fetch(f"pxelinux.cfg/01-{M3.replace(':', '-')}")
    assert isinstance(cfg, bytes)
    initrd = next(ln for ln in cfg.decode().splitlines() if ln.startswith("  INITRD "))
    oem = initrd.split(",")[-1]
    assert oem == f"oem/{U3}.cpio.gz"
    a3 = served.artifacts.issued(U3)
    assert a3 is not None and a3.archive is not None
    assert await fetch(oem) == a3.archive  # the right client gets it
    # forgotten (LRU eviction, no public path to force it): rendered again, same bytes
    served.artifacts._issued.clear()
    assert await fetch(oem) == a3.archive
    # another address asking for node 3's archive: access violation
    assert await fetch(oem, "127.0.0.2") == 2
    # node 3's address asking for another node's archive: access violation
    async with aiohttp.ClientSession() as s:
        await _script(s, served, M1, U1)  # node 1 booted (from 127.0.0.1 too, over HTTP) ...
    # ... which re-points 127.0.0.1 at node 1: now node 3's archive is refused to it
    assert await fetch(oem) == 2
    assert await fetch(f"oem/{U1}.cpio.gz") == served.artifacts.issued(U1).archive  # type: ignore[union-attr]
    assert await fetch(f"oem/{U2}.cpio.gz") == 2
    assert await fetch("oem/not-a-uuid.cpio.gz") == 1
    assert refused() == 4
    assert served.counters.get("ignition_served_total", kind="oem", transport="tftp") == 3


async def test_render_failure_moves_node_to_error(served: Served,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    async with aiohttp.ClientSession() as s:
        script = await _script(s, served, M4, U4)
    assert "NOT BOOTING" in script and "site setting ntp" in script
    node = served.registry.get(U4)
    assert node is not None and node.state == "error"
    assert "site setting ntp has an empty or spaced entry" in (node.reason or "")
    assert "not booting " + U4 in caplog.text and "site setting ntp" in caplog.text
    events = await served.registry.events(U4)
    # one write for the boot step: straight to 'error', from the boot script
    assert [e["state"] for e in events if e["kind"] == "state"][-1:] == ["error"]
    assert events[-1]["source"] == "ipxe"

    # the pxelinux path: the node asking for its config over TFTP ends in 'error' too
    mac5 = "52:54:00:10:00:05"
    uuid5 = "11111111-0000-4000-8000-000000000005"
    _dhcp_saw(served, mac5, uuid5)
    cfg = await asyncio.to_thread(tftp_fetch, ("127.0.0.1", served.tftp.port),
                                  f"pxelinux.cfg/01-{mac5.replace(':', '-')}")
    assert isinstance(cfg, bytes) and b"LOCALBOOT -1" in cfg and b"no-such-template" in cfg
    for _ in range(50):
        node = served.registry.get(uuid5)
        if node is not None and node.state == "error":
            break
        await asyncio.sleep(0.02)
    assert node is not None and node.state == "error" and "no-such-template" in (node.reason or "")
    # and a signed URL for a failed node serves nothing
    async with aiohttp.ClientSession() as s:
        status, body = await _get(s, served.artifacts.signed_url(served.url, "oem", U4))
    assert status == 503 and b"site setting ntp" in body


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "netboot", "render", *args, "--config",
                           str(config)], check=False, capture_output=True, timeout=60)


async def test_cli_render_gives_the_served_bytes(served: Served, tmp_path: Path) -> None:
    async with aiohttp.ClientSession() as s:
        script = await _script(s, served, M1, U1)
        _, archive = await _get(s, _local(_oem_url(script), served))
        _, config = await _get(s, served.artifacts.signed_url(served.url, "ignition", U1))
    assert config.startswith(b'{"ignition"')
    by_uuid = await asyncio.to_thread(_cli, served.config, "ignition", U1)
    assert by_uuid.returncode == 0, by_uuid.stderr
    assert by_uuid.stdout == config
    by_mac = await asyncio.to_thread(_cli, served.config, "ignition", M1.replace(":", "-"))
    assert by_mac.stdout == config
    out = tmp_path / "oem.cpio.gz"
    oem = await asyncio.to_thread(_cli, served.config, "oem", U1, "-o", str(out))
    assert oem.returncode == 0, oem.stderr
    assert out.read_bytes() == archive
    # a node that must not boot: the reason, exit 1, nothing on stdout
    bad = await asyncio.to_thread(_cli, served.config, "ignition", M4)
    assert bad.returncode == 1 and bad.stdout == b"" and b"site setting ntp" in bad.stderr
    unknown = await asyncio.to_thread(_cli, served.config, "ignition", "52:54:00:99:99:99")
    assert unknown.returncode == 1 and b"no UUID known" in unknown.stderr
