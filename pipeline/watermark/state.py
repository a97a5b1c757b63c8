"""Pure watermark computation: fold the progress log of a consistency group into W.

The progress topic has one partition, so its events arrive in one total order; folding
them with ``WatermarkState.apply`` gives the same W in every process that reads them
(the watermark service, a restarted service resuming from a published snapshot, a test).
No I/O here: the service keeps wall-clock times and talks to Kafka.

Rules (DESIGN invariant 2, "watermark safety"):

- ``JOIN(id, e, s)``: a new instance of interceptor ``id``. Its epoch is ``e``, or the
  JOIN's own offset when ``e == JOIN_EPOCH_FROM_OFFSET`` (ARCHITECTURE: "the JOIN's offset
  is the interceptor's epoch"; the interceptor cannot know that offset before writing
  the JOIN, so it writes the sentinel and learns its epoch from the delivery report).
  An older instance still in the table was fenced by the new one's init_transactions:
  it is removed exactly as by a FENCE (with the clamp). The new member starts at
  ``s = effective_s = max(s, W)``. A JOIN whose epoch is not newer is stale.
- ``PROGRESS(id, e, s)``: accepted only from the current instance (same epoch) and only
  when S does not go back; it lifts any clamp (fresh evidence the member is alive).
- ``LEAVE(id, e, s)``: graceful exit after flushing everything; removed, no clamp.
- ``FENCE(id, e)``: the service fenced the instance through Kafka. Removes the member if
  its epoch <= e and clamps every other member's effective S to the fenced member's S,
  until that member reports again: the fenced one may have acknowledged async writes
  above its S that are lost, so W passes its S only on fresh evidence from the living.
- Holds (issue #13, "W never jumps a lost tail silently"): a member removed without LEAVE
  (FENCE, or replaced by a newer JOIN) that served async volumes (``async_volumes`` of
  its JOIN/PROGRESS) may have acknowledged writes above its S that never reached Kafka.
  It leaves a ``Hold``: W stays <= its S while any of its volumes is unrepublished. A
  PROGRESS of a later instance of the same id listing volumes in ``resynced_volumes``
  (their dirty regions republished at ts <= its S, committed with that record) removes
  them and raises ``until`` to that S: W may then never land in (s, until), a cut there
  would hold effects of the tail without the republished tail, so it jumps over the gap
  at once. ``LOST`` (``lowmark fence --declare-lost``) gives up an id's unrepublished
  volumes and records the accepted loss; a gap already republished stays.
- ``W = max(W, min(effective_s, holds))`` over the members; unchanged when there are none.
  Folding keeps ``W <= effective_s <= s`` for every member, so the min never lies below
  W; if it ever did, W would already have covered a live member's future writes, and
  ``_set_w`` raises instead of hiding it.

``max_s`` is the largest S in any JOIN/PROGRESS/LEAVE folded, accepted or not (a zombie's
S only raises the clock floor of later joiners, which is always safe).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pipeline.errors import CorruptRecordError, WatermarkError
from schemas.records import (
    Departed,
    Hold,
    LostTail,
    Progress,
    ProgressKind,
    Watermark,
    WatermarkMember,
)

#: the ``epoch`` a JOIN carries to say "my epoch is this record's offset"
JOIN_EPOCH_FROM_OFFSET = -1
#: how many declared-lost tails the state keeps (the CG's record of accepted loss)
LOST_HISTORY = 64
#: departed instances a W keeps per interceptor (its last ones): an applier rejects a
#: zombie of any of them by its final S, even one whose other evidence (the W that listed
#: its successor) the compacted watermark topic no longer holds
DEPARTED_HISTORY = 8


class Reason(StrEnum):
    """Why an event was folded the way it was (also the keys of ``WatermarkState.counts``)."""

    ACCEPTED = "accepted"
    DUPLICATE_OFFSET = "duplicate offset"  # offset <= progress_offset: already folded
    STALE_EPOCH = "stale epoch"  # not the member's current epoch: a zombie or a late event
    UNKNOWN_MEMBER = "unknown member"  # no such member (left, fenced, never joined)
    S_REGRESSED = "s regressed"  # PROGRESS with S below the member's S


@dataclass(frozen=True, slots=True)
class EventOutcome:
    accepted: bool
    reason: Reason


@dataclass(slots=True)
class Member:
    interceptor_id: str
    epoch: int
    s: int  # latest S the member promised
    effective_s: int  # s, or lower while clamped by a fence since its last report
    last_progress_offset: int  # offset of its JOIN or latest accepted PROGRESS
    async_volumes: tuple[str, ...] = ()  # from its latest JOIN/PROGRESS: a tail is possible


_MEMBER_FIELDS = tuple(f.name for f in dataclasses.fields(Member))


class WatermarkState:
    """The fold of a progress log up to ``progress_offset``."""

    def __init__(
        self,
        w: int = 0,
        max_s: int = 0,
        members: Iterable[Member] = (),
        progress_offset: int = -1,
        departed: Iterable[tuple[str, int, int]] = (),
        holds: Iterable[Hold] = (),
        lost: Iterable[LostTail] = (),
    ) -> None:
        self._w = w
        #: (interceptor id, epoch) -> the hold its unreplicated async tail puts on W
        self.holds: dict[tuple[str, int], Hold] = {}
        for h in holds:
            if (h.interceptor_id, h.epoch) in self.holds:
                raise WatermarkError(
                    f"hold {h!r} listed twice in a watermark state; the snapshot is corrupt: "
                    "rebuild it by folding the progress topic"
                )
            self.holds[h.interceptor_id, h.epoch] = h
        self.lost: list[LostTail] = list(lost)[-LOST_HISTORY:]
        # interceptor id -> (epoch, final S) of its last instance that left or was fenced;
        # an applier rejects that instance's records above it (a zombie that Kafka's
        # fencing did not stop must still never reach a backup)
        self._departed: dict[str, list[tuple[int, int]]] = {}
        for iid, epoch, final_s in sorted(departed):
            self._depart(iid, epoch, final_s)
        self.max_s = max_s
        self.progress_offset = progress_offset
        self.members: dict[str, Member] = {}
        for m in members:
            if m.interceptor_id in self.members:
                raise WatermarkError(
                    f"member {m.interceptor_id!r} listed twice in a watermark state; "
                    "the snapshot is corrupt: rebuild it by folding the progress topic"
                )
            self.members[m.interceptor_id] = dataclasses.replace(m)
        # diagnostics only: not part of the snapshot, not compared for determinism
        self.counts: Counter[Reason] = Counter()
        self._validate()

    @property
    def w(self) -> int:
        return self._w

    @property
    def departed(self) -> dict[str, tuple[int, int]]:
        """interceptor id -> (epoch, final S) of its last instance that left or was fenced."""
        return {iid: h[-1] for iid, h in self._departed.items()}

    def departures(self) -> list[tuple[str, int, int]]:
        """(interceptor id, epoch, final S) of the last DEPARTED_HISTORY instances of every
        interceptor that left or were fenced, sorted."""
        return [(iid, e, s) for iid in sorted(self._departed) for e, s in self._departed[iid]]

    def _depart(self, iid: str, epoch: int, final_s: int) -> None:
        history = [x for x in self._departed.get(iid, []) if x[0] != epoch]
        history.append((epoch, final_s))
        history.sort()
        self._departed[iid] = history[-DEPARTED_HISTORY:]

    def apply(self, event: Progress, offset: int) -> EventOutcome:
        """Fold one progress event read at ``offset``."""
        if offset <= self.progress_offset:
            # replay of something already folded (a restart re-reading its tail)
            self.counts[Reason.DUPLICATE_OFFSET] += 1
            return EventOutcome(False, Reason.DUPLICATE_OFFSET)
        iid, epoch, kind, s = _parse(event, offset)
        self.progress_offset = offset
        if kind not in (ProgressKind.FENCE, ProgressKind.LOST):
            self.max_s = max(self.max_s, s)
        match kind:
            case ProgressKind.JOIN:
                reason = self._join(iid, join_epoch(epoch, offset), s, offset, event)
            case ProgressKind.PROGRESS:
                reason = self._progress(iid, epoch, s, offset, event)
            case ProgressKind.LEAVE:
                reason = self._leave(iid, epoch)
            case ProgressKind.FENCE:
                reason = self._fence(iid, epoch)
            case ProgressKind.LOST:
                reason = self._lost(iid, epoch, event.wall_us)
        self.counts[reason] += 1
        if reason is Reason.ACCEPTED and self.members:
            self._set_w(self._capped(min(m.effective_s for m in self.members.values())))
        return EventOutcome(reason is Reason.ACCEPTED, reason)

    def _capped(self, w: int) -> int:
        """The largest W <= ``w`` the holds allow: at most the S of every hold with volumes
        still unrepublished, and never inside the gap (s, until) of one whose tail went
        out again at ts <= until (it falls back to s). A hold with nothing left unrepublished
        that W reached the ``until`` of is dropped: W jumped over its gap."""
        for h in self.holds.values():
            if h.volumes:
                w = min(w, h.s)
        moved = True
        while moved:  # each step lowers w to some hold's s: it ends within len(holds)
            moved = False
            for h in self.holds.values():
                if h.s < w < h.until:
                    w, moved = h.s, True
        for key in [k for k, h in self.holds.items() if not h.volumes and h.until <= w]:
            del self.holds[key]
        return w

    def _join(self, iid: str, epoch: int, s: int, offset: int, event: Progress) -> Reason:
        old = self.members.get(iid)
        if old is not None:
            if epoch <= old.epoch:
                return Reason.STALE_EPOCH
            self._remove_and_clamp(old)
        start = max(s, self._w)
        self.members[iid] = Member(iid, epoch, start, start, offset, tuple(event.async_volumes))
        return Reason.ACCEPTED

    def _progress(self, iid: str, epoch: int, s: int, offset: int, event: Progress) -> Reason:
        m = self.members.get(iid)
        if m is None:
            return Reason.UNKNOWN_MEMBER
        if epoch != m.epoch:
            return Reason.STALE_EPOCH
        if s < m.s:
            return Reason.S_REGRESSED
        m.s = m.effective_s = s
        m.last_progress_offset = offset
        m.async_volumes = tuple(event.async_volumes)
        if event.resynced_volumes:
            self._resolve(iid, epoch, s, set(event.resynced_volumes))
        return Reason.ACCEPTED

    def _resolve(self, iid: str, epoch: int, s: int, resynced: set[str]) -> None:
        """Earlier instances' tails of ``resynced`` are republished at ts <= ``s``."""
        for key, h in list(self.holds.items()):
            if h.interceptor_id != iid or h.epoch >= epoch:
                continue
            if any(v in resynced for v in h.volumes):
                left = tuple(v for v in h.volumes if v not in resynced)
                self.holds[key] = dataclasses.replace(h, volumes=left, until=max(h.until, s))

    def _lost(self, iid: str, epoch: int, declared_us: int) -> Reason:
        """An operator accepted the loss of ``iid``'s unrepublished tails up to instance
        ``epoch``. What was republished keeps its gap: it is not lost, only late."""
        m = self.members.get(iid)
        if m is not None and m.epoch <= epoch:
            del self.members[iid]  # declared lost, so no hold of its own: it was fenced
            self._depart(iid, m.epoch, m.s)
            self.lost.append(LostTail(iid, m.epoch, m.s, m.async_volumes, declared_us))
        mine = [k for k, h in self.holds.items() if k[0] == iid and h.epoch <= epoch]
        if (m is None or m.epoch > epoch) and not mine:
            return Reason.UNKNOWN_MEMBER
        for key in mine:
            h = self.holds[key]
            if h.volumes:
                self.lost.append(LostTail(iid, h.epoch, h.s, h.volumes, declared_us))
            if h.until < 0:
                del self.holds[key]
            else:
                self.holds[key] = dataclasses.replace(h, volumes=())
        del self.lost[:-LOST_HISTORY]
        return Reason.ACCEPTED

    def _leave(self, iid: str, epoch: int) -> Reason:
        m = self.members.get(iid)
        if m is None:
            return Reason.UNKNOWN_MEMBER
        if epoch != m.epoch:
            return Reason.STALE_EPOCH
        # every record it acked is durable and it will not write again: no clamp
        del self.members[iid]
        self._depart(iid, m.epoch, m.s)
        return Reason.ACCEPTED

    def _fence(self, iid: str, epoch: int) -> Reason:
        m = self.members.get(iid)
        if m is None:
            return Reason.UNKNOWN_MEMBER
        if m.epoch > epoch:
            # the service decided to fence an instance that has since been replaced
            return Reason.STALE_EPOCH
        self._remove_and_clamp(m)
        return Reason.ACCEPTED

    def _remove_and_clamp(self, fenced: Member) -> None:
        del self.members[fenced.interceptor_id]
        self._depart(fenced.interceptor_id, fenced.epoch, fenced.s)
        if fenced.async_volumes:
            key = (fenced.interceptor_id, fenced.epoch)
            self.holds[key] = Hold(*key, fenced.s, fenced.async_volumes)
        for m in self.members.values():
            m.effective_s = min(m.effective_s, fenced.s)

    def _set_w(self, w: int) -> None:
        # checked where it is written: a lower W would mean a published cut was unsafe
        if w < self._w:
            raise WatermarkError(
                f"watermark would decrease from {self._w} to {w} at progress offset "
                f"{self.progress_offset}; a member's effective S fell below W, so an "
                "earlier W may not have been a safe cut. Halt the service and report a bug"
            )
        self._w = w

    def snapshot(self) -> dict[str, Any]:
        """The state as the fields of a Watermark record (members sorted by id)."""
        return {
            "w": self._w,
            "max_s": self.max_s,
            "progress_offset": self.progress_offset,
            "members": [dataclasses.asdict(self.members[k]) for k in sorted(self.members)],
            "departed": [
                {"interceptor_id": k, "epoch": e, "s": s} for k, e, s in self.departures()
            ],
            "holds": [dataclasses.asdict(self.holds[k]) for k in sorted(self.holds)],
            "lost": [dataclasses.asdict(x) for x in self.lost],
        }

    def watermark(self, cg: str, log_offsets: Mapping[int, int], published_us: int) -> Watermark:
        """The Watermark record of this state (members and departed sorted by id)."""
        return Watermark(
            cg,
            self._w,
            dict(log_offsets),
            self.progress_offset,
            self.max_s,
            tuple(
                WatermarkMember(**dataclasses.asdict(self.members[k])) for k in sorted(self.members)
            ),
            published_us,
            tuple(Departed(k, e, s) for k, e, s in self.departures()),
            tuple(self.holds[k] for k in sorted(self.holds)),
            tuple(self.lost),
        )

    @classmethod
    def from_watermark(cls, wm: Watermark) -> WatermarkState:
        """Resume from a decoded Watermark record."""
        return cls(
            w=wm.w,
            max_s=wm.max_s,
            members=[Member(**dataclasses.asdict(m)) for m in wm.members],
            progress_offset=wm.progress_offset,
            departed=[(d.interceptor_id, d.epoch, d.s) for d in wm.departed],
            holds=wm.holds,
            lost=wm.lost,
        )

    @classmethod
    def from_snapshot(cls, d: Mapping[str, Any]) -> WatermarkState:
        """Resume from ``snapshot()`` output or a decoded Watermark record (extra keys ignored)."""
        try:
            members = [
                Member(**{k: m[k] for k in _MEMBER_FIELDS if k in m or k != "async_volumes"})
                for m in d["members"]
            ]
            for m in members:
                m.async_volumes = tuple(m.async_volumes)
            return cls(
                w=d["w"],
                max_s=d["max_s"],
                members=members,
                progress_offset=d["progress_offset"],
                departed=[(x["interceptor_id"], x["epoch"], x["s"]) for x in d.get("departed", [])],
                holds=[Hold(**{**x, "volumes": tuple(x["volumes"])}) for x in d.get("holds", [])],
                lost=[LostTail(**{**x, "volumes": tuple(x["volumes"])}) for x in d.get("lost", [])],
            )
        except (KeyError, TypeError) as e:
            raise WatermarkError(
                f"watermark snapshot lacks a field ({e!r}); rebuild the state by folding "
                "the progress topic from offset 0"
            ) from None

    def silences(
        self,
        last_seen_us: Mapping[str, int],
        now_us: int,
        *,
        not_before_us: int | None = None,
    ) -> dict[str, int]:
        """How long each member has been silent at ``now_us`` (µs), by id in id order.

        Silence counts from the member's last accepted event (``last_seen_us``). With
        ``not_before_us`` it never counts from before that moment (the service's start,
        or the last moment it saw Kafka unable to take writes: a member that could not
        report through an election is not silent), and a member missing from the map
        counts from it. Without it, a member missing from the map is left out: the
        caller must seed the map for members it loaded from a snapshot, otherwise a
        restart would fence every live interceptor at once.
        """
        out = {}
        for iid in sorted(self.members):
            seen = last_seen_us.get(iid)
            if not_before_us is not None:
                seen = not_before_us if seen is None else max(seen, not_before_us)
            if seen is not None:
                out[iid] = now_us - seen
        return out

    def silent_members(
        self,
        last_seen_wall_us: Mapping[str, int],
        now_us: int,
        liveness_timeout_us: int,
        *,
        not_before_us: int | None = None,
    ) -> list[Member]:
        """Members silent for longer than the timeout (``silences``), sorted by id (copies)."""
        quiet = self.silences(last_seen_wall_us, now_us, not_before_us=not_before_us)
        return [
            dataclasses.replace(self.members[iid])
            for iid, silent_us in quiet.items()
            if silent_us > liveness_timeout_us
        ]

    def _validate(self) -> None:
        ints = [self._w, self.max_s, self.progress_offset]
        if any(type(v) is not int for v in ints) or self.progress_offset < -1 or self._w < 0:
            raise WatermarkError(
                f"watermark state has impossible values w={self._w!r} max_s={self.max_s!r} "
                f"progress_offset={self.progress_offset!r}; rebuild it from the progress topic"
            )
        if self._w > self.max_s:
            raise WatermarkError(
                f"watermark state has w={self._w} above max_s={self.max_s}; no member ever "
                "reported that much. Rebuild the state from the progress topic"
            )
        for h in self.holds.values():
            if not self._w <= h.s or h.until > self.max_s:
                raise WatermarkError(
                    f"watermark state hold {h!r} lies below w={self._w} or resolves above "
                    f"max_s={self.max_s}; rebuild the state from the progress topic"
                )
        for m in self.members.values():
            if not (self._w <= m.effective_s <= m.s <= self.max_s) or (
                m.last_progress_offset > self.progress_offset
            ):
                raise WatermarkError(
                    f"watermark state member {m!r} breaks w <= effective_s <= s <= max_s "
                    f"(w={self._w}, max_s={self.max_s}) or lies beyond progress_offset "
                    f"{self.progress_offset}; rebuild the state from the progress topic"
                )


