"""What every record type shares: the Avro enums, the base classes, the offsets shape.

``schemas.records`` defines the record types on these and re-exports them; import from
there. Per-partition offsets are ``{partition: offset}`` dicts in Python; their Avro shape,
a list of ``{partition, offset}`` records sorted by partition, is built and parsed only in
``offsets_to_avro`` / ``offsets_from_avro``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Any, ClassVar, Self

from schemas.checks import bad as _bad

# ---------------------------------------------------------------- enums (Avro enums)


class ProgressKind(StrEnum):
    """What a Progress record says (``progress.avsc`` enum ProgressKind; grows at the end)."""

    JOIN = "JOIN"
    PROGRESS = "PROGRESS"
    LEAVE = "LEAVE"
    FENCE = "FENCE"
    LOST = "LOST"  # an operator declared an ended instance's tail lost (``fence --declare-lost``)


class ZeroKind(StrEnum):
    """ZERO keeps the range allocated, TRIM may deallocate it (``zero.avsc`` ZeroKind)."""

    ZERO = "ZERO"
    TRIM = "TRIM"


class VolumeOp(StrEnum):
    """What happened to a volume (``volume_change.avsc`` VolumeOp)."""

    CREATE = "CREATE"
    RESIZE = "RESIZE"
    DELETE = "DELETE"


# ---------------------------------------------------------------- base classes


class Record:
    """A lowmark record. Subclasses are frozen slotted dataclasses whose fields are the
    schema's fields in schema order, ``crc32c`` excepted (the codec owns it)."""

    __slots__ = ()
    #: the Avro record name (``lowmark.<TYPE>``) and the Kafka header ``type``
    TYPE: ClassVar[str]
    #: the schema file stem: ``schemas/<SCHEMA>.avsc``
    SCHEMA: ClassVar[str]

    @property
    def header_ts(self) -> int | None:
        """The ts the ``ts`` header shows (None: no header)."""
        raise NotImplementedError

    def to_avro(self) -> dict[str, Any]:
        """The fields as the plain dict fastavro writes (no crc32c)."""
        raise NotImplementedError

    @classmethod
    def from_avro(cls, d: Mapping[str, Any]) -> Self:
        """From the dict fastavro reads (crc32c removed); raises CorruptRecordError."""
        raise NotImplementedError

    def check(self) -> None:
        """Raise ``CorruptRecordError`` if a value is impossible (README, "Impossible values")."""
        raise NotImplementedError


class LogRecord(Record):
    """A record of the CG's log, written by interceptor ``interceptor_id`` at ``epoch``."""

    __slots__ = ()
    interceptor_id: str
    epoch: int

    def timestamps(self) -> list[int]:
        """Every ts the record carries, in record order."""
        raise NotImplementedError


class VolumeRecord(LogRecord):
    """A log record that changes one volume; its volume's records share one partition."""

    __slots__ = ()
    volume_id: str


class CgRecord(LogRecord):
    """A CG-wide log record at one ts (a marker or snapshot point); changes no image."""

    __slots__ = ()
    name: str
    ts: int

    @property
    def header_ts(self) -> int | None:
        return self.ts

    def timestamps(self) -> list[int]:
        return [self.ts]


# ---------------------------------------------------------------- per-partition offsets


def offsets_to_avro(offsets: Mapping[int, int]) -> list[dict[str, int]]:
    """``{partition: offset}`` -> the Avro ``PartitionOffset`` list, by partition."""
    return [{"partition": p, "offset": o} for p, o in sorted(offsets.items())]


def offsets_from_avro(rt: str, name: str, items: Iterable[Mapping[str, int]]) -> dict[int, int]:
    """The Avro ``PartitionOffset`` list -> ``{partition: offset}``; a repeated partition
    is impossible (a dict could not say which offset holds)."""
    out: dict[int, int] = {}
    for po in items:
        p = po["partition"]
        if p in out:
            raise _bad(rt, f"{name} has a negative or repeated partition {p}")
        out[p] = po["offset"]
    return out


def avro_dict(obj: Any) -> dict[str, Any]:
    """A nested record's fields, its tuples as the lists Avro arrays decode to."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(obj).items()}


def with_tuple(cls: type, d: Mapping[str, Any], name: str) -> Any:
    """``cls(**d)`` with the Avro array ``name`` as a tuple (absent: empty, its default)."""
    return cls(**{**d, name: tuple(d.get(name, ()))})
