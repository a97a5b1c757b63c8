"""The applier's clocks and bounds, without Kafka: what it decides when, and what it keeps.

A fake ``TimeSource`` drives the checkpoint interval, the choice between a background
checkpoint and one with digests or a snapshot, and the stamps of a checkpoint record.
The lists that grow with the log are bounded: markers (the newest kept, the rest
counted) and watermarks read but not applied yet (the next to apply and the newest kept).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.backup import applier as applier_mod
from pipeline.backup.applier import Applier, ApplierConfig
from pipeline.backup.plan import ApplyOp, OpKind
from schemas import codec
from schemas.records import Marker, Watermark
from tests.fake_time import FakeTime


def _applier(tmp_path: Path, clock: FakeTime, **config: Any) -> Applier:
    cfg = ApplierConfig(cg="cg", site="dr", data_dir=tmp_path, **config)
    return Applier(cfg, {}, clock.source())  # no Kafka until start()


def _idle(a: Applier) -> list[str]:
    """Stub the Kafka side of a step; record which checkpoint the step chose."""
    chosen: list[str] = []
    a._read_log = lambda timeout_s: 0  # type: ignore[method-assign]
    a._read_watermarks = lambda timeout_s=0: 0  # type: ignore[method-assign]
    a._apply_ready = lambda: False  # type: ignore[method-assign]
    a.checkpoint = lambda digests=True: chosen.append(f"full:{digests}") or {}  # type: ignore[method-assign]
    a._checkpoint_background = lambda: chosen.append("background")  # type: ignore[method-assign]
    return chosen


def test_a_checkpoint_is_due_after_the_interval_of_the_injected_clock(tmp_path: Path) -> None:
    clock = FakeTime(500.0)
    a = _applier(tmp_path, clock, checkpoint_interval_s=2.0)
    chosen = _idle(a)
    a.applied_w = 7  # applied past the last checkpoint
    clock.advance(1.999)
    a.step(0)
    assert chosen == []
    clock.advance(0.001)
    a.step(0)
    assert chosen == ["background"]
    a.applied_w = a.checkpoint_w  # nothing new applied: never due, however long
    clock.advance(3600)
    a.step(0)
    assert chosen == ["background"]


def test_digests_and_snapshots_make_the_checkpoint_synchronous_when_due(tmp_path: Path) -> None:
    clock = FakeTime(500.0)
    a = _applier(tmp_path, clock, digest_interval_s=30.0, snapshot_interval_s=60.0)
    chosen = _idle(a)
    a._last_digest = a._last_snapshot = clock.t
    clock.advance(29)
    a._checkpoint_due()
    clock.advance(1)
    a._checkpoint_due()
    a._last_digest = clock.t  # as checkpoint() would have set it
    clock.advance(30)  # 60 s since the last snapshot: due, although digests are too
    a._checkpoint_due()
    assert chosen == ["background", "full:None", "full:None"]


def test_the_checkpoint_record_and_rpo_read_the_injected_wall_clock(tmp_path: Path) -> None:
    clock = FakeTime(500.0)
    a = _applier(tmp_path, clock)
    a.site = type("NoImages", (), {"images": {}})()  # type: ignore[assignment]
    rec = a._checkpoint_record(digests=False)
    assert rec.written_us == clock.wall_us()
    assert a.metrics()["rpo_s"] is None  # nothing applied yet


def _marker(ts: int) -> ApplyOp:
    rec = Marker(f"m{ts}", ts, "i", 0, 1)
    return ApplyOp(OpKind.MARKER, None, ts, 0, 0, None, rec, "i", 0)


def test_markers_are_bounded_newest_kept_dropped_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = _applier(tmp_path, FakeTime())
    assert a.markers.maxlen == applier_mod.MAX_MARKERS
    n = applier_mod.MAX_MARKERS + 37
    for ts in range(1, n + 1):
        a._apply(_marker(ts))
    assert len(a.markers) == applier_mod.MAX_MARKERS
    assert a.markers[0].ts == n - applier_mod.MAX_MARKERS + 1 and a.markers[-1].ts == n
    assert a.stats.markers_dropped == 37 == a.metrics()["markers_dropped"]


class _Msg:
    def __init__(self, value: bytes, offset: int) -> None:
        self._value, self._offset = value, offset

    def error(self) -> None:
        return None

    def value(self) -> bytes:
        return self._value

    def offset(self) -> int:
        return self._offset


class _WatermarkTopic:
    def __init__(self, msgs: list[_Msg]) -> None:
        self.msgs = msgs

    def consume(self, n: int, timeout_s: float) -> list[_Msg]:
        out, self.msgs = self.msgs[:n], self.msgs[n:]
        return out


def _watermark(w: int, offset: int) -> _Msg:
    # log_offsets never reached: they pile up
    rec = Watermark("cg", w, {0: 10**9}, w, w, (), 1)
    return _Msg(codec.encode(rec), offset)


def test_watermarks_waiting_to_be_applied_are_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(applier_mod, "MAX_TARGETS", 8)
    a = _applier(tmp_path, FakeTime())
    a._wm = _WatermarkTopic([_watermark(w, w) for w in range(1, 101)])  # type: ignore[assignment]
    while a._read_watermarks(0):
        pass
    ws = [t.w for t in a._targets]
    assert len(ws) == 8 and a.stats.targets_dropped == 92 == a.metrics()["targets_dropped"]
    # the next to apply stays; the newest (which covers every dropped one) is kept
    assert ws[0] == 1 and ws[-1] == 100 and ws == sorted(ws)
    assert a.metrics()["target_w"] == 100
