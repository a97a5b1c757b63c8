"""The steps of a marker's coordination (``marker_phase.avsc``): ``MarkerPhase``.

Kept apart from ``schemas.records`` (which registers it in ``RECORDS``) so the registry
module stays short. The rules of the phases live in ``pipeline.primary.markers``; this
module only says what a step may hold.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Self

from schemas.checks import bad as _bad
from schemas.checks import integer as _int
from schemas.checks import member as _enum
from schemas.checks import text as _text
from schemas.checks import volume_ids as _volume_ids
from schemas.record_base import Record

__all__ = ["MarkerPhase", "MarkerStep"]


class MarkerStep(StrEnum):
    """A step of one marker attempt (``marker_phase.avsc`` enum MarkerStep)."""

    QUIESCE = "QUIESCE"  # coordinator: hold new writes, drain, answer with your cap
    QUIESCED = "QUIESCED"  # member: held and drained; ts is my cap (error: I cannot)
    ABORT = "ABORT"  # coordinator: resume without a marker, unless it is complete already
    RESUMED = "RESUMED"  # member: writes flow again; ts the marker's (0: none), error why
    COPIED = "COPIED"  # member, a snapshot's: its copies at ts are complete (error: failed)


#: the steps only the coordinator sends (the others come from interceptors)
COORDINATOR_STEPS = frozenset({MarkerStep.QUIESCE, MarkerStep.ABORT})


@dataclass(frozen=True, slots=True)
class MarkerPhase(Record):
    """One step of marker attempt ``marker_id`` (see ``marker_phase.avsc`` for the fields)."""

    TYPE: ClassVar[str] = "MarkerPhase"
    SCHEMA: ClassVar[str] = "marker_phase"
    marker_id: str
    name: str
    step: MarkerStep
    interceptor_id: str = ""
    ts: int = 0
    emitter: str = ""
    timeout_ms: int = 0
    members: tuple[str, ...] = ()
    error: str = ""
    sent_us: int = 0
    snapshot: bool = False
    volumes: tuple[str, ...] = ()

    @property
    def header_ts(self) -> int | None:
        return self.ts or None

    def to_avro(self) -> dict[str, Any]:
        return {
            **{f: getattr(self, f) for f in self.__slots__},
            "step": self.step.value,
            "members": list(self.members),
            "volumes": list(self.volumes),
        }

    @classmethod
    def from_avro(cls, d: Mapping[str, Any]) -> Self:
        return cls(d["marker_id"], d["name"], MarkerStep(d["step"]), d["interceptor_id"],
                   d["ts"], d["emitter"], d["timeout_ms"], tuple(d["members"]), d["error"],
                   d["sent_us"], d.get("snapshot", False),
                   tuple(d.get("volumes", ())))  # fmt: skip

    def check(self) -> None:
        rt = "MarkerPhase"
        _text(rt, "marker_id", self.marker_id)
        _text(rt, "name", self.name)
        _enum(rt, "step", self.step, MarkerStep)
        for f in ("ts", "timeout_ms", "sent_us"):
            _int(rt, f, getattr(self, f))
        if (self.step in COORDINATOR_STEPS) == bool(self.interceptor_id):
            raise _bad(rt, f"a {self.step} step with interceptor_id {self.interceptor_id!r}")
        _volume_ids(rt, "volumes", self.volumes)
        if not isinstance(self.snapshot, bool):
            raise _bad(rt, f"snapshot must be a boolean, got {self.snapshot!r}")
        if self.step is MarkerStep.QUIESCE:
            _text(rt, "emitter", self.emitter)
            _int(rt, "timeout_ms", self.timeout_ms, 1)
            if not self.members or len(set(self.members)) != len(self.members):
                raise _bad(rt, f"QUIESCE needs distinct members, got {list(self.members)}")
            if self.emitter not in self.members:
                raise _bad(rt, f"the emitter {self.emitter!r} is not a member")