def join_epoch(epoch: int, offset: int) -> int:
    """The epoch of a JOIN read at ``offset``: the offset itself when the JOIN carries
    ``JOIN_EPOCH_FROM_OFFSET`` (what an interceptor writes, and then learns its epoch
    from the JOIN's delivery report through this same rule), else the epoch it carries."""
    return offset if epoch == JOIN_EPOCH_FROM_OFFSET else epoch


def join_clock_floor(watermark_max_s: int, progress_events_after: Iterable[Progress]) -> int:
    """The value a joining interceptor must raise its clock above before emitting records.

    ``progress_events_after``: the events after the latest Watermark's ``progress_offset``
    up to the interceptor's own JOIN (including the JOIN is harmless). Every S counts,
    whatever its kind or whether the fold accepts it: a higher floor is always safe.
    """
    floor = watermark_max_s
    for ev in progress_events_after:
        s = ev.s
        if type(s) is int and s > floor:
            floor = s
    return floor


def _parse(event: Progress, offset: int) -> tuple[str, int, ProgressKind, int]:
    # the codec refuses these already; a fold fed by other code must not trust them either
    iid, epoch, kind, s = event.interceptor_id, event.epoch, event.kind, event.s
    bad = (
        not isinstance(kind, ProgressKind)
        or type(iid) is not str
        or type(epoch) is not int
        or type(s) is not int
        or s < 0
        or (epoch < 0 and not (kind is ProgressKind.JOIN and epoch == JOIN_EPOCH_FROM_OFFSET))
    )
    if bad:
        raise CorruptRecordError(
            f"progress event at offset {offset} has impossible values "
            f"(interceptor_id={iid!r}, epoch={epoch!r}, kind={kind!r}, s={s!r}); "
            "the progress topic holds a record lowmark did not write. Inspect it with kcat"
        )
    return iid, epoch, kind, s
