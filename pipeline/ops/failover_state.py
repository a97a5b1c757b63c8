"""What a failover has done so far, kept in the site's ``state/failover.json``: pure rules.

A failover is a few steps that must each happen once, in order, across crashes of the
``lowmark failover`` process (kill -9 at any point, then run it again):

1. ``PLANNED``: the cut, the next generation and the base it starts from are chosen and
   written here *before* anything is committed, so a re-run commits the same plan (and
   finds it already committed, if the crash came after the commit);
2. ``COMMITTED``: the roles of the new generation are in ``lowmark.config``. From here on
   the site's images belong to the new primary; before it, the failover never touches them
   (the site stays a consistent backup if the commit loses a race);
3. ``CHANGES_APPLIED``: the backlog's volume changes (create, resize, delete) are applied
   to the images. Once only: applied again after foreground writes, a shrink and a grow
   would zero what clients wrote beyond the smaller size;
4. ``ROLLED_FORWARD``: every backlog extent is in the images (fdatasynced); from here the
   site is a plain primary of its generation and the backlog is never read again.

``decide`` maps (this file, the committed roles) to what a run must do; it is the only
place that knows how a re-run continues, and it has no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import Any

import orjson

from pipeline.errors import FailoverError
from pipeline.fsutil import atomic_write
from schemas.records import CgRoles

STATE_FILE = "failover.json"
FORMAT = 1


class Phase(IntEnum):
    PLANNED = 1
    COMMITTED = 2
    CHANGES_APPLIED = 3
    ROLLED_FORWARD = 4


@dataclass(frozen=True)
class FailoverRecord:
    """One failover of ``site`` from generation ``from_generation`` to ``generation``."""

    cg: str
    site: str
    generation: int
    from_generation: int
    from_site: str  # the previous primary ("" when never recorded)
    cut_ts: int  # the failover cut: base_w of the new generation
    how: str  # "latest", "marker" or "at"
    marker: str | None
    published_w: int  # the latest W of the old generation when the cut was chosen
    base_offsets: dict[int, int]  # old generation's log offsets bounding the cut
    site_w: int  # the site's checkpoint W: its images hold exactly ts <= site_w
    site_offsets: dict[int, int]  # where the backlog starts in the old generation's log
    forced: bool
    interceptor_id: str
    started_us: int
    phase: Phase = Phase.PLANNED
    phase_us: dict[str, int] = field(default_factory=dict)

    def at(self, phase: Phase, now_us: int) -> FailoverRecord:
        """This record moved on to ``phase`` (never back)."""
        if phase < self.phase:
            raise FailoverError(
                f"failover state cannot go back from {self.phase.name} to {phase.name}"
            )
        return replace(self, phase=phase, phase_us={**self.phase_us, phase.name: now_us})

    def matches(self, roles: CgRoles | None) -> bool:
        """Whether ``roles`` are the generation this failover commits."""
        return (
            roles is not None
            and roles.generation == self.generation
            and roles.primary_site == self.site
            and roles.base_w == self.cut_ts
        )

    def to_json(self) -> bytes:
        doc = asdict(self)
        doc["phase"] = self.phase.name
        doc["format"] = FORMAT
        return orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_INDENT_2)

    @classmethod
    def from_json(cls, data: bytes, where: str) -> FailoverRecord:
        try:
            doc = orjson.loads(data)
            if doc.pop("format", None) != FORMAT:
                raise ValueError(f"unknown format (expected {FORMAT})")
            doc["phase"] = Phase[doc["phase"]]
            for key in ("base_offsets", "site_offsets"):
                doc[key] = {int(p): int(o) for p, o in doc[key].items()}
            return cls(**doc)
        except (ValueError, KeyError, TypeError) as exc:
            raise FailoverError(
                f"failover state {where} is unreadable ({exc}); if no failover of this site "
                "is in progress, move the file away and run `lowmark failover` again"
            ) from None


def state_path(state_dir: Path) -> Path:
    return Path(state_dir) / STATE_FILE


def load(state_dir: Path) -> FailoverRecord | None:
    path = state_path(state_dir)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return FailoverRecord.from_json(data, str(path))


def save(state_dir: Path, record: FailoverRecord) -> None:
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    atomic_write(state_path(state_dir), record.to_json())


class Action(StrEnum):
    START = "start"  # plan a new failover
    COMMIT = "commit"  # the plan is written, the roles are not committed yet
    CONTINUE = "continue"  # committed: continue from the recorded phase
    DONE = "done"  # rolled forward: serve as the primary of the generation


@dataclass(frozen=True)
class Decision:
    action: Action
    record: FailoverRecord | None
    why: str


def decide(record: FailoverRecord | None, roles: CgRoles | None, site: str) -> Decision:
    """What a run of ``lowmark failover --site site`` does, given the site's failover
    state and the CG's committed roles. Raises ``FailoverError`` when neither starting nor
    continuing is safe, saying what to do."""
    if record is not None and record.site != site:
        raise FailoverError(
            f"the failover state in this data dir is for site {record.site!r}, not {site!r}: "
            "check --site and the data dir"
        )
    if record is None:
        if roles is not None and roles.primary_site == site:
            raise FailoverError(
                f"site {site!r} is already the primary of CG {roles.cg} (generation "
                f"{roles.generation}) and this data dir holds no failover of it: run "
                "`lowmark serve` on this site, or check --site and the data dir"
            )
        return Decision(Action.START, None, "no failover in progress")
    gen = 0 if roles is None else roles.generation
    if record.matches(roles):
        if record.phase >= Phase.ROLLED_FORWARD:
            return Decision(Action.DONE, record, "rolled forward already")
        if record.phase >= Phase.COMMITTED:
            return Decision(Action.CONTINUE, record, f"continuing after {record.phase.name}")
        return Decision(Action.COMMIT, record, "committed, not yet recorded as such")
    if gen == record.from_generation and record.phase == Phase.PLANNED:
        return Decision(Action.COMMIT, record, "planned, not committed")
    if record.phase == Phase.PLANNED and gen > record.from_generation:
        # someone else moved the CG on before our commit: the images were never touched
        raise FailoverError(
            f"CG {record.cg} moved on to generation {gen} (primary "
            f"{roles.primary_site if roles else '?'}) while this failover to generation "
            f"{record.generation} was only planned; nothing was changed at this site. Move "
            f"{STATE_FILE} out of its state dir and decide again (`lowmark roles show`)"
        )
    raise FailoverError(
        f"this site's failover to generation {record.generation} of CG {record.cg} is at "
        f"{record.phase.name}, but the roles are now generation {gen} (primary "
        f"{roles.primary_site if roles else 'unknown'}): the site was superseded while it "
        "rolled forward; it must rejoin as a backup (failback), not serve"
    )


def summary(record: FailoverRecord) -> Mapping[str, Any]:
    """The fields an operator reads first (logs, --json)."""
    return {
        "cg": record.cg,
        "site": record.site,
        "generation": record.generation,
        "from_generation": record.from_generation,
        "from_site": record.from_site,
        "cut_ts": record.cut_ts,
        "how": record.how,
        "marker": record.marker,
        "forced": record.forced,
        "phase": record.phase.name,
    }
