"""A replay reports the markers of its range, bounded: a long range holds any number of
them, the plan keeps the newest ``MAX_MARKERS`` and counts the rest. No Kafka."""

from __future__ import annotations

import pytest

from pipeline.ops import replay as replay_mod
from pipeline.ops.replay import ReplayPlan
from schemas.records import Marker


def _marker(ts: int) -> Marker:
    return Marker(f"m{ts}", ts, "A", 0, 1)


def test_replay_markers_are_bounded_newest_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replay_mod, "MAX_MARKERS", 5)
    plan = ReplayPlan(10, 1000)
    for off, ts in enumerate(range(1, 41)):
        assert plan.add(_marker(ts), 0, off) == []
    # ts 1..10 lie at or below from_w: not in the range, not counted
    assert [m.ts for m in plan.markers] == [36, 37, 38, 39, 40]
    assert plan.markers_dropped == 25
