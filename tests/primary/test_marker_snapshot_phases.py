"""The phases of a snapshot's marker (pure): what the members copy and what the emitter
writes. Tries to break: a Snapshot record naming fewer volumes than the members copied
(a member's QUIESCED read late, or twice), a snapshot flag lost between QUIESCE and
EMIT/RESUME (a copy never confirmed or never cancelled), COPIED counted for another ts."""

from __future__ import annotations

import random

import pytest

from pipeline.primary.markers import Act, MarkerRun, MemberPhases, Stage
from schemas.control import MarkerStep

MEMBERS = ("a", "b", "c")
VOLUMES = {"a": ("A1", "A2"), "b": ("B",), "c": ()}


@pytest.mark.parametrize("seed", range(200))
def test_every_member_emits_or_resumes_with_the_union_of_volumes(seed):
    rng = random.Random(seed)
    t = [0.0]
    run = MarkerRun("m1", "snap", MEMBERS, 5.0, lambda: t[0], snapshot=True)
    quiesce = run.start()
    assert quiesce.snapshot
    members = {i: MemberPhases(i, lambda: t[0]) for i in MEMBERS}
    topic = [quiesce]
    actions = {}
    for m in members.values():
        act = m.on_step(quiesce)
        assert act.act is Act.QUIESCE and act.snapshot
    order = list(MEMBERS)
    rng.shuffle(order)
    for i in order:
        (answer,) = members[i].quiesced("m1", 100 + MEMBERS.index(i), VOLUMES[i])
        topic.append(answer.reply)
    if rng.random() < 0.5:
        topic.append(topic[rng.randrange(1, len(topic))])  # a step read twice
    for step in topic[1:]:
        run.on_step(step)
        for i, m in members.items():
            act = m.on_step(step)
            if act.act in (Act.EMIT, Act.RESUME):
                actions[i] = act
    assert run.stage is Stage.COMPLETE and run.ts == 102
    assert run.volumes == ("A1", "A2", "B")
    assert set(actions) == set(MEMBERS)
    assert [i for i, a in actions.items() if a.act is Act.EMIT] == [run.emitter]
    for a in actions.values():
        assert a.snapshot and a.ts == 102 and a.volumes == ("A1", "A2", "B")
    for i in MEMBERS:
        run.on_step(members[i].copied("m1", "snap", 102 if i != "c" else 7, VOLUMES[i]))
    assert run.copied == {"a": "", "b": ""}  # c's COPIED names another ts


def test_an_aborted_snapshot_resumes_every_member_with_the_flag_so_copies_are_dropped():
    t = [0.0]
    run = MarkerRun("m2", "snap", ("a", "b"), 2.0, lambda: t[0], snapshot=True)
    q = run.start()
    a, b = MemberPhases("a", lambda: t[0]), MemberPhases("b", lambda: t[0])
    a.on_step(q)
    b.on_step(q)
    a.quiesced("m2", 5, ("A",))
    t[0] = 1.5
    abort = run.poll()
    assert abort is not None and abort.step is MarkerStep.ABORT
    act = a.on_step(abort)
    assert act.act is Act.RESUME and act.snapshot and not act.ts
    t[0] = 3.0
    late = b.poll()
    assert late.act is Act.RESUME and late.snapshot and not late.ts
