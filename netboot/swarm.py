"""Swarm facts from a manager's Docker Engine API socket, and a sweeper for stale nodes.

netboot renders each worker's join unit with the live join token and
manager address, so it asks a manager over its UNIX socket at render time
instead of having the admin copy tokens into config files that go stale.

Join tokens are secrets: nothing here logs them or puts them in an
exception message, and ``SwarmFacts.__repr__`` redacts them.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from typing import Any

import aiohttp

from netboot.ignition.render import SwarmFacts

__all__ = ["SWARM_PORT", "SwarmError", "read_swarm_facts", "sweep_down_nodes"]

log = logging.getLogger(__name__)

SWARM_PORT = 2377
MANAGER_HINT = "; is this node a swarm manager?"
_BASE = "http://docker"  # host part is ignored on a UNIX socket


class SwarmError(Exception):
    """The Docker socket could not tell us what a node needs to join."""


def _session(socket_path: str, timeout: float) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.UnixConnector(path=socket_path),
        timeout=aiohttp.ClientTimeout(total=timeout),
    )


async def _call(
    session: aiohttp.ClientSession, method: str, path: str, socket_path: str
) -> tuple[int, Any]:
    """(status, decoded JSON or None); connection trouble becomes a SwarmError."""
    try:
        async with session.request(method, _BASE + path) as resp:
            body = await resp.read()
            status = resp.status
    except (aiohttp.ClientConnectionError, OSError) as exc:
        raise SwarmError(
            f"cannot reach the Docker Engine API at unix://{socket_path} ({exc.__class__.__name__}:"
            f" {exc}); check that dockerd runs with that --host socket and that netboot may"
            " open it (root or the docker group)"
        ) from None
    except TimeoutError:
        raise SwarmError(
            f"the Docker Engine API at unix://{socket_path} did not answer {method} {path} in"
            " time; check that dockerd is healthy"
        ) from None
    try:
        data = json.loads(body) if body else None
    except ValueError:
        raise SwarmError(
            f"unix://{socket_path} answered {method} {path} with something other than JSON;"
            " is it really a Docker Engine API socket?"
        ) from None
    return status, data


async def _get(
    session: aiohttp.ClientSession, path: str, socket_path: str, want: type, hint: str = ""
) -> Any:
    """GET ``path`` expecting HTTP 200 and a JSON value of type ``want``."""
    status, data = await _call(session, "GET", path, socket_path)
    if status != 200 or not isinstance(data, want):
        raise SwarmError(
            f"GET {path} on unix://{socket_path} failed with HTTP {status}:"
            f" {_api_message(data)}{hint}"
        )
    return data


def _api_message(data: Any) -> str:
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        return data["message"]
    return "no message"


def _with_port(host: str, port: int = SWARM_PORT) -> str:
    """'10.0.0.1' -> '10.0.0.1:2377', '::1' -> '[::1]:2377'."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return f"{host}:{port}"
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _manager_addr(info: dict[str, Any], socket_path: str) -> str:
    """The address workers join: this manager's own entry in RemoteManagers, else NodeAddr."""
    swarm = info.get("Swarm") or {}
    node_id = swarm.get("NodeID")
    remotes = swarm.get("RemoteManagers") or []
    for remote in remotes:
        if remote.get("NodeID") == node_id and remote.get("Addr"):
            return str(remote["Addr"])
    if swarm.get("NodeAddr"):
        return _with_port(str(swarm["NodeAddr"]))
    for remote in remotes:
        if remote.get("Addr"):
            return str(remote["Addr"])
    raise SwarmError(
        f"the Docker Engine at unix://{socket_path} reports no manager address"
        " (Swarm.NodeAddr and Swarm.RemoteManagers are empty)"
    )


async def read_swarm_facts(socket_path: str, *, timeout: float = 10.0) -> SwarmFacts:
    """Join tokens (GET /swarm) and manager address (GET /info) from a manager's socket."""
    async with _session(socket_path, timeout) as session:
        info = await _get(session, "/info", socket_path, dict)
        swarm = info.get("Swarm") or {}
        state = swarm.get("LocalNodeState") or "unknown"
        if state != "active":
            raise SwarmError(
                f"the Docker Engine at unix://{socket_path} is not in a swarm (state {state!r});"
                " run `docker swarm init` on the first manager, or point netboot at a manager"
            )
        if not swarm.get("ControlAvailable"):
            raise SwarmError(
                f"the Docker Engine at unix://{socket_path} is a swarm worker; join tokens are"
                " only available from a manager's socket"
            )
        data = await _get(session, "/swarm", socket_path, dict, MANAGER_HINT)
        tokens = data.get("JoinTokens") or {}
        worker, manager = tokens.get("Worker"), tokens.get("Manager")
        if not (isinstance(worker, str) and worker and isinstance(manager, str) and manager):
            raise SwarmError(f"GET /swarm on unix://{socket_path} returned no JoinTokens")
        facts = SwarmFacts(
            manager_addr=_manager_addr(info, socket_path),
            worker_token=worker,
            manager_token=manager,
        )
    log.info("read swarm facts from unix://%s: manager %s", socket_path, facts.manager_addr)
    return facts


def _node_hostname(node: dict[str, Any]) -> str | None:
    return (node.get("Description") or {}).get("Hostname")


def _node_state(node: dict[str, Any]) -> str | None:
    return (node.get("Status") or {}).get("State")


async def sweep_down_nodes(
    socket_path: str, hostnames_rebooted: set[str], *, timeout: float = 10.0
) -> list[str]:
    """Remove down nodes that came back under a new node ID; return the removed IDs.

    A diskless node netbooted again joins as a new node, and the manager
    keeps listing its old identity as down forever. An old entry is removed
    only when netboot re-booted that hostname and another node with the same
    hostname is ready now; managers are left alone (removing one needs a
    demotion decided by a human).
    """
    removed: list[str] = []
    async with _session(socket_path, timeout) as session:
        nodes = await _get(session, "/nodes", socket_path, list, MANAGER_HINT)
        ready = {
            _node_hostname(n) for n in nodes if isinstance(n, dict) and _node_state(n) == "ready"
        }
        for node in sorted(
            (n for n in nodes if isinstance(n, dict)), key=lambda n: str(n.get("ID"))
        ):
            host = _node_hostname(node)
            node_id = node.get("ID")
            if not isinstance(node_id, str) or _node_state(node) != "down":
                continue
            if host not in hostnames_rebooted or host not in ready:
                continue
            if node.get("ManagerStatus") or (node.get("Spec") or {}).get("Role") == "manager":
                log.warning("swarm node %s (%s) is a down manager; not removing it", node_id, host)
                continue
            status, data = await _call(session, "DELETE", f"/nodes/{node_id}", socket_path)
            if status in (200, 204):
                log.info("removed down swarm node %s (%s), re-booted as a new node", node_id, host)
                removed.append(node_id)
            else:
                log.warning(
                    "could not remove down swarm node %s (%s): HTTP %s: %s",
                    node_id, host, status, _api_message(data),
                )
    return removed
