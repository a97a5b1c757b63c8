"""The applier's side of following generations: learn the cut, apply up to it, switch.

``Applier`` inherits ``FollowGenerations``; the decisions are ``generations.decide``
(pure), this is their I/O. The sequence for a site applying generation g when the roles
name generation g + 1 (``Cut``: base_w, base_offsets):

1. learn the cut: no W of g above base_w is a target any more; a record of g at or above
   base_offsets is dropped unread from now on; records already read past the cut are
   forgotten and re-read (``_spill``) so none of them can be taken;
2. once the log is read up to base_offsets and the watermark topic up to its end as of
   step 1 (the W the cut was chosen under, with its epochs and departures), apply every
   op with ts <= base_w (whatever W targets of g at or below base_w came first are
   applied on the way, as always);
3. switch: checkpoint at (g + 1, base_w, every partition of g + 1's log at 0), after the
   images are fdatasynced, and read g + 1's log and watermarks from there.

A crash between 2 and 3 restarts from the checkpoint of g and does 1-3 again (the ops
re-applied are the same bytes). A crash after 3 resumes in g + 1.
"""

from __future__ import annotations

import logging
from typing import Any

from connectors.kafka.consumer import Consumer
from connectors.kafka.reading import bounds
from connectors.kafka.settings import ApplierSettings
from connectors.kafka.topics import CgTopics, ensure_topics
from pipeline.backup.checkpointer import Checkpointer, retention_lost, retention_lost_message
from pipeline.backup.generations import Action, Cut, Decision, RolesPoll, decide
from pipeline.backup.plan import ApplyOp, ApplyPlanner
from pipeline.errors import ApplyError, KafkaUnavailableError, LowmarkError, RetentionLostError
from pipeline.logs import event
from pipeline.site import SiteDir

log = logging.getLogger("lowmark.applier")

#: a roles read that keeps failing is logged this often (seconds)
_ERROR_LOG_EVERY_S = 10.0
#: before a halt on generation g's log is final, the roles are read again for this long
#: (seconds), this often: a roles record just committed may not be readable yet
HALT_ROLES_GRACE_S = 5.0
HALT_ROLES_RETRY_S = 0.2


