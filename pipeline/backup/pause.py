"""Pausing a site's applier, and handing its site over to a failover.

Two control files in the site's ``state/`` steer a running applier (it looks every
``CONTROL_EVERY_S``):

- ``paused`` (``lowmark pause`` / ``lowmark resume``): while it exists the images do not
  change. Pausing takes effect once the images are a cut (``may_checkpoint``) and no
  generation cut is being followed: the applier checkpoints, then stages every op it
  would have applied (``staging.Stage``), marking the stage where it would checkpoint.
  Resuming applies the stage to the images (newest bytes of each range, volume changes
  first, as a roll-forward does), checkpoints and deletes the stage. An applier started
  while the file exists catches up first, then pauses (after a restart its images may
  hold more than its checkpoint: they are a cut only once it has passed every W
  published before it started).
- ``handover`` (written by ``lowmark failover``, which waits for the site lock): the
  applier stops as if asked to, marking its stage (paused) or checkpointing (not), and
  gives up the lock; the failover then starts from what it left.

Why a paused site keeps reading: the failover of a site whose applier is paused (an
operator holding a cut, or a slow disk) would otherwise read the whole backlog from
Kafka before its first read; with the stage it reads only the tail past the last mark.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.backup import staging
from pipeline.backup.images import ImageSet
from pipeline.backup.plan import ApplyPlanner
from pipeline.backup.rollforward import Backlog, RollForward, apply_volume_changes
from pipeline.errors import ApplyError
from pipeline.logs import event
from pipeline.site import STATE, SiteDir

log = logging.getLogger("lowmark.applier")

PAUSED = "paused"
HANDOVER = "handover"
CONTROL_EVERY_S = 0.05


def control_path(site: SiteDir, name: str) -> Path:
    return site.root / STATE / name


def set_control(site: SiteDir, name: str, on: bool, text: str = "") -> bool:
    """Create (``on``) or remove a control file; whether it changed anything."""
    path = control_path(site, name)
    if on == path.exists():
        return False
    if on:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    else:
        path.unlink(missing_ok=True)
    return True


def is_set(site: SiteDir, name: str) -> bool:
    return control_path(site, name).exists()


class PauseAndHandOver:
    """Mixin of ``Applier``: the attributes below are the applier's."""

    config: Any
    site: ImageSet
    planner: ApplyPlanner
    applied_w: int
    checkpoint_w: int
    finished: str | None
    _cut: Any
    _now: Any
    _last_checkpoint: float
    _stage: staging.Stage | None = None
    _stage_base = b""
    _control_at = -1.0

    # provided by Applier / FollowGenerations
    def checkpoint(self, digests: bool | None = True) -> Any: ...
    def _finish(self, reason: str) -> None: ...
    def may_checkpoint(self) -> bool:
        raise NotImplementedError

    @property
    def paused(self) -> bool:
        return self._stage is not None

    def _control(self) -> None:
        now = self._now()
        if now - self._control_at < CONTROL_EVERY_S:
            return
        self._control_at = now
        site = SiteDir(self.config.data_dir)
        if is_set(site, HANDOVER):
            self._finish("handing the site over to `lowmark failover`")
        elif is_set(site, PAUSED):
            if self._stage is None:
                self._pause(site)
        elif self._stage is not None:
            self._resume(site)

    def _pause(self, site: SiteDir) -> None:
        if self._cut is not None or not self.may_checkpoint():
            return  # not a cut yet, or following a generation's cut: pause once there
        rec = self.checkpoint(digests=False)
        self._stage_base = site.checkpoint_path.read_bytes()
        self._stage = staging.Stage(site, self._stage_base)
        event(log, "applier paused", cg=self.config.cg, site=self.config.site, w=rec.w)

    def _stage_mark(self) -> None:
        assert self._stage is not None
        self._stage.mark(self.applied_w, self.planner.checkpoint_offsets())
        self._last_checkpoint = self._now()

    def _close_stage(self) -> None:
        """Mark what was staged and close the stage (it stays for a failover or resume)."""
        if self._stage is not None:
            self._stage_mark()
            self._stage.close()
            event(
                log,
                "stage kept",
                cg=self.config.cg,
                site=self.config.site,
                staged_w=self._stage.w,
                ops=self._stage.ops,
                bytes=self._stage.bytes,
            )
            self._stage = None

    def _resume(self, site: SiteDir) -> None:
        assert self._stage is not None
        stage = self._stage
        self._stage_mark()
        stage.close()
        staged, why = staging.load(site, self._stage_base)
        if staged is None:
            raise ApplyError(
                f"site {self.config.site}'s own stage cannot be read back ({why}): remove "
                f"{staging.stage_dir(site)} and restart the applier (it re-reads the log)"
            )
        backlog = Backlog()
        try:
            staging.fold_into(staged, backlog)
            apply_volume_changes(backlog, self.site)
            RollForward(backlog, self.site).run()
        finally:
            backlog.close()
        self._stage = None
        if self.may_checkpoint():
            self.checkpoint(digests=False)
        staging.discard(site)
        event(
            log,
            "applier resumed",
            cg=self.config.cg,
            site=self.config.site,
            w=self.applied_w,
            applied_bytes=staged.bytes,
        )

    def pause_metrics(self) -> dict[str, Any]:
        stage = self._stage
        return {
            "paused": stage is not None,
            "staged_ops": stage.ops if stage else 0,
            "staged_bytes": stage.bytes if stage else 0,
            "staged_w": (stage.w or 0) if stage else 0,
        }
