"""Tries to break the watermark fold (DESIGN invariants 1 and 2).

Attacks: W going down under any event sequence; W passing a live member's S; W passing a
fenced member's S before every survivor reported again; zombies and stale epochs moving
anything; replayed offsets changing state; a resumed fold (from a snapshot at any cut)
disagreeing with a full one; a joiner's clock floor below some W; and, end to end in a
seeded simulation of interceptors and a watermark service, a record with ts <= W
becoming durable after W was published.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from pipeline.errors import CorruptRecordError, WatermarkError
from pipeline.watermark.state import (
    JOIN_EPOCH_FROM_OFFSET,
    Member,
    Reason,
    WatermarkState,
    join_clock_floor,
    join_epoch,
)
from schemas.records import Progress, ProgressKind, Watermark


def ev(kind: str, iid: str, epoch: int, s: int = 0) -> Progress:
    return Progress(iid, epoch, ProgressKind(kind), s, {}, 0)


def fold(
    events: list[tuple[Progress, int]], state: WatermarkState | None = None
) -> WatermarkState:
    state = state or WatermarkState()
    for e, off in events:
        state.apply(e, off)
    return state


# ---- rules, one at a time ---------------------------------------------------------------


def test_join_starts_at_w_and_takes_offset_as_epoch() -> None:
    st_ = fold([(ev("JOIN", "a", JOIN_EPOCH_FROM_OFFSET, 0), 0), (ev("PROGRESS", "a", 0, 50), 1)])
    assert st_.w == 50
    out = st_.apply(ev("JOIN", "b", JOIN_EPOCH_FROM_OFFSET, 7), 5)
    assert out.accepted
    b = st_.members["b"]
    assert (b.epoch, b.s, b.effective_s, b.last_progress_offset) == (5, 50, 50, 5)
    assert st_.w == 50 and st_.max_s == 50


def test_progress_from_zombie_unknown_or_regressing_is_ignored_and_counted() -> None:
    st_ = fold([(ev("JOIN", "a", JOIN_EPOCH_FROM_OFFSET), 0), (ev("PROGRESS", "a", 0, 40), 1)])
    before = st_.snapshot()
    assert st_.apply(ev("PROGRESS", "a", 9, 100), 2).reason is Reason.STALE_EPOCH
    assert st_.apply(ev("PROGRESS", "x", 0, 100), 3).reason is Reason.UNKNOWN_MEMBER
    assert st_.apply(ev("PROGRESS", "a", 0, 39), 4).reason is Reason.S_REGRESSED
    after = st_.snapshot()
    assert after["w"] == before["w"] == 40 and after["members"] == before["members"]
    assert after["progress_offset"] == 4
    assert st_.counts[Reason.STALE_EPOCH] == st_.counts[Reason.UNKNOWN_MEMBER] == 1
    assert st_.counts[Reason.S_REGRESSED] == 1


def test_fence_clamps_survivors_until_they_report() -> None:
    st_ = fold(
        [
            (ev("JOIN", "a", -1), 0),
            (ev("JOIN", "b", -1), 1),
            (ev("JOIN", "c", -1), 2),
            (ev("PROGRESS", "a", 0, 100), 3),
            (ev("PROGRESS", "b", 1, 300), 4),
            (ev("PROGRESS", "c", 2, 400), 5),
        ]
    )
    assert st_.w == 100
    assert st_.apply(ev("FENCE", "a", 0), 6).accepted
    assert "a" not in st_.members
    assert st_.members["b"].effective_s == st_.members["c"].effective_s == 100
    assert st_.w == 100  # without the clamp it would jump to 300
    st_.apply(ev("PROGRESS", "b", 1, 300), 7)  # same S again: fresh evidence all the same
    assert st_.w == 100  # c has not reported since the fence
    st_.apply(ev("PROGRESS", "c", 2, 410), 8)
    assert st_.w == 300


def test_rejoin_fences_the_old_instance_with_the_clamp() -> None:
    st_ = fold(
        [
            (ev("JOIN", "a", -1), 0),
            (ev("JOIN", "b", -1), 1),
            (ev("PROGRESS", "a", 0, 100), 2),
            (ev("PROGRESS", "b", 1, 200), 3),
        ]
    )
    assert st_.apply(ev("JOIN", "a", -1, 0), 4).accepted
    a, b = st_.members["a"], st_.members["b"]
    assert a.epoch == 4 and a.s == 100  # starts at W
    assert b.effective_s == 100 and st_.w == 100
    assert st_.apply(ev("PROGRESS", "a", 0, 500), 5).reason is Reason.STALE_EPOCH
    assert st_.apply(ev("JOIN", "a", 3, 900), 6).reason is Reason.STALE_EPOCH
    st_.apply(ev("PROGRESS", "b", 1, 250), 7)
    st_.apply(ev("PROGRESS", "a", 4, 260), 8)
    assert st_.w == 250


def test_fence_epoch_rules_and_leave_without_clamp() -> None:
    st_ = fold(
        [
            (ev("JOIN", "a", -1), 0),
            (ev("JOIN", "b", -1), 1),
            (ev("PROGRESS", "a", 0, 100), 2),
            (ev("PROGRESS", "b", 1, 200), 3),
        ]
    )
    assert st_.apply(ev("FENCE", "b", 0), 4).reason is Reason.STALE_EPOCH  # b rejoined since
    assert st_.apply(ev("FENCE", "zz", 9), 5).reason is Reason.UNKNOWN_MEMBER
    assert st_.apply(ev("LEAVE", "a", 7, 100), 6).reason is Reason.STALE_EPOCH
    assert st_.apply(ev("LEAVE", "a", 0, 150), 7).accepted
    assert st_.w == 200 and st_.members["b"].effective_s == 200  # no clamp on leave
    assert st_.max_s == 200
    assert st_.apply(ev("FENCE", "b", 5), 8).accepted  # a FENCE for a later epoch fences too
    assert not st_.members and st_.w == 200
    assert st_.apply(ev("JOIN", "c", -1, 10), 9).accepted
    assert st_.members["c"].s == 200 and st_.w == 200  # no members: W unchanged; joiner at W


def test_duplicate_offsets_are_ignored() -> None:
    st_ = fold([(ev("JOIN", "a", -1), 3), (ev("PROGRESS", "a", 3, 10), 4)])
    snap = st_.snapshot()
    for off in (0, 3, 4):
        assert st_.apply(ev("PROGRESS", "a", 3, 99), off).reason is Reason.DUPLICATE_OFFSET
    assert st_.snapshot() == snap


@pytest.mark.parametrize(
    "event",
    [
        # what the codec refuses, handed to the fold by other code
        Progress("a", 0, "PROGRES", 1, {}, 0),  # type: ignore[arg-type]
        Progress("a", 0, ProgressKind.PROGRESS, None, {}, 0),  # type: ignore[arg-type]  # no s
        Progress("a", -1, ProgressKind.PROGRESS, 1, {}, 0),
        Progress("a", 0, ProgressKind.PROGRESS, -5, {}, 0),
        Progress(7, 0, ProgressKind.JOIN, 1, {}, 0),  # type: ignore[arg-type]
        Progress("a", "0", ProgressKind.JOIN, 1, {}, 0),  # type: ignore[arg-type]
        Progress(None, 0, ProgressKind.JOIN, 1, {}, 0),  # type: ignore[arg-type]  # no id
    ],
)
def test_malformed_events_raise_and_change_nothing(event: Progress) -> None:
    st_ = fold([(ev("JOIN", "a", -1), 0)])
    snap = st_.snapshot()
    with pytest.raises(CorruptRecordError, match="progress event at offset 1"):
        st_.apply(event, 1)
    assert st_.snapshot() == snap


def test_w_is_checked_where_it_is_written() -> None:
    st_ = fold([(ev("JOIN", "a", -1), 0), (ev("PROGRESS", "a", 0, 100), 1)])
    with pytest.raises(WatermarkError, match="decrease from 100 to 99"):
        st_._set_w(99)
    assert st_.w == 100


def test_from_snapshot_accepts_watermark_records_and_refuses_impossible_ones() -> None:
    st_ = fold([(ev("JOIN", "a", -1), 0), (ev("PROGRESS", "a", 0, 100), 1)])
    record = {"cg": "g", "log_offsets": [], "published_us": 1, "crc32c": 0, **st_.snapshot()}
    record["members"] = [{**m, "extra": 1} for m in record["members"]]
    assert WatermarkState.from_snapshot(record).snapshot() == st_.snapshot()
    good = st_.snapshot()
    bad = [
        {**good, "w": 101},  # above max_s
        {**good, "w": -1},
        {**good, "progress_offset": -2},
        {**good, "members": [{**good["members"][0], "effective_s": 99}]},  # below W
        {**good, "members": [{**good["members"][0], "s": 99}]},  # s < effective_s
        {**good, "members": [{**good["members"][0], "last_progress_offset": 5}]},
        {**good, "members": good["members"] * 2},
        {k: v for k, v in good.items() if k != "max_s"},
    ]
    for d in bad:
        with pytest.raises(WatermarkError):
            WatermarkState.from_snapshot(d)


def test_watermark_records_round_trip_the_state() -> None:
    st_ = fold([(ev("JOIN", "a", -1), 0), (ev("JOIN", "b", -1), 1), (ev("PROGRESS", "a", 0, 7), 2)])
    st_.apply(ev("LEAVE", "b", 1, 5), 3)
    wm = st_.watermark("g", {1: 4, 0: 2}, 99)
    assert isinstance(wm, Watermark) and (wm.cg, wm.w, wm.published_us) == ("g", st_.w, 99)
    assert wm.log_offsets == {0: 2, 1: 4}
    assert WatermarkState.from_watermark(wm).snapshot() == st_.snapshot()
    assert WatermarkState.from_snapshot(wm.to_avro()).snapshot() == st_.snapshot()


def test_silent_members() -> None:
    st_ = fold([(ev("JOIN", i, -1), n) for n, i in enumerate(["c", "a", "b", "d"])])
    seen = {"a": 100, "b": 50, "c": 40}  # d: never seen by this service instance
    silent = st_.silent_members(seen, now_us=150, liveness_timeout_us=50)
    assert [m.interceptor_id for m in silent] == ["b", "c"]  # 100 is not > 50 old
    silent[0].s = 10**9  # copies: the caller cannot corrupt the state through them
    assert st_.members["b"].s == 0


@pytest.mark.parametrize("seen", [None, 0, 40, 99, 100, 101, 150, 200])
@pytest.mark.parametrize("not_before", [None, 0, 60, 100, 101, 150])
@pytest.mark.parametrize("timeout", [0, 49, 50, 51])
def test_silence_counts_from_the_later_of_last_seen_and_not_before(
    seen: int | None, not_before: int | None, timeout: int
) -> None:
    """Every combination against a model: the later of the two, a missing one skipped."""
    st_ = fold([(ev("JOIN", "m", -1), 0)])
    last = {} if seen is None else {"m": seen}
    now = 150
    starts = [x for x in (seen, not_before) if x is not None]
    want = now - max(starts) if starts else None
    got = st_.silences(last, now, not_before_us=not_before)
    assert got == ({} if want is None else {"m": want})
    silent = st_.silent_members(last, now, timeout, not_before_us=not_before)
    fenced = want is not None and want > timeout
    assert [m.interceptor_id for m in silent] == (["m"] if fenced else [])


def test_silences_cover_members_only_in_id_order() -> None:
    st_ = fold([(ev("JOIN", i, -1), n) for n, i in enumerate(["c", "a", "b"])])
    seen = {"a": 10, "gone": 0}  # an id no longer in the table is never reported
    assert list(st_.silences(seen, 100, not_before_us=30)) == ["a", "b", "c"]
    assert st_.silences(seen, 100, not_before_us=30) == {"a": 70, "b": 70, "c": 70}
    assert st_.silences(seen, 100) == {"a": 90}
    assert st_.silences({}, 100) == {}
    assert fold([]).silences(seen, 100, not_before_us=0) == {}
    # a member that left or was fenced is not silent any more, whatever the map says
    st_.apply(ev("LEAVE", "a", 1, 0), 3)
    st_.apply(ev("FENCE", "b", 2, 0), 4)
    assert st_.silent_members(seen, 10**9, 1, not_before_us=0) == [st_.members["c"]]


def test_join_epoch_rule_is_the_offset_for_the_sentinel_only() -> None:
    assert join_epoch(JOIN_EPOCH_FROM_OFFSET, 0) == 0
    assert join_epoch(JOIN_EPOCH_FROM_OFFSET, 12345) == 12345
    for epoch in (0, 1, 7, 2**40):
        assert join_epoch(epoch, 99) == epoch
    # the fold applies the same rule: an interceptor that learns its epoch through
    # join_epoch from its JOIN's delivery offset agrees with every reader of the JOIN
    st_ = fold([(ev("JOIN", "a", JOIN_EPOCH_FROM_OFFSET, 5), 41), (ev("JOIN", "b", 3, 5), 42)])
    assert st_.members["a"].epoch == join_epoch(JOIN_EPOCH_FROM_OFFSET, 41)
    assert st_.members["b"].epoch == join_epoch(3, 42) == 3


def test_join_clock_floor() -> None:
    events = [ev("PROGRESS", "a", 0, 70), ev("FENCE", "b", 1, 90), ev("JOIN", "c", -1, 0)]
    assert join_clock_floor(50, events) == 90
    assert join_clock_floor(100, events) == 100
    assert join_clock_floor(5, []) == 5


# ---- a tiny model, written out plainly, to compare the incremental fold against ----------


@dataclasses.dataclass
class Model:
    """The rules as a list of statements; clamp bookkeeping kept independently."""

    w: int = 0
    members: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # [epoch, s, eff, lpo]
    # clamps: [fenced S, survivors (iid, epoch) that have not reported since]
    clamps: list[tuple[int, set[tuple[str, int]]]] = dataclasses.field(default_factory=list)

    def _remove(self, iid: str, clamp: bool) -> None:
        epoch, s, _, _ = self.members.pop(iid)
        for _, survivors in self.clamps:
            survivors.discard((iid, epoch))
        if clamp:
            for m in self.members.values():
                m[2] = min(m[2], s)
            self.clamps.append((s, {(i, m[0]) for i, m in self.members.items()}))

    def apply(self, e: Progress, off: int) -> bool:
        iid, epoch, kind, s = e.interceptor_id, e.epoch, e.kind, e.s
        m = self.members.get(iid)
        if kind == "JOIN":
            epoch = off if epoch == -1 else epoch
            if m is not None and epoch <= m[0]:
                return False
            if m is not None:
                self._remove(iid, clamp=True)
            self.members[iid] = [epoch, max(s, self.w), max(s, self.w), off]
        elif m is None or (kind != "FENCE" and epoch != m[0]) or (kind == "FENCE" and m[0] > epoch):
            return False
        elif kind == "PROGRESS":
            if s < m[1]:
                return False
            m[1] = m[2] = s
            m[3] = off
            for _, survivors in self.clamps:
                survivors.discard((iid, epoch))
        else:
            self._remove(iid, clamp=kind == "FENCE")
        self.clamps = [c for c in self.clamps if c[1]]
        if self.members:
            self.w = max(self.w, min(m[2] for m in self.members.values()))
        return True


IIDS = ("a", "b", "c", "d")


class WatermarkMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.state = WatermarkState()
        self.model = Model()
        self.log: list[tuple[Progress, int]] = []
        self.snaps: list[dict] = [self.state.snapshot()]  # snaps[k]: after log[:k]
        self.offset = -1
        self.last_w = 0
        self.max_s_seen = 0
        self.past_epochs: dict[str, list[int]] = {i: [] for i in IIDS}

    def fold(self, e: Progress, gap: int) -> None:
        self.offset += 1 + gap
        before = self.state.snapshot()
        expected = self.model.apply(e, self.offset)
        out = self.state.apply(e, self.offset)
        assert out.accepted == expected, (e, out)
        after = self.state.snapshot()
        if not out.accepted:
            # stale epochs, zombies, regressions: nothing moves but the read position
            assert after["w"] == before["w"] and after["members"] == before["members"]
        if e.kind != "FENCE":
            self.max_s_seen = max(self.max_s_seen, e.s)
        assert after["progress_offset"] == self.offset
        self.log.append((e, self.offset))
        self.snaps.append(after)
        for iid, m in self.state.members.items():
            if m.epoch not in self.past_epochs[iid]:
                self.past_epochs[iid].append(m.epoch)

    def some_s(self, data: st.DataObject, base: int) -> int:
        return max(0, base + data.draw(st.integers(-5, 40)))

    @rule(iid=st.sampled_from(IIDS), data=st.data(), gap=st.integers(0, 2))
    def join(self, iid: str, data: st.DataObject, gap: int) -> None:
        how = data.draw(st.sampled_from(["sentinel", "sentinel", "explicit", "stale"]))
        m = self.state.members.get(iid)
        epoch = {
            "sentinel": JOIN_EPOCH_FROM_OFFSET,
            "explicit": self.offset + 1 + gap,
            "stale": m.epoch if m else 0,
        }[how]
        self.fold(
            ev(
                "JOIN", iid, epoch, data.draw(st.sampled_from([0, self.some_s(data, self.state.w)]))
            ),
            gap,
        )

    @rule(iid=st.sampled_from(IIDS), data=st.data(), gap=st.integers(0, 2))
    def progress(self, iid: str, data: st.DataObject, gap: int) -> None:
        m = self.state.members.get(iid)
        epoch = m.epoch if m else data.draw(st.integers(0, 5))
        self.fold(ev("PROGRESS", iid, epoch, self.some_s(data, m.s if m else 0)), gap)

    @precondition(lambda self: any(self.past_epochs.values()))
    @rule(data=st.data(), gap=st.integers(0, 2))
    def zombie(self, data: st.DataObject, gap: int) -> None:
        """An event from an instance that is no longer the member (or never was)."""
        iid = data.draw(st.sampled_from([i for i in IIDS if self.past_epochs[i]]))
        m = self.state.members.get(iid)
        old = [e for e in self.past_epochs[iid] if m is None or e != m.epoch] or [10**6]
        kind = data.draw(st.sampled_from(["PROGRESS", "LEAVE", "PROGRESS"]))
        self.fold(
            ev(kind, iid, data.draw(st.sampled_from(old)), data.draw(st.integers(0, 10**4))), gap
        )

    @rule(iid=st.sampled_from(IIDS), data=st.data(), gap=st.integers(0, 2))
    def leave(self, iid: str, data: st.DataObject, gap: int) -> None:
        m = self.state.members.get(iid)
        self.fold(ev("LEAVE", iid, m.epoch if m else 0, self.some_s(data, m.s if m else 0)), gap)

    @rule(iid=st.sampled_from(IIDS), de=st.integers(-2, 2), gap=st.integers(0, 2))
    def fence(self, iid: str, de: int, gap: int) -> None:
        m = self.state.members.get(iid)
        self.fold(ev("FENCE", iid, max(0, (m.epoch if m else 0) + de), 0), gap)

    @precondition(lambda self: self.log)
    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        e, off = data.draw(st.sampled_from(self.log))
        snap = self.state.snapshot()
        assert self.state.apply(e, off).reason is Reason.DUPLICATE_OFFSET
        assert self.state.snapshot() == snap

    @rule(data=st.data())
    def resume_from_a_cut(self, data: st.DataObject) -> None:
        cut = data.draw(st.integers(0, len(self.log)))
        resumed = fold(self.log[cut:], WatermarkState.from_snapshot(self.snaps[cut]))
        assert resumed.snapshot() == self.state.snapshot()
        # the floor a joiner would compute from that watermark and the events after it
        floor = join_clock_floor(self.snaps[cut]["max_s"], [e for e, _ in self.log[cut:]])
        assert floor >= max(s["w"] for s in self.snaps)
        assert floor >= self.state.max_s == self.max_s_seen

    @invariant()
    def w_never_decreases(self) -> None:
        assert self.state.w >= self.last_w
        self.last_w = self.state.w

    @invariant()
    def agrees_with_model(self) -> None:
        assert self.state.w == self.model.w
        got = {
            i: [m.epoch, m.s, m.effective_s, m.last_progress_offset]
            for i, m in self.state.members.items()
        }
        assert got == self.model.members

    @invariant()
    def w_below_every_live_member_and_every_pending_clamp(self) -> None:
        w = self.state.w
        for m in self.state.members.values():
            assert w <= m.effective_s <= m.s <= self.state.max_s
        for fenced_s, survivors in self.model.clamps:
            assert survivors and w <= fenced_s, (w, fenced_s, survivors)


WatermarkMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_watermark_machine = WatermarkMachine.TestCase


@pytest.mark.torture
def test_watermark_machine_torture() -> None:
    from hypothesis.stateful import run_state_machine_as_test

    run_state_machine_as_test(
        WatermarkMachine,
        settings=settings(max_examples=3000, stateful_step_count=100, deadline=None),
    )


# ---- deterministic simulation: interceptors, Kafka fencing, a watermark service -----------


@dataclasses.dataclass
class Instance:
    iid: str
    epoch: int = -1
    clock: int = 0
    alive: bool = True
    fenced: bool = False  # by Kafka (a newer instance or the service took the id)
    buffer: list[int] = dataclasses.field(default_factory=list)  # stamped, not yet committed

    def now(self, t: int) -> int:
        self.clock = max(self.clock + 1, t)
        return self.clock


class Sim:
    """One seed of the world. Commits are Kafka transactions; fencing is by id."""

    def __init__(self, seed: int, n_ids: int = 3, timeout: int = 60) -> None:
        self.rng = random.Random(seed)
        self.t = 1000
        self.timeout = timeout
        self.ids = [f"i{k}" for k in range(n_ids)]
        self.log: list[Progress] = []  # the progress topic, offset = index
        self.service = WatermarkState()
        self.folded = 0
        self.last_seen: dict[str, int] = {}
        self.published: dict = self.service.snapshot()
        self.published_w = 0
        self.current: dict[str, Instance] = {}  # id -> newest instance
        self.durable = 0

    def append(self, e: Progress) -> int:
        self.log.append(e)
        return len(self.log) - 1

    def start(self, iid: str) -> None:
        old = self.current.get(iid)
        if old is not None:
            old.fenced = True  # init_transactions with the same transactional.id
        inst = self.current[iid] = Instance(iid)
        off = self.append(ev("JOIN", iid, JOIN_EPOCH_FROM_OFFSET, 0))
        inst.epoch = off
        after = self.log[self.published["progress_offset"] + 1 : off + 1]
        inst.clock = max(self.t, join_clock_floor(self.published["max_s"], after))

    def commit(self, inst: Instance, kind: str = "PROGRESS") -> None:
        if inst.fenced:
            inst.alive = False  # the commit fails; the process learns it is fenced and exits
            if self.rng.random() < 0.3:
                # a Kafka anomaly lets its progress through anyway (its records are lost)
                self.append(ev("PROGRESS", inst.iid, inst.epoch, inst.now(self.t)))
            return
        for ts in inst.buffer:
            # invariant 2: nothing with ts <= a published W becomes durable afterwards
            assert ts > self.published_w, (ts, self.published_w)
            self.durable += 1
        inst.buffer.clear()
        self.append(ev(kind, inst.iid, inst.epoch, inst.now(self.t)))
        if kind == "LEAVE":
            inst.alive = False

    def serve(self) -> None:
        """The watermark service: fold, fence the silent, publish."""
        while self.folded < len(self.log):
            e = self.log[self.folded]
            if self.service.apply(e, self.folded).accepted:
                self.last_seen[e.interceptor_id] = self.t
            self.folded += 1
        for m in self.service.silent_members(self.last_seen, self.t, self.timeout):
            inst = self.current.get(m.interceptor_id)
            if inst is not None:
                inst.fenced = True  # the service's own init_transactions on that id
            self.append(ev("FENCE", m.interceptor_id, m.epoch, m.s))
        assert self.service.w >= self.published_w
        self.published = self.service.snapshot()
        self.published_w = self.service.w

    def step(self) -> None:
        rng = self.rng
        self.t += rng.randint(0, 8)
        live = [i for i in self.current.values() if i.alive]
        r = rng.random()
        if r < 0.35 and live:
            inst = rng.choice(live)
            inst.buffer.append(inst.now(self.t))
        elif r < 0.65 and live:
            self.commit(rng.choice(live))
        elif r < 0.80:
            self.serve()
        elif r < 0.86:
            self.start(rng.choice(self.ids))
        elif r < 0.90 and live:
            rng.choice(live).alive = False  # crash: its buffer is lost
        elif r < 0.93 and live:
            self.commit(rng.choice(live), "LEAVE")

    def settle(self) -> None:
        """Every id running and reporting: W must reach the floor of their S."""
        for iid in self.ids:
            inst = self.current.get(iid)
            if inst is None or not inst.alive or inst.fenced:
                self.start(iid)
        for _ in range(3):
            self.t += self.timeout + 1
            for inst in self.current.values():
                self.commit(inst)
            self.serve()
        reported = min(i.clock for i in self.current.values())
        self.t += 1
        for inst in self.current.values():
            self.commit(inst)
        self.serve()
        self.serve()
        assert self.service.w >= reported, "W is stuck although every member reports"


def run_sim(seed: int, steps: int) -> None:
    sim = Sim(seed)
    for iid in sim.ids:
        sim.start(iid)
    for _ in range(steps):
        sim.step()
    sim.settle()
    # determinism: a full re-fold and a resume from the last published snapshot agree
    full = fold([(e, off) for off, e in enumerate(sim.log)])
    assert full.snapshot() == sim.service.snapshot()
    cut = sim.rng.randrange(len(sim.log))
    resumed = fold([(e, off) for off, e in enumerate(sim.log)][: cut + 1])
    resumed = fold(
        [(e, off) for off, e in enumerate(sim.log)][cut + 1 :],
        WatermarkState.from_snapshot(resumed.snapshot()),
    )
    assert resumed.snapshot() == full.snapshot()
    assert sim.durable > 0


def test_simulation_many_seeds() -> None:
    for seed in range(200):
        run_sim(seed, steps=300)


@pytest.mark.torture
def test_simulation_torture() -> None:
    for seed in range(10_000, 14_000):
        run_sim(seed, steps=3000)


def test_member_dataclass_round_trips() -> None:
    m = Member("a", 3, 10, 8, 4)
    state = WatermarkState(w=5, max_s=12, members=[m], progress_offset=4)
    m.s = 0  # the state keeps its own copy
    assert state.members["a"].s == 10
    assert WatermarkState.from_snapshot(state.snapshot()).members["a"] == Member("a", 3, 10, 8, 4)


def test_fenced_and_left_instances_are_remembered_with_their_final_s():
    st_ = WatermarkState()
    st_.apply(ev("JOIN", "a", -1, 10), 0)
    st_.apply(ev("JOIN", "b", -1, 10), 1)
    st_.apply(ev("PROGRESS", "a", 0, 50), 2)
    st_.apply(ev("PROGRESS", "b", 1, 60), 3)
    st_.apply(ev("FENCE", "a", 0, 0), 4)
    st_.apply(ev("LEAVE", "b", 1, 70), 5)
    assert st_.departed == {"a": (0, 50), "b": (1, 60)}
    again = WatermarkState.from_snapshot(st_.snapshot())
    assert again.departed == st_.departed and again.w == st_.w
