"""``netboot nodes`` CLI against a real API server."""

from __future__ import annotations

import argparse
import asyncio
import re
from pathlib import Path

import pytest

from netboot.cli.nodes import add_parser, resolve_node, table
from tests.nodes import observe, populate, transition, uuid_of
from tests.test_api import ADMIN, U1, U2, Served, serve_registry

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="netboot")
    add_parser(ap.add_subparsers(dest="command", required=True))
    return ap.parse_args(argv)


async def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    args = _parse(argv)
    rc = await asyncio.to_thread(args.func, args)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
async def srv(tmp_path: Path) -> Served:
    async with serve_registry(tmp_path) as s:
        await observe(s.registry, U1, mac="52:54:00:00:00:01", address="10.0.0.7", source="dhcp",
                                 serial="SN-LONG-SERIAL-1", vendor="Dell Inc.", hostname="db1")
        await observe(s.registry, U2, mac=None, address="10.0.0.8", source="dhcp")
        await transition(s.registry, U1, "installed", source="t")
        await transition(s.registry, U2, "error", source="t", reason="no disk")
        yield s


async def test_list_is_aligned_and_coloured_on_request(srv: Served, capsys) -> None:
    rc, out, _ = await _run(["nodes", "list", "--url", srv.url], capsys)
    assert rc == 0 and "\x1b[" not in out  # not a tty
    lines = out.splitlines()
    assert lines[0].startswith("UUID") and "STATE" in lines[0]
    col = lines[0].index("STATE")
    assert lines[1][col:].startswith("installed") and lines[2][col:].startswith("error")
    assert "2 nodes: 1 installed, 1 error" in out

    rc, out, _ = await _run(["nodes", "list", "--url", srv.url, "--color", "always",
                             "--state", "error"], capsys)
    assert "\x1b[31merror" in out and U1 not in out
    plain = ANSI.sub("", out).splitlines()
    assert plain[1][plain[0].index("STATE"):].startswith("error")


async def test_list_follows_the_cursors_and_names_resolve(srv: Served, capsys) -> None:
    await populate(srv.registry, 1200)  # more than one request's page (1000)
    rc, out, _ = await _run(["nodes", "list", "--url", srv.url], capsys)
    assert rc == 0 and out.count("\n10000000-0000-0000-0000-") == 1200
    assert U1 in out and U2 in out and "1202 nodes" in out and "shown" not in out
    rc, out, _ = await _run(["nodes", "list", "--url", srv.url, "--limit", "5"], capsys)
    assert out.count("\n10000000-0000-0000-0000-") == 3 and U1 in out and U2 in out
    assert "the first 5 shown" in out
    rc, out, _ = await _run(["nodes", "list", "--url", srv.url, "-q", "sn-01199"], capsys)
    assert uuid_of(1199) in out and "1202 nodes" in out and uuid_of(1198) not in out
    args = _parse(["nodes", "list", "--url", srv.url])
    for name in ("SN-01150", "node1150.lab", "52-54-00-00-04-7E", uuid_of(1150).upper()):
        assert (await asyncio.to_thread(resolve_node, args, name))["uuid"] == uuid_of(1150), name
    with pytest.raises(SystemExit):
        _parse(["nodes", "list", "--limit", "0"])
    assert "not a whole number above 0" in capsys.readouterr().err


async def test_show_rearm_forget(srv: Served, capsys, monkeypatch) -> None:
    rc, out, _ = await _run(["nodes", "show", U1, "--url", srv.url], capsys)
    assert rc == 0 and "SN-LONG-SERIAL-1" in out
    assert re.search(r"^armed: +no$", out, re.MULTILINE)
    assert "discovered -> installed" in out

    rc, _, err = await _run(["nodes", "rearm", U1, "--url", srv.url, "--token", ""], capsys)
    assert rc == 1 and "admin token" in err
    rc, _, err = await _run(["nodes", "rearm", U1, "--url", srv.url, "--token", "bad"], capsys)
    assert rc == 1 and "HTTP 401" in err
    monkeypatch.setenv("NETBOOT_ADMIN_TOKEN", ADMIN)
    rc, out, _ = await _run(["nodes", "rearm", U1, "--url", srv.url], capsys)
    assert rc == 0 and "re-armed" in out and srv.registry.get(U1).armed

    rc, out, _ = await _run(["nodes", "forget", U2, "--url", srv.url], capsys)
    assert rc == 0 and srv.registry.get(U2) is None
    rc, _, err = await _run(["nodes", "show", U2, "--url", srv.url], capsys)
    assert rc == 1 and "HTTP 404" in err


async def test_unreachable_server(capsys) -> None:
    rc, _, err = await _run(["nodes", "list", "--url", "http://127.0.0.1:9"], capsys)
    assert rc == 1 and "cannot reach netboot" in err


def test_table_pads_before_colouring() -> None:
    nodes = [{"uuid": "u1", "state": "deploying", "stuck": True, "time_in_state": 4000},
             {"uuid": "u2", "state": "installed", "time_in_state": 5}]
    lines = ANSI.sub("", table(nodes, colour=True)).splitlines()
    assert len({len(line.rstrip()) for line in lines[1:]}) == 1
    assert "deploying STUCK" in lines[1] and "1h 6m" in lines[1]
