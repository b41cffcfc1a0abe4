"""YAML loading that remembers where each value came from, so a config error
names the file, the line and the field instead of just the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class SourceError(Exception):
    """One or more problems in one file, each already formatted as 'file:line: field: message'."""

    def __init__(self, path: Path, problems: list[str]):
        self.path = path
        self.problems = problems
        super().__init__("\n".join(problems))


def _record_lines(node: yaml.Node, data: Any, lines: dict[tuple[Any, ...], int],
                  loc: tuple[Any, ...]) -> None:
    """Walk the composed node tree beside the constructed data, noting each value's line."""
    lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode) and isinstance(data, dict):
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            for candidate in data:
                if str(candidate) == key:
                    lines[loc + (candidate,)] = key_node.start_mark.line + 1
                    _record_lines(value_node, data[candidate], lines, loc + (candidate,))
                    break
    elif isinstance(node, yaml.SequenceNode) and isinstance(data, list):
        for i, (item, value) in enumerate(zip(node.value, data)):
            _record_lines(item, value, lines, loc + (i,))


def load_yaml(path: Path) -> tuple[Any, dict[tuple[Any, ...], int]]:
    """Parse one YAML file -> (data, {location tuple: line number})."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(path, [f"{path}: cannot read: {exc}"]) from None
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else 0
        raise SourceError(path, [f"{path}:{line}: YAML syntax: {exc.problem}"]) from None
    except yaml.YAMLError as exc:
        raise SourceError(path, [f"{path}: YAML: {exc}"]) from None
    lines: dict[tuple[Any, ...], int] = {}
    if node is None:
        return {}, lines
    _record_lines(node, data, lines, ())
    return data, lines


def validate(model: type[M], path: Path, data: Any,
                           lines: dict[tuple[Any, ...], int]) -> M:
    """pydantic validation whose errors carry file and line."""
    if data is None:
        data = {}
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            line = _nearest_line(lines, loc)
            field = ".".join(str(p) for p in loc) or "(top level)"
            problems.append(f"{path}:{line}: {field}: {err['msg']}")
        raise SourceError(path, problems) from None


def _nearest_line(lines: dict[tuple[Any, ...], int], loc: tuple[Any, ...]) -> int:
    while loc not in lines and loc:
        loc = loc[:-1]
    return lines.get(loc, 1)
