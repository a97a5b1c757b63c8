"""How fast a resync copies (a token bucket under a rate that yields to foreground writes)
and how far it is.

DRBD's resync controller is the anchor: ``c-max-rate`` caps the resync, ``c-min-rate`` is
what it always gets however busy the application is. Here the rate the bucket refills at
is ``max_rate - foreground`` (the bytes per second the new primary's clients write, as
measured by ``ForegroundMeter``), never below ``min_rate`` and never above ``max_rate``; 0
for ``max_rate`` means no limit. Pure: the clock is the caller's (``now`` arguments), the
bucket only says how long to wait. Tests: ``tests/ops/test_resync_rate.py``.

Where DRBD compares the backing disk's sector counters with its own resync I/O, the
foreground here is what the new primary's clients write, read off its log topic: the offsets
it grew by times the mean record size. Every write reaches that log, wherever the primary's
disk is; transaction markers take offsets too, so the estimate errs high (the resync yields
a little more than it must, never less).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from connectors.kafka.reading import end_offsets, mean_value_bytes
from pipeline.errors import ConfigError
from pipeline.timesource import wall_us


def target_rate(max_rate: int, min_rate: int, foreground_bps: float = 0.0) -> float:
    """Bytes per second the resync may copy now (0: unlimited)."""
    if max_rate < 0 or min_rate < 0:
        raise ConfigError(f"rates must be >= 0, got --max-rate {max_rate} --min-rate {min_rate}")
    if max_rate and min_rate > max_rate:
        raise ConfigError(f"--min-rate {min_rate} is above --max-rate {max_rate}")
    if not max_rate:
        return 0.0
    return float(max(min_rate, min(max_rate, max_rate - max(0.0, foreground_bps))))


@dataclass
class TokenBucket:
    """Tokens are bytes; ``burst_s`` seconds of the rate may be spent at once."""

    rate: float
    now: float
    burst_s: float = 0.1
    tokens: float = 0.0

    def set_rate(self, rate: float, now: float) -> None:
        self._refill(now)
        self.rate = rate

    def take(self, nbytes: int, now: float) -> float:
        """Spend ``nbytes``; the seconds to sleep before spending them (0 when unlimited).
        A piece larger than the burst is allowed: it runs the bucket into debt."""
        if self.rate <= 0:
            return 0.0
        self._refill(now)
        self.tokens -= nbytes
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def _refill(self, now: float) -> None:
        if self.rate > 0 and now > self.now:
            self.tokens = min(self.rate * self.burst_s, self.tokens + (now - self.now) * self.rate)
        self.now = max(self.now, now)


@dataclass
class ForegroundMeter:
    """Bytes per second the foreground writes, from samples of (offsets so far, mean bytes
    per offset): the first rate measured as is, later ones smoothed with ``half_life_s``."""

    half_life_s: float = 2.0
    bps: float = 0.0
    _last: tuple[float, int] | None = None
    _measured: bool = False

    def observe(self, now: float, offsets: int, mean_bytes: float) -> float:
        last, self._last = self._last, (now, offsets)
        if last is None or now <= last[0]:
            return self.bps
        dt = now - last[0]
        rate = max(0, offsets - last[1]) * max(0.0, mean_bytes) / dt
        if not self._measured:
            self.bps, self._measured = rate, True
        else:
            self.bps += (1 - 0.5 ** (dt / self.half_life_s)) * (rate - self.bps)
        return self.bps


def log_growth_sampler(
    kafka_conf: Mapping[str, Any], topic: str, mean_every: int = 10
) -> Callable[[], tuple[int, float]]:
    """A ``ForegroundMeter`` sample of ``topic``: its offsets so far, and the mean record
    size, re-read every ``mean_every`` samples (it reads records; the offsets do not)."""
    calls, mean = 0, 0.0

    def sample() -> tuple[int, float]:
        nonlocal calls, mean
        ends = end_offsets(kafka_conf, topic)
        if calls % mean_every == 0 or not mean:
            mean = mean_value_bytes(kafka_conf, topic, ends, last=8)
        calls += 1
        return sum(ends.values()), mean

    return sample


def eta_s(done: int, total: int, rate_bps: float) -> float | None:
    """Seconds left at ``rate_bps`` (None when nothing was measured yet)."""
    if rate_bps <= 0:
        return None if done < total else 0.0
    return max(0, total - done) / rate_bps


@dataclass
class Progress:
    phase: str = "plan"
    bytes_planned: int = 0
    bytes_done: int = 0
    bytes_read: int = 0  # from N's images, this run
    started_mono: float = field(default_factory=time.monotonic)
    foreground_bps: float = 0.0  # what N's clients write (measured only under --max-rate)
    limit_bps: float = 0.0  # the rate the resync may copy at now (0: unlimited)

    def rate_bps(self, now: float) -> float:
        return self.bytes_read / max(1e-6, now - self.started_mono)

    def metrics(self) -> dict[str, Any]:
        """The resync's numbers for ``lowmark failback``'s /metrics (service ``resync``)."""
        return {
            "bytes_copied": self.bytes_done,
            "bytes_planned": self.bytes_planned,
            "bytes_read": self.bytes_read,
            "bytes_left": max(0, self.bytes_planned - self.bytes_done),
            "foreground_bytes_per_s": self.foreground_bps,
            "limit_bytes_per_s": self.limit_bps,
        }

    def to_json(self, now: float) -> dict[str, Any]:
        rate = self.rate_bps(now)
        return {
            "phase": self.phase,
            "bytes_planned": self.bytes_planned,
            "bytes_done": self.bytes_done,
            "bytes_left": max(0, self.bytes_planned - self.bytes_done),
            "rate_bps": round(rate, 1),
            "eta_s": eta_s(self.bytes_done, self.bytes_planned, rate),
            "foreground_bps": round(self.foreground_bps, 1),
            "limit_bps": round(self.limit_bps, 1),
            "updated_us": wall_us(),
        }

    def line(self, now: float) -> str:
        d = self.to_json(now)
        eta = "?" if d["eta_s"] is None else f"{d['eta_s']:.1f}s"
        limit = (
            f" (limit {self.limit_bps / 1e6:.2f} MB/s, foreground {self.foreground_bps / 1e6:.2f})"
            if self.limit_bps
            else ""
        )
        return (
            f"resync {self.phase}: {self.bytes_done / 2**20:.1f} MiB done, "
            f"{d['bytes_left'] / 2**20:.1f} MiB left, {d['rate_bps'] / 1e6:.2f} MB/s{limit}, "
            f"ETA {eta}"
        )
