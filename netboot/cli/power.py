"""``netboot power``: power nodes on, off or cycle through their BMCs, from a terminal.

Nodes are named by UUID, MAC, hostname or serial, or chosen by ``--label`` or
``--state``; more than one node goes through the server's staggered bulk job
(``bmc.stagger_concurrency`` at a time, ``bmc.stagger_delay`` seconds apart, so
a rack does not draw its inrush at once), with a line of progress per node.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, TextIO

from .nodes import (
    DEFAULT_URL,
    CliError,
    _request,
    _run,
    default_token,
    list_nodes,
    resolve_node,
)

ACTIONS = ("on", "off", "soft", "cycle")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    power = subparsers.add_parser(
        "power", help="power nodes on, off, soft-off or cycle; show power state",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    power.add_argument("action", choices=(*ACTIONS, "status"),
                       help="on, off (hard), soft (ACPI shutdown), cycle, or status")
    power.add_argument("nodes", nargs="*", metavar="NODE",
                       help="UUID, MAC, hostname or serial (or use --label / --state)")
    power.add_argument("--label", help="every node with this label (key=value)")
    power.add_argument("--state", help="every node in this lifecycle state")
    power.add_argument("--boot", choices=("network", "disk"),
                       help="boot device, set before powering: the next boot only")
    power.add_argument("--persistent", action="store_true",
                       help="with --boot: every boot from now on, not just the next")
    power.add_argument("--concurrency", type=int, help="bulk: nodes at once "
                       "(default: the server's bmc.stagger_concurrency)")
    power.add_argument("--delay", type=float, help="bulk: seconds between starts "
                       "(default: the server's bmc.stagger_delay)")
    power.add_argument("--url", default=DEFAULT_URL, help=f"netboot HTTP address ({DEFAULT_URL})")
    power.add_argument("--token", default=default_token(),
                       help="operator or admin token (default: $NETBOOT_TOKEN, else "
                       "$NETBOOT_ADMIN_TOKEN)")
    power.add_argument("--color", default="never", help=argparse.SUPPRESS)
    power.set_defaults(func=cmd_power)
    return power


@_run
def cmd_power(args: argparse.Namespace, out: TextIO) -> int:
    if not args.nodes and not args.label and not args.state:
        raise CliError("name the nodes (UUID, MAC, hostname or serial), or give --label or "
                       "--state")
    if args.action == "status":
        return _status(args, out)
    if len(args.nodes) == 1 and not args.label and not args.state:
        node = resolve_node(args, args.nodes[0])
        r = _request(args, "POST", f"/api/v1/nodes/{node['uuid']}/power",
                     body={"action": args.action, "boot": args.boot,
                           "persistent": args.persistent})
        print(f"{_name(node)}: {args.action} accepted; power {r['power']['state']}", file=out)
        return 0
    body: dict[str, Any] = {"action": args.action, "boot": args.boot,
                            "concurrency": args.concurrency, "delay": args.delay}
    if args.nodes:
        body["uuids"] = [resolve_node(args, n)["uuid"] for n in args.nodes]
    body["label"], body["state"] = args.label, args.state
    job = _request(args, "POST", "/api/v1/power", body={k: v for k, v in body.items()
                                                          if v is not None})
    print(f"power {args.action}: {job['total']} node(s), job {job['id']}", file=out, flush=True)
    reported: set[str] = set()
    while True:
        for item in job["items"]:
            if item["ok"] is not None and item["uuid"] not in reported:
                reported.add(item["uuid"])
                print(f"  [{len(reported)}/{job['total']}] {item['uuid']}: "
                      f"{'ok' if item['ok'] else 'FAILED: ' + (item['reason'] or '?')}",
                      file=out, flush=True)
        if job["finished"]:
            break
        time.sleep(0.5)
        job = _request(args, "GET", f"/api/v1/power/jobs/{job['id']}")
    print(f"done: {job['total'] - job['failed']} ok, {job['failed']} failed", file=out)
    return 1 if job["failed"] else 0


def _status(args: argparse.Namespace, out: TextIO) -> int:
    if args.nodes:
        nodes = [resolve_node(args, n) for n in args.nodes]
    else:
        nodes, _, _ = list_nodes(args, {"label": args.label, "state": args.state})
    unknown = 0
    for n in nodes:
        p = n["power"]
        unknown += p["state"] == "unknown"
        why = f" ({p['reason']})" if p.get("reason") else ""
        print(f"{_name(n):<38} {p['state']:<8}{why}", file=out)
    return 1 if unknown else 0


def _name(node: dict[str, Any]) -> str:
    return node.get("hostname") or node["uuid"]
