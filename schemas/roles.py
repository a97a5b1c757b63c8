"""The roles of a consistency group (``roles.avsc``): ``CgRoles``, its ``Transition``s.

Kept apart from ``schemas.records`` (which re-exports them and registers ``CgRoles`` in
``RECORDS``) so the registry module stays short. The pure rules that change roles live in
``pipeline.topology.roles``; this module only says what a record may hold.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Self

from schemas.checks import bad as _bad
from schemas.checks import integer as _int
from schemas.checks import member as _enum
from schemas.checks import offsets as _offsets
from schemas.checks import text as _text
from schemas.record_base import Record, offsets_from_avro, offsets_to_avro

__all__ = ["CgRoles", "DrainRequest", "Transition", "TransitionKind"]


class TransitionKind(StrEnum):
    """How a generation began (``roles.avsc`` enum TransitionKind; grows at the end)."""

    #: unplanned: the primary is lost or unreachable
    FAILOVER = "FAILOVER"
    #: planned: the primary stopped first, nothing is lost
    SWITCHOVER = "SWITCHOVER"


@dataclass(frozen=True, slots=True)
class Transition:
    """The change that made ``generation``: the primary moved ``from_site`` -> ``to_site``
    at the cut ``w``. ``from_site`` is "" when the previous primary was never recorded."""

    generation: int
    kind: TransitionKind
    from_site: str
    to_site: str
    w: int
    forced: bool
    at_us: int

    def to_avro(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__slots__}

    @classmethod
    def from_avro(cls, d: Mapping[str, Any]) -> Self:
        return cls(
            d["generation"],
            TransitionKind(d["kind"]),
            d["from_site"],
            d["to_site"],
            d["w"],
            d["forced"],
            d["at_us"],
        )


@dataclass(frozen=True, slots=True)
class CgRoles(Record):
    """A CG's generation, its primary and the cut the generation starts from.

    Generation 0 is the CG as first deployed (``base_w`` 0, no history); every later
    generation was made by the last entry of ``history``, which names it.
    """

    TYPE: ClassVar[str] = "CgRoles"
    SCHEMA: ClassVar[str] = "roles"
    cg: str
    generation: int
    primary_site: str
    base_w: int
    base_offsets: Mapping[int, int]
    history: tuple[Transition, ...]
    updated_us: int

    @property
    def header_ts(self) -> int | None:
        return self.base_w if self.generation else None

    @property
    def last_transition(self) -> Transition | None:
        return self.history[-1] if self.history else None

    def to_avro(self) -> dict[str, Any]:
        return {
            "cg": self.cg,
            "generation": self.generation,
            "primary_site": self.primary_site,
            "base_w": self.base_w,
            "base_offsets": offsets_to_avro(self.base_offsets),
            "history": [t.to_avro() for t in self.history],
            "updated_us": self.updated_us,
        }

    @classmethod
    def from_avro(cls, d: Mapping[str, Any]) -> Self:
        return cls(
            d["cg"],
            d["generation"],
            d["primary_site"],
            d["base_w"],
            offsets_from_avro("CgRoles", "base_offsets", d["base_offsets"]),
            tuple(Transition.from_avro(t) for t in d["history"]),
            d["updated_us"],
        )

    def check(self) -> None:
        rt = "CgRoles"
        _text(rt, "cg", self.cg)
        _text(rt, "primary_site", self.primary_site)
        for name in ("generation", "base_w", "updated_us"):
            _int(rt, name, getattr(self, name))
        _offsets(rt, "base_offsets", self.base_offsets)
        if self.generation == 0 and (self.base_w or self.base_offsets or self.history):
            raise _bad(rt, "generation 0 starts from nothing: no base_w, offsets or history")
        prev: Transition | None = None
        for t in self.history:
            _enum(rt, "kind", t.kind, TransitionKind)
            _text(rt, "to_site", t.to_site)
            _int(rt, "w", t.w)
            _int(rt, "at_us", t.at_us)
            if not isinstance(t.from_site, str) or t.from_site == t.to_site:
                raise _bad(rt, f"generation {t.generation} moves {t.from_site!r} to itself")
            if not isinstance(t.forced, bool):
                raise _bad(rt, f"forced must be a boolean, got {t.forced!r}")
            _int(rt, "generation", t.generation, 1)
            if prev is not None and (t.generation <= prev.generation or t.w < prev.w):
                raise _bad(
                    rt,
                    f"history goes from generation {prev.generation} at w {prev.w} to "
                    f"{t.generation} at w {t.w}: generations must rise and cuts never fall",
                )
            prev = t
        if prev is not None and (
            prev.generation != self.generation
            or prev.to_site != self.primary_site
            or prev.w != self.base_w
        ):
            raise _bad(
                rt,
                f"generation {self.generation} (primary {self.primary_site!r}, base_w "
                f"{self.base_w}) is not what its last transition made",
            )
        if self.generation and prev is None:
            raise _bad(rt, f"generation {self.generation} has no transition that made it")


@dataclass(frozen=True, slots=True)
class DrainRequest(Record):
    """A switchover's request that generation ``generation`` of ``cg`` drain (``drain.avsc``)."""

    TYPE: ClassVar[str] = "DrainRequest"
    SCHEMA: ClassVar[str] = "drain"
    cg: str
    generation: int
    to_site: str
    requested_us: int

    @property
    def header_ts(self) -> int | None:
        return None

    def to_avro(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__slots__}

    @classmethod
    def from_avro(cls, d: Mapping[str, Any]) -> Self:
        return cls(d["cg"], d["generation"], d["to_site"], d["requested_us"])

    def check(self) -> None:
        rt = "DrainRequest"
        _text(rt, "cg", self.cg)
        _text(rt, "to_site", self.to_site)
        _int(rt, "generation", self.generation)
        _int(rt, "requested_us", self.requested_us)
