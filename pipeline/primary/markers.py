"""The phases of a marker: one application-consistent ts across every interceptor of a CG.

Pure rules, no I/O, an injected clock. The coordinator (``pipeline.ops.marker``) and each
member interceptor (``pipeline.primary.marker_member``) exchange ``MarkerPhase`` steps
through ``lowmark.<cg>.control``, one partition, so every reader sees one order:

1. the coordinator runs the pre-hook (a freeze writes: it must run while writes flow),
   then sends QUIESCE naming the members (the interceptors of the latest W) and the
   emitter;
2. each member holds new writes (reads flow, the NBD loop never blocks), waits for the
   writes already admitted to take effect, then stamps one ts, its *cap*: every write of
   it so far is below the cap, and its S stays below the cap while it holds (the stamp
   is an in-flight ts, ``Interceptor.stamp``). It sends QUIESCED with the cap;
3. **the marker is complete when every member's QUIESCED stands in the topic before any
   ABORT of it**. Every member reads the others' QUIESCED and decides that by itself,
   the coordinator too: one hop, not a round trip through the coordinator, is all a
   write waits. Its ts M is the largest cap: above every write any member took before it
   quiesced, and no member's S reached M;
4. each member raises its clock to M (every later write is above M) and resumes; the
   emitter writes the Marker record with ts M in place of its cap. Each sends RESUMED,
   the emitter once the Marker is durable in Kafka;
5. the coordinator runs the post-hook and reports.

Nothing wedges the primary: the coordinator sends ABORT when the marker is not complete
within half the timeout (a QUIESCED with an error aborts at once), and a member that has
seen neither by the whole timeout resumes by itself (the coordinator died). A member that
resumed by itself never emits; if the marker completes after all, it answers RESUMED with
an error, and the coordinator reports it. Two coordinators at once: a member that holds for
one answers the other's QUIESCE with an error, and the second aborts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from schemas.control import MarkerPhase, MarkerStep


class Act(StrEnum):
    """What a member's I/O edge must do after a step."""

    NOTHING = "nothing"
    QUIESCE = "quiesce"  # hold new writes, drain, stamp the cap, then ``quiesced``
    EMIT = "emit"  # raise the clock to ts, write the Marker in place of the cap, resume
    RESUME = "resume"  # raise the clock to ts (0: no marker), drop the cap, resume
    ANSWER = "answer"  # send ``reply`` only


@dataclass(frozen=True)
class MemberAction:
    act: Act
    marker_id: str = ""
    name: str = ""
    ts: int = 0
    timeout_s: float = 0.0
    reply: MarkerPhase | None = None
    why: str = ""
    #: a snapshot's marker: QUIESCE starts the copies, EMIT writes a Snapshot record
    snapshot: bool = False
    #: EMIT/RESUME of a snapshot: every member's volumes (the Snapshot record's)
    volumes: tuple[str, ...] = ()


NOTHING = MemberAction(Act.NOTHING)


@dataclass
class _Hold:
    marker_id: str
    name: str
    members: tuple[str, ...]
    emitter: str
    since: float
    deadline: float
    caps: dict[str, int] = field(default_factory=dict)
    drained: bool = False  # our own cap is stamped (else we are still draining)
    aborted: str = ""  # an ABORT (or an error) came while draining
    snapshot: bool = False
    volumes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # by member
    #: the longest trip of a step of this marker to us (QUIESCE, QUIESCED), by wall clocks
    lag_us: int = 0


def complete(members: Iterable[str], caps: Mapping[str, object]) -> bool:
    return all(m in caps for m in members)


