"""Registry HTTP API against a real aiohttp server on 127.0.0.1."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from netboot.http.app import all_routes
from netboot.storage.registry import Registry
from tests.nodes import observe, patch, populate, transition, uuid_of
from tests.served import SECRET, Served, serving, write_config

ADMIN = "s3cret-admin"
VIEWER = "viewer-token-0123456789"
OPERATOR = "operator-token-0123456789"
U1 = "4c4c4544-0042-3510-8052-b4c04f384d32"
U2 = "00000000-0000-0000-0000-0000000000b2"
ROOT = Path(__file__).resolve().parent.parent


@asynccontextmanager
async def serve_registry(data_dir: Path, *, admin_token: str | None = ADMIN,
                         profiles: dict[str, Any] | None = None,
                         settings: dict[str, Any] | None = None,
                         **kw: Any) -> AsyncIterator[Served]:
    """A real netboot (registry, API, dashboard) on an ephemeral 127.0.0.1 port, with its
    data in ``data_dir`` (``settings``: more of netboot.yaml, e.g. a registry url);
    shared by the other test files."""
    config = write_config(data_dir / "config", data_dir, profiles, **(settings or {}))
    kw.setdefault("tokens", {VIEWER: ("watcher", "viewer"), OPERATOR: ("ops", "operator")})
    async with serving(config, secret=SECRET, admin_token=admin_token, **kw) as served:
        yield served


@pytest.fixture
async def srv(tmp_path: Path) -> AsyncIterator[Served]:
    async with serve_registry(tmp_path, profiles={"coreos": {"kernel": "fcos/vmlinuz",
                                                             "boot": "once"}}) as s:
        yield s


async def _call(method: str, url: str, **kw: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.request(method, url, **kw) as r:
        body = await r.json() if r.content_type == "application/json" else await r.text()
        return r.status, body


async def test_node_reports_for_itself(srv: Served) -> None:
    reg = srv.registry
    await observe(reg, U1, mac="52:54:00:00:00:01", address="10.0.0.7", source="dhcp",
                      profile="coreos", hostname="db1")
    await patch(reg, U1, labels={"rack": "r1"})
    tok = reg.node_token(U1)
    base = f"{srv.url}/api/v1/nodes/{U1}"

    st, body = await _call("GET", f"{base}/profile?token={tok}")
    assert st == 200 and body["uuid"] == U1 and body["name"] == "coreos"
    assert body["profile"]["kernel"] == "fcos/vmlinuz" and body["profile"]["boot"] == "once"
    st, body = await _call("GET", f"{base}/detail", headers={"X-Node-Token": tok})
    assert st == 200 and body == {"uuid": U1, "address": "10.0.0.7", "hostname": "db1",
                                  "labels": {"rack": "r1"}}

    st, body = await _call("POST", f"{base}/register?token={tok}",
                           json={"serial": "SN-9", "vendor": "Dell Inc.",
                                 "mac": "52-54-00-00-00-02"})
    assert st == 200 and body["serial"] == "SN-9"
    assert body["macs"] == ["52:54:00:00:00:01", "52:54:00:00:00:02"]
    assert body["address"] == "127.0.0.1"  # the request's source address

    st, body = await _call("POST", f"{base}/installed?token={tok}")
    assert st == 200 and body["state"] == "installed" and body["armed"] is False
    st, body = await _call("POST", f"{base}/failed?token={tok}",
                           data={"reason": "grub-install: disk /dev/sda not found"})
    assert st == 200 and body["state"] == "error"
    assert body["reason"] == "grub-install: disk /dev/sda not found"
    st, body = await _call("POST", f"{base}/failed?token={tok}", json={"reason": "x" * 3000})
    assert st == 400 and "reason" in body["error"]

    st, body = await _call("GET", base)
    assert st == 200
    assert [e["kind"] for e in body["events"]] == ["discovered", "patch", "state", "state"]
    assert body["events"][-1]["detail"] == "grub-install: disk /dev/sda not found"
    assert body["events"][-1]["source"] == "api"


async def test_node_token_is_for_that_node_only(srv: Served) -> None:
    reg = srv.registry
    await observe(reg, U1, mac=None, address=None, source="t")
    await observe(reg, U2, mac=None, address=None, source="t")
    tok1 = reg.node_token(U1)
    for method, path in [("GET", "profile"), ("GET", "detail"), ("POST", "register"),
                         ("POST", "installed"), ("POST", "failed")]:
        url = f"{srv.url}/api/v1/nodes/{U2}/{path}"
        st, body = await _call(method, f"{url}?token={tok1}")
        assert st == 403, (path, body)
        st, body = await _call(method, url, headers={"X-Node-Token": tok1})
        assert st == 403, (path, body)
        st, body = await _call(method, url)
        assert st == 401 and "token" in body["error"]
    assert reg.get(U2).state == "discovered"


async def test_admin_changes_need_the_token(srv: Served) -> None:
    await observe(srv.registry, U1, mac=None, address=None, source="t")
    url = f"{srv.url}/api/v1/nodes/{U1}"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN},
                    {"Authorization": f"Basic {ADMIN}"}):
        st, body = await _call("PATCH", url, json={"rearm": True}, headers=headers)
        assert st == 401, headers
        st, body = await _call("DELETE", url, headers=headers)
        assert st == 401, headers
    auth = {"Authorization": f"Bearer {ADMIN}"}
    st, body = await _call("PATCH", url, json={"labels": {"rack": "r9"}, "hostname": "web1",
                                               "profile": "coreos", "rearm": True}, headers=auth)
    assert st == 200 and body["labels"] == {"rack": "r9"} and body["hostname"] == "web1"
    st, body = await _call("PATCH", url, json={"labels": ["no"]}, headers=auth)
    assert st == 400 and body["error"].startswith("invalid request body: labels")
    st, body = await _call("PATCH", url, json={"colour": "red"}, headers=auth)
    assert st == 400 and "colour" in body["error"]
    st, body = await _call("PATCH", url, data="{not json", headers={
        **auth, "Content-Type": "application/json"})
    assert st == 400 and "not JSON" in body["error"]
    st, body = await _call("PATCH", f"{srv.url}/api/v1/nodes/nope", json={}, headers=auth)
    assert st == 400 and "UUID" in body["error"]
    st, body = await _call("PATCH", f"{srv.url}/api/v1/nodes/{U2}", json={}, headers=auth)
    assert st == 404
    st, body = await _call("DELETE", url, headers=auth)
    assert st == 200 and body == {"deleted": U1}
    st, body = await _call("GET", url)
    assert st == 404


async def test_without_admin_token_every_change_is_refused(tmp_path: Path) -> None:
    async with serve_registry(tmp_path, admin_token=None, tokens={}) as srv:
        await observe(srv.registry, U1, mac=None, address=None, source="t")
        url = f"{srv.url}/api/v1/nodes/{U1}"
        for method in ("PATCH", "DELETE"):
            for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer None"}):
                st, body = await _call(method, url, json={"rearm": True}, headers=headers)
                assert st == 401 and "admin_token" in body["error"]
        assert srv.registry.get(U1) is not None
        st, _ = await _call("GET", url)
        assert st == 200  # reads stay open


TOKEN_ROUTES = [r for r in all_routes() if r.auth in ("operator", "admin")]


@pytest.mark.parametrize("route", TOKEN_ROUTES, ids=lambda r: f"{r.method} {r.path}")
async def test_every_token_route_refuses_a_missing_or_weaker_token(srv: Served,
                                                                    route: Any) -> None:
    """Driven by the route table: a route declared 'operator' or 'admin' is refused without
    a token (401), with an unknown one (401) and with one of a lower role (403), whatever
    its handler does, and changes nothing."""
    await observe(srv.registry, U1, mac=None, address=None, source="t")
    before = srv.registry.get(U1)
    url = srv.url + route.path.replace("{uuid}", U1)
    weaker = VIEWER if route.auth == "operator" else OPERATOR
    for headers, status in (({}, 401), ({"Authorization": "Bearer wrong"}, 401),
                            ({"Authorization": f"Bearer {weaker}"}, 403)):
        st, body = await _call(route.method, url, json={"rearm": True}, headers=headers)
        assert st == status and "token" in body["error"], (route.path, st, body)
    assert srv.registry.get(U1) == before


def test_the_route_table_declares_who_may_change_what() -> None:
    declared = {(r.method, r.path): r.auth for r in all_routes()}
    assert declared[("PATCH", "/api/v1/nodes/{uuid}")] == "operator"
    assert declared[("DELETE", "/api/v1/nodes/{uuid}")] == "admin"
    # every changing request is a node's own report, or needs a token with a role
    for r in all_routes():
        if r.method not in ("GET", "HEAD"):
            assert r.auth in ("operator", "admin", "node"), (r.method, r.path)


async def test_changes_are_audited_with_their_actor(srv: Served) -> None:
    await observe(srv.registry, U1, mac=None, address=None, source="t")
    url = f"{srv.url}/api/v1/nodes/{U1}"
    st, _ = await _call("PATCH", url, json={"rearm": True},
                        headers={"Authorization": f"Bearer {OPERATOR}"})
    assert st == 200
    st, _ = await _call("DELETE", url, headers={"Authorization": f"Bearer {OPERATOR}"})
    assert st == 403
    rows = await srv.registry.audit(target=U1)
    assert [(r["actor"], r["role"], r["action"], r["result"]) for r in rows] == [
        ("ops", "operator", "delete_node", "403"), ("ops", "operator", "patch_node", "ok")]
    assert OPERATOR not in str(rows)


async def test_list_filters(srv: Served) -> None:
    reg = srv.registry
    await observe(reg, U1, mac=None, address=None, source="t", profile="coreos")
    await observe(reg, U2, mac=None, address=None, source="t", profile="debian")
    await transition(reg, U2, "deploying", source="t")
    await patch(reg, U2, labels={"rack": "r2"})
    async def uuids(q: str) -> list[str]:
        st, body = await _call("GET", f"{srv.url}/api/v1/nodes{q}")
        assert st == 200
        return [n["uuid"] for n in body["nodes"]]
    assert await uuids("") == [U1, U2]
    assert await uuids("?state=deploying") == [U2]
    assert await uuids("?profile=coreos") == [U1]
    assert await uuids("?label=rack=r2") == [U2]
    assert await uuids("?label=rack=r1") == []
    st, body = await _call("GET", f"{srv.url}/api/v1/nodes?state=bogus")
    assert st == 400 and "discovered" in body["error"]


async def test_list_pages_follow_cursors_and_search(srv: Served) -> None:
    everyone = await populate(srv.registry, 250)
    order = [n.uuid for n in sorted((srv.registry.get(u) for u in everyone),
                                    key=lambda n: (n.first_seen, n.uuid))]  # type: ignore[union-attr]
    st, body = await _call("GET", f"{srv.url}/api/v1/nodes")
    assert st == 200 and len(body["nodes"]) == 100  # the default page
    assert body["prev_cursor"] is None and body["counts"]["discovered"] == 250
    seen, cursors = [], []
    params: dict[str, str] = {"limit": "60"}
    while True:
        st, body = await _call("GET", f"{srv.url}/api/v1/nodes", params=params)
        assert st == 200
        seen += [n["uuid"] for n in body["nodes"]]
        if body["next_cursor"] is None:
            break
        cursors.append(body["next_cursor"])
        params["cursor"] = body["next_cursor"]
    assert seen == order and len(cursors) == 4  # 60 + 60 + 60 + 60 + 10
    st, body = await _call("GET", f"{srv.url}/api/v1/nodes",
                           params={"limit": "60", "cursor": body["prev_cursor"]})
    assert [n["uuid"] for n in body["nodes"]] == order[180:240]
    st, body = await _call("GET", f"{srv.url}/api/v1/nodes?q=sn-00042")
    assert [n["uuid"] for n in body["nodes"]] == [uuid_of(42)] and body["next_cursor"] is None
    st, body = await _call("GET", f"{srv.url}/api/v1/nodes?q=52:54:00:00:00:2a&state=discovered")
    assert [n["uuid"] for n in body["nodes"]] == [uuid_of(42)]
    for query, words in (("limit=0", "limit"), ("limit=1001", "1000"), ("limit=ten", "limit"),
                         ("cursor=bogus", "first page"), ("cursor=" + cursors[0][:-2], "cursor"),
                         ("q=" + "x" * 300, "q")):
        st, body = await _call("GET", f"{srv.url}/api/v1/nodes?{query}")
        assert st == 400 and words in body["error"], (query, body)


async def test_openapi_is_valid_and_complete(srv: Served) -> None:
    validator = pytest.importorskip("openapi_spec_validator",
                                    reason="pip install openapi-spec-validator (test extra)")
    st, doc = await _call("GET", f"{srv.url}/api/v1/openapi.json")
    assert st == 200
    validator.validate(doc)
    for resource in srv.app.router.resources():
        info = resource.get_info()
        path = info.get("formatter") or info.get("path")
        if "prefix" in info:  # the static directory
            path = info["prefix"].rstrip("/") + "/{path}"
        assert path in doc["paths"], path
        for route in resource:
            if route.method != "HEAD":
                assert route.method.lower() in doc["paths"][path], (route.method, path)
    assert len(all_routes()) >= 20
    patch = doc["paths"]["/api/v1/nodes/{uuid}"]["patch"]
    assert patch["security"] == [{"bearer": []}] and "401" in patch["responses"]
    assert "403" in patch["responses"]


async def test_responses_match_the_documented_schemas(srv: Served) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    await observe(srv.registry, U1, mac="52:54:00:00:00:01", address=None, source="t")
    _, doc = await _call("GET", f"{srv.url}/api/v1/openapi.json")
    schemas = doc["components"]["schemas"]

    def check(body: Any, name: str) -> None:
        schema = {**schemas[name], "components": {"schemas": schemas}}
        jsonschema.validate(body, schema)

    # refs in the document point at #/components/schemas/..., resolvable from this root
    _, body = await _call("GET", f"{srv.url}/api/v1/nodes/{U1}")
    check(body, "NodeWithEvents")
    _, body = await _call("GET", f"{srv.url}/api/v1/nodes")
    check(body, "NodeList")


async def test_metrics(srv: Served) -> None:
    reg = srv.registry
    srv.counters.inc("http_requests_total", route="images")  # someone else's counter
    await observe(reg, U1, mac=None, address=None, source="t", boot=True)
    await observe(reg, U2, mac=None, address=None, source="t")
    for uuid, outcome in ((U1, "installed"), (U2, "failed")):  # the nodes' own reports
        st, _ = await _call("POST", f"{srv.url}/api/v1/nodes/{uuid}/{outcome}",
                            headers={"X-Node-Token": reg.node_token(uuid)}, json={"reason": "x"}
                            if outcome == "failed" else None)
        assert st == 200
    st, text = await _call("GET", f"{srv.url}/metrics")
    assert st == 200
    lines = set(text.splitlines())
    assert 'netboot_http_requests_total{route="images"} 1' in lines
    assert 'netboot_nodes{state="installed"} 1' in lines
    assert 'netboot_nodes{state="error"} 1' in lines
    assert 'netboot_nodes{state="deploying"} 0' in lines
    assert "netboot_node_failures_total 1" in lines
    assert "netboot_boot_duration_seconds_count 1" in lines
    assert 'netboot_boot_duration_seconds_bucket{le="30"} 1' in lines
    assert "# TYPE netboot_boot_duration_seconds histogram" in lines
    assert "netboot_nodes_stuck 0" in lines
    assert "netboot_registry_events_pruned_total 0" in lines


def test_alert_rules_pass_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool missing: apt-get install -y prometheus")
    r = subprocess.run([promtool, "check", "rules", str(ROOT / "configs" / "alerts.yml")],
                       check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    text = (ROOT / "configs" / "alerts.yml").read_text()
    for metric in ("netboot_nodes_stuck", "netboot_node_failures_total",
                   "netboot_boot_duration_seconds_bucket"):
        assert metric in text


async def test_without_a_registry_health_and_metrics_still_answer(tmp_path: Path) -> None:
    """An unusable data dir: boots are served unrecorded, and the operator's screens say so
    (they used to vanish with the registry, counters and all)."""
    config = write_config(tmp_path / "config", tmp_path / "data")
    async with serving(config, registry=False) as srv:
        srv.counters.inc("dhcp_offers_total", arch="bios", ipxe="no")
        st, text = await _call("GET", f"{srv.url}/metrics")
        assert st == 200
        lines = set(text.splitlines())
        assert 'netboot_dhcp_offers_total{arch="bios",ipxe="no"} 1' in lines
        assert "netboot_registry_up 0" in lines
        st, health = await _call("GET", f"{srv.url}/health")
        assert st == 200 and health["status"] == "degraded"
        assert health["registry"].startswith("absent: ")
        st, body = await _call("GET", f"{srv.url}/api/v1/nodes")
        assert st == 503 and "registry is not available" in body["error"]
        st, body = await _call("GET", f"{srv.url}/")
        assert st == 503 and "/health" in body
        st, body = await _call("GET", f"{srv.url}/boot.ipxe")
        assert st == 200 and body.startswith("#!ipxe")


async def test_a_registry_that_cannot_write_answers_503_with_the_reason(srv: Served) -> None:
    await observe(srv.registry, U1, mac=None, address=None, source="t")
    # Fault injection: no public path makes SQLite refuse writes (see test_registry).
    await srv.registry._db.execute("PRAGMA query_only = 1")
    try:
        st, body = await _call("POST", f"{srv.url}/api/v1/nodes/{U1}/installed",
                               headers={"X-Node-Token": srv.registry.node_token(U1)})
    finally:
        await srv.registry._db.execute("PRAGMA query_only = 0")
    assert st == 503 and "cannot record" in body["error"] and "/health" in body["error"]
    st, health = await _call("GET", f"{srv.url}/health")
    assert health["status"] == "degraded" and "write failed" in health["registry"]


async def test_register_records_secure_boot_and_it_survives_a_reopen(
        srv: Served, tmp_path: Path) -> None:
    """The OS reads the SecureBoot EFI variable and says so (the demo OS posts a form);
    an OS that does not say (BIOS) leaves the record as it was."""
    reg = srv.registry
    await observe(reg, U1, mac="52:54:00:00:00:01", address="10.0.0.7", source="dhcp")
    tok = reg.node_token(U1)
    base = f"{srv.url}/api/v1/nodes/{U1}"
    st, body = await _call("GET", f"{srv.url}/api/v1/nodes/{U1}")
    assert st == 200 and body["secure_boot"] is None  # never reported
    st, body = await _call("POST", f"{base}/register?token={tok}",
                           data={"serial": "SN-1", "secure_boot": "1"})
    assert st == 200 and body["secure_boot"] is True, body
    st, body = await _call("POST", f"{base}/register?token={tok}", data={"serial": "SN-1"})
    assert st == 200 and body["secure_boot"] is True  # not said: unchanged
    st, body = await _call("POST", f"{base}/register?token={tok}",
                           json={"secure_boot": False})
    assert st == 200 and body["secure_boot"] is False
    st, _ = await _call("POST", f"{base}/register?token={tok}", json={"secure_boot": "maybe"})
    assert st == 400
    await reg.commit()
    again = await Registry.open(tmp_path, secret=SECRET)  # the file srv writes (data_dir)
    try:
        assert again.get(U1) is not None and again.get(U1).secure_boot is False
    finally:
        await again.close()
