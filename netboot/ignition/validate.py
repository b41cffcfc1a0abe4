"""A strict validator for Ignition spec 3.3.0 configs, against the vendored JSON
schema (``netboot/schemas/``) plus the checks the schema cannot express: URLs,
hashes, node paths, unit names, users. Ignition only warns about unknown keys,
so a typo such as ``pathh`` would otherwise boot a machine silently missing its
file."""

from __future__ import annotations

import base64
import binascii
import json
import posixpath
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = ["IGNITION_VERSION", "validate_ignition"]

IGNITION_VERSION = "3.3.0"
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "ignition-v3_3.schema.json"

# systemd unit types (systemd.unit(5)); Ignition writes any name, systemd
# ignores a file without one of these suffixes, so we refuse it up front.
UNIT_SUFFIXES = (
    ".service", ".socket", ".device", ".mount", ".automount", ".swap",
    ".target", ".path", ".timer", ".slice", ".scope",
)
# URL schemes Ignition 2.14 fetches for spec 3.3.0 (oem:// is gone since spec 3).
URL_SCHEMES = frozenset({"http", "https", "tftp", "s3", "gs", "arn", "data"})
HASH_LENGTHS = {"sha512": 128, "sha256": 64}
# Characters allowed unescaped in the data part of a URL (RFC 3986 unreserved + reserved).
_URL_CHARS = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]*")
_PCT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_DATA_URL = re.compile(
    r"data:(?P<mediatype>[^,;]*(?:;[^,;=]+=[^,;]*)*)(?P<base64>;base64)?,(?P<data>.*)", re.DOTALL
)


def _items(value: object) -> list[tuple[int, dict[str, Any]]]:
    if not isinstance(value, list):
        return []
    return [(i, v) for i, v in enumerate(value) if isinstance(v, dict)]


@cache
def _schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def _resolve(ref: str) -> dict[str, Any]:
    node: Any = _schema()
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


@dataclass
class _Shape:
    """One schema node with $ref and allOf folded in."""

    types: set[str] = field(default_factory=set)
    properties: dict[str, Any] = field(default_factory=dict)
    required: set[str] = field(default_factory=set)
    items: dict[str, Any] | None = None
    refs: set[str] = field(default_factory=set)


def _shape(schema: dict[str, Any], shape: _Shape | None = None) -> _Shape:
    shape = shape or _Shape()
    if "$ref" in schema:
        shape.refs.add(schema["$ref"])
        return _shape(_resolve(schema["$ref"]), shape)
    for sub in schema.get("allOf", []):
        _shape(sub, shape)
    t = schema.get("type")
    if t is not None:
        new = {t} if isinstance(t, str) else set(t)
        shape.types = shape.types & new if shape.types else new
    shape.properties.update(schema.get("properties", {}))
    shape.required.update(schema.get("required", []))
    if "items" in schema:
        shape.items = schema["items"]
    return shape


