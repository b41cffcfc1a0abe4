"""Render Ignition (spec 3.3.0) configs from jinja2 YAML templates, and validate them.

Templates mirror Ignition's own JSON structure written as YAML, with a few
conveniences so they stay readable:

* ``contents: {inline: "text"}`` (and ``append: [{inline: ...}]``) on a file
  becomes a ``data:`` URL source;
* ``mode: 0644`` (YAML octal) or ``mode: "0644"`` / ``"0o644"`` becomes the
  decimal integer Ignition wants;
* ``ignition.version`` defaults to ``3.3.0``.

The result is checked by our own strict validator before it leaves the
server: Ignition only warns about unknown keys, so a typo such as ``pathh``
would otherwise boot a machine silently missing its file.
"""

from __future__ import annotations

import base64
import binascii
import json
import posixpath
import re
import shlex
import traceback
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import jinja2
import yaml

__all__ = [
    "IGNITION_VERSION",
    "IgnitionError",
    "IgnitionRenderer",
    "SiteSettings",
    "SwarmFacts",
    "bundled_template_dir",
    "data_url",
    "validate_ignition",
]

IGNITION_VERSION = "3.3.0"
SCHEMA_PATH = Path(__file__).with_name("schemas") / "ignition-v3_3.schema.json"
TEMPLATE_SUFFIX = ".yaml.j2"

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


class IgnitionError(Exception):
    """A template could not be rendered into a valid config.

    The message names the template and the offending key path or template
    line, never the values (they may hold join tokens).
    """

    def __init__(self, template: str, problems: list[str] | str) -> None:
        self.template = template
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(f"{template}: " + "; ".join(self.problems))


def _no_control(name: str, value: str | None) -> None:
    if value is not None and any(ord(c) < 32 or c in "\"\\" for c in value):
        raise ValueError(f"site setting {name} must not contain quotes, backslashes or newlines")


@dataclass(frozen=True)
class SiteSettings:
    """Settings every node of the site gets, whatever its role."""

    ntp: list[str] = field(default_factory=list)
    registry_mirrors: list[str] = field(default_factory=list)
    insecure_registries: list[str] = field(default_factory=list)
    http_proxy: str | None = None
    https_proxy: str | None = None
    no_proxy: str | None = None

    def __post_init__(self) -> None:
        # These end up inside unit files and shell snippets; refusing odd
        # characters here is simpler and safer than quoting for each format.
        for name in ("ntp", "registry_mirrors", "insecure_registries"):
            for item in getattr(self, name):
                _no_control(name, item)
                if not item or " " in item:
                    raise ValueError(f"site setting {name} has an empty or spaced entry")
        for name in ("http_proxy", "https_proxy", "no_proxy"):
            _no_control(name, getattr(self, name))

    @property
    def has_proxy(self) -> bool:
        return bool(self.http_proxy or self.https_proxy)


@dataclass(frozen=True)
class SwarmFacts:
    """What a node needs to join an existing swarm. Tokens are secrets."""

    manager_addr: str  # "ip:2377"
    worker_token: str = field(repr=False)
    manager_token: str = field(repr=False)

    def __repr__(self) -> str:
        return (
            f"SwarmFacts(manager_addr={self.manager_addr!r}, "
            "worker_token=<redacted>, manager_token=<redacted>)"
        )

    __str__ = __repr__


def bundled_template_dir() -> Path:
    """The ``ignition/`` folder shipped at the repository root."""
    return Path(__file__).resolve().parents[1] / "ignition"


# --------------------------------------------------------------------------- render


def data_url(content: str | bytes) -> str:
    """Shortest deterministic ``data:`` URL for ``content`` (percent or base64)."""
    raw = content.encode() if isinstance(content, str) else bytes(content)
    pct = "data:," + quote(raw, safe="/:=@!$&'()*+,;")
    b64 = "data:;base64," + base64.b64encode(raw).decode()
    return pct if len(pct) <= len(b64) else b64


def _yaml_quote(value: object) -> str:
    """A scalar as a YAML double-quoted string (JSON strings are valid YAML)."""
    return json.dumps("" if value is None else str(value), ensure_ascii=False)


def _to_json(value: object, indent: int | None = None) -> str:
    """JSON of plain data; one line by default so it can sit in YAML flow context."""
    return json.dumps(_plain(value), sort_keys=True, indent=indent, ensure_ascii=False)


