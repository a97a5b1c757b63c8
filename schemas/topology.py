"""The topology records of ``lowmark.config``: ``VolumeEntry`` and ``SiteEntry``.

Kept apart from ``schemas.records`` (which registers them in ``RECORDS``). The fold of
them into one model lives in ``pipeline.topology.model``; this module only says what a
record may hold.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from schemas.checks import bad as _bad
from schemas.checks import integer as _int
from schemas.checks import text as _text
from schemas.record_base import Record

__all__ = ["ACCESS_STATES", "SITE_KINDS", "SiteEntry", "VolumeEntry"]

#: as NVMe ANA: a volume's state at one interceptor
ACCESS_STATES = ("optimized", "non-optimized", "inaccessible", "change")
SITE_KINDS = ("backup", "primary")
_MODES = ("async", "sync")


def _strings(rt: str, name: str, value: object) -> None:
    ok = isinstance(value, Mapping) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    )
    if not ok:
        raise _bad(rt, f"{name} must be a map of strings, got {value!r}")


@dataclass(frozen=True, slots=True)
class VolumeEntry(Record):
    """A volume as the primary last described it (``volume_entry.avsc``)."""

    TYPE: ClassVar[str] = "VolumeEntry"
    SCHEMA: ClassVar[str] = "volume_entry"
    cg: str
    volume_id: str
    name: str
    size: int
    mode: str
    metadata: Mapping[str, str]
    deleted: bool
    generation: int
    interceptor_id: str
    ts: int
    updated_us: int
    access: Mapping[str, str] = field(default_factory=dict)

    @property
    def header_ts(self) -> int | None:
        return self.ts

    def to_avro(self) -> dict[str, Any]:
        d = {f: getattr(self, f) for f in self.__slots__}
        return {**d, "metadata": dict(self.metadata), "access": dict(self.access)}

    @classmethod
    def from_avro(cls, d: Mapping[str, Any]) -> Self:
        return cls(d["cg"], d["volume_id"], d["name"], d["size"], d["mode"],
                   dict(d["metadata"]), d["deleted"], d["generation"], d["interceptor_id"],
                   d["ts"], d["updated_us"], dict(d.get("access") or {}))  # fmt: skip

    def check(self) -> None:
        rt = "VolumeEntry"
        for name in ("cg", "volume_id", "name", "interceptor_id"):
            _text(rt, name, getattr(self, name))
        for name in ("generation", "ts", "updated_us"):
            _int(rt, name, getattr(self, name))
        _int(rt, "size", self.size, low=0 if self.deleted else 1)
        if self.size % 512:
            raise _bad(rt, f"size {self.size} is not a multiple of 512")
        if self.mode not in _MODES:
            raise _bad(rt, f"mode {self.mode!r} is not one of {_MODES}")
        if not isinstance(self.deleted, bool):
            raise _bad(rt, f"deleted must be a boolean, got {self.deleted!r}")
        _strings(rt, "metadata", self.metadata)
        _strings(rt, "access", self.access)
        for iid, state in self.access.items():
            if state not in ACCESS_STATES:
                raise _bad(rt, f"access state {state!r} of {iid!r} is not one of {ACCESS_STATES}")


@dataclass(frozen=True, slots=True)
class SiteEntry(Record):
    """A site, as its service registered it (``site_entry.avsc``)."""

    TYPE: ClassVar[str] = "SiteEntry"
    SCHEMA: ClassVar[str] = "site_entry"
    cg: str
    site: str
    kind: str
    host: str
    data_dir: str
    metrics: str
    version: str
    registered_us: int

    @property
    def header_ts(self) -> int | None:
        return None

    def to_avro(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__slots__}

    @classmethod
    def from_avro(cls, d: Mapping[str, Any]) -> Self:
        return cls(d["cg"], d["site"], d["kind"], d["host"], d["data_dir"], d["metrics"],
                   d["version"], d["registered_us"])  # fmt: skip

    def check(self) -> None:
        rt = "SiteEntry"
        for name in ("cg", "site"):
            _text(rt, name, getattr(self, name))
        for name in ("host", "data_dir", "metrics", "version"):
            if not isinstance(getattr(self, name), str):
                raise _bad(rt, f"{name} must be a string")
        if self.kind not in SITE_KINDS:
            raise _bad(rt, f"kind {self.kind!r} is not one of {SITE_KINDS}")
        _int(rt, "registered_us", self.registered_us)
