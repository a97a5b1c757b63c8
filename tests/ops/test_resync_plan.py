"""The divergence and the plan of a failback resync (pure): tries to break the promise that
every byte any source names is copied, that nothing else is copied in DELTA mode, that a
range never crosses a volume's end, and that the threshold and volume changes pick FULL."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import ConfigError
from pipeline.ops.resync_plan import Divergence, Mode, Source, VolumePlan, plan_resync

RB = 4096


def _covered(vp: VolumePlan) -> set[int]:
    out: set[int] = set()
    for o, n in vp.ranges:
        out.update(range(o, o + n))
    return out


touches = st.lists(
    st.tuples(
        st.sampled_from(["a", "b"]),
        st.integers(0, 40_000),
        st.integers(0, 9000),
        st.sampled_from(list(Source)),
    ),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(touches, st.integers(1, 40_000), st.integers(1, 40_000))
def test_delta_copies_exactly_the_regions_touched(ts, size_a, size_b):
    div = Divergence(RB)
    for vid, off, n, src in ts:
        div.touch(vid, off, n, src)
    sizes = {"a": size_a, "b": size_b}
    plan = plan_resync(div, sizes, sizes, full_copy_threshold=1.0, max_range_bytes=2 * RB)
    for vid, size in sizes.items():
        vp = plan.volume(vid)
        assert vp is not None and vp.mode is Mode.DELTA and vp.size == size
        want: set[int] = set()
        for v, off, n, _src in ts:
            if v == vid and n:
                first, last = off // RB * RB, min(size, ((off + n - 1) // RB + 1) * RB)
                want.update(range(first, last))
        got = _covered(vp)
        assert got == want  # every touched byte's region, nothing else, nothing past the end
        assert vp.diverged_bytes == len(want) == vp.planned_bytes
        starts = [o for o, _n in vp.ranges]
        assert starts == sorted(starts)
        assert all(0 < n <= 2 * RB for _o, n in vp.ranges)


def test_threshold_switches_to_full():
    div = Divergence(RB)
    div.touch("a", 0, 5 * RB, Source.DIRTY)  # 5 of 10 regions: 50%
    sizes = {"a": 10 * RB}
    at = plan_resync(div, sizes, sizes, full_copy_threshold=0.5).volumes[0]
    assert at.mode is Mode.DELTA and at.planned_bytes == 5 * RB
    above = plan_resync(div, sizes, sizes, full_copy_threshold=0.49).volumes[0]
    assert above.mode is Mode.FULL and above.planned_bytes == 10 * RB
    assert above.diverged_bytes == 5 * RB and "threshold" in above.why


def test_volume_changes_copy_whole_or_drop():
    div = Divergence(RB)
    div.volume_changed("resized", Source.REVERSE_LOG)
    old = {"resized": 8 * RB, "gone": RB, "bigger": RB, "same": 4 * RB}
    new = {"resized": 8 * RB, "fresh": 2 * RB, "bigger": 2 * RB, "same": 4 * RB}
    plan = {v.volume_id: v for v in plan_resync(div, old, new).volumes}
    assert plan["resized"].mode is Mode.FULL and "since the cut" in plan["resized"].why
    assert plan["fresh"].mode is Mode.FULL and plan["fresh"].planned_bytes == 2 * RB
    assert plan["bigger"].mode is Mode.FULL
    assert plan["gone"].mode is Mode.DROP and plan["gone"].ranges == ()
    assert plan["same"].mode is Mode.DELTA and plan["same"].ranges == ()


def test_dirty_log_regions_of_another_size_and_the_json_round_trip():
    div = Divergence(RB)
    div.touch_regions("a", [1, 3], 64 * 1024, Source.DIRTY)
    assert div.named[Source.DIRTY] == 32
    vp = plan_resync(div, {"a": 1 << 20}, {"a": 1 << 20}).volumes[0]
    assert vp.ranges == ((64 * 1024, 64 * 1024), (3 * 64 * 1024, 64 * 1024))
    assert VolumePlan.from_json(vp.to_json()) == vp


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="region-bytes"):
        Divergence(3000)
    with pytest.raises(ConfigError, match="threshold"):
        plan_resync(Divergence(RB), {}, {}, full_copy_threshold=1.5)
