"""The watermark service following the roles, with fake services and a fake clock
(``pipeline.watermark.generations``).

Tries to break: a follower that reads the roles on every step (a Kafka read per poll),
never reads them again, keeps the old generation's service running beside the new one,
dies on a failed roles read, or loses its way when the new generation's service fails
to start (it must retry, not step a closed service).
"""

from __future__ import annotations

import pytest

from pipeline.errors import KafkaUnavailableError
from pipeline.topology.roles import initial_roles, plan_failover
from pipeline.watermark.generations import GenerationalWatermark
from tests.fake_time import FakeTime

G0 = initial_roles("cg1", "main", now_us=1)
G1 = plan_failover(G0, "cg1", "dr", 100, {}, True, 2)
G2 = plan_failover(G1, "cg1", "main", 200, {}, True, 3)


class FakeService:
    def __init__(self, generation: int, log: list[str], fail_start: list[bool]) -> None:
        self.generation = generation
        self.log = log
        self.fail_start = fail_start
        self.steps = 0
        self.closed = False

    def start(self) -> None:
        if self.fail_start and self.fail_start.pop(0):
            self.log.append(f"start-failed {self.generation}")
            raise KafkaUnavailableError("brokers away")
        self.log.append(f"start {self.generation}")

    def step(self, poll_timeout_s: float = 0.05) -> None:
        assert not self.closed, "stepped a closed service"
        self.steps += 1

    def close(self) -> None:
        self.closed = True
        self.log.append(f"close {self.generation}")

    def metrics(self) -> dict[str, int]:
        return {"w": self.generation * 10}


def make_follower(roles, fail_start=()):
    t = FakeTime()
    log: list[str] = []
    fails = list(fail_start)
    reads = []

    def read():
        reads.append(t.t)
        r = roles[0]
        if isinstance(r, Exception):
            raise r
        return r

    f = GenerationalWatermark(
        "cg1", lambda g: FakeService(g, log, fails), read, t.source(), check_every_s=1.0
    )
    return f, t, log, reads


def test_starts_in_the_roles_generation_and_reads_them_once_a_second() -> None:
    roles = [None]
    f, t, log, reads = make_follower(roles)
    f.start()
    assert log == ["start 0"] and f.generation == 0
    for _ in range(50):
        f.step()
        t.advance(0.01)
    assert len(reads) == 1, "roles read more than about once a second"
    t.advance(0.6)
    f.step()
    assert len(reads) == 2
    roles[0] = G1
    f.step()  # within the second: not seen yet
    assert f.generation == 0
    t.advance(1.0)
    f.step()
    assert log == ["start 0", "close 0", "start 1"] and f.generation == 1
    assert f.metrics()["generation"] == 1 and f.metrics()["w"] == 10
    assert f.metrics()["generation_switches"] == 1


def test_a_failed_roles_read_keeps_the_generation_running() -> None:
    roles: list = [G1]
    f, t, log, _ = make_follower(roles)
    f.start()
    roles[0] = KafkaUnavailableError("away")
    t.advance(1.0)
    f.step()
    assert f.generation == 1 and f.roles_errors == 1 and log == ["start 1"]
    roles[0] = G2
    t.advance(1.0)
    f.step()
    assert f.generation == 2


def test_a_new_generation_that_cannot_start_is_retried() -> None:
    roles: list = [None]
    f, t, log, _ = make_follower(roles, fail_start=[False, True])
    f.start()
    roles[0] = G1
    t.advance(1.0)
    with pytest.raises(KafkaUnavailableError):
        f.step()  # the run loop backs off on it and steps again
    assert f.service is None
    f.step()
    assert f.generation == 1 and log == [
        "start 0",
        "close 0",
        "start-failed 1",
        "close 1",
        "start 1",
    ]
    f.close()
    assert log[-1] == "close 1"
