"""When a service riding out a fault says so.

A service retries a passing fault (an election, a broker restart, a cluster not up yet)
every few seconds; a warning per attempt buries the one line an operator needs. A
``FaultStreak`` says it at the first failure, again when the error changes, then every
``remind_s`` while it lasts (with how long and how many attempts), and once when a step
succeeds again. Pure: the caller logs what it returns, on its injected clock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class FaultStreak:
    now: Callable[[], float]
    remind_s: float = 60.0
    _since: float | None = None
    _said_at: float = 0.0
    _error: str = ""
    _attempts: int = 0

    def failed(self, error: str) -> dict[str, Any] | None:
        """A failed attempt; the fields to log if this one is to be said, else None."""
        t = self.now()
        self._attempts += 1
        first = self._since is None
        if first:
            self._since = t
        if not (first or error != self._error or t - self._said_at >= self.remind_s):
            return None
        self._said_at, self._error = t, error
        for_s = round(t - (t if self._since is None else self._since), 1)
        return {"error": error, "attempts": self._attempts, "failing_for_s": for_s}

    def succeeded(self) -> dict[str, Any] | None:
        """A step that worked; the fields of the streak it ends, if one was running."""
        if self._since is None:
            return None
        out = {"attempts": self._attempts, "failed_for_s": round(self.now() - self._since, 1)}
        self._since, self._error, self._attempts = None, "", 0
        return out
