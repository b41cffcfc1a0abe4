"""Process-wide counters, cheap enough for the per-packet path.

A counter is a dict slot keyed by (name, sorted label items); incrementing is
one dict lookup and an add, with no formatting until /metrics is scraped.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .boot.lifecycle import Lifecycle, LifecycleEvent
    from .storage.registry import Registry

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


class Histogram:
    """A Prometheus histogram kept in memory (resets with the process, as counters do)."""

    def __init__(self, buckets: Iterable[float]):
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, upper in enumerate(self.buckets):
            if value <= upper:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def render(self, name: str, help_text: str) -> list[str]:
        out = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        for upper, n in zip(self.buckets, self.counts):
            out.append(f'{name}_bucket{{le="{upper:g}"}} {n}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:g}",
                f"{name}_count {self.count}"]
        return out


# Boot duration buckets (seconds): PXE + kernel + an OS install is minutes, not seconds.
BOOT_BUCKETS: tuple[float, ...] = (30, 60, 120, 300, 600, 900, 1200, 1800, 2700, 3600, 7200)


class NodeMetrics:
    """Registry gauges and the boot-duration histogram, fed by lifecycle events."""

    def __init__(self) -> None:
        self.boot_durations = Histogram(BOOT_BUCKETS)

    def __call__(self, event: LifecycleEvent) -> None:
        """A lifecycle listener: a node that reached 'installed' ends its boot cycle."""
        if event.kind == "installed" and event.old is not None \
                and event.old.cycle_start is not None:
            self.boot_durations.observe(max(0.0, event.time - event.old.cycle_start))

    def render(self, registry: Registry | None, lifecycle: Lifecycle) -> str:
        out: list[str] = []
        if registry is not None:
            out += ["# HELP netboot_nodes Nodes in the registry by lifecycle state",
                    "# TYPE netboot_nodes gauge"]
            out += [f'netboot_nodes{{state="{s}"}} {n}'
                    for s, n in registry.counts_by_state().items()]
            out += ["# HELP netboot_registry_commits_total Registry write transactions "
                    "committed", "# TYPE netboot_registry_commits_total counter",
                    f"netboot_registry_commits_total {registry.stats.commits}",
                    "# HELP netboot_registry_events_pruned_total Event rows removed by the "
                    "retention limits", "# TYPE netboot_registry_events_pruned_total counter",
                    f"netboot_registry_events_pruned_total {registry.stats.events_pruned}",
                    "# HELP netboot_registry_audit_pruned_total Audit rows removed by the "
                    "retention limits", "# TYPE netboot_registry_audit_pruned_total counter",
                    f"netboot_registry_audit_pruned_total {registry.stats.audit_pruned}"]
        out += ["# HELP netboot_nodes_stuck Nodes in 'deploying' for longer than stuck_after",
                "# TYPE netboot_nodes_stuck gauge",
                f"netboot_nodes_stuck {len(lifecycle.stuck())}"]
        out += ["# HELP netboot_registry_up Whether boots are being recorded (1) or not (0)",
                "# TYPE netboot_registry_up gauge",
                f"netboot_registry_up {int(registry is not None and lifecycle.problem is None)}"]
        out += self.boot_durations.render(
            "netboot_boot_duration_seconds",
            "Seconds from first contact or last boot to 'installed'")
        return "\n".join(out) + "\n"
