"""The one progress bar of every long operation (restore, replay, drill, indexing,
roll-forward, resync, bootstrap).

Tries to break: a bar drawn for an operation that took a moment; a redraw per call
(a hot loop floods the terminal); carriage returns into a log file; a bar past 100% or
an ETA when the total is unknown.
"""

from __future__ import annotations

import io

from pipeline.app.progress import MIB, ProgressBar, bar_text


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_the_text() -> None:
    assert bar_text("restoring", 312 * MIB, 600 * MIB, "MiB", 41 * MIB) == (
        "restoring [##########..........]  52%  312/600 MiB  41.0 MiB/s  ETA 7 s"
    )
    over = bar_text("x", 700, 600, "records", None)
    assert "[####################] 100%" in over and "ETA" not in over
    assert "[....................]   0%" in bar_text("x", 5, 0, "records", 1.0)  # unknown total


def test_quiet_then_throttled_redraws_in_place_on_a_terminal() -> None:
    out, clock = Tty(), Clock()
    bar = ProgressBar("resync", quiet_s=1.0, every_s=0.25, out=out, now=clock)
    bar.show(1, 10)
    assert out.getvalue() == "" and not bar.shown  # a quick operation shows nothing
    clock.t += 1.0
    for _ in range(100):
        bar.show(5 * MIB, 10 * MIB)
    assert out.getvalue().count("\r") == 1  # one redraw per every_s, not per call
    clock.t += 0.3
    bar.show(10 * MIB, 10 * MIB)
    bar.close()
    text = out.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n") and "100%" in text


def test_a_log_file_gets_plain_lines_now_and_then() -> None:
    out, clock = io.StringIO(), Clock()
    bar = ProgressBar("bootstrap v1", quiet_s=0.0, out=out, now=clock, plain_every_s=5.0)
    for _ in range(20):
        bar.show(1, 4)
        clock.t += 1.0
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 4
    assert all(ln.startswith("bootstrap v1 [") for ln in lines)
