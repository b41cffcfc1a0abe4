"""Docker socket error paths that need no root; the real swarm is in test_swarm_lab.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from netboot.swarm import SwarmError, _manager_addr, read_swarm_facts


async def test_unreachable_socket_message(tmp_path: Path) -> None:
    with pytest.raises(SwarmError, match="cannot reach the Docker Engine API.*check that dockerd"):
        await read_swarm_facts(str(tmp_path / "nope.sock"), timeout=5)


async def test_not_a_docker_socket(tmp_path: Path) -> None:
    """A UNIX socket that speaks HTTP but not the Engine API is named as such."""
    sock = tmp_path / "x.sock"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(handle, path=str(sock))
    async with server:
        with pytest.raises(SwarmError, match="not JSON|other than JSON"):
            await read_swarm_facts(str(sock), timeout=5)


def test_manager_addr_prefers_own_remote_manager_entry() -> None:
    info = {"Swarm": {"NodeID": "b", "NodeAddr": "10.0.0.2",
                      "RemoteManagers": [{"NodeID": "a", "Addr": "10.0.0.1:2377"},
                                         {"NodeID": "b", "Addr": "10.0.0.2:4000"}]}}
    assert _manager_addr(info, "s") == "10.0.0.2:4000"
    assert _manager_addr({"Swarm": {"NodeAddr": "fd00::2"}}, "s") == "[fd00::2]:2377"
    with pytest.raises(SwarmError, match="no manager address"):
        _manager_addr({"Swarm": {}}, "s")