def _systemd_escape(value: object) -> str:
    """Escape for a double-quoted systemd value: backslash, quote and specifiers."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")


def _plain(value: Any) -> Any:
    """Dataclasses and tuples to plain JSON-able data for the to_json filter."""
    if hasattr(value, "__dataclass_fields__"):
        return {k: _plain(getattr(value, k)) for k in value.__dataclass_fields__}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _template_line(exc: BaseException, filename: str | None) -> str:
    """'line N' of the innermost template frame, to point the admin at it."""
    lineno = getattr(exc, "lineno", None)
    name = getattr(exc, "name", None) or getattr(exc, "filename", None)
    if lineno:
        return f"{name or filename} line {lineno}"
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if frame.filename.endswith(TEMPLATE_SUFFIX) or frame.filename.endswith(".j2"):
            return f"{Path(frame.filename).name} line {frame.lineno}"
    return filename or "?"


class IgnitionRenderer:
    """Render ``<name>.yaml.j2`` templates in ``template_dir`` to config bytes."""

    def __init__(self, template_dir: Path) -> None:
        self.template_dir = Path(template_dir)
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(self.template_dir)),
            undefined=jinja2.StrictUndefined,
            autoescape=False,
            keep_trailing_newline=True,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["q"] = _yaml_quote
        self.env.filters["to_json"] = _to_json
        self.env.filters["shq"] = shlex.quote
        self.env.filters["systemd_escape"] = _systemd_escape
        self.env.filters["data_url"] = data_url
        self.env.globals["fail"] = self._fail

    @staticmethod
    def _fail(message: str) -> None:
        """Let a template refuse a context it cannot serve, e.g. missing swarm facts."""
        raise _TemplateRefused(message)

    def templates(self) -> list[str]:
        """Names (without suffix) of the templates machines may use; '_' ones are includes."""
        return sorted(
            p.name.removesuffix(TEMPLATE_SUFFIX)
            for p in self.template_dir.glob("*" + TEMPLATE_SUFFIX)
            if not p.name.startswith("_")
        )

    def render(self, template: str, context: dict[str, Any]) -> bytes:
        """Canonical JSON (sorted keys, compact, UTF-8) of a validated 3.3.0 config."""
        name = template if template.endswith(TEMPLATE_SUFFIX) else template + TEMPLATE_SUFFIX
        ctx = dict(context.get("vars") or {})
        ctx.update(context)  # the machine's vars at top level; reserved names win
        site = ctx.setdefault("site", SiteSettings())
        if isinstance(site, dict):  # e.g. a config model dumped to a dict
            ctx["site"] = SiteSettings(**site)
        ctx.setdefault("vars", {})
        try:
            text = self.env.get_template(name).render(ctx)
        except jinja2.TemplateNotFound as exc:
            raise IgnitionError(
                template, f"template {exc.name!r} not found in {self.template_dir}") from None
        except _TemplateRefused as exc:
            raise IgnitionError(template, f"{_template_line(exc, name)}: {exc}") from None
        except jinja2.UndefinedError as exc:
            raise IgnitionError(
                template, f"{_template_line(exc, name)}: undefined value: {exc.message}"
            ) from None
        except jinja2.TemplateError as exc:
            raise IgnitionError(
                template, f"{_template_line(exc, name)}: {exc.message or type(exc).__name__}"
            ) from None
        cfg = parse_template_output(template, text)
        problems = validate_ignition(cfg)
        if problems:
            raise IgnitionError(template, problems)
        return canonical_json(cfg)


class _TemplateRefused(Exception):
    pass


def canonical_json(cfg: dict[str, Any]) -> bytes:
    """Sorted keys, no whitespace: equal configs give equal bytes (and ETags)."""
    return json.dumps(cfg, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# libyaml's safe loader where PyYAML was built with it: ~4x faster per render, which is
# most of a cache miss (docs/BENCHMARKS.md, Ignition rendering).
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse_template_output(template: str, text: str) -> dict[str, Any]:
    """YAML text to an Ignition dict with the template conveniences applied."""
    try:
        cfg = yaml.load(text, Loader=_SafeLoader)  # noqa: S506 - a safe loader
    except yaml.MarkedYAMLError as exc:
        # Only the problem and position: the snippet could show a token.
        mark = exc.problem_mark
        where = f"rendered YAML line {mark.line + 1} column {mark.column + 1}" if mark else "YAML"
        raise IgnitionError(template, f"{where}: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise IgnitionError(template, f"invalid YAML: {type(exc).__name__}") from None
    if not isinstance(cfg, dict):
        raise IgnitionError(template, "the rendered YAML is not a mapping")
    cfg = _prune_none(cfg)
    problems: list[str] = []
    ign = cfg.setdefault("ignition", {})
    if isinstance(ign, dict):
        ign.setdefault("version", IGNITION_VERSION)
    storage = cfg.get("storage")
    if isinstance(storage, dict):
        for kind in ("files", "directories"):
            for i, node in _items(storage.get(kind)):
                path = f"storage.{kind}[{i}]"
                if "mode" in node:
                    node["mode"] = _octal_mode(node["mode"], f"{path}.mode", problems)
                if kind != "files":
                    continue
                if isinstance(node.get("contents"), dict):
                    _inline(node["contents"], f"{path}.contents", problems)
                for j, res in _items(node.get("append")):
                    _inline(res, f"{path}.append[{j}]", problems)
    if problems:
        raise IgnitionError(template, problems)
    return cfg


def _prune_none(value: Any) -> Any:
    """Drop keys left empty (``key:`` whose conditional items all rendered to nothing).

    Ignition reads a null like an absent key, and a list key with no items
    is what a template gets when every entry sat behind a false ``if``.
    """
    if isinstance(value, dict):
        return {k: _prune_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_prune_none(v) for v in value]
    return value


def _items(value: object) -> list[tuple[int, dict[str, Any]]]:
    if not isinstance(value, list):
        return []
    return [(i, v) for i, v in enumerate(value) if isinstance(v, dict)]


def _octal_mode(value: object, path: str, problems: list[str]) -> object:
    """'0644', '0o644' and YAML's own 0644 (already an int) to an int."""
    if isinstance(value, str):
        digits = value.strip().lower().removeprefix("0o")
        if not re.fullmatch(r"[0-7]{1,5}", digits):
            problems.append(f"{path}: mode must be octal like 0644")
            return value
        return int(digits, 8)
    return value


def _inline(resource: dict[str, Any], path: str, problems: list[str]) -> None:
    if "inline" not in resource:
        return
    inline = resource.pop("inline")
    if resource.get("source") is not None:
        problems.append(f"{path}: give either inline or source, not both")
    elif not isinstance(inline, str):
        problems.append(f"{path}.inline: must be a string")
    else:
        resource["source"] = data_url(inline)


# ------------------------------------------------------------------------- validate


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