class MemberPhases:
    """One interceptor's side: at most one marker held at a time."""

    def __init__(
        self,
        interceptor_id: str,
        now: Callable[[], float],
        wall_us: Callable[[], int] | None = None,
    ) -> None:
        self.interceptor_id = interceptor_id
        self._now = now
        #: tells a QUIESCE read long after it was sent (a member that was stopped) from a
        #: live one; None: every QUIESCE is live
        self._wall_us = wall_us
        self.hold: _Hold | None = None
        #: of the last complete marker: the longest trip of one of its steps to us (µs)
        self.last_lag_us = 0
        #: an expired marker's members and the caps read since, to tell if it completes
        self._late: dict[str, tuple[tuple[str, ...], dict[str, int]]] = {}

    def on_step(self, step: MarkerPhase) -> MemberAction:
        if step.step is MarkerStep.QUIESCE:
            return self._on_quiesce(step)
        hold = self.hold
        if hold is None or hold.marker_id != step.marker_id:
            return self._after_expiry(step)
        if step.step is MarkerStep.QUIESCED and step.interceptor_id in hold.members:
            if step.error:
                return self._abort(hold, f"interceptor {step.interceptor_id}: {step.error}")
            hold.caps.setdefault(step.interceptor_id, step.ts)
            hold.volumes.setdefault(step.interceptor_id, step.volumes)
            if step.sent_us and self._wall_us:
                hold.lag_us = max(hold.lag_us, self._wall_us() - step.sent_us)
            return self._decide(hold)
        if step.step is MarkerStep.ABORT:
            return self._abort(hold, step.error or "aborted by the coordinator")
        return NOTHING

    def _on_quiesce(self, step: MarkerPhase) -> MemberAction:
        if self.interceptor_id not in step.members:
            return NOTHING  # joined after the coordinator looked: see ``ops.marker``
        if self.hold is not None:
            if self.hold.marker_id == step.marker_id:
                return NOTHING  # read twice
            why = f"interceptor is quiesced for marker {self.hold.name!r} ({self.hold.marker_id})"
            return MemberAction(Act.ANSWER, reply=self._quiesced(step.marker_id, step.name, 0, why))
        age_us = self._wall_us() - step.sent_us if self._wall_us and step.sent_us else 0
        if age_us > step.timeout_ms * 1000:
            why = (f"the QUIESCE was sent {age_us / 1e6:.3f} s ago, beyond its timeout: it is "
                   "over (or the coordinator's clock is off: keep the hosts' clocks in sync)")
            return MemberAction(Act.ANSWER, reply=self._quiesced(step.marker_id, step.name, 0, why))
        now = self._now()
        timeout_s = step.timeout_ms / 1000
        self.hold = _Hold(step.marker_id, step.name, step.members, step.emitter, now,
                          now + timeout_s, lag_us=age_us, snapshot=step.snapshot)  # fmt: skip
        return MemberAction(Act.QUIESCE, step.marker_id, step.name, timeout_s=timeout_s,
                            snapshot=step.snapshot)  # fmt: skip

    def quiesced(
        self, marker_id: str, cap: int, volumes: tuple[str, ...] = ()
    ) -> list[MemberAction]:
        """Our drain is done and the cap stamped (a snapshot's copies of ``volumes``
        begun): send the QUIESCED, then maybe resume (the others' caps are all in already,
        or the marker was aborted meanwhile)."""
        hold = self.hold
        if hold is None or hold.marker_id != marker_id:
            return [MemberAction(Act.RESUME, marker_id, why="no longer held")]
        if hold.aborted:
            self.hold = None
            return [MemberAction(Act.RESUME, marker_id, hold.name, why=hold.aborted,
                                 snapshot=hold.snapshot)]  # fmt: skip
        hold.drained = True
        reply = self._quiesced(marker_id, hold.name, cap, "", volumes)
        # our own step comes back through the topic like the others'; its place in the
        # order is what counts (an ABORT may stand before it), so it is not counted here
        return [MemberAction(Act.ANSWER, marker_id, hold.name, reply=reply)]

    def failed(self, marker_id: str, why: str) -> MarkerPhase | None:
        """The quiesce could not be done (drain too slow, engine failed): the error to
        send; the edge resumes."""
        hold = self.hold
        if hold is None or hold.marker_id != marker_id:
            return None
        self.hold = None
        return self._quiesced(marker_id, hold.name, 0, why)

    def poll(self) -> MemberAction:
        """A hold past its deadline resumes by itself (the coordinator went silent)."""
        hold = self.hold
        if hold is None or self._now() < hold.deadline:
            return NOTHING
        self.hold = None
        self._late[hold.marker_id] = (hold.members, dict(hold.caps))
        for old in list(self._late)[:-16]:
            del self._late[old]
        why = "the marker was neither complete nor aborted in time; resumed by itself"
        return MemberAction(Act.RESUME, hold.marker_id, hold.name, why=why,
                            snapshot=hold.snapshot)  # fmt: skip

    def _after_expiry(self, step: MarkerPhase) -> MemberAction:
        """A marker we resumed from by itself completes after all: say so (RESUMED error)."""
        late = self._late.get(step.marker_id)
        if late is None:
            return NOTHING
        members, caps = late
        if step.step is MarkerStep.ABORT or (step.step is MarkerStep.QUIESCED and step.error):
            del self._late[step.marker_id]  # it never completes: nothing to report
            return NOTHING
        if step.step is not MarkerStep.QUIESCED or step.interceptor_id not in members:
            return NOTHING
        caps.setdefault(step.interceptor_id, step.ts)
        if not complete(members, caps):
            return NOTHING
        del self._late[step.marker_id]
        why = "this interceptor had resumed by itself before the marker completed"
        reply = self._resumed(step.marker_id, step.name, max(caps.values()), 0, why)
        return MemberAction(Act.ANSWER, reply=reply)

    def _decide(self, hold: _Hold) -> MemberAction:
        if not hold.drained or not complete(hold.members, hold.caps):
            return NOTHING
        self.hold = None
        self.last_lag_us = hold.lag_us
        act = Act.EMIT if hold.emitter == self.interceptor_id else Act.RESUME
        volumes = tuple(sorted({v for vs in hold.volumes.values() for v in vs}))
        return MemberAction(act, hold.marker_id, hold.name, max(hold.caps.values()),
                            snapshot=hold.snapshot, volumes=volumes)  # fmt: skip

    def _abort(self, hold: _Hold, why: str) -> MemberAction:
        if not hold.drained:
            hold.aborted = why  # ``quiesced`` resumes once the drain is done
            return NOTHING
        self.hold = None
        return MemberAction(Act.RESUME, hold.marker_id, hold.name, why=why,
                            snapshot=hold.snapshot)  # fmt: skip

    def held_s(self) -> float:
        return 0.0 if self.hold is None else self._now() - self.hold.since

    def resumed(self, action: MemberAction, held_us: int, error: str = "") -> MarkerPhase:
        """The RESUMED to send once ``action`` (EMIT or RESUME) is done."""
        return self._resumed(action.marker_id, action.name, action.ts, held_us,
                             error or action.why)  # fmt: skip

    def copied(self, marker_id: str, name: str, ts: int, volumes: tuple[str, ...],
               error: str = "") -> MarkerPhase:  # fmt: skip
        """The COPIED to send once a snapshot's copies here are complete (or failed)."""
        sent = self._wall_us() if self._wall_us else 0
        return MarkerPhase(marker_id, name, MarkerStep.COPIED, self.interceptor_id, ts=ts,
                           error=error, sent_us=sent, volumes=volumes)  # fmt: skip

    def _quiesced(self, marker_id: str, name: str, cap: int, error: str,
                  volumes: tuple[str, ...] = ()) -> MarkerPhase:  # fmt: skip
        sent = self._wall_us() if self._wall_us else 0
        return MarkerPhase(marker_id, name, MarkerStep.QUIESCED, self.interceptor_id, ts=cap,
                           error=error, sent_us=sent, volumes=volumes)  # fmt: skip

    def _resumed(self, marker_id: str, name: str, ts: int, held_us: int, error: str) -> MarkerPhase:
        sent = self._wall_us() if self._wall_us else 0
        return MarkerPhase(marker_id, name or "?", MarkerStep.RESUMED, self.interceptor_id,
                           ts=ts, timeout_ms=held_us, error=error, sent_us=sent)  # fmt: skip


