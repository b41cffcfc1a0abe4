"""Process-wide counters, cheap enough for the per-packet path.

A counter is a dict slot keyed by (name, sorted label items); incrementing is
one dict lookup and an add, with no formatting until /metrics is scraped.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

LabelKey = tuple[tuple[str, str], ...]


class Counters:
    """Named monotonic counters with optional labels, rendered in Prometheus text format."""

    def __init__(self) -> None:
        self._values: dict[str, dict[LabelKey, float]] = defaultdict(lambda: defaultdict(float))
        self._help: dict[str, str] = {}

    def describe(self, name: str, help_text: str) -> None:
        self._help[name] = help_text

    def inc(self, name: str, n: float = 1, **labels: str) -> None:
        key: LabelKey = tuple(sorted(labels.items())) if labels else ()
        self._values[name][key] += n

    def get(self, name: str, **labels: str) -> float:
        key: LabelKey = tuple(sorted(labels.items())) if labels else ()
        return self._values.get(name, {}).get(key, 0.0)

    def total(self, name: str) -> float:
        return sum(self._values.get(name, {}).values())

    def items(self) -> Iterable[tuple[str, LabelKey, float]]:
        for name, series in sorted(self._values.items()):
            for key, value in sorted(series.items()):
                yield name, key, value

    def render(self, prefix: str = "netboot_") -> str:
        """Prometheus text exposition of every counter."""
        out: list[str] = []
        for name, series in sorted(self._values.items()):
            full = prefix + name
            if name in self._help:
                out.append(f"# HELP {full} {self._help[name]}")
            out.append(f"# TYPE {full} counter")
            for key, value in sorted(series.items()):
                out.append(f"{full}{_labels(key)} {value:g}")
        return "\n".join(out) + ("\n" if out else "")


def _labels(key: LabelKey) -> str:
    if not key:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in key)
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
