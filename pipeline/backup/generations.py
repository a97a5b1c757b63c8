"""A backup site follows the CG's generations: the pure decision, and the roles poll.

A site applies one generation g at a time (its checkpoint's ``generation``). The roles
(``lowmark.config``, ``RolesStore.latest``; none recorded = generation 0) say what to do:

- roles at generation g (or none and g = 0): keep applying g;
- roles at generation g + 1: generation g ends at the failover cut. Apply every record
  of g with ts <= ``base_w`` that lies below ``base_offsets`` (the log offsets of the
  published W the cut was chosen under: every record of g with ts <= base_w is below
  them), never one above the cut, then checkpoint at (g + 1, base_w, offsets 0) and go
  on with g + 1's topics from there (``Cut``);
- the site is the roles' ``primary_site``: it must not apply at all (``lowmark
  failover`` runs it as the primary); the applier stops cleanly, it does not crash-loop;
- refuse, with what to do: the site is two or more generations behind (the roles keep
  ``base_offsets`` only for the latest transition, so an older cut's end in its log is
  not known), it applied past the cut already (its images hold records the new
  generation does not: rebuild), or its checkpoint is of a generation the roles do not
  have (the roles went back: fix the roles record first).

A record of g at or above ``base_offsets`` is never applied, whatever its ts. One with
ts > base_w is the old primary's tail (fencing stops the interceptor; a raw producer
with the old transactional id, or a restarted old primary, can still write some). One
with ts <= base_w there broke watermark safety: the W the cut was chosen under promised
that no such record would follow. Either way the new primary's images (rolled forward
from the same bounded backlog) do not hold it, so the backup must not: it is dropped
unread and counted (``beyond_cut``), and never halts the site.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from pipeline.errors import KafkaError
from schemas.records import CgRoles, Watermark

__all__ = ["Action", "Cut", "Decision", "RolesPoll", "decide"]

#: the roles are read at most this often (seconds of the service's monotonic clock)
ROLES_POLL_INTERVAL_S = 1.0


class Action(StrEnum):
    KEEP = "keep"  # go on applying the site's generation
    CUT = "cut"  # apply the site's generation up to the cut, then switch to the next
    STOP_PRIMARY = "stop_primary"  # this site is the primary: stop applying, cleanly
    REFUSE = "refuse"  # cannot follow safely; ``reason`` says what to do


@dataclass(frozen=True)
class Cut:
    """Where generation ``generation`` ends for a backup: ts <= ``base_w`` below
    ``base_offsets`` (offsets of generation ``generation``'s log)."""

    generation: int
    base_w: int
    base_offsets: Mapping[int, int]

    @property
    def next_generation(self) -> int:
        return self.generation + 1

    def covers(self, w: Watermark) -> bool:
        """Whether ``w`` (a W of this generation) is a cut inside this one: at or below
        base_w, its log offsets within base_offsets. Such a W may still be applied on the
        way to the cut; any other never is."""
        return w.w <= self.base_w and all(
            off <= self.base_offsets.get(p, 0) for p, off in w.log_offsets.items() if off
        )

    def beyond(self, partition: int, offset: int) -> bool:
        """Whether the record at (partition, offset) of this generation's log lies at or
        above the cut's end (a partition the cut does not name held nothing by then)."""
        return offset >= self.base_offsets.get(partition, 0)


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str = ""
    cut: Cut | None = None  # set for CUT
    generation: int = 0  # the roles' generation (0 when none recorded)


def decide(
    cg: str,
    site: str,
    generation: int,
    applied_w: int,
    roles: CgRoles | None,
) -> Decision:
    """What a backup ``site`` applying ``generation`` up to ``applied_w`` does, given the
    CG's committed ``roles`` (None: none recorded, i.e. generation 0, primary unknown).

    ``applied_w`` is the highest W the site's images may hold (after a restart, the
    highest published before it, until it has passed it).
    """
    current = roles.generation if roles is not None else 0
    if roles is not None and roles.primary_site == site:
        return Decision(
            Action.STOP_PRIMARY,
            f"site {site!r} is the primary of generation {current} of CG {cg!r}: its "
            "applier stops (`lowmark failover` runs this site as the primary). To make it "
            "a backup again, fail back (a later generation with another primary)",
            generation=current,
        )
    if current == generation:
        return Decision(Action.KEEP, generation=current)
    if current < generation:
        return Decision(
            Action.REFUSE,
            f"site {site!r} applies generation {generation} of CG {cg!r}, but the recorded "
            f"roles are at generation {current}: the roles went back (a roles record lost "
            "or rewritten by hand). Restore the roles record (`lowmark roles show`) before "
            "starting this applier",
            generation=current,
        )
    assert roles is not None  # current > generation >= 0
    if current > generation + 1:
        return Decision(
            Action.REFUSE,
            f"site {site!r} is at generation {generation} of CG {cg!r}, {current - generation} "
            f"generations behind the roles' {current}: only the latest transition's end "
            f"offsets are recorded, so where generation {generation} ends in its log is not "
            "known. Rebuild this site from another site's checkpoint and images "
            "(replacement backup)",
            generation=current,
        )
    if applied_w > roles.base_w:
        return Decision(
            Action.REFUSE,
            f"site {site!r} has applied generation {generation} of CG {cg!r} up to W "
            f"{applied_w}, above W {roles.base_w} where generation {current} starts: its "
            f"images hold records that generation {current} does not. Rebuild this site "
            "from another site's checkpoint and images (replacement backup), or resync it "
            "(failback)",
            generation=current,
        )
    return Decision(
        Action.CUT,
        cut=Cut(generation, roles.base_w, dict(roles.base_offsets)),
        generation=current,
    )


@dataclass
class RolesPoll:
    """Reads the roles at most every ``interval_s`` of ``now`` (the service's monotonic
    clock). A read that fails (a Kafka error) keeps the last roles known and is tried
    again at the next interval: never fatal, counted in ``errors``.

    A read takes up to a second (a bounded read of ``lowmark.config``), so a service
    does not read in its loop: ``start`` runs the reads in a thread, and the loop looks at
    ``roles`` and ``reads`` (the number of reads that succeeded), which only that thread
    changes. ``poll(force=True)`` reads at once, in the caller's thread (at start-up).
    """

    read: Callable[[], CgRoles | None]
    now: Callable[[], float]
    interval_s: float = ROLES_POLL_INTERVAL_S
    roles: CgRoles | None = None
    errors: int = 0
    last_error: str = ""
    reads: int = 0
    _last: float | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    def start(self, name: str = "lowmark-roles") -> None:
        """Poll in a daemon thread (checking every ``tick_s`` whether a read is due)."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        self._stop.set()
        if thread is not None:
            thread.join(30)

    def _run(self, tick_s: float = 0.05) -> None:
        while not self._stop.wait(tick_s):
            self.poll()

    def due(self) -> bool:
        return self._last is None or self.now() - self._last >= self.interval_s

    def poll(self, force: bool = False) -> bool:
        """Read the roles if due (or ``force``); whether a read succeeded now. A roles
        record never goes back: a read older than what was seen is ignored."""
        with self._lock:  # one read at a time (the thread's, or a forced one)
            if not (force or self.due()):
                return False
            self._last = self.now()
            try:
                got = self.read()
            except KafkaError as exc:  # a passing fault (or a broker down): keep what we had
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                return False
            if got is not None and (self.roles is None or got.generation >= self.roles.generation):
                self.roles = got
            self.reads += 1
            return True
