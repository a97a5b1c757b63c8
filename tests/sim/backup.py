"""The simulated watermark service and backup applier: the real pure cores (``WatermarkState``,
``ApplyPlanner``) driven as their services drive them, over the simulated log.

- ``WatermarkService`` folds the committed progress records in offset order, fences a
  member silent for longer than the liveness timeout (the fence first, then the FENCE
  record), publishes W with the log's end offsets when W rose (the publisher's floor), and
  restarts from the latest published W (``WatermarkState.from_watermark``). A shadow fold
  that never restarts must agree with it at every common progress offset.
- ``Applier`` reads partitions in a random interleaving (Kafka's order only within one),
  reads W's, notes their member tables and departed instances, applies every ready W
  (``ready`` then ``take``), checkpoints only when its images are a cut (after a restart:
  once it passed every W published before it), spills (``drop_pending`` and re-read), and
  restarts from its checkpoint: a new planner at the checkpoint's W and offsets, every W
  re-read (or only the latest, as after compaction).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from connectors.kafka import admin
from pipeline.backup.plan import ApplyOp, ApplyPlanner, OpKind
from pipeline.errors import ApplyError, KafkaUnavailableError
from pipeline.watermark import publisher
from pipeline.watermark.state import WatermarkState
from schemas.records import Progress, ProgressKind, Watermark
from tests.sim.log import SimLog

LIVENESS_US = 400_000


class WatermarkService:
    def __init__(self, log: SimLog, now: Callable[[], int], fence: Callable[[str], None]):
        self.log = log
        self.now = now
        self.fence = fence  # the service's init_transactions with the member's id
        self.shadow = WatermarkState()  # folds the same log, never restarts
        self.shadow_cursor = 0
        #: (progress offset, final S) of every instance removed by a fence (oracle)
        self.fences: list[tuple[int, int]] = []
        self.leaderless = 0  # end-offset answers with a partition without a leader
        #: a second instance, standing by: it folds too, at its own pace
        self.standby = WatermarkState()
        self.standby_cursor = 0
        self.restart()

    def restart(self) -> None:
        """The active instance crashes; a fresh one takes the publisher."""
        self._take_over(None, 0)

    def take_over(self) -> None:
        """The standby, folding on its own and maybe behind, fences the active instance and
        takes the publisher (the old active stands by with its fold): two instances racing."""
        fold, cursor = self.standby, self.standby_cursor
        self.standby, self.standby_cursor = self.state, self.cursor
        self._take_over(fold, cursor)

    def _take_over(self, fold: WatermarkState | None, cursor: int) -> None:
        """WatermarkService._take_over: the floor is read once the others are fenced."""
        latest = self.log.watermarks[-1] if self.log.watermarks else None
        resumed = publisher.resume_from_floor(fold, latest)
        if resumed is not None:
            self.state, self.cursor = resumed, resumed.progress_offset + 1
        else:
            assert fold is not None
            self.state, self.cursor = fold, cursor
        self.last_seen: dict[str, int] = {}
        self.started_us = self.now()
        self.floor = latest.w if latest else 0  # the highest committed W (publisher.py)
        self.last_published: int | None = None  # this instance's own cadence

    def fold(self, rng: random.Random) -> None:
        """Fold some of the committed progress records not folded yet (a consumer batch)."""
        end = len(self.log.progress)
        if self.cursor < end:
            end = rng.randint(self.cursor + 1, end)
        for off, rec in self.log.visible_progress(self.cursor, end):
            if self.state.apply(rec, off).accepted:
                self.last_seen[rec.interceptor_id] = self.now()
        self.cursor = max(self.cursor, end)
        self._fold_shadow(end)
        if self.standby_cursor < end and rng.random() < 0.5:
            stop = rng.randint(self.standby_cursor + 1, end)
            for off, rec in self.log.visible_progress(self.standby_cursor, stop):
                self.standby.apply(rec, off)
            self.standby_cursor = stop

    def _fold_shadow(self, end: int) -> None:
        for off, rec in self.log.visible_progress(self.shadow_cursor, end):
            before = self.shadow.members.get(rec.interceptor_id)
            accepted = self.shadow.apply(rec, off).accepted
            after = self.shadow.members.get(rec.interceptor_id)
            removed = before is not None and (after is None or after.epoch != before.epoch)
            if accepted and removed and rec.kind is not ProgressKind.LEAVE:  # FENCE or JOIN
                assert before is not None
                self.fences.append((off, before.s))
        self.shadow_cursor = max(self.shadow_cursor, end)

    def fence_silent(self) -> list[str]:
        silent = self.state.silent_members(
            self.last_seen, self.now(), LIVENESS_US, not_before_us=self.started_us
        )
        for m in silent:
            self.fence(m.interceptor_id)
            fence = Progress(m.interceptor_id, m.epoch, ProgressKind.FENCE, m.s, {}, self.now())
            self.log.append_txn([], fence, committed=True)
        return [m.interceptor_id for m in silent]

    def publish(self, rng: random.Random | None = None) -> Watermark | None:
        """Publish W if it moved since this instance last published and is not below the
        floor; log_offsets: the ends, read after the fold (one ListOffsets request, which a
        partition without a leader answers with -1001: W is held then). No ``rng``: no
        fault (the drain)."""
        w = self.state.w
        if w == self.last_published or not publisher.may_publish(w, self.floor):
            return None
        ends: dict[int, int] = self.log.ends()
        if rng is not None and rng.random() < 0.05:
            ends[rng.randrange(self.log.partitions)] = -1001
            self.leaderless += 1
        try:
            offsets = admin.checked_end_offsets("log", range(self.log.partitions), ends)
        except KafkaUnavailableError:
            return None
        wm = self.state.watermark("sim", offsets, self.now())
        self.log.watermarks.append(wm)
        self.floor = max(self.floor, wm.w)
        self.last_published = wm.w
        return wm


@dataclass
class Checkpoint:
    w: int
    offsets: dict[int, int]
    images: dict[str, bytes]


@dataclass
class Applier:
    """A backup site: planner, images, checkpoint, read positions."""

    name: str
    log: SimLog
    images: dict[str, bytearray] = field(default_factory=dict)
    checkpoint: Checkpoint = field(default_factory=lambda: Checkpoint(0, {}, {}))
    #: what the oracle checks: every op applied, with the W it was applied under
    applied: list[tuple[int, ApplyOp]] = field(default_factory=list)
    restarts: int = 0
    skip: set[tuple[int, int]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.start(every_w=True)

    def start(self, every_w: bool) -> None:
        """(Re)start from the checkpoint (applier._open_generation)."""
        ck = self.checkpoint
        self.halted: tuple[int, int] | None = None
        self.planner = ApplyPlanner(ck.w, max_pending_bytes=1 << 40)
        self.applied_w = ck.w
        self.cursor = {p: 0 for p in range(self.log.partitions)}
        self.cursor.update(ck.offsets)
        for p, off in self.cursor.items():
            self.planner.note_position(p, off)
        self.targets: list[Watermark] = []
        self.max_seen_w = ck.w
        # the compacted watermark topic: every W, or only the latest after compaction
        n = len(self.log.watermarks)
        self.wm_cursor = 0 if every_w or n == 0 else n - 1
        self.wm_read_max = -1  # the newest W (topic index) read since this start
        self.restart_floor = max((wm.w for wm in self.log.watermarks), default=0)
        self.wm_end_at_start = n

    def operator_skip(self) -> None:
        """The operator restarts a halted applier with ``--skip P:O`` for its bad record."""
        assert self.halted is not None
        self.skip.add(self.halted)
        self.restart(compacted=False)

    def restart(self, compacted: bool) -> None:
        """Killed at any instant: the images keep what was applied (item 2 of issue 16
        loses unsynced bytes; here every apply reached the disk), the planner is lost."""
        self.restarts += 1
        self.start(every_w=not compacted)

    def may_checkpoint(self) -> bool:
        return self.wm_cursor >= self.wm_end_at_start and self.applied_w >= self.restart_floor

    def is_cut(self) -> bool:
        """Whether the images are claimed to be a cut at applied_w (what may be exposed)."""
        return self.may_checkpoint()

    # ---------------------------------------------------------------- reading

    def read_log(self, rng: random.Random, p: int, n: int, w_seen: Callable[[int], bool]) -> int:
        """Read a fetch batch of up to n entries of partition p (read_committed), as
        applier._read_log handles it. A zombie is only read once this applier has read the
        W that proves it stale when ``w_seen`` says so. At a bad record the partition is
        blocked (and paused: the cursor stays there), yet the rest of the batch and its EOF
        event still arrive; the planner must refuse them and hold the position."""
        part = self.log.parts[p]
        done, i, paused = 0, self.cursor[p], False
        while done < n and i < len(part):
            e = part[i]
            if e.zombie and not w_seen(e.proof_w):
                break
            i += 1
            done += 1
            if self.planner.is_blocked(p, e.offset):
                self.planner.note_position(p, e.offset)  # refused, not consumed
                paused = True
                continue
            if e.corrupt and (p, e.offset) not in self.skip:
                self.planner.block(p, e.offset)
                paused = True
                continue
            self.cursor[p] = i
            if e.corrupt:  # skipped by the operator (`lowmark apply --skip P:O`)
                self.planner.note_position(p, e.offset + 1)
            elif e.committed and e.record is not None:
                self.planner.add(e.record, p, e.offset)
                self.planner.note_position(p, e.offset + 1)
            # aborted records and transaction markers are never delivered
        if i == len(part):
            self.planner.note_position(p, len(part))  # partition EOF (may be in flight)
        return 0 if paused and not done else done

    def read_watermarks(self, n: int) -> int:
        done = 0
        while done < n and self.wm_cursor < len(self.log.watermarks):
            wm = self.log.watermarks[self.wm_cursor]
            self.wm_read_max = max(self.wm_read_max, self.wm_cursor)
            self.wm_cursor += 1
            done += 1
            for m in wm.members:
                self.planner.note_epoch(m.interceptor_id, m.epoch, wm.log_offsets)
            for d in wm.departed:
                self.planner.note_departed(d.interceptor_id, d.epoch, d.s)
            if wm.w > self.max_seen_w:
                self.max_seen_w = wm.w
                self.targets.append(wm)
        return done

    # ---------------------------------------------------------------- applying

    def apply_ready(self) -> bool:
        applied = False
        while self.targets:
            target = self.targets[0]
            if not self.planner.ready(target.w, target.log_offsets):
                blocker = self.planner.blocked_by(target.log_offsets)
                if blocker is not None and self.halted is None:
                    self.take_checkpoint()  # what was applied before the bad record
                    self.halted = blocker
                return applied
            self.targets.pop(0)
            if target.w <= self.applied_w:
                continue
            for op in self.planner.take(target.w):
                self._apply(op)
                self.applied.append((target.w, op))
            self.applied_w = target.w
            applied = True
        return applied

    def _apply(self, op: ApplyOp) -> None:
        """What ImageSet.apply does to the bytes (the sim keeps images in memory)."""
        if op.kind is OpKind.VOLUME_CHANGE:
            assert op.volume_id is not None
            img = self.images.setdefault(op.volume_id, bytearray())
            if len(img) < op.length:
                img.extend(bytes(op.length - len(img)))
            del img[op.length :]
            return
        if op.kind not in (OpKind.WRITE, OpKind.ZERO, OpKind.TRIM):
            return
        assert op.volume_id is not None
        img = self.images[op.volume_id]
        if op.offset + op.length > len(img):  # ImageSet's range check
            raise ApplyError(f"{op.kind} at ts {op.ts} extends past {op.volume_id}'s size")
        img[op.offset : op.offset + op.length] = (
            op.data if op.data is not None else bytes(op.length)
        )

    def take_checkpoint(self) -> bool:
        if not self.may_checkpoint() or self.applied_w <= self.checkpoint.w:
            return False
        self.checkpoint = Checkpoint(
            self.applied_w,
            self.planner.checkpoint_offsets(),
            {v: bytes(b) for v, b in self.images.items()},
        )
        return True

    def spill(self) -> None:
        """Over the memory budget: forget pending records, seek back, re-read them."""
        for p, off in self.planner.drop_pending().items():
            self.cursor[p] = off
