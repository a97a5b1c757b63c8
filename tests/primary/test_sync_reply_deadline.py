"""A sync write over NBD gets its reply within replication_timeout_s, whatever Kafka does.

Found by the broker-fault run (tests/system/test_broker_faults.py, seed 1560717716): with
the log leader partitioned, paused and killed, sync writes got no reply within
replication_timeout_s + 3 s. The NBD path chained "durable" and then "covered", and only
the second had a deadline; the tick thread retries a transaction for as long as the
brokers are away, so a write could wait without bound and then a full timeout more.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from pipeline.errors import ReplicationError
from pipeline.primary.nbd_volume import VolumeExport

TIMEOUT_S = 0.3
Callback = Callable[[BaseException | None], None]


class _Engine:
    def __init__(self) -> None:
        self.config = SimpleNamespace(replication_timeout_s=TIMEOUT_S)
        self.time_source = SimpleNamespace(monotonic=time.monotonic)
        self.covered_timeouts: list[float] = []

    def admit_ack(self, writes: int = 1) -> None:
        pass

    def on_covered(self, ts: int, fn: Callback, timeout_s: float | None = None) -> None:
        assert timeout_s is not None
        self.covered_timeouts.append(timeout_s)  # W never comes: the follower's timeout


class _Ticket:
    def __init__(self, ts: int, durable_after_s: float | None) -> None:
        self.ts = ts
        self.durable_after_s = durable_after_s

    def add_done_callback(self, fn: Callback) -> None:
        if self.durable_after_s is not None:
            asyncio.get_running_loop().call_later(self.durable_after_s, fn, None)


def _export(engine: _Engine) -> VolumeExport:
    volume: Any = SimpleNamespace(name="v", mode="sync", _cg=SimpleNamespace(interceptor=engine))
    return VolumeExport(volume)


@pytest.mark.parametrize("durable_after_s", [None, 0.2], ids=["never-durable", "late-durable"])
def test_a_sync_write_gets_an_error_reply_within_the_timeout(durable_after_s: float | None) -> None:
    engine = _Engine()

    async def write() -> float:
        started = time.monotonic()
        ticket: Any = _Ticket(7, durable_after_s)
        with pytest.raises(ReplicationError, match="replication_timeout_s"):
            # the bound the test allows: the timeout and a little; without the fix the
            # never-durable write waits forever (wait_for's TimeoutError fails the test)
            await asyncio.wait_for(_export(engine)._covered(ticket), TIMEOUT_S * 5)
        return time.monotonic() - started

    took = asyncio.run(write())
    assert took < TIMEOUT_S + 0.2, f"the error reply took {took:.2f} s"
    if durable_after_s is not None:  # the cut's wait gets only what is left of the deadline
        assert engine.covered_timeouts and engine.covered_timeouts[0] <= TIMEOUT_S - 0.15


@pytest.mark.parametrize("writes", [1, 0], ids=["fua-write", "flush"])
def test_a_fua_write_or_flush_gets_an_error_reply_within_the_timeout(writes: int) -> None:
    """The async path's durability wait (FUA, flush) has the same bound: the Python API's
    ``wait_durable`` raises after ``replication_timeout_s``, NBD did not answer at all."""
    engine = _Engine()

    async def flush() -> float:
        started = time.monotonic()
        ticket: Any = _Ticket(9, None)
        with pytest.raises(ReplicationError, match="NOT replicated"):
            await asyncio.wait_for(_export(engine)._durable(ticket, writes), TIMEOUT_S * 5)
        return time.monotonic() - started

    took = asyncio.run(flush())
    assert took < TIMEOUT_S + 0.2, f"the error reply took {took:.2f} s"


def test_a_durable_flush_is_answered_at_once_with_success() -> None:
    engine = _Engine()

    async def flush() -> float:
        started = time.monotonic()
        await _export(engine)._durable(_Ticket(9, 0.0), 0)  # type: ignore[arg-type]
        return time.monotonic() - started

    assert asyncio.run(flush()) < TIMEOUT_S / 2
