"""The invariants the simulation checks after every step, as plain functions.

Each returns None when the invariant holds, else a sentence saying what broke; the world
raises ``Violation`` with that sentence, the seed and the last events.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from pipeline.watermark.state import WatermarkState
from schemas.records import Watermark
from tests.sim.backup import Applier
from tests.sim.log import Entry


def w_never_decreases(watermarks: list[Watermark], since: int = 0) -> str | None:
    """DESIGN invariant 2: no W in the topic is lower than an earlier one (any instance).

    ``since``: the pairs before index ``since`` were checked already (the list only grows)."""
    start = max(since - 1, 0)
    for i, (a, b) in enumerate(itertools.pairwise(watermarks[start:]), start):
        if b.w < a.w:
            return f"published W #{i + 1} = {b.w} is below W #{i} = {a.w}"
    return None


def published_w_bounds_its_records(wm: Watermark, parts: list[list[Entry]]) -> str | None:
    """Every legitimate committed record with a ts <= W lies below W's log_offsets."""
    for p, part in enumerate(parts):
        end = wm.log_offsets.get(p, 0)
        for e in part[end:]:
            if e.committed and not e.zombie and e.record is not None:
                low = min(e.record.timestamps())
                if low <= wm.w:
                    return f"record at {p}@{e.offset} has ts {low} <= W {wm.w} above {end}"
    return None


def fence_clamps_w(wm: Watermark, fences: list[tuple[int, int]]) -> str | None:
    """Invariant 2: W passes a fenced instance's final S only on fresh evidence: while a
    member has not reported since the fence, W stays at or below the fenced S."""
    for off, final_s in fences:
        if off > wm.progress_offset or wm.w <= final_s:
            continue
        for m in wm.members:
            if m.last_progress_offset < off:
                return (
                    f"W {wm.w} passed the final S {final_s} of an instance fenced at progress "
                    f"offset {off}, but {m.interceptor_id} has not reported since "
                    f"(last at {m.last_progress_offset})"
                )
    return None


def w_covers_everything_durable(w: int, max_ts: int) -> str | None:
    """Liveness: once the faults stop and every interceptor reports, W covers every
    durable record."""
    if w < max_ts:
        return f"after the drain W {w} is below the newest durable ts {max_ts}"
    return None


def no_record_below_published_w(entries: Iterable[Entry], max_w: int) -> str | None:
    """Invariant 2: no record with ts <= W appears in the log after W was published."""
    for e in entries:
        if e.committed and not e.zombie and e.record is not None:
            low = min(e.record.timestamps())
            if low <= max_w:
                return f"record at offset {e.offset} with ts {low} committed after W {max_w}"
    return None


def applied_only_legit_and_below_w(
    applier: Applier, legit: set[tuple[str, int, str, int]]
) -> str | None:
    """No op with ts > its W is applied; no zombie's op is ever applied."""
    for w, op in applier.applied:
        if op.ts > w:
            return f"{applier.name} applied {op.kind} ts {op.ts} under W {w}"
        if (
            op.volume_id is not None
            and (op.volume_id, op.ts, op.interceptor_id, op.epoch) not in legit
        ):
            return (
                f"{applier.name} applied {op.kind} of {op.volume_id} ts {op.ts} from "
                f"{op.interceptor_id} epoch {op.epoch}, which no live instance committed (a zombie)"
            )
    applier.applied.clear()  # checked: keep the per-step check O(new ops)
    return None


def checkpoint_stops_at_bad_records(applier: Applier, bad: list[list[int]]) -> str | None:
    """Invariant 5: nothing at or after a bad record counts as consumed until it is skipped:
    no checkpoint's offsets pass it. ``bad``: per partition, the corrupt records' offsets."""
    for p, offsets in enumerate(bad):
        first = next((o for o in offsets if (p, o) not in applier.skip), None)
        if first is not None and applier.checkpoint.offsets.get(p, 0) > first:
            return (
                f"{applier.name}'s checkpoint offset {applier.checkpoint.offsets[p]} of partition "
                f"{p} passes the bad record at {first}, which nobody skipped"
            )
    return None


def images_equal(
    name: str, got: dict[str, bytearray] | dict[str, bytes], want: dict[str, bytes]
) -> str | None:
    """Invariant 1: the images are exactly the oracle's at that W."""
    if sorted(got) != sorted(want):
        return f"{name} holds volumes {sorted(got)}, the oracle {sorted(want)}"
    for vid in sorted(want):
        if bytes(got[vid]) != want[vid]:
            a, b = bytes(got[vid]), want[vid]
            first = next(
                (i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b))
            )
            return f"{name} volume {vid} differs from the oracle first at byte {first}"
    return None


def strictly_increasing(iid: str, issued: list[int], since: int = 0) -> str | None:
    """The clock never reissues a ts, across restarts (the reservation survives them).

    ``since`` as in ``w_never_decreases``."""
    for a, b in itertools.pairwise(issued[max(since - 1, 0) :]):
        if b <= a:
            return f"interceptor {iid} issued ts {b} after {a}"
    return None


def _fold(s: WatermarkState) -> tuple[object, ...]:
    # the fold's fields compared as they are: snapshot() copies them with dataclasses.asdict,
    # which cost a third of the simulation's time when run after every step
    return (s.w, s.max_s, s.progress_offset, s.members, s.departures(), s.holds, s.lost)


def fold_agrees(service_state: WatermarkState, shadow: WatermarkState) -> str | None:
    """A restarted watermark service resumes the same fold (same W, members, departed)."""
    if _fold(service_state) != _fold(shadow):
        a, b = service_state.snapshot(), shadow.snapshot()
        return f"the resumed fold {a} differs from the uninterrupted one {b}"
    return None
