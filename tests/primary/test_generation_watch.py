"""The generation watch of an interceptor, without Kafka (``pipeline.primary.generation_watch``).

Tries to break: a watch that fences on the current generation or an older one, that
fences twice, that dies (or fences) on a failed roles read, that keeps reading after it
fired, an error message that does not say what happened and what to do; the new
InterceptorConfig fields accepting nonsense.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from pipeline.errors import ConfigError, FencedError, KafkaUnavailableError
from pipeline.primary.engine_config import InterceptorConfig
from pipeline.primary.generation_watch import GenerationWatch, superseded
from pipeline.topology.roles import initial_roles, plan_failover

G0 = initial_roles("cg1", "main", now_us=1)
G1 = plan_failover(G0, "cg1", "dr", 123 << 12, {0: 7}, True, 2)
G2 = plan_failover(G1, "cg1", "main", 456 << 12, {}, False, 3)


def test_current_or_older_roles_fence_nobody() -> None:
    assert superseded(None, "cg1", 0, "i") is None
    assert superseded(G0, "cg1", 0, "i") is None
    assert superseded(G1, "cg1", 1, "i") is None
    assert superseded(G1, "cg1", 2, "i") is None  # older roles than us: not our business


def test_a_newer_generation_fences_with_what_to_do() -> None:
    err = superseded(G1, "cg1", 0, "host-a")
    assert isinstance(err, FencedError) and not err.retriable
    text = str(err)
    for words in (
        "interceptor host-a of CG cg1 (generation 0) is fenced",
        "generation 1, whose primary is 'dr'",
        "failover from main at W",
        "no longer the primary",
        "not replicated",
        "failback",
    ):
        assert words in text
    assert "generation 2" in str(superseded(G2, "cg1", 0, "x"))


class Reader:
    def __init__(self, *answers):
        self.answers = list(answers)
        self.calls = 0

    def __call__(self):
        self.calls += 1
        a = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(a, Exception):
            raise a
        return a


def test_the_watch_fires_once_and_survives_failed_reads() -> None:
    fired: list[FencedError] = []
    reader = Reader(KafkaUnavailableError("brokers away"), RuntimeError("odd"), G0, G1)
    watch = GenerationWatch(reader, "cg1", 0, "i", fired.append, 0.01, now=lambda: 0.0)
    assert watch.check() is None and watch.errors == 1  # logged, not fatal
    assert watch.check() is None and watch.errors == 2
    assert watch.check() is None and fired == []
    err = watch.check()
    assert err is not None and fired == [err] and watch.fired is err
    watch.check()
    assert fired == [err], "fenced twice"


def test_the_watch_thread_reads_until_it_fires_then_stops() -> None:
    done = threading.Event()
    fired: list[FencedError] = []

    def on(err: FencedError) -> None:
        fired.append(err)
        done.set()

    reader = Reader(None, None, KafkaUnavailableError("x"), G1)
    watch = GenerationWatch(reader, "cg1", 0, "i", on, 0.01)
    watch.start()
    assert done.wait(5)
    calls = reader.calls
    threading.Event().wait(0.1)
    assert reader.calls == calls, "the watch kept reading after it fired"
    assert len(fired) == 1
    watch.close()


def test_a_closed_watch_stops_reading() -> None:
    reader = Reader(None)
    watch = GenerationWatch(reader, "cg1", 0, "i", lambda e: None, 0.01)
    watch.start()
    threading.Event().wait(0.05)
    watch.close()
    calls = reader.calls
    threading.Event().wait(0.05)
    assert reader.calls == calls


@pytest.mark.parametrize(
    "bad",
    [
        {"generation": -1},
        {"generation": True},
        {"clock_floor_us": -5},
        {"clock_floor_us": 1.5},
        {"generation_check_s": 0},
        {"generation_check_s": 600},
    ],
)
def test_config_refuses_nonsense(bad, tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        InterceptorConfig("cg1", "i", tmp_path, **bad).validate()


def test_config_defaults_are_generation_0() -> None:
    c = InterceptorConfig("cg1", "i", Path("/x")).validate()
    assert (c.generation, c.clock_floor_us, c.generation_check_s) == (0, 0, 1.0)
