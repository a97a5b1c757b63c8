"""A backup site's applied state (``checkpoint.avsc``): ``Checkpoint`` and its parts.

Kept apart from ``schemas.records`` (which registers it in ``RECORDS``) so the registry
module stays short.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from schemas.checks import bad as _bad
from schemas.checks import integer as _int
from schemas.checks import offsets as _offsets
from schemas.checks import text as _text
from schemas.record_base import Record, offsets_from_avro, offsets_to_avro

__all__ = ["Checkpoint", "SnapshotHeld", "VolumeDigest"]


@dataclass(frozen=True, slots=True)
class SnapshotHeld:
    """A named snapshot a site holds a complete copy of, taken at exactly ``ts``."""

    name: str
    ts: int
    size: int = 0


@dataclass(frozen=True, slots=True)
class VolumeDigest:
    """A volume of a checkpoint: its size and content digest ("" when not computed)."""

    volume_id: str
    size: int
    digest: str


@dataclass(frozen=True, slots=True)
class Checkpoint(Record):
    """A site's applied state: images equal the primary's after the records with ts <= w."""

    TYPE: ClassVar[str] = "Checkpoint"
    SCHEMA: ClassVar[str] = "checkpoint"
    site: str
    cg: str
    w: int
    log_offsets: Mapping[int, int]
    volumes: tuple[VolumeDigest, ...]
    written_us: int
    #: the generation whose log this site applies: ``log_offsets`` are offsets of
    #: ``CgTopics(cg, generation).log`` (schema default 0: checkpoints from before
    #: generations existed are of generation 0)
    generation: int = 0
    #: the named snapshots complete at this site, oldest first (schema default: none)
    snapshots: tuple[SnapshotHeld, ...] = ()

    @property
    def header_ts(self) -> int | None:
        return self.w

    def to_avro(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "cg": self.cg,
            "w": self.w,
            "log_offsets": offsets_to_avro(self.log_offsets),
            "volumes": [dataclasses.asdict(v) for v in self.volumes],
            "written_us": self.written_us,
            "generation": self.generation,
            "snapshots": [dataclasses.asdict(h) for h in self.snapshots],
        }

    @classmethod
    def from_avro(cls, d: Mapping[str, Any]) -> Self:
        return cls(
            d["site"],
            d["cg"],
            d["w"],
            offsets_from_avro("Checkpoint", "log_offsets", d["log_offsets"]),
            tuple(VolumeDigest(**v) for v in d["volumes"]),
            d["written_us"],
            d.get("generation", 0),  # schema default: 0
            tuple(SnapshotHeld(**h) for h in d.get("snapshots", ())),
        )

    def check(self) -> None:
        rt = "Checkpoint"
        _text(rt, "site", self.site)
        _text(rt, "cg", self.cg)
        _int(rt, "w", self.w)
        _int(rt, "written_us", self.written_us)
        _int(rt, "generation", self.generation)
        _offsets(rt, "log_offsets", self.log_offsets)
        seen: set[str] = set()
        for v in self.volumes:
            _text(rt, "volume_id", v.volume_id)
            _int(rt, "size", v.size)
            if not isinstance(v.digest, str) or v.volume_id in seen:
                raise _bad(rt, f"volume {v.volume_id!r} listed twice or without a digest")
            seen.add(v.volume_id)
        names = [h.name for h in self.snapshots]
        for h in self.snapshots:
            _text(rt, "snapshot name", h.name)
            _int(rt, "snapshot ts", h.ts)
            _int(rt, "snapshot size", h.size)
        if len(set(names)) != len(names):
            raise _bad(rt, f"a snapshot is listed twice: {names}")