# JSON schema type names; bool is checked before int because bool subclasses int.
_JSON_TYPES: tuple[tuple[type, str], ...] = (
    (bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"),
    (list, "array"), (dict, "object"),
)


def _type_of(value: object) -> str:
    if value is None:
        return "null"
    for py, name in _JSON_TYPES:
        if isinstance(value, py):
            return name
    return type(value).__name__


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _walk(value: object, schema: dict[str, Any], path: str, problems: list[str]) -> None:
    shape = _shape(schema)
    kind = _type_of(value)
    if shape.types and kind not in shape.types:
        want = " or ".join(sorted(shape.types))
        problems.append(f"{path or '(root)'}: expected {want}, got {kind}")
        return
    if "#/definitions/resource" in shape.refs and isinstance(value, dict):
        _check_resource(value, path, problems)
    if isinstance(value, dict):
        for key in sorted(shape.required - value.keys()):
            problems.append(f"{_join(path, key)}: required key missing")
        for key, sub in value.items():
            if key not in shape.properties:
                problems.append(f"{_join(path, str(key))}: unknown key")
            else:
                _walk(sub, shape.properties[key], _join(path, key), problems)
    elif isinstance(value, list) and shape.items is not None:
        for i, sub in enumerate(value):
            _walk(sub, shape.items, f"{path}[{i}]", problems)


def _check_resource(res: dict[str, Any], path: str, problems: list[str]) -> None:
    source = res.get("source")
    if isinstance(source, str):
        _check_url(source, f"{path}.source", problems)
    verification = res.get("verification")
    if isinstance(verification, dict) and isinstance(verification.get("hash"), str):
        algo, _, digest = verification["hash"].partition("-")
        if HASH_LENGTHS.get(algo) != len(digest) or not re.fullmatch(r"[0-9a-f]*", digest):
            problems.append(f"{path}.verification.hash: must be sha512-<hex> or sha256-<hex>")
    compression = res.get("compression")
    if compression not in (None, "", "gzip"):
        problems.append(f"{path}.compression: must be gzip or empty")


def _check_url(url: str, path: str, problems: list[str]) -> None:
    scheme = urlsplit(url).scheme.lower() if ":" in url else ""
    if scheme not in URL_SCHEMES:
        problems.append(f"{path}: URL scheme {scheme or '(none)'!r} is not one Ignition fetches")
        return
    if scheme != "data":
        return
    m = _DATA_URL.fullmatch(url)
    if m is None:
        problems.append(f"{path}: malformed data: URL (want data:[type][;base64],payload)")
        return
    data = m["data"]
    if m["base64"]:
        try:
            base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            problems.append(f"{path}: data: URL has invalid base64")
    elif not _URL_CHARS.fullmatch(data.replace("%", "")) or _PCT.search(data):
        problems.append(f"{path}: data: URL payload must be percent-encoded")


def _check_node_paths(cfg: dict[str, Any], problems: list[str]) -> None:
    storage = cfg.get("storage")
    if not isinstance(storage, dict):
        return
    seen: dict[str, str] = {}
    for kind in ("files", "directories", "links"):
        for i, node in _items(storage.get(kind)):
            where = f"storage.{kind}[{i}]"
            p = node.get("path")
            if isinstance(p, str):
                if not p.startswith("/"):
                    problems.append(f"{where}.path: must be absolute")
                elif "//" in p or posixpath.normpath(p) != p:
                    problems.append(f"{where}.path: must be normalised (no //, . or ..)")
                if p in seen:
                    problems.append(f"{where}.path: duplicate of {seen[p]}")
                seen.setdefault(p, f"{where}.path")
            mode = node.get("mode")
            if isinstance(mode, int) and not isinstance(mode, bool) and not 0 <= mode <= 0o7777:
                problems.append(f"{where}.mode: must be within 0..07777 (got {mode:#o})")
            if kind == "links" and node.get("target") in (None, ""):
                problems.append(f"{where}.target: required for a link")
    for i, fs in _items(storage.get("filesystems")):
        p = fs.get("path")
        if isinstance(p, str) and not p.startswith("/"):
            problems.append(f"storage.filesystems[{i}].path: must be absolute")


def _check_units(cfg: dict[str, Any], problems: list[str]) -> None:
    systemd = cfg.get("systemd")
    if not isinstance(systemd, dict):
        return
    seen: set[str] = set()
    for i, unit in _items(systemd.get("units")):
        where = f"systemd.units[{i}]"
        name = unit.get("name")
        if isinstance(name, str):
            if "/" in name or not name.endswith(UNIT_SUFFIXES) or name.startswith("."):
                problems.append(
                    f"{where}.name: {name!r} needs a unit type suffix such as .service or .timer"
                )
            if name in seen:
                problems.append(f"{where}.name: duplicate unit {name!r}")
            seen.add(name)
        dropins: set[str] = set()
        for j, dropin in _items(unit.get("dropins")):
            dname = dropin.get("name")
            if isinstance(dname, str):
                if not dname.endswith(".conf") or "/" in dname:
                    problems.append(f"{where}.dropins[{j}].name: {dname!r} must end in .conf")
                if dname in dropins:
                    problems.append(f"{where}.dropins[{j}].name: duplicate drop-in {dname!r}")
                dropins.add(dname)


def _check_users(cfg: dict[str, Any], problems: list[str]) -> None:
    passwd = cfg.get("passwd")
    if not isinstance(passwd, dict):
        return
    for kind in ("users", "groups"):
        seen: set[str] = set()
        for i, entry in _items(passwd.get(kind)):
            name = entry.get("name")
            if isinstance(name, str):
                if name in seen:
                    problems.append(f"passwd.{kind}[{i}].name: duplicate {name!r}")
                seen.add(name)


def validate_ignition(cfg: dict[str, Any]) -> list[str]:
    """Problems with ``cfg`` as an Ignition 3.3.0 config; empty when it is fine.

    Stricter than Ignition: unknown keys are errors, units need a type
    suffix, node paths must be absolute and unique, modes within 0..07777,
    data: URLs well-formed. Each message starts with the JSON path.
    """
    problems: list[str] = []
    _walk(cfg, _schema(), "", problems)
    if not isinstance(cfg, dict):
        return problems
    ign = cfg.get("ignition")
    if isinstance(ign, dict) and ign.get("version") != IGNITION_VERSION:
        problems.append(f"ignition.version: must be {IGNITION_VERSION!r}")
    _check_node_paths(cfg, problems)
    _check_units(cfg, problems)
    _check_users(cfg, problems)
    return problems
