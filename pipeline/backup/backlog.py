"""The applier's memory budget over a backlog (``Backlog``, a mixin of ``Applier``).

Records are held until the W that covers them is readable to its log offsets. Past
``max_pending_bytes`` a site with a W known applies each volume's ops with ts <= that W
as they stream in (``ApplyPlanner.take_early``: per-volume order makes that safe) and
holds checkpoints and snapshot copies until applied_w reaches it; only what that does not
free is dropped and read again from Kafka (``_spill``), so an applier that was offline for
hours catches up within its budget instead of stalling on a W whose records exceed it.
Over budget with no W known at all, the applier stops reading the log until one arrives
(``Applier.step``): nothing could be applied, so dropping and re-reading would only loop.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.backup.plan import ApplyOp, ApplyPlanner
from pipeline.fsutil import atomic_write
from pipeline.logs import event

log = logging.getLogger("lowmark.applier")

#: over budget, read at most this many batches of W's before taking ops early
_WM_CATCH_UP_READS = 50


class Backlog:
    """Mixin of ``Applier``: the attributes below are the applier's."""

    planner: ApplyPlanner
    stats: Any
    topics: Any
    paused: bool
    _targets: list[Any]
    _cut: Any
    _log: Any
    _blocked: dict[int, Any]
    _restart_floor: int
    _early_w: int
    _ahead_path: Path

    def _apply(self, op: ApplyOp) -> None: ...
    def _read_watermarks(self, timeout_s: float = 0) -> int:
        raise NotImplementedError

    def _apply_early(self) -> bool:
        """Over the memory budget with a W known but not yet readable to its offsets (a
        long backlog): apply each volume's ops with ts <= that W now, and hold checkpoints
        until applied_w reaches it (``_restart_floor``), instead of dropping the backlog
        and reading it again, which cannot reach a W whose records exceed the budget."""
        if self.paused or self._cut is not None:
            return False
        # the log is read 2000 records a step, W's 100: after an outage the log runs far
        # ahead of the W's known; the newest W frees the most
        for _ in range(_WM_CATCH_UP_READS):
            if not self._read_watermarks(0):
                break
        if not self._targets:
            return False
        target = max(self._targets, key=lambda t: t.w)
        ops = self.planner.take_early(target.w, target.log_offsets)
        if not ops:
            return False
        if target.w > self._early_w:
            # durable before the images move: after a crash, a snapshot below it must not
            # be copied from images that hold later writes
            atomic_write(self._ahead_path, str(target.w).encode())
            self._early_w = target.w
        for op in ops:
            self._apply(op)
        self._restart_floor = max(self._restart_floor, target.w)
        self.stats.applied_early += len(ops)
        return True

    def _spill(self, why: str = "pending records exceeded the memory budget") -> None:
        """Bounded memory: forget pending records and re-read them from Kafka later."""
        offsets = self.planner.drop_pending()
        assert self._log is not None
        for p, off in offsets.items():
            self._log.seek(self.topics.log, p, off)
        # a paused partition would never re-read what lies before its bad record; reading
        # on reaches the bad record again, and _block pauses it again
        blocked = [p for p in self._blocked if p in offsets]
        if blocked:
            self._log.resume(self.topics.log, blocked)
        event(
            log,
            f"{why}; re-reading from Kafka",
            level=logging.WARNING,
            offsets=offsets,
        )
