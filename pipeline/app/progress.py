"""One progress bar for every long operation: restore, replay, drill, the failover's
indexing and roll-forward, a resync, a bootstrap from a peer.

``restoring [##########..........]  52%  312/600 MiB  41.0 MiB/s  ETA 7 s`` on stderr,
redrawn in place at most every ``every_s``, and only after ``quiet_s`` (a restore that
takes a moment shows nothing). Not a terminal (a log file, a pipe): one plain line every
``plain_every_s`` instead of carriage returns. The log lines say the same in JSON.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

MIB = 1 << 20
CELLS = 20


def bar_text(what: str, done: float, total: float, unit: str, rate: float | None,
             extra: str = "") -> str:  # fmt: skip
    """The bar as text (pure); ``unit`` "MiB" scales bytes, anything else counts."""
    frac = min(1.0, done / total) if total > 0 else 0.0
    cells = int(frac * CELLS)
    scale = MIB if unit == "MiB" else 1
    text = (f"{what} [{'#' * cells}{'.' * (CELLS - cells)}] {100 * frac:3.0f}%  "
            f"{done / scale:.0f}/{total / scale:.0f} {unit}")  # fmt: skip
    if rate is not None and rate > 0:
        text += f"  {rate / scale:.1f} {unit}/s"
        if total > done:
            text += f"  ETA {(total - done) / rate:.0f} s"
    return text + (f"  {extra}" if extra else "")


class ProgressBar:
    def __init__(
        self,
        what: str,
        unit: str = "MiB",
        quiet_s: float = 1.0,
        every_s: float = 0.25,
        plain_every_s: float = 5.0,
        out: TextIO | None = None,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what, self.unit, self.now = what, unit, now
        self.out = out if out is not None else sys.stderr
        self.tty = self.out.isatty()
        self.every_s = every_s if self.tty else plain_every_s
        self.started = now()
        self._quiet_until = self.started + quiet_s
        self._next = 0.0
        self.shown = False

    def show(self, done: float, total: float, extra: str = "") -> None:
        t = self.now()
        if t < self._quiet_until or t < self._next:
            return
        self._next = t + self.every_s
        rate = done / max(1e-6, t - self.started)
        text = bar_text(self.what, done, total, self.unit, rate, extra)
        if self.tty:
            self.out.write("\r" + text + "\x1b[K")
        else:
            self.out.write(text + "\n")
        self.out.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown and self.tty:
            self.out.write("\n")
            self.out.flush()
        self.shown = False


__all__ = ["ProgressBar", "bar_text"]
