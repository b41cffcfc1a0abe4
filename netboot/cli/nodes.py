"""``netboot nodes``: the registry from a terminal, through the admin API.

It talks HTTP (stdlib urllib, no event loop) rather than opening the SQLite
file, so it works from another host and never races the server's writer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any, TextIO

from ..identity import IdentityError, normalise_mac, normalise_uuid
from ..util.text import human_duration

DEFAULT_URL = "http://127.0.0.1:8080"
STATE_COLOURS = {"discovered": "90", "commissioning": "35", "ready": "36", "booting": "34",
                 "deploying": "33", "installed": "32", "error": "31"}
#: nodes per request when following the API's cursors (its maximum)
PAGE = 1000
COLUMNS = ("UUID", "HOSTNAME", "SERIAL", "VENDOR", "PRODUCT", "PROFILE", "ADDRESS", "STATE",
           "IN STATE", "BOOTS")


class CliError(Exception):
    pass


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``nodes list|show|rearm|forget|deploy``; each handler returns an exit code."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=DEFAULT_URL, help=f"netboot HTTP address ({DEFAULT_URL})")
    common.add_argument("--token", default=default_token(),
                        help="API token for changes (default: $NETBOOT_TOKEN, else "
                        "$NETBOOT_ADMIN_TOKEN); operator or admin role")
    common.add_argument("--color", "--colour", choices=("auto", "always", "never"),
                        default="auto", help="colour states (auto: only on a terminal)")
    nodes = subparsers.add_parser("nodes", help="list, show, deploy, re-arm or forget nodes",
                                  description=__doc__.splitlines()[0])
    sub = nodes.add_subparsers(dest="nodes_command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", parents=[common], help="table of nodes")
    p.add_argument("--state", help="only nodes in this state")
    p.add_argument("--profile", help="only nodes with this profile")
    p.add_argument("--label", help="only nodes with label key=value")
    p.add_argument("--search", "-q", help="only nodes whose serial, hostname or a MAC "
                   "contains this (any case)")
    p.add_argument("--limit", type=_positive, help="at most this many nodes (default: all, "
                   f"fetched {PAGE} a request)")
    p.add_argument("--json", action="store_true",
                   help="print the nodes and counts as JSON (the API's fields)")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", parents=[common], help="one node with its events")
    p.add_argument("uuid")
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("rearm", parents=[common],
                       help="let a 'boot: once' node install again at its next boot")
    p.add_argument("uuid")
    p.set_defaults(func=cmd_rearm)

    p = sub.add_parser("forget", parents=[common], help="delete a node and its history")
    p.add_argument("uuid")
    p.set_defaults(func=cmd_forget)

    p = sub.add_parser(
        "deploy", parents=[common], help="boot a profile now and follow the node to installed",
        description="Set the node's profile, next boot to the network, power it on through "
        "its BMC (or cycle it if it is on), then follow it until it is installed, failed, "
        "or --timeout runs out, printing each state it passes through.")
    p.add_argument("node", help="UUID, MAC, hostname or serial")
    p.add_argument("--profile", required=True, help="profile to boot (see: netboot check)")
    p.add_argument("--timeout", type=float, default=1800,
                   help="seconds to follow it (default 1800; 0: do not follow)")
    p.add_argument("--every", type=float, default=2.0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_deploy)
    return nodes


# -- HTTP -----------------------------------------------------------------------------

def _request(args: argparse.Namespace, method: str, path: str, body: Any = None,
             query: dict[str, str | None] | None = None) -> Any:
    url = args.url.rstrip("/") + path
    q = {k: v for k, v in (query or {}).items() if v}
    if q:
        url += "?" + urllib.parse.urlencode(q)
    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if method != "GET":
        if not args.token:
            raise CliError("this needs an operator or admin token: --token, $NETBOOT_TOKEN "
                           "or $NETBOOT_ADMIN_TOKEN (admin token: api.admin_token)")
        headers["Authorization"] = f"Bearer {args.token}"
    elif args.token:
        headers["Authorization"] = f"Bearer {args.token}"  # reads, when open_reads is off
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)
    except urllib.error.HTTPError as exc:
        try:
            message = json.load(exc).get("error", "")
        except (ValueError, AttributeError):
            message = ""
        raise CliError(f"{method} {path}: HTTP {exc.code}: {message or exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CliError(f"cannot reach netboot at {args.url}: {reason}") from None


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number above 0")
    return n


def list_nodes(args: argparse.Namespace, query: dict[str, str | None],
               limit: int | None = None) -> tuple[list[dict[str, Any]], dict[str, int], bool]:
    """The nodes ``query`` matches, following ``next_cursor`` page by page (the first
    ``limit`` only, when given): (nodes, counts per state, whether more were left)."""
    nodes: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        want = PAGE if limit is None else min(PAGE, limit - len(nodes))
        data = _request(args, "GET", "/api/v1/nodes",
                        query={**query, "limit": str(want), "cursor": cursor})
        nodes += data["nodes"]
        cursor = data.get("next_cursor")
        if cursor is None or (limit is not None and len(nodes) >= limit):
            return nodes, data["counts"], cursor is not None


def default_token() -> str | None:
    return os.environ.get("NETBOOT_TOKEN") or os.environ.get("NETBOOT_ADMIN_TOKEN")


def resolve_node(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """The node a UUID, MAC, hostname or serial names (exactly one, or CliError)."""
    want = name.strip().lower()
    try:
        uuid = normalise_uuid(want)
    except IdentityError:
        pass
    else:
        return dict(_request(args, "GET", f"/api/v1/nodes/{uuid}"))
    try:
        mac: str | None = normalise_mac(want)
    except IdentityError:
        mac = None
    # the API's search narrows it down (substring); the name must match exactly
    nodes, _, _ = list_nodes(args, {"q": mac or want})
    hits = [n for n in nodes if mac in n.get("macs", [])
            or want == (n.get("hostname") or "").lower()
            or want == (n.get("serial") or "").lower()]
    if not hits:
        raise CliError(f"no node {name!r} (by UUID, MAC, hostname or serial); "
                       "netboot nodes list shows them")
    if len(hits) > 1:
        raise CliError(f"{name!r} names {len(hits)} nodes: " + ", ".join(
            n["uuid"] for n in hits) + "; give a UUID")
    return hits[0]


def _run(fn: Any) -> Any:
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return fn(args, sys.stdout)
        except CliError as exc:
            print(f"netboot {getattr(args, 'command', None) or 'nodes'}: {exc}",
                  file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


# -- formatting ------------------------------------------------------------------------

def _use_colour(args: argparse.Namespace, out: TextIO) -> bool:
    if args.color == "always":
        return True
    if args.color == "never" or os.environ.get("NO_COLOR"):
        return False
    return out.isatty()


def paint(text: str, state: str, colour: bool) -> str:
    code = STATE_COLOURS.get(state)
    return f"\x1b[{code}m{text}\x1b[0m" if colour and code else text


def table(nodes: Sequence[dict[str, Any]], colour: bool) -> str:
    """Aligned columns; the state is padded before it is coloured so ANSI codes don't skew."""
    rows = []
    for n in nodes:
        state = n["state"] + (" STUCK" if n.get("stuck") else "")
        rows.append([n["uuid"], n.get("hostname") or "-", n.get("serial") or "-",
                     n.get("vendor") or "-", n.get("product") or "-", n.get("profile") or "-",
                     n.get("address") or "-", state, human_duration(n.get("time_in_state", 0)),
                     str(n.get("boot_count", 0))])
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(COLUMNS)]
    si = COLUMNS.index("STATE")
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)).rstrip()]
    for r, n in zip(rows, nodes):
        cells = [c.rjust(w) if i >= si + 1 else c.ljust(w)
                 for i, (c, w) in enumerate(zip(r, widths))]
        cells[si] = paint(cells[si], n["state"], colour)
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _ts(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


# -- commands --------------------------------------------------------------------------

@_run
def cmd_list(args: argparse.Namespace, out: TextIO) -> int:
    """Print the node table and a per-state summary."""
    nodes, counts, more = list_nodes(
        args, {"state": args.state, "profile": args.profile, "label": args.label,
               "q": args.search}, args.limit)
    if args.json:
        print(json.dumps({"nodes": nodes, "counts": counts, "more": more}, indent=2), file=out)
        return 0
    colour = _use_colour(args, out)
    if nodes:
        print(table(nodes, colour), file=out)
    else:
        print("no nodes", file=out)
    summary = ", ".join(paint(f"{n} {s}", s, colour) for s, n in counts.items() if n)
    print(f"\n{sum(counts.values())} nodes" + (f": {summary}" if summary else ""), file=out)
    if more:
        print(f"(the first {len(nodes)} shown: a larger --limit, or none, shows more)",
              file=out)
    return 0


@_run
def cmd_show(args: argparse.Namespace, out: TextIO) -> int:
    """Print one node's fields and its event history."""
    n = _request(args, "GET", f"/api/v1/nodes/{args.uuid}")
    if args.json:
        print(json.dumps(n, indent=2), file=out)
        return 0
    colour = _use_colour(args, out)
    state = paint(n["state"], n["state"], colour) + (" (stuck)" if n.get("stuck") else "")
    if n.get("reason"):
        state += f": {n['reason']}"
    fields = [("uuid", n["uuid"]), ("state", f"{state}, for {human_duration(n['time_in_state'])}"),
              ("hostname", n.get("hostname")), ("serial", n.get("serial")),
              ("vendor", n.get("vendor")), ("product", n.get("product")),
              ("asset", n.get("asset")), ("macs", ", ".join(n.get("macs", []))),
              ("address", n.get("address")), ("profile", n.get("profile")),
              ("labels", ", ".join(f"{k}={v}" for k, v in sorted(n["labels"].items()))),
              ("armed", "yes" if n["armed"] else "no"), ("boots", str(n["boot_count"])),
              ("first seen", _ts(n["first_seen"])), ("last seen", _ts(n["last_seen"]))]
    for k, v in fields:
        print(f"{k + ':':<12} {v or '-'}", file=out)
    print("\nevents:", file=out)
    for e in n.get("events", []):
        st = e.get("state") or ""
        change = f"{e['from']} -> {st}" if e.get("from") else st
        change = change.replace(st, paint(st, st, colour)) if st else change
        extra = "  ".join(x for x in (e.get("source"), e.get("address"), e.get("detail")) if x)
        print(f"  {_ts(e['time'])}  {e['kind']:<10} {change}  {extra}".rstrip(), file=out)
    return 0


@_run
def cmd_rearm(args: argparse.Namespace, out: TextIO) -> int:
    """Re-arm: a 'boot: once' node runs its profile again at the next boot."""
    n = _request(args, "PATCH", f"/api/v1/nodes/{args.uuid}", body={"rearm": True})
    print(f"{n['uuid']} re-armed (state {n['state']}): it installs again at its next boot",
          file=out)
    return 0


@_run
def cmd_forget(args: argparse.Namespace, out: TextIO) -> int:
    """Delete the node and its history; it reappears as new at its next contact."""
    n = _request(args, "DELETE", f"/api/v1/nodes/{args.uuid}")
    print(f"{n['deleted']} forgotten", file=out)
    return 0


@_run
def cmd_deploy(args: argparse.Namespace, out: TextIO) -> int:
    """Deploy a profile and follow the node: exit 0 installed, 1 error or timeout."""
    node = resolve_node(args, args.node)
    uuid = node["uuid"]
    n = _request(args, "POST", f"/api/v1/nodes/{uuid}/deploy", body={"profile": args.profile})
    print(f"{uuid}: deploying profile {args.profile}; powered "
          f"{'on' if n['power']['state'] != 'on' else 'on (cycled)'} to boot from the network",
          file=out, flush=True)
    if args.timeout <= 0:
        return 0
    colour = _use_colour(args, out)
    deadline = time.monotonic() + args.timeout
    seen = None
    start = time.monotonic()
    while time.monotonic() < deadline:
        n = _request(args, "GET", f"/api/v1/nodes/{uuid}")
        boots = n["boot_count"]
        if n["state"] != seen or seen is None:
            seen = n["state"]
            print(f"  {time.monotonic() - start:6.0f}s  {paint(seen, seen, colour)}"
                  + (f": {n['reason']}" if n.get("reason") else ""), file=out, flush=True)
        if boots > node["boot_count"] and seen in ("installed", "error"):
            return 0 if seen == "installed" else 1
        time.sleep(args.every)
    print(f"netboot nodes: {uuid} is still {seen} after {args.timeout:.0f}s "
          "(netboot nodes show it; is it stuck?)", file=sys.stderr)
    return 1