class FollowGenerations:
    """Mixin of ``Applier``: the attributes below are the applier's."""

    config: Any
    stats: Any
    roles: RolesPoll
    generation: int
    topics: CgTopics
    applied_w: int
    checkpoint_w: int
    planner: ApplyPlanner
    checkpointer: Checkpointer
    finished: str | None
    on_finish: Any
    _cut: Cut | None
    _cut_wm_end: int
    _next_wm_end: int
    _fresh = False
    _refused: ApplyError | None
    _targets: list[Any]
    _wm: Any
    _wm_read_to: int
    _restart_floor: int
    _blocked: dict[int, Any]
    _max_seen_w: int
    _wm_end_at_start: int
    _now: Any
    _sleep: Any

    # provided by Applier
    def _apply(self, op: ApplyOp) -> None: ...
    def _spill(self, why: str = "") -> None: ...
    def _halt(self, partition: int) -> None: ...
    def _finish_background_checkpoint(self, wait: bool = False) -> None: ...
    def _close_consumers(self) -> None: ...
    def checkpoint(self, digests: bool | None = True) -> Any: ...
    def may_checkpoint(self) -> bool:
        raise NotImplementedError

    kafka_conf: dict[str, Any]
    _log: Any
    _last_roles_error_log = -1e9
    _roles_errors_seen = 0
    _roles_reads_seen = 0
    _beyond_logged: frozenset[int] = frozenset()

    def _resume_point(self) -> tuple[dict[int, int], Decision]:
        """Read the roles and the site's checkpoint (local file, else the checkpoints
        topics of the roles' generation and the ones before it): set the generation and W
        the site resumes at; its log offsets there, and what the roles say to do."""
        if not self.roles.poll(force=True):
            raise KafkaUnavailableError(
                f"cannot read the roles of CG {self.config.cg} ({self.roles.last_error}); "
                "check the brokers"
            )
        roles = self.roles.roles
        local = self.checkpointer.path.exists()
        ckpt = self.checkpointer.load(roles.generation if roles is not None else 0)
        self.generation = ckpt.generation if ckpt is not None else 0
        # a site that never checkpointed and holds no volume has applied nothing at all
        self._fresh = ckpt is None and not SiteDir(self.config.data_dir).read_catalog(
            require_images=False
        )
        if ckpt is not None:
            self.applied_w = self.checkpoint_w = self._max_seen_w = ckpt.w
        decision = decide(self.config.cg, self.config.site, self.generation, self.applied_w, roles)
        if decision.cut is not None and not local:
            # Resuming in g from Kafka's copy: before it lost its local file this site may
            # have switched and applied g + 1 (whose checkpoint did not reach Kafka). Until
            # it has passed every W of g + 1 published before now, its images are no cut.
            nxt = bounds(self.kafka_conf, CgTopics(self.config.cg, self.generation + 1).watermark)
            self._next_wm_end = nxt[0][1] if nxt and 0 in nxt else 0
        return (dict(ckpt.log_offsets) if ckpt is not None else {}), decision

    def _open_generation(self, generation: int, offsets: dict[int, int]) -> None:
        """Read ``generation``'s log from ``offsets`` (missing partitions: from 0) and its
        watermarks from the start, with a new planner at ``applied_w``."""
        self.topics = self._ensure_topics(generation)
        self.generation = generation
        # the topic says how many partitions it has (a site joining an existing CG needs
        # no log_partitions setting, and one set too low must not leave partitions unread)
        log_bounds = bounds(self.kafka_conf, self.topics.log) or {}
        parts = log_bounds.keys() or range(self.config.log_partitions)
        start_offsets = {p: 0 for p in parts}
        start_offsets.update(offsets)
        lost = retention_lost(start_offsets, log_bounds)
        if lost is not None:
            raise RetentionLostError(
                retention_lost_message(self.config.site, self.topics.log, *lost, self._fresh)
            )
        self.planner = ApplyPlanner(self.applied_w, self.config.max_pending_bytes)
        for p, off in start_offsets.items():
            self.planner.note_position(p, off)
        settings = ApplierSettings(self.kafka_conf, self.config.cg, self.config.site)
        self._log = Consumer(settings.log_consumer())
        self._log.assign(self.topics.log, start_offsets)
        self._wm = Consumer(settings.watermark_consumer())
        self._wm.assign(self.topics.watermark, {0: 0})

    def _ensure_topics(self, generation: int) -> CgTopics:
        return ensure_topics(
            self.kafka_conf,
            self.config.cg,
            log_partitions=self.config.log_partitions,
            replication_factor=self.config.replication_factor,
            generation=generation,
        )

    def _follow_roles(self) -> None:
        """Act on the roles the poll thread read last (about once a second)."""
        errors = self.roles.errors
        if errors > self._roles_errors_seen:
            self._roles_errors_seen = errors
            if self._now() - self._last_roles_error_log >= _ERROR_LOG_EVERY_S:
                self._last_roles_error_log = self._now()
                event(
                    log,
                    "cannot read the roles; applying on, retrying",
                    logging.WARNING,
                    cg=self.config.cg,
                    error=self.roles.last_error,
                )
        reads = self.roles.reads
        if reads == self._roles_reads_seen:
            return  # nothing new read
        self._roles_reads_seen = reads
        if self._cut is not None:
            return  # already following the cut to the next generation
        d = decide(
            self.config.cg, self.config.site, self.generation, self.applied_w, self.roles.roles
        )
        if d.action is Action.STOP_PRIMARY:
            self._finish(d.reason)
        elif d.action is Action.REFUSE:
            self._refuse(d.reason)
        elif d.cut is not None:
            self._learn_cut(d.cut)

    def _finish(self, reason: str) -> None:
        self.finished = reason
        event(log, "applier stops: " + reason, logging.WARNING, cg=self.config.cg)
        if self.on_finish is not None:
            self.on_finish()

    def _refuse(self, reason: str) -> None:
        self._refused = ApplyError(reason)
        event(log, "applier refuses to go on", logging.ERROR, cg=self.config.cg, why=reason)
        raise self._refused

    def _halt_past_cut(self) -> bool:
        """The planner halted on generation g's log (a record breaking watermark safety, a
        ts going back, ...) while the cut was not known yet: the roles may already end g
        below that record (the old primary's tail after a failover). Read them now; True
        when a cut is learnt and what was read past it is dropped (the caller stops its
        batch: everything is re-read with the cut in force, and a record below the cut
        that is really bad halts again)."""
        if self._cut is not None:
            return False
        # a halt is for good, so look twice: Kafka writes a transaction's markers after
        # EndTxn returns, and a roles record committed a moment ago may not be below the
        # last stable offset yet (seen in CI: the tail was read before the roles were)
        deadline = self._now() + HALT_ROLES_GRACE_S
        while True:
            self.roles.poll(force=True)
            d = decide(
                self.config.cg, self.config.site, self.generation, self.applied_w, self.roles.roles
            )
            if d.cut is not None:
                return self._learn_cut(d.cut)
            if self._now() >= deadline:
                return False
            self._sleep(HALT_ROLES_RETRY_S)

    def _learn_cut(self, cut: Cut) -> bool:
        """Follow ``cut`` from now on; whether records read past it were dropped."""
        self._cut = cut
        self._targets = [t for t in self._targets if cut.covers(t)]
        self._cut_wm_end = self._wm.watermark_offsets(self.topics.watermark, 0)[1]
        event(
            log,
            "generation ends at the failover cut",
            cg=self.config.cg,
            site=self.config.site,
            generation=cut.generation,
            next_generation=cut.next_generation,
            base_w=cut.base_w,
            base_offsets=dict(cut.base_offsets),
            applied_w=self.applied_w,
        )
        if any(pos > cut.base_offsets.get(p, 0) for p, pos in self.planner.positions().items()):
            # read past the cut before it was known: forget what is pending and re-read
            # it with the cut in force, so nothing at or above it can be taken
            self._spill("records were read past the failover cut before it was known")
            return True
        return False

    def _beyond_cut(self, partition: int, offset: int) -> None:
        """A record of this generation at or above the cut: dropped unread, counted."""
        assert self._cut is not None
        self.stats.beyond_cut += 1
        end = self._cut.base_offsets.get(partition, 0)
        self.planner.note_position(partition, end)  # everything below the cut was read
        if partition not in self._beyond_logged:
            self._beyond_logged = self._beyond_logged | {partition}
            event(
                log,
                "records past the failover cut are never applied (the old primary's tail)",
                logging.WARNING,
                generation=self.generation,
                partition=partition,
                offset=offset,
                cut_offset=end,
            )

    def _apply_cut(self) -> bool:
        """Apply the ops of this generation with ts <= base_w once all are read, then
        switch to the next generation. Whether it switched."""
        cut = self._cut
        assert cut is not None
        if self._wm_read_to < self._cut_wm_end:
            return False  # the W the cut was chosen under (epochs, departures) not read yet
        if not self.planner.ready(cut.base_w, cut.base_offsets):
            blocker = self.planner.blocked_by(cut.base_offsets)
            if blocker is not None:
                self._halt(blocker[0])
            return False
        if self._restart_floor > cut.base_w and not self._fresh:
            self._refuse(
                f"site {self.config.site!r} restarted after it may have applied generation "
                f"{cut.generation} up to W {self._restart_floor} (published before this "
                f"start), above W {cut.base_w} where generation {cut.next_generation} "
                "starts: its images may hold records that generation does not. Rebuild this "
                "site from another site's checkpoint and images (replacement backup)"
            )
        # the next generation's topics first: a broker fault here changes nothing (retried)
        self._ensure_topics(cut.next_generation)
        for op in self.planner.take(cut.base_w):
            self._apply(op)
        self.applied_w = cut.base_w
        try:
            self._switch(cut)
        except LowmarkError as exc:
            if self._log is not None:
                raise  # switched: what failed is the checkpoint, retried like any other
            self._refuse(  # half-way: the clean way on is a restart from the checkpoint
                f"site {self.config.site!r} failed switching to generation "
                f"{cut.next_generation} ({type(exc).__name__}: {exc}); restart the applier: "
                "it resumes from its checkpoint and switches again"
            )
        return True

    def _switch(self, cut: Cut) -> None:
        """Checkpoint at the next generation's start and read its topics from there."""
        self._finish_background_checkpoint(wait=True)  # a checkpoint of g lands first
        self._close_consumers()
        self._cut = None
        self._targets = []
        self._blocked = {}
        self._beyond_logged = frozenset()
        self._max_seen_w = self.applied_w
        self._open_generation(cut.next_generation, {})
        # nothing of the new generation was applied before (unless the site lost its local
        # checkpoint, see _resume_point): its images are a cut now
        self._wm_end_at_start, self._wm_read_to = self._next_wm_end, 0
        self._next_wm_end = 0
        self._restart_floor = self.applied_w
        self.stats.generation_switches += 1
        if self.may_checkpoint():
            self.checkpoint(digests=False)  # (g + 1, base_w, offsets 0), images fdatasynced
        event(
            log,
            "switched to the next generation",
            cg=self.config.cg,
            site=self.config.site,
            generation=self.generation,
            w=self.applied_w,
        )
