"""The layout's rules, checked on the source: storage knows no HTTP, webhooks or
Prometheus; only the lifecycle moves nodes between states; the TFTP side never
imports HTTP."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "netboot"


def _imports(path: Path) -> set[str]:
    """Absolute names of the netboot modules a file imports."""
    rel = path.relative_to(PKG.parent).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts)
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            mod = ".".join([*base, *(node.module.split(".") if node.module else [])])
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("netboot")}


def _files(sub: str) -> list[Path]:
    return sorted((PKG / sub).rglob("*.py"))


@pytest.mark.parametrize("path", _files("storage"), ids=lambda p: p.name)
def test_storage_imports_nothing_of_http_webhooks_or_metrics(path: Path) -> None:
    bad = {m for m in _imports(path) if m.startswith(("netboot.http", "netboot.webhooks",
                                                      "netboot.metrics", "netboot.boot"))}
    assert not bad, f"{path.relative_to(PKG)} imports {sorted(bad)}"


@pytest.mark.parametrize("sub", ["tftp", "dhcp", "boot", "storage", "power"])
def test_protocols_and_core_never_import_http(sub: str) -> None:
    for path in _files(sub):
        bad = {m for m in _imports(path) if m.startswith("netboot.http")}
        assert not bad, f"{path.relative_to(PKG)} imports {sorted(bad)}"


STATE_WRITES = ("set_state", "observe")


def test_only_the_lifecycle_moves_nodes_between_states() -> None:
    """A node enters a state through Registry.set_state or (new, 'discovered')
    Registry.observe; outside storage only boot/lifecycle.py and boot/bmcs.py (which
    the lifecycle drives, for nodes a machine file's BMC makes known) call them."""
    allowed = {PKG / "boot" / "lifecycle.py", PKG / "boot" / "bmcs.py"}
    for path in PKG.rglob("*.py"):
        if path in allowed or path.is_relative_to(PKG / "storage"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in STATE_WRITES and "reg" in ast.unparse(node.func.value):
                pytest.fail(f"{path.relative_to(PKG)}:{node.lineno} calls "
                            f".{node.func.attr}(): only boot/lifecycle.py moves nodes")


def test_every_endpoint_that_records_a_boot_admits_new_nodes_first() -> None:
    """lifecycle.served() creates nodes; the endpoint asks lifecycle.admit() before the
    Booter decides, so a new machine over limits.new_nodes gets its ask-again answer
    (served() alone would only skip the record)."""
    callers = []
    for path in PKG.rglob("*.py"):
        if path == PKG / "boot" / "lifecycle.py":
            continue
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            calls = {n.func.attr for n in ast.walk(fn) if isinstance(n, ast.Call)
                     and isinstance(n.func, ast.Attribute)
                     and "lifecycle" in ast.unparse(n.func.value)}
            if "served" in calls:
                callers.append(f"{path.relative_to(PKG)}:{fn.name}")
                assert "admit" in calls, f"{callers[-1]} calls served() without admit()"
    # tftp/router.py:_config serves both pxelinux and GRUB configs
    assert sorted(callers) == ["http/boot.py:node_grub", "http/boot.py:node_ipxe",
                               "tftp/router.py:_config"]
