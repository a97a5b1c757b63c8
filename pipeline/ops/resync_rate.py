"""How fast a resync copies: a token bucket under a rate that yields to foreground writes.

DRBD's resync controller is the anchor: ``c-max-rate`` caps the resync, ``c-min-rate`` is
what it always gets however busy the application is. Here the rate the bucket refills at
is ``max_rate - foreground`` (the bytes per second the new primary's clients write, as
measured by the caller), never below ``min_rate`` and never above ``max_rate``; 0 for
``max_rate`` means no limit. Pure: the clock is the caller's (``now`` arguments), the
bucket only says how long to wait. Tests: ``tests/ops/test_resync_rate.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import ConfigError


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


def eta_s(done: int, total: int, rate_bps: float) -> float | None:
    """Seconds left at ``rate_bps`` (None when nothing was measured yet)."""
    if rate_bps <= 0:
        return None if done < total else 0.0
    return max(0, total - done) / rate_bps
