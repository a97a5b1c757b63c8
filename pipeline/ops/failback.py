"""After a switchover, the old primary rejoins as a backup of the new one: no copy needed.

A drained primary (``pipeline.primary.drain``) stopped with every write it acknowledged
durable, below its final S, and the switchover cut at a W covering that S. So when it was
the CG's only interceptor, its images hold exactly the CG's records with ts <= the cut:
what a backup site checkpointed at (the old generation, the cut, the cut's offsets) holds.
``rejoin`` checks that this is the case, from Kafka alone, and writes that checkpoint into
the site directory; its ``lowmark apply`` then follows the new generation from the cut
(``pipeline.backup.generations``), and a later switchover can hand the role back.

After an unplanned failover the old primary may hold writes above the cut that nobody
applies, and the new primary wrote since: that needs the delta resync
(``pipeline.ops.resync``, ``lowmark failback --source-dir``), so it is refused here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.backup.images import ImageSet
from pipeline.errors import FailoverError
from pipeline.fsutil import atomic_write
from pipeline.ops import failover_state as fs
from pipeline.primary.fencing import progress_activity
from pipeline.site import SiteDir, SiteLock
from pipeline.timesource import wall_us
from pipeline.topology.store import RolesStore
from schemas import codec
from schemas.records import (
    CgRoles,
    Checkpoint,
    ProgressKind,
    Transition,
    TransitionKind,
    VolumeDigest,
)


def last_move_from(roles: CgRoles | None, cg: str, site: str) -> tuple[CgRoles, Transition]:
    """The roles and their last transition, which must have moved the primary away from
    ``site``; ``FailoverError`` saying why not."""
    last = None if roles is None else roles.last_transition
    if roles is None or last is None:
        raise FailoverError(f"CG {cg} never failed over or switched over: nothing to fail back")
    if last.from_site != site:
        raise FailoverError(
            f"the last change of CG {cg} moved the primary from {last.from_site!r} to "
            f"{last.to_site!r}, not from {site!r}: check --site"
        )
    return roles, last


def rejoin(kafka_conf: Mapping[str, Any], cg: str, site: str, site_dir: Path) -> Checkpoint:
    """Make the drained old primary ``site`` (its data dir ``site_dir``) a backup at the
    switchover's cut; the checkpoint written. Raises ``FailoverError`` saying why not."""
    roles = RolesStore(dict(kafka_conf)).latest(cg)
    roles, last = last_move_from(roles, cg, site)
    if last.kind is not TransitionKind.SWITCHOVER:
        raise FailoverError(
            f"site {site!r} was failed over (generation {roles.generation}, unplanned): its "
            "images may hold writes above the cut that no backup applies. Resync it: run "
            "`lowmark failback` again with --source-dir (the new primary's data dir)"
        )
    old = roles.generation - 1
    activity = progress_activity(kafka_conf, cg, old)
    writers = {k: a for k, a in activity.items() if a.kind is not ProgressKind.FENCE}
    if len(writers) != 1:
        raise FailoverError(
            f"generation {old} of CG {cg} had interceptors {sorted(writers)}: a site holds "
            "the volumes of one of them only; rejoin it with a resync (not built yet)"
        )
    ((iid, act),) = writers.items()
    if act.kind is not ProgressKind.LEAVE or act.s > roles.base_w:
        raise FailoverError(
            f"interceptor {iid} of generation {old} did not drain below the cut (its last "
            f"progress is {act.kind.value} at S {act.s}, the cut {roles.base_w}): its images "
            "may hold writes the new generation lacks; a resync is needed"
        )
    sdir = SiteDir(Path(site_dir))
    if not sdir.is_site():
        raise FailoverError(f"{site_dir} is not a site's data dir (no images/ in it)")
    with SiteLock(sdir, f"rejoin of site {site}"):
        with ImageSet(sdir) as images:
            digests = tuple(
                VolumeDigest(v["volume_id"], v["size"], v["digest"]) for v in images.volumes()
            )
        ckpt = Checkpoint(site, cg, roles.base_w, dict(roles.base_offsets), digests, wall_us(), old)
        atomic_write(sdir.checkpoint_path, codec.encode(ckpt))
        # a failover this site once made is history now: a later one starts afresh
        state = fs.state_path(sdir.state_dir)
        if state.exists():
            state.rename(state.with_name(f"failover.g{roles.generation - 1}.json"))
    return ckpt
