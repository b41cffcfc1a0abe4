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

from ..util.text import human_duration

DEFAULT_URL = "http://127.0.0.1:8080"
STATE_COLOURS = {"discovered": "90", "booting": "34", "deploying": "33", "installed": "32",
                 "error": "31"}
COLUMNS = ("UUID", "HOSTNAME", "SERIAL", "VENDOR", "PRODUCT", "PROFILE", "ADDRESS", "STATE",
           "IN STATE", "BOOTS")


class CliError(Exception):
    pass


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``nodes list|show|rearm|forget``; each handler returns an exit code."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=DEFAULT_URL, help=f"netboot HTTP address ({DEFAULT_URL})")
    common.add_argument("--token", default=os.environ.get("NETBOOT_ADMIN_TOKEN"),
                        help="admin token for changes (default: $NETBOOT_ADMIN_TOKEN)")
    common.add_argument("--color", "--colour", choices=("auto", "always", "never"),
                        default="auto", help="colour states (auto: only on a terminal)")
    nodes = subparsers.add_parser("nodes", help="list, show, re-arm or forget nodes",
                                  description=__doc__.splitlines()[0])
    sub = nodes.add_subparsers(dest="nodes_command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", parents=[common], help="table of nodes")
    p.add_argument("--state", help="only nodes in this state")
    p.add_argument("--profile", help="only nodes with this profile")
    p.add_argument("--label", help="only nodes with label key=value")
    p.add_argument("--json", action="store_true", help="print the API's JSON")
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
            raise CliError("this needs the admin token: --token or $NETBOOT_ADMIN_TOKEN")
        headers["Authorization"] = f"Bearer {args.token}"
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


def _run(fn: Any) -> Any:
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return fn(args, sys.stdout)
        except CliError as exc:
            print(f"netboot nodes: {exc}", file=sys.stderr)
            return 1
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
    data = _request(args, "GET", "/api/v1/nodes",
                    query={"state": args.state, "profile": args.profile, "label": args.label})
    if args.json:
        print(json.dumps(data, indent=2), file=out)
        return 0
    colour = _use_colour(args, out)
    if data["nodes"]:
        print(table(data["nodes"], colour), file=out)
    else:
        print("no nodes", file=out)
    summary = ", ".join(paint(f"{n} {s}", s, colour) for s, n in data["counts"].items() if n)
    print(f"\n{sum(data['counts'].values())} nodes" + (f": {summary}" if summary else ""),
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


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry (``python -m netboot.cli.nodes nodes list``), for before cli.py wires it."""
    ap = argparse.ArgumentParser(prog="netboot")
    add_parser(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
