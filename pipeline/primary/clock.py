"""The hybrid logical clock: a monotonic clock with a persisted bound, commit wait.

A ts (``schemas.ts``) is one signed 64-bit integer ``physical_us << 12 | logical``:
integer order is causal order. ``physical_us`` follows the wall clock when it moves
forward; when the wall clock stalls or goes backwards the 12-bit logical counter advances
instead, carrying into the physical part when it overflows, so ``now()`` never repeats or
goes back.

With a ``state_path`` the clock also survives restarts: it never issues a ts whose
physical part has not been reserved durably on disk beforehand, so a restarted process,
even on a host whose clock jumped back, starts above everything it issued before. The
reservation runs ``reserve_us`` ahead, costing one fsync per ``reserve_us`` of time.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.errors import ClockError
from pipeline.timesource import wall_us
from schemas.ts import (
    LOGICAL_BITS,
    MAX_PHYSICAL_US,
    MAX_TS,
    format_ts,
    ts_physical_us,
)

# Below this, commit_wait yields instead of sleeping: a sleep overshoots by ~50-100 µs.
_SPIN_BELOW_US = 2_000


class HybridClock:
    """A thread-safe hybrid logical clock; optionally persisted (see the module docstring).

    ``sleep`` is injectable so tests can drive ``commit_wait`` with a fake wall clock.
    """

    def __init__(
        self,
        wall_us: Callable[[], int] = wall_us,
        state_path: Path | None = None,
        reserve_us: int = 1_000_000,
        max_clock_skew_us: int = 0,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if reserve_us < 1:
            raise ValueError(f"reserve_us must be >= 1, got {reserve_us}")
        if max_clock_skew_us < 0:
            raise ValueError(f"max_clock_skew_us must be >= 0, got {max_clock_skew_us}")
        self._wall = wall_us
        self._sleep = sleep
        self._state_path = Path(state_path) if state_path is not None else None
        self._reserve_us = reserve_us
        self._skew_us = max_clock_skew_us
        self._lock = threading.Lock()
        self._last = 0
        # Physical µs below which issuing is safe: durably reserved (or unbounded).
        self._bound = MAX_PHYSICAL_US + 1
        if self._state_path is not None:
            floor = self._read_bound(self._state_path)
            self._bound = floor
            # Fails here, not on the first write, when the state file is unwritable.
            self._reserve(max(floor, self._wall()))
            # Everything issued before the restart lies below the persisted bound.
            self._last = floor << LOGICAL_BITS

    # -- hot path ------------------------------------------------------------------

    def now(self) -> int:
        """Issue a ts greater than every ts issued or observed before (across threads)."""
        # Hot path (every write): plain comparisons, no builtin calls; ~0.5 µs.
        with self._lock:
            ts = self._wall() << LOGICAL_BITS
            last = self._last
            if ts <= last:
                ts = last + 1  # stalled/backward wall: logical ticks, carrying into physical
            if ts >> LOGICAL_BITS >= self._bound:
                self._reserve(ts >> LOGICAL_BITS)
            self._last = ts
            return ts

    def observe(self, ts: int) -> None:
        """HLC receive rule: after this, ``now()`` returns values greater than ``ts``."""
        if not 0 <= ts <= MAX_TS:
            raise ClockError(f"observed ts {ts} is outside [0, 2**63); refusing it")
        with self._lock:
            if ts <= self._last:
                return
            # Reserve now, not at the next now(): a caller may promise "never <= ts"
            # (progress S) from last() before this process issues anything above it.
            if ts >> LOGICAL_BITS >= self._bound:
                self._reserve(ts >> LOGICAL_BITS)
            self._last = ts

    def last(self) -> int:
        """The last issued ts, or the floor set by ``observe``/a restart, without issuing."""
        with self._lock:
            return self._last

    # -- commit wait ---------------------------------------------------------------

    def commit_wait_us(self, ts: int) -> int:
        """How long ``commit_wait(ts)`` would block now, in µs (0 when it would not)."""
        return max(0, ts_physical_us(ts) + self._skew_us + 1 - self._wall())

    def commit_wait(self, ts: int, timeout_s: float | None = None) -> None:
        """Block until ``wall_us() > physical(ts) + max_clock_skew_us``.

        Any host's clock is then past ts, so a write issued after the ack gets a larger
        ts anywhere. Raises ClockError if that takes longer than ``timeout_s``.
        """
        target = ts_physical_us(ts) + self._skew_us
        remaining = target + 1 - self._wall()
        if remaining <= 0:
            return
        if timeout_s is not None and remaining > timeout_s * 1e6:
            raise ClockError(
                f"commit wait for ts {format_ts(ts)} needs {remaining} µs, more than the "
                f"{timeout_s} s allowed: this host's clock is behind the ts (clock stepped "
                "back, or a peer's clock is ahead by more than max_clock_skew). Fix NTP."
            )
        while remaining > 0:
            if remaining > _SPIN_BELOW_US:
                self._sleep((remaining - _SPIN_BELOW_US // 2) / 1e6)
            else:
                self._sleep(0)  # yield the GIL; a real sleep would overshoot
            remaining = target + 1 - self._wall()

    # -- persisted bound -----------------------------------------------------------

    def _reserve(self, physical_us: int) -> None:
        """Make ``[.., physical_us + reserve_us)`` issuable; durable first when persisted."""
        bound = min(physical_us + self._reserve_us, MAX_PHYSICAL_US + 1)
        if physical_us > MAX_PHYSICAL_US:
            raise ClockError(
                f"the clock reached {physical_us} µs, past the last representable ts "
                "(year 2041); the ts encoding must be widened"
            )
        if self._state_path is not None:
            self._write_bound(self._state_path, bound)
        self._bound = bound

    @staticmethod
    def _read_bound(path: Path) -> int:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise ClockError(f"cannot read clock state {path}: {exc}") from exc
        try:
            bound = json.loads(text)["reserved_physical_us"]
            if not isinstance(bound, int) or not 0 <= bound <= MAX_PHYSICAL_US + 1:
                raise ValueError(bound)
        except (ValueError, KeyError, TypeError) as exc:
            # Starting from 0 could repeat ts already issued: refuse instead of guessing.
            raise ClockError(
                f"clock state {path} is unreadable ({exc!r}). If this host's clock is "
                "certainly past every ts this process issued, delete the file and restart."
            ) from exc
        return bound

    @staticmethod
    def _write_bound(path: Path, bound: int) -> None:
        tmp = path.with_name(path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, json.dumps({"reserved_physical_us": bound}).encode() + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            raise ClockError(
                f"cannot persist the clock bound to {path}: {exc}. The clock will not "
                "issue timestamps it could repeat after a restart; make the path writable."
            ) from exc
