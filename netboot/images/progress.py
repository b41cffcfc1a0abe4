"""Download progress: a bar on a terminal, plain lines elsewhere."""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


class Progress:
    """A bar on a terminal, plain lines every few seconds elsewhere (logs, CI)."""

    def __init__(self, out: TextIO | None = None, tty: bool | None = None,
                 interval: float | None = None) -> None:
        self.out = out or sys.stderr
        self.tty = self.out.isatty() if tty is None else tty
        self.interval = interval if interval is not None else (0.1 if self.tty else 5.0)
        self.label, self.total, self.done, self.started, self.last = "", 0, 0, 0.0, 0.0
        self.resumed_from = 0
        self.midline = False  # a bar is drawn and the cursor is still on its line

    def start(self, label: str, total: int | None, done: int = 0) -> None:
        self.label, self.total, self.done = label, total or 0, done
        self.resumed_from = done
        self.started = self.last = time.monotonic()
        if not self.tty:
            extra = f", resuming at {_mb(done)}" if done else ""
            size = _mb(self.total) if self.total else "unknown size"
            self.out.write(f"fetch {label}: {size}{extra}\n")
            self.out.flush()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._show(now)

    def _show(self, now: float, end: str = "") -> None:
        rate = (self.done - self.resumed_from) / max(now - self.started, 1e-6)
        pct = 100 * self.done / self.total if self.total else 0.0
        if self.tty:
            width = 24
            fill = int(width * pct / 100)
            room = max(16, shutil.get_terminal_size((100, 24)).columns - 66)
            label = self.label if len(self.label) <= room else "…" + self.label[1 - room:]
            text = (f"\r{label:<{room}} {pct:5.1f}% [{'#' * fill}{'.' * (width - fill)}] "
                    f"{_mb(self.done)}/{_mb(self.total)} {_mb(rate)}/s")
            self.out.write(text + end)
            self.midline = not end
        else:
            self.out.write(f"fetch {self.label}: {pct:.0f}% {_mb(self.done)} of "
                           f"{_mb(self.total)}, {_mb(rate)}/s\n")
        self.out.flush()

    def finish(self) -> None:
        self._show(time.monotonic(), end="\n")

    def note(self, text: str) -> None:
        self.out.write(("\n" if self.midline else "") + text + "\n")
        self.midline = False
        self.out.flush()