class Stage(StrEnum):
    QUIESCING = "quiescing"
    ABORTING = "aborting"  # our ABORT is sent; the marker may still prove complete before it
    COMPLETE = "complete"  # every QUIESCED before any ABORT: waiting for the RESUMED
    DONE = "done"
    ABORTED = "aborted"


@dataclass
class MarkerRun:
    """The coordinator's side of one marker attempt.

    ``start`` gives the QUIESCE; feed every step read back (our own included) to
    ``on_step``; ``poll`` gives the ABORT to send when one is due. ``stage`` ends DONE (the
    Marker is durable, ``ts``) or ABORTED (``error``).
    """

    marker_id: str
    name: str
    members: tuple[str, ...]
    timeout_s: float
    now: Callable[[], float]
    stage: Stage = Stage.QUIESCING
    caps: dict[str, int] = field(default_factory=dict)
    held_us: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    error: str = ""
    ts: int = 0
    emitter: str = ""
    emitted: bool = False
    #: a snapshot: the members start copies at the hold, the emitter writes a Snapshot
    snapshot: bool = False
    #: a snapshot's volumes, from the QUIESCED steps; COPIED answers (member -> error)
    volumes: tuple[str, ...] = ()
    copied: dict[str, str] = field(default_factory=dict)
    #: when every cap was in (the ts was fixed), on ``now``'s clock
    completed_at: float = 0.0
    _started: float = 0.0
    _abort: MarkerPhase | None = None

    def start(self, sent_us: int = 0) -> MarkerPhase:
        if not self.members:
            raise ValueError("a marker needs at least one member")
        self.members = tuple(sorted(set(self.members)))
        self.emitter = emitter_of(self.members)
        self._started = self.now()
        return MarkerPhase(self.marker_id, self.name, MarkerStep.QUIESCE,
                           emitter=self.emitter, timeout_ms=max(1, round(self.timeout_s * 1000)),
                           members=self.members, sent_us=sent_us,
                           snapshot=self.snapshot)  # fmt: skip

    def on_step(self, step: MarkerPhase) -> None:
        if step.marker_id != self.marker_id:
            return
        if step.step is MarkerStep.ABORT:
            if self.stage in (Stage.QUIESCING, Stage.ABORTING):
                self.stage = Stage.ABORTED
                self.error = self.error or step.error or "aborted"
            return
        iid = step.interceptor_id
        if iid not in self.members:
            return
        if step.step is MarkerStep.QUIESCED and self.stage in (Stage.QUIESCING, Stage.ABORTING):
            if step.error:
                self._fail(f"interceptor {iid} could not quiesce: {step.error}")
                return
            self.caps.setdefault(iid, step.ts)
            self.volumes = tuple(sorted({*self.volumes, *step.volumes}))
            if complete(self.members, self.caps):
                self.stage, self.ts = Stage.COMPLETE, max(self.caps.values())
                self.completed_at = self.now()
                self._abort = None  # complete before our ABORT: the ABORT means nothing
        elif step.step is MarkerStep.COPIED and step.ts == self.ts and self.ts:
            self.copied.setdefault(iid, step.error)
        elif step.step is MarkerStep.RESUMED and iid not in self.held_us:
            self.held_us[iid] = step.timeout_ms
            if step.error and iid == self.emitter and self.stage is Stage.COMPLETE:
                self.stage, self.error = Stage.ABORTED, f"emitter {iid}: {step.error}"
            elif step.error and self.stage is Stage.COMPLETE:
                self.warnings.append(f"interceptor {iid}: {step.error}")
            elif iid == self.emitter and step.ts == self.ts and self.ts:
                self.emitted = True
            done = self.emitted and complete(self.members, self.held_us)
            if self.stage is Stage.COMPLETE and done:
                self.stage = Stage.DONE

    def poll(self, sent_us: int = 0) -> MarkerPhase | None:
        """The step to send now, if any: ABORT when the quiesce takes too long."""
        if self._abort is not None:
            step, self._abort = self._abort, None
            return step
        now = self.now()
        if self.stage is Stage.QUIESCING and now - self._started >= self.timeout_s / 2:
            missing = sorted(set(self.members) - set(self.caps))
            self._fail(f"no QUIESCED from {missing} within {self.timeout_s / 2:.3g} s")
            return self.poll(sent_us)
        if self.stage is Stage.ABORTING and now - self._started >= self.timeout_s * 2:
            self.stage = Stage.ABORTED  # our own ABORT never came back: Kafka is away
        if self.stage is Stage.COMPLETE and now - self.completed_at >= self.timeout_s:
            if not self.emitted:
                self.stage = Stage.ABORTED
                self.error = f"the emitter {self.emitter} did not confirm the Marker in time"
            else:  # the Marker is durable; a silent member resumes by itself
                silent = sorted(set(self.members) - set(self.held_us))
                self.warnings.append(f"no RESUMED from {silent}")
                self.stage = Stage.DONE
        return None

    @property
    def finished(self) -> bool:
        return self.stage in (Stage.DONE, Stage.ABORTED)

    def _fail(self, why: str) -> None:
        if self.stage is not Stage.QUIESCING:
            return
        self.stage, self.error = Stage.ABORTING, why
        self._abort = MarkerPhase(self.marker_id, self.name, MarkerStep.ABORT, error=why)

    def abort(self, why: str) -> MarkerPhase | None:
        """Give up now (the operator interrupted): the ABORT to send, if still useful."""
        self._fail(why)
        step, self._abort = self._abort, None
        return step


def emitter_of(members: Iterable[str]) -> str:
    """The member that writes the Marker record: the first by id (any would do)."""
    return min(members)


def emitted_markers(steps: Iterable[MarkerPhase]) -> list[tuple[str, int, int]]:
    """(name, ts, confirmed_us) of every marker the steps show emitted, in order: its
    emitter (named in the QUIESCE) answered RESUMED with the ts and no error."""
    emitter: dict[str, str] = {}
    out = []
    for s in steps:
        if s.step is MarkerStep.QUIESCE:
            emitter[s.marker_id] = s.emitter
        elif (s.step is MarkerStep.RESUMED and s.ts and not s.error
              and emitter.get(s.marker_id) == s.interceptor_id):  # fmt: skip
            out.append((s.name, s.ts, s.sent_us))
    return out
