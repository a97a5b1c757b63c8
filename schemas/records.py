"""The record types lowmark writes: one frozen dataclass per ``schemas/*.avsc``, registered once.

``RECORDS`` is the registry: the codec (``schemas.codec``) builds its schema table from it
and refuses to load when a class and its schema file disagree on a field. Each class knows
its Avro name and Kafka header ``type`` (``TYPE``), its schema file (``SCHEMA``), how it
converts to and from the plain Avro dict fastavro reads and writes (``to_avro`` /
``from_avro``), which of its values are impossible (``check``), and the ts its ``ts``
header shows (``header_ts``). The base classes say where a record lives: a ``LogRecord``
is on the CG's log, a ``VolumeRecord`` changes one volume, a ``CgRecord`` is CG-wide.
``CgRoles`` (the roles of a CG, in ``lowmark.config``) is defined in ``schemas.roles`` and
registered here like the rest.

Adding a record type: its ``.avsc``, its class here (and in ``RECORDS``), the handlers of
the consumers that act on it (they dispatch on the class), and its row in
``schemas/README.md``. Nothing else names the list.

Objects are not checked when built (that would tax the write path twice); the codec
checks them when encoding and after decoding, so an impossible record is refused at
both ends, as before.

Per-partition offsets (``Progress.partition_offsets``, ``Watermark.log_offsets``,
``Checkpoint.log_offsets``) are ``{partition: offset}`` dicts in Python; their Avro shape,
a list of ``{partition, offset}`` records sorted by partition, is built and parsed only in
``offsets_to_avro`` / ``offsets_from_avro``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from pipeline.errors import UnknownSchemaError
from schemas.checkpoint import Checkpoint, SnapshotHeld, VolumeDigest
from schemas.checks import INT64_MAX, check_extents
from schemas.checks import bad as _bad
from schemas.checks import integer as _int
from schemas.checks import member as _enum
from schemas.checks import offsets as _offsets
from schemas.checks import text as _text
from schemas.checks import volume_ids as _volume_ids
from schemas.control import MarkerPhase
from schemas.record_base import (
    CgRecord,
    LogRecord,
    ProgressKind,
    Record,
    VolumeOp,
    VolumeRecord,
    ZeroKind,
    offsets_from_avro,
    offsets_to_avro,
)
from schemas.record_base import avro_dict as _avro_dict
from schemas.record_base import with_tuple as _with_volumes
from schemas.roles import CgRoles, DrainRequest, Transition, TransitionKind
from schemas.topology import SiteEntry, VolumeEntry

__all__ = [
    "LOG_RECORDS",
    "RECORDS",
    "CgRecord",
    "CgRoles",
    "Checkpoint",
    "Departed",
    "DrainRequest",
    "Hold",
    "LogRecord",
    "LostTail",
    "Marker",
    "MarkerPhase",
    "Progress",
    "ProgressKind",
    "Record",
    "SiteEntry",
    "Snapshot",
    "SnapshotHeld",
    "Transition",
    "TransitionKind",
    "VolumeChange",
    "VolumeDigest",
    "VolumeEntry",
    "VolumeOp",
    "VolumeRecord",
    "Watermark",
    "WatermarkMember",
    "Write",
    "WriteExtent",
    "Zero",
    "ZeroKind",
    "offsets_from_avro",
    "offsets_to_avro",
    "record_class",
]

# ---------------------------------------------------------------- the log


@dataclass(frozen=True, slots=True)
class WriteExtent:
    """One whole write, or one fragment of a large one (fragments share the write's ts)."""

    ts: int
    offset: int
    write_length: int
    fragment_index: int
    fragment_count: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Write(VolumeRecord):
    """Writes to one volume from one interceptor tick (``write.avsc``)."""

    TYPE: ClassVar[str] = "Write"
    SCHEMA: ClassVar[str] = "write"
    volume_id: str
    interceptor_id: str
    epoch: int
    extents: tuple[WriteExtent, ...]

    @property
    def header_ts(self) -> int | None:
        return self.extents[-1].ts if self.extents else None

    def timestamps(self) -> list[int]:
        return [x.ts for x in self.extents]

    def to_avro(self) -> dict[str, Any]:
        return {
            "volume_id": self.volume_id,
            "interceptor_id": self.interceptor_id,
            "epoch": self.epoch,
            "extents": [
                {
                    "ts": x.ts,
                    "offset": x.offset,
                    "write_length": x.write_length,
                    "fragment_index": x.fragment_index,
                    "fragment_count": x.fragment_count,
                    "data": x.data,
                }
                for x in self.extents
            ],
        }

    @classmethod
    def from_avro(cls, d: Mapping[str, Any]) -> Self:
        return cls(
            d["volume_id"],
            d["interceptor_id"],
            d["epoch"],
            tuple(WriteExtent(**x) for x in d["extents"]),
        )

    def check(self) -> None:
        vid, iid, epoch = self.volume_id, self.interceptor_id, self.epoch
        # inline for the common case (every Write is checked on encode and on decode)
        if not (type(vid) is str and vid and type(iid) is str and iid) or not (
            type(epoch) is int and 0 <= epoch <= INT64_MAX
        ):
            _text("Write", "volume_id", vid)
            _text("Write", "interceptor_id", iid)
            _int("Write", "epoch", epoch)
        check_extents(self.extents)


# The write path builds a WriteExtent per write and a Write per record, and the appliers
# one per decoded extent. Python 3.11's frozen __init__ goes through object.__setattr__
# per field, twice the cost of the slots' own setters, which bypass the frozen check the
# same way; so these two take an __init__ that calls those (same signature, no defaults).
_x = [getattr(WriteExtent, f.name).__set__ for f in dataclasses.fields(WriteExtent)]
_w = [getattr(Write, f.name).__set__ for f in dataclasses.fields(Write)]


def _extent_init(
    self: WriteExtent,
    ts: int,
    offset: int,
    write_length: int,
    fragment_index: int,
    fragment_count: int,
    data: bytes,
) -> None:
    _x[0](self, ts)
    _x[1](self, offset)
    _x[2](self, write_length)
    _x[3](self, fragment_index)
    _x[4](self, fragment_count)
    _x[5](self, data)


def _write_init(
    self: Write, volume_id: str, interceptor_id: str, epoch: int, extents: tuple[WriteExtent, ...]
) -> None:
    _w[0](self, volume_id)
    _w[1](self, interceptor_id)
    _w[2](self, epoch)
    _w[3](self, extents)


WriteExtent.__init__ = _extent_init  # type: ignore[method-assign]
Write.__init__ = _write_init  # type: ignore[method-assign]


@dataclass(frozen=True, slots=True)
class Zero(VolumeRecord):
    """A range of a volume made to read as zeros (``zero.avsc``)."""

    TYPE: ClassVar[str] = "Zero"
    SCHEMA: ClassVar[str] = "zero"
    volume_id: str
    interceptor_id: str
    epoch: int
    ts: int
    offset: int
    length: int
    kind: ZeroKind

    @property
    def header_ts(self) -> int | None:
        return self.ts

    def timestamps(self) -> list[int]:
        return [self.ts]

    def to_avro(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__slots__}

    @classmethod
    def from_avro(cls, d: Mapping[str, Any]) -> Self:
        return cls(
            d["volume_id"],
            d["interceptor_id"],
            d["epoch"],
            d["ts"],
            d["offset"],
            d["length"],
            ZeroKind(d["kind"]),
        )

    def check(self) -> None:
        rt = "Zero"
        _text(rt, "volume_id", self.volume_id)
        _text(rt, "interceptor_id", self.interceptor_id)
        for name in ("epoch", "ts", "offset"):
            _int(rt, name, getattr(self, name))
        _int(rt, "length", self.length, 1)
        if self.offset > INT64_MAX - self.length:
            raise _bad(rt, f"offset {self.offset} + length {self.length} overflows")
        _enum(rt, "kind", self.kind, ZeroKind)


@dataclass(frozen=True, slots=True)
class Marker(CgRecord):
    """An application-consistent point of the CG, restorable by name (``marker.avsc``)."""

    TYPE: ClassVar[str] = "Marker"
    SCHEMA: ClassVar[str] = "marker"
    name: str
    ts: int
    interceptor_id: str
    epoch: int
    created_us: int

    def to_avro(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__slots__}

    @classmethod
    def from_avro(cls, d: Mapping[str, Any]) -> Self:
        return cls(d["name"], d["ts"], d["interceptor_id"], d["epoch"], d["created_us"])

    def check(self) -> None:
        _text("Marker", "name", self.name)
        _text("Marker", "interceptor_id", self.interceptor_id)
        for name in ("ts", "epoch", "created_us"):
            _int("Marker", name, getattr(self, name))


@dataclass(frozen=True, slots=True)
class Snapshot(CgRecord):
    """A point-in-time copy every backup takes at exactly ts (``snapshot.avsc``)."""

    TYPE: ClassVar[str] = "Snapshot"
    SCHEMA: ClassVar[str] = "snapshot"
    name: str
    ts: int
    volume_ids: tuple[str, ...]
    interceptor_id: str
    epoch: int

    def to_avro(self) -> dict[str, Any]:
        return {
            **{f: getattr(self, f) for f in self.__slots__},
            "volume_ids": list(self.volume_ids),
        }

    @classmethod
    def from_avro(cls, d: Mapping[str, Any]) -> Self:
        return cls(d["name"], d["ts"], tuple(d["volume_ids"]), d["interceptor_id"], d["epoch"])

    def check(self) -> None:
        rt = "Snapshot"
        _text(rt, "name", self.name)
        _text(rt, "interceptor_id", self.interceptor_id)
        _int(rt, "ts", self.ts)
        _int(rt, "epoch", self.epoch)
        ids = self.volume_ids
        if not all(isinstance(v, str) and v for v in ids) or len(set(ids)) != len(ids):
            raise _bad(rt, f"volume_ids must be distinct non-empty strings, got {ids!r}")


@dataclass(frozen=True, slots=True)
class VolumeChange(VolumeRecord):
    """A volume created, resized or deleted at the primary at ts (``volume_change.avsc``)."""

    TYPE: ClassVar[str] = "VolumeChange"
    SCHEMA: ClassVar[str] = "volume_change"
    op: VolumeOp
    volume_id: str
    name: str
    size: int
    metadata: Mapping[str, str]
    ts: int
    interceptor_id: str
    epoch: int

    @property
    def header_ts(self) -> int | None:
        return self.ts

    def timestamps(self) -> list[int]:
        return [self.ts]

    def to_avro(self) -> dict[str, Any]:
        return {**{f: getattr(self, f) for f in self.__slots__}, "metadata": dict(self.metadata)}

    @classmethod
    def from_avro(cls, d: Mapping[str, Any]) -> Self:
        return cls(
            VolumeOp(d["op"]),
            d["volume_id"],
            d["name"],
            d["size"],
            dict(d["metadata"]),
            d["ts"],
            d["interceptor_id"],
            d["epoch"],
        )

    def check(self) -> None:
        rt = "VolumeChange"
        _text(rt, "volume_id", self.volume_id)
        _text(rt, "interceptor_id", self.interceptor_id)
        for name in ("size", "ts", "epoch"):
            _int(rt, name, getattr(self, name))
        _enum(rt, "op", self.op, VolumeOp)
        if not isinstance(self.name, str) or not isinstance(self.metadata, Mapping):
            raise _bad(rt, "name must be a string and metadata a map of strings")


# ---------------------------------------------------------------- progress, W, checkpoints


@dataclass(frozen=True, slots=True)
class Progress(Record):
    """An interceptor's promise about S (``progress.avsc``); the progress topic's records."""

    TYPE: ClassVar[str] = "Progress"
    SCHEMA: ClassVar[str] = "progress"
    interceptor_id: str
    epoch: int
    kind: ProgressKind
    s: int
    partition_offsets: Mapping[int, int]
    wall_us: int
    #: JOIN/PROGRESS: the async volumes served (they can have an unreplicated tail)
    async_volumes: tuple[str, ...] = ()
    #: PROGRESS: volumes whose earlier instances' dirty regions are republished at ts <= s
    resynced_volumes: tuple[str, ...] = ()

    @property
    def header_ts(self) -> int | None:
        return self.s

    def to_avro(self) -> dict[str, Any]:
        return {
            **{f: getattr(self, f) for f in self.__slots__},
            "partition_offsets": offsets_to_avro(self.partition_offsets),
            "async_volumes": list(self.async_volumes),
            "resynced_volumes": list(self.resynced_volumes),
        }

    @classmethod
    def from_avro(cls, d: Mapping[str, Any]) -> Self:
        return cls(
            d["interceptor_id"],
            d["epoch"],
            ProgressKind(d["kind"]),
            d["s"],
            offsets_from_avro("Progress", "partition_offsets", d["partition_offsets"]),
            d["wall_us"],
            tuple(d.get("async_volumes", ())),  # schema default: [] (progress.v1)
            tuple(d.get("resynced_volumes", ())),
        )

    def check(self) -> None:
        rt = "Progress"
        _text(rt, "interceptor_id", self.interceptor_id)
        # A JOIN is written before its own offset (the epoch) is known: -1 means "not yet".
        _int(rt, "epoch", self.epoch, -1)
        _int(rt, "s", self.s)
        _int(rt, "wall_us", self.wall_us)
        _enum(rt, "kind", self.kind, ProgressKind)
        _offsets(rt, "partition_offsets", self.partition_offsets)
        _volume_ids(rt, "async_volumes", self.async_volumes)
        _volume_ids(rt, "resynced_volumes", self.resynced_volumes)


@dataclass(frozen=True, slots=True)
class WatermarkMember:
    """A member of the watermark's fold (Avro ``Member``)."""

    interceptor_id: str
    epoch: int
    s: int
    effective_s: int
    last_progress_offset: int
    async_volumes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Departed:
    """The last instance of an interceptor that left or was fenced, and its final S."""

    interceptor_id: str
    epoch: int
    s: int


@dataclass(frozen=True, slots=True)
class Hold:
    """An instance that ended without LEAVE while serving async volumes (Avro ``Hold``):
    W stays <= s while ``volumes`` (its volumes not republished or declared lost yet) is
    not empty, and never lands in (s, until): ``until`` is the S covering what was
    republished (-1: nothing yet), so W jumps from <= s to >= until at once."""

    interceptor_id: str
    epoch: int
    s: int
    volumes: tuple[str, ...]
    until: int = -1


@dataclass(frozen=True, slots=True)
class LostTail:
    """A tail an operator declared lost (``lowmark fence --declare-lost``)."""

    interceptor_id: str
    epoch: int
    s: int
    volumes: tuple[str, ...]
    declared_us: int


@dataclass(frozen=True, slots=True)
class Watermark(Record):
    """The CG's W and the fold state a service resumes from (``watermark.avsc``)."""

    TYPE: ClassVar[str] = "Watermark"
    SCHEMA: ClassVar[str] = "watermark"
    cg: str
    w: int
    log_offsets: Mapping[int, int]
    progress_offset: int
    max_s: int
    members: tuple[WatermarkMember, ...]
    published_us: int
    departed: tuple[Departed, ...] = ()
    holds: tuple[Hold, ...] = ()
    lost: tuple[LostTail, ...] = ()

    @property
    def header_ts(self) -> int | None:
        return self.w

    def newer_than(self, other: Watermark) -> bool:
        """The later of two records: higher W, then the later fold."""
        return (self.w, self.progress_offset) > (other.w, other.progress_offset)

    def to_avro(self) -> dict[str, Any]:
        return {
            "cg": self.cg,
            "w": self.w,
            "log_offsets": offsets_to_avro(self.log_offsets),
            "progress_offset": self.progress_offset,
            "max_s": self.max_s,
            "members": [_avro_dict(m) for m in self.members],
            "published_us": self.published_us,
            "departed": [dataclasses.asdict(d) for d in self.departed],
            "holds": [_avro_dict(h) for h in self.holds],
            "lost": [_avro_dict(x) for x in self.lost],
        }

    @classmethod
    def from_avro(cls, d: Mapping[str, Any]) -> Self:
        return cls(
            d["cg"],
            d["w"],
            offsets_from_avro("Watermark", "log_offsets", d["log_offsets"]),
            d["progress_offset"],
            d["max_s"],
            tuple(_with_volumes(WatermarkMember, m, "async_volumes") for m in d["members"]),
            d["published_us"],
            tuple(Departed(**x) for x in d.get("departed", ())),  # schema default: []
            tuple(_with_volumes(Hold, x, "volumes") for x in d.get("holds", ())),
            tuple(_with_volumes(LostTail, x, "volumes") for x in d.get("lost", ())),
        )

    def check(self) -> None:
        rt = "Watermark"
        _text(rt, "cg", self.cg)
        for name in ("w", "max_s", "published_us"):
            _int(rt, name, getattr(self, name))
        _int(rt, "progress_offset", self.progress_offset, -1)  # -1: no progress folded yet
        _offsets(rt, "log_offsets", self.log_offsets)
        seen: set[str] = set()
        for m in self.members:
            _text(rt, "interceptor_id", m.interceptor_id)
            for name in ("epoch", "s", "effective_s", "last_progress_offset"):
                _int(rt, name, getattr(m, name))
            if m.interceptor_id in seen:
                raise _bad(rt, f"member {m.interceptor_id!r} listed twice")
            seen.add(m.interceptor_id)
            _volume_ids(rt, "async_volumes", m.async_volumes)
        held: set[tuple[str, int]] = set()
        for h in self.holds:
            _text(rt, "interceptor_id", h.interceptor_id)
            for name in ("epoch", "s"):
                _int(rt, name, getattr(h, name))
            _int(rt, "until", h.until, -1)  # -1: unresolved
            _volume_ids(rt, "volumes", h.volumes)
            if (h.interceptor_id, h.epoch) in held:
                raise _bad(rt, f"hold {h!r} is listed twice")
            held.add((h.interceptor_id, h.epoch))
        for x in self.lost:
            _text(rt, "interceptor_id", x.interceptor_id)
            for name in ("epoch", "s", "declared_us"):
                _int(rt, name, getattr(x, name))
            _volume_ids(rt, "volumes", x.volumes)


# ---------------------------------------------------------------- the registry

#: every record type lowmark writes, once; the codec and the consumers derive from it
RECORDS: tuple[type[Record], ...] = (
    Write,
    Zero,
    Marker,
    Snapshot,
    VolumeChange,
    Progress,
    Watermark,
    Checkpoint,
    CgRoles,
    DrainRequest,
    MarkerPhase,
    VolumeEntry,
    SiteEntry,
)

#: the record types the CG's log holds
LOG_RECORDS: tuple[type[LogRecord], ...] = tuple(c for c in RECORDS if issubclass(c, LogRecord))

_BY_TYPE: dict[str, type[Record]] = {c.TYPE: c for c in RECORDS}


def record_class(type_name: str) -> type[Record]:
    """The class whose header ``type`` is ``type_name``; UnknownSchemaError if none is."""
    try:
        return _BY_TYPE[type_name]
    except KeyError:
        raise UnknownSchemaError(
            f"unknown record type {type_name!r}; known: {', '.join(_BY_TYPE)}. A record "
            "written by a newer lowmark, or a header set by another producer"
        ) from None
