"""The pure rules of a backup following generations, the roles poll, the site lock, and a
checkpoint written before generations existed (no Kafka).

``decide`` is tried exhaustively over small worlds: every (site generation, applied W,
roles generation, base_w, primary) combination, each checked against a rule written
independently below.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.backup.generations import Action, Cut, RolesPoll, decide
from pipeline.errors import KafkaUnavailableError, SiteBusyError
from pipeline.site import SiteDir, SiteLock
from pipeline.topology.roles import initial_roles, plan_failover
from schemas import codec
from schemas.records import CgRoles, Checkpoint, VolumeDigest, Watermark

CG = "cg1"
SITE = "dr1"


def roles_at(generation: int, primary: str, base_w: int, offsets: dict[int, int]) -> CgRoles:
    """Generation ``generation`` with ``primary`` its primary, made at the cut ``base_w``
    (earlier generations had primaries p0, p1, ... and lower cuts)."""
    if generation == 0:
        return initial_roles(CG, primary, now_us=1)
    r = initial_roles(CG, "p0", now_us=1)
    for g in range(1, generation + 1):
        last = g == generation
        to = primary if last else f"p{g}"
        w = base_w if last else min(base_w, g)
        r = plan_failover(r, CG, to, w, offsets if last else {}, False, g)
    return r


def expected(site_gen: int, applied_w: int, roles: CgRoles | None) -> Action:
    """The rule, stated plainly."""
    if roles is not None and roles.primary_site == SITE:
        return Action.STOP_PRIMARY
    g = 0 if roles is None else roles.generation
    if g == site_gen:
        return Action.KEEP
    if g < site_gen or g > site_gen + 1:
        return Action.REFUSE
    assert roles is not None
    return Action.REFUSE if applied_w > roles.base_w else Action.CUT


def test_decide_exhaustively() -> None:
    seen: set[Action] = set()
    worlds: list[CgRoles | None] = [None]
    for g, primary, base_w in itertools.product(range(4), ["main", SITE, "dr2"], [0, 5, 10]):
        if g == 0 and base_w:
            continue
        worlds.append(roles_at(g, primary, base_w if g else 0, {0: 7, 1: 3}))
    for roles, site_gen, applied_w in itertools.product(worlds, range(4), [0, 4, 5, 6, 10, 11]):
        d = decide(CG, SITE, site_gen, applied_w, roles)
        want = expected(site_gen, applied_w, roles)
        assert d.action is want, (site_gen, applied_w, roles)
        seen.add(d.action)
        assert d.generation == (roles.generation if roles else 0)
        if want is Action.CUT:
            assert roles is not None
            assert d.cut == Cut(site_gen, roles.base_w, dict(roles.base_offsets))
            assert d.cut.next_generation == roles.generation
        else:
            assert d.cut is None
        if want in (Action.REFUSE, Action.STOP_PRIMARY):
            assert SITE in d.reason and CG in d.reason
    assert seen == set(Action)


def test_decide_messages_say_what_to_do() -> None:
    r1 = roles_at(1, "dr2", 10, {0: 7})
    r2 = roles_at(2, "dr2", 10, {0: 7})
    assert "is the primary of generation 1" in decide(CG, "dr2", 0, 0, r1).reason
    assert "`lowmark failover`" in decide(CG, "dr2", 0, 0, r1).reason
    behind = decide(CG, SITE, 0, 0, r2).reason
    assert "2 generations behind" in behind and "replacement backup" in behind
    past = decide(CG, SITE, 0, 11, r1).reason
    assert "up to W 11, above W 10" in past and "Rebuild" in past
    back = decide(CG, SITE, 2, 0, r1).reason
    assert "went back" in back
    assert decide(CG, SITE, 1, 0, None).action is Action.REFUSE
    # a fresh site (generation 0, nothing applied) joins after one failover by cutting
    d = decide(CG, SITE, 0, 0, r1)
    assert d.action is Action.CUT and d.cut == Cut(0, 10, {0: 7})


def test_cut_beyond() -> None:
    cut = Cut(0, 10, {0: 7, 1: 0})
    assert not cut.beyond(0, 6) and cut.beyond(0, 7) and cut.beyond(0, 100)
    assert cut.beyond(1, 0)
    assert cut.beyond(2, 0), "a partition the cut does not name held nothing by then"


def test_cut_covers_only_the_ws_inside_it() -> None:
    cut = Cut(0, 10, {0: 7, 1: 3})

    def wm(w: int, offsets: dict[int, int]) -> Watermark:
        return Watermark(CG, w, offsets, 0, w, (), 0)

    assert cut.covers(wm(10, {0: 7, 1: 3})) and cut.covers(wm(4, {0: 2}))
    assert cut.covers(wm(4, {0: 2, 2: 0})), "an empty partition is inside any cut"
    assert not cut.covers(wm(11, {0: 7})), "above base_w"
    assert not cut.covers(wm(9, {0: 8})), "its records reach past base_offsets"
    assert not cut.covers(wm(9, {2: 1})), "a partition the cut does not name"


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_roles_poll_once_a_second_and_errors_are_not_fatal() -> None:
    clock = Clock()
    answers: list[object] = [None, KafkaUnavailableError("down"), roles_at(1, "dr2", 5, {})]
    calls = []

    def read() -> CgRoles | None:
        calls.append(clock.t)
        a = answers.pop(0) if answers else roles_at(0, "main", 0, {})
        if isinstance(a, Exception):
            raise a
        return a  # type: ignore[return-value]

    poll = RolesPoll(read, clock)
    assert poll.poll() and poll.roles is None
    clock.t = 0.5
    assert not poll.poll() and calls == [0.0], "not due within a second"
    clock.t = 1.0
    assert not poll.poll() and poll.errors == 1 and "down" in poll.last_error
    clock.t = 1.5
    assert not poll.poll(), "a failed read waits for the next interval too"
    clock.t = 2.0
    assert poll.poll() and poll.roles is not None and poll.roles.generation == 1
    clock.t = 3.0
    assert poll.poll() and poll.roles.generation == 1, "an older read never goes back"
    assert poll.poll(force=True) and calls == [0.0, 1.0, 2.0, 3.0, 3.0]


def test_roles_poll_thread_reads_when_due_by_the_injected_clock() -> None:
    clock = Clock()
    got: list[float] = []

    def read() -> CgRoles | None:
        got.append(clock.t)
        return roles_at(1, "dr2", 5, {})

    poll = RolesPoll(read, clock)
    poll.start()
    try:
        deadline = time.monotonic() + 10
        while poll.reads < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.3)
        assert poll.reads == 1, "the clock did not move: no second read"
        clock.t = 1.0
        while poll.reads < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert got == [0.0, 1.0] and poll.roles is not None and poll.roles.generation == 1
    finally:
        poll.stop()
    clock.t = 5.0
    time.sleep(0.2)
    assert poll.reads == 2, "stopped: no more reads"


def test_old_checkpoint_decodes_as_generation_0() -> None:
    # written by the Checkpoint schema before `generation` (checkpoint.v1.avsc)
    old = bytes.fromhex(
        "c301471d8d59b7cf89e90c736974652d6106636731f2c001040006020e00020476318080800114626c61"
        "6b6532623a303000c601b2d4acc807"
    )
    rec = codec.decode(old, Checkpoint)
    assert rec == Checkpoint(
        "site-a", "cg1", 12345, {0: 3, 1: 7}, (VolumeDigest("v1", 1 << 20, "blake2b:00"),), 99
    )
    assert rec.generation == 0
    new = Checkpoint("s", "c", 5, {0: 0}, (), 1, generation=3)
    assert codec.decode(codec.encode(new), Checkpoint).generation == 3
    assert codec.writer_fingerprint(old) != codec.fingerprint(Checkpoint)


# ---------------------------------------------------------------- the site lock


def _hold(path: str, ready: Any, done: Any) -> None:
    with SiteLock(Path(path), "test holder"):
        ready.set()
        done.wait(30)


def test_site_lock_refuses_a_second_holder_and_names_the_pid(tmp_path: Path) -> None:
    site = SiteDir(tmp_path / "site").create()
    lock = SiteLock(site, "applier of site dr1").acquire()
    assert lock.held and site.lock_path.is_file()
    assert lock.holder_pid() == os.getpid()
    with pytest.raises(SiteBusyError, match=f"in use by process {os.getpid()}"):
        SiteLock(site.root).acquire()  # same process, another open file: refused too
    lock.release()
    with SiteLock(site.root) as again:
        assert again.held
    assert not again.held

    ctx = multiprocessing.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold, args=(str(site.root), ready, done))
    proc.start()
    try:
        assert ready.wait(60)
        with pytest.raises(SiteBusyError, match=f"process {proc.pid}") as err:
            SiteLock(site).acquire()
        assert "Stop that process" in str(err.value)
    finally:
        done.set()
        proc.join(30)
    SiteLock(site).acquire().release()  # free again once the holder is gone


def test_site_lock_is_dropped_when_the_holder_is_killed(tmp_path: Path) -> None:
    site = SiteDir(tmp_path / "site").create()
    ctx = multiprocessing.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold, args=(str(site.root), ready, done))
    proc.start()
    assert ready.wait(60)
    proc.kill()
    proc.join(30)
    with SiteLock(site) as lock:  # the kernel dropped it: the stale pid blocks nobody
        assert lock.holder_pid() == os.getpid()


@pytest.mark.parametrize("fail_at", [1, 2])  # the ftruncate, the pid's pwrite
def test_site_lock_failing_to_write_its_pid_holds_nothing(tmp_path: Path, fail_at: int) -> None:
    """Found by tests/fsloss/test_applier_loss.py: an EIO after the flock leaked the open
    file, and with it the lock: every later applier of the site was refused as busy."""
    from tests.fsloss.shim import FsLoss

    site = SiteDir(tmp_path / "site").create()
    SiteLock(site).acquire().release()  # the file is there from an earlier holder
    with FsLoss(site.root, 0, crash_at=fail_at) as fs:
        with pytest.raises(OSError, match="power cut"):
            SiteLock(site, "applier of site dr1").acquire()
        fs.crash()
        with SiteLock(site.root) as again:
            assert again.held
