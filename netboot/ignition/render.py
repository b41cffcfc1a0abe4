"""Render Ignition (spec 3.3.0) configs from jinja2 YAML templates.

Templates mirror Ignition's own JSON structure written as YAML, with a few
conveniences so they stay readable:

* ``contents: {inline: "text"}`` (and ``append: [{inline: ...}]``) on a file
  becomes a ``data:`` URL source;
* ``mode: 0644`` (YAML octal) or ``mode: "0644"`` / ``"0o644"`` becomes the
  decimal integer Ignition wants;
* ``ignition.version`` defaults to ``3.3.0``.

The result is checked by our own strict validator (:mod:`.validate`) before it
leaves the server: Ignition only warns about unknown keys, so a typo such as
``pathh`` would otherwise boot a machine silently missing its file.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import shlex
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
import yaml

from .validate import IGNITION_VERSION, _items, validate_ignition

log = logging.getLogger("netboot.ignition")

__all__ = [
    "IgnitionError",
    "IgnitionRenderer",
    "SiteSettings",
    "SwarmFacts",
    "bundled_template_dir",
    "data_url",
]

TEMPLATE_SUFFIX = ".yaml.j2"


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
    return Path(__file__).resolve().parents[2] / "ignition"


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


def _always_current() -> bool:
    return True  # a loaded template changes only by load(): jinja must not stat it


class IgnitionRenderer:
    """Render ``<name>.yaml.j2`` templates in ``template_dir`` to config bytes.

    The templates are read into memory by :meth:`load` (at start, and by the
    background upkeep when the directory changes), so rendering never touches the
    disk, not even to stat a template on the boot path.
    """

    def __init__(self, template_dir: Path) -> None:
        self.template_dir = Path(template_dir)
        self.env = jinja2.Environment(
            loader=jinja2.DictLoader({}),
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
        self.load()

    def load(self) -> None:
        """Read every template file into memory; on a read error keep what was loaded."""
        sources: dict[str, tuple[str, str, Callable[[], bool]]] = {}
        try:
            for path in sorted(self.template_dir.glob("*.j2")):
                if path.is_file():  # the file name, so errors and tracebacks name it
                    sources[path.name] = (path.read_text(encoding="utf-8"), str(path),
                                          _always_current)
        except FileNotFoundError:
            sources = {}
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("cannot read Ignition templates in %s: %s; keeping the last ones",
                        self.template_dir, exc)
            return
        self.env.loader = jinja2.FunctionLoader(sources.get)
        if self.env.cache is not None:
            self.env.cache.clear()

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
