"""What a failback after an unplanned failover must copy: the pure rules, no I/O, no clock.

After ``lowmark failover`` moved generation g's primary P to site N (generation g + 1,
cut C = the roles' ``base_w``), P's images and N's images at the cut may differ only in
(the union is the *divergence*, at the granularity of ``region_bytes``):

- **above the cut** (``Source.ABOVE_CUT``): records of generation g that no backup applies:
  every one with ts > C, and every one at or beyond the cut's ``base_offsets`` whatever its
  ts (``pipeline.backup.generations``: a backup drops those unread). P wrote them; N did
  not roll them forward.
- **unreplicated tail** (``Source.DIRTY``): regions still set in P's persisted dirty-region
  log (``pipeline.primary.region_log``): writes P acknowledged that may never have reached
  Kafka, so no log names them.
- **written since** (``Source.REVERSE_LOG``): regions generation g + 1's log (the reverse
  log) names: N changed them after the cut.

Anything else is the same on both sides: both hold exactly g's records with ts <= C there.

Per volume the plan is one of (``Mode``):

- ``DELTA``: copy the diverged regions only, coalesced into ranges of at most
  ``max_range_bytes``;
- ``FULL``: copy the whole volume. Chosen when the diverged share of the volume is above
  ``full_copy_threshold``, or when the volume itself changed (created, resized or deleted
  above the cut or since it, a size that differs between the two sides, missing at P):
  region arithmetic over two different sizes is not worth its risk;
- ``DROP``: P holds a volume N does not: it goes (the catch-up replay recreates it, if
  generation g + 1 creates it again).

The rules, each a test in ``tests/ops/test_resync_plan.py``: a touched byte's region is
always copied (never less than the union), nothing outside the union is copied in DELTA
mode, ranges never cross a volume's end, and the share is the planned bytes over the
volume's size at N.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from pipeline.errors import ConfigError
from pipeline.primary.regions import (
    DEFAULT_REGION_BYTES,
    byte_ranges,
    check_region_bytes,
    region_span,
)

__all__ = [
    "DEFAULT_FULL_COPY_THRESHOLD",
    "DEFAULT_REGION_BYTES",
    "Divergence",
    "Mode",
    "ResyncPlan",
    "Source",
    "VolumePlan",
    "plan_resync",
]

DEFAULT_FULL_COPY_THRESHOLD = 0.5
#: a planned range is copied (and its progress recorded) in pieces of at most this
DEFAULT_MAX_RANGE_BYTES = 1 << 20


class Source(StrEnum):
    ABOVE_CUT = "above_cut"
    DIRTY = "dirty"
    REVERSE_LOG = "reverse_log"


class Mode(StrEnum):
    DELTA = "delta"
    FULL = "full"
    DROP = "drop"


@dataclass
class Divergence:
    """The fold: every byte range the three sources name, as regions per volume."""

    region_bytes: int = DEFAULT_REGION_BYTES
    regions: dict[str, set[int]] = field(default_factory=dict)
    #: volumes whose existence or size changed above the cut or since it
    changed: dict[str, set[Source]] = field(default_factory=dict)
    #: per source, the number of regions it named (a region named twice counts twice)
    named: dict[Source, int] = field(default_factory=lambda: dict.fromkeys(Source, 0))

    def __post_init__(self) -> None:
        try:
            check_region_bytes(self.region_bytes)
        except ValueError as exc:
            raise ConfigError(f"--region-bytes: {exc}") from None

    def touch(self, volume_id: str, offset: int, length: int, source: Source) -> None:
        """``[offset, offset + length)`` of ``volume_id`` may differ between the sides."""
        span = region_span(offset, length, self.region_bytes)
        self.regions.setdefault(volume_id, set()).update(span)
        self.named[source] += len(span)

    def touch_regions(
        self, volume_id: str, regions: Iterable[int], region_bytes: int, source: Source
    ) -> None:
        """Regions of another size (a dirty-region log's own ``region_bytes``)."""
        for r in regions:
            self.touch(volume_id, r * region_bytes, region_bytes, source)

    def volume_changed(self, volume_id: str, source: Source) -> None:
        """A create, resize or delete of ``volume_id``: the volume is copied whole."""
        self.changed.setdefault(volume_id, set()).add(source)


@dataclass(frozen=True)
class VolumePlan:
    volume_id: str
    mode: Mode
    #: the volume's size at N when planned (0 for DROP)
    size: int
    #: what to copy: (offset, length), ascending, disjoint, inside [0, size)
    ranges: tuple[tuple[int, int], ...]
    #: bytes of the diverged regions inside the volume (what DELTA would copy)
    diverged_bytes: int
    why: str

    @property
    def planned_bytes(self) -> int:
        return sum(n for _o, n in self.ranges)

    def to_json(self) -> dict[str, object]:
        return {
            "volume_id": self.volume_id,
            "mode": self.mode.value,
            "size": self.size,
            "ranges": [list(r) for r in self.ranges],
            "diverged_bytes": self.diverged_bytes,
            "why": self.why,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, object]) -> VolumePlan:
        ranges = d["ranges"]
        assert isinstance(ranges, list)
        return cls(
            str(d["volume_id"]),
            Mode(str(d["mode"])),
            int(str(d["size"])),
            tuple((int(o), int(n)) for o, n in ranges),
            int(str(d["diverged_bytes"])),
            str(d["why"]),
        )


@dataclass(frozen=True)
class ResyncPlan:
    region_bytes: int
    full_copy_threshold: float
    volumes: tuple[VolumePlan, ...]

    @property
    def planned_bytes(self) -> int:
        return sum(v.planned_bytes for v in self.volumes)

    @property
    def diverged_bytes(self) -> int:
        return sum(v.diverged_bytes for v in self.volumes)

    def volume(self, volume_id: str) -> VolumePlan | None:
        return next((v for v in self.volumes if v.volume_id == volume_id), None)


def plan_resync(
    divergence: Divergence,
    old_sizes: Mapping[str, int],
    new_sizes: Mapping[str, int],
    *,
    full_copy_threshold: float = DEFAULT_FULL_COPY_THRESHOLD,
    max_range_bytes: int = DEFAULT_MAX_RANGE_BYTES,
) -> ResyncPlan:
    """The plan per volume: ``old_sizes`` are P's volumes, ``new_sizes`` N's (as planned)."""
    if not 0.0 <= full_copy_threshold <= 1.0:
        raise ConfigError(
            f"--full-copy-threshold {full_copy_threshold!r} must be a share in [0, 1]"
        )
    rb = divergence.region_bytes
    if max_range_bytes < rb or max_range_bytes % rb:
        raise ConfigError(f"max_range_bytes {max_range_bytes} must be a multiple of {rb}")
    plans = []
    for vid in sorted(set(old_sizes) | set(new_sizes)):
        if vid not in new_sizes:
            plans.append(VolumePlan(vid, Mode.DROP, 0, (), 0, "not a volume of the new primary"))
            continue
        size = new_sizes[vid]
        regions = {r for r in divergence.regions.get(vid, ()) if r * rb < size}
        diverged = sum(min(size, (r + 1) * rb) - r * rb for r in regions)
        whole = ((0, size),) if size else ()
        full = _split(whole, max_range_bytes)
        why = _full_reason(vid, old_sizes, size, divergence.changed.get(vid))
        if why:
            plans.append(VolumePlan(vid, Mode.FULL, size, full, diverged, why))
        elif size and diverged / size > full_copy_threshold:
            share = f"{diverged / size:.0%} diverged, above the threshold"
            plans.append(
                VolumePlan(vid, Mode.FULL, size, full, diverged, f"{share} {full_copy_threshold}")
            )
        else:
            ranges = tuple(byte_ranges(regions, rb, size, max_range_bytes))
            share = f"{diverged / size:.1%}" if size else "0%"
            plans.append(VolumePlan(vid, Mode.DELTA, size, ranges, diverged, f"{share} diverged"))
    return ResyncPlan(rb, full_copy_threshold, tuple(plans))


def _full_reason(
    vid: str, old_sizes: Mapping[str, int], size: int, changed: set[Source] | None
) -> str:
    if vid not in old_sizes:
        return "missing at the old primary"
    if old_sizes[vid] != size:
        return f"size {old_sizes[vid]} at the old primary, {size} at the new one"
    if changed:
        return "created, resized or deleted " + " and ".join(
            {"above_cut": "above the cut", "reverse_log": "since the cut", "dirty": "unlogged"}[
                s.value
            ]
            for s in sorted(changed)
        )
    return ""


def _split(ranges: Iterable[tuple[int, int]], step: int) -> tuple[tuple[int, int], ...]:
    out = []
    for offset, length in ranges:
        for o in range(offset, offset + length, step):
            out.append((o, min(step, offset + length - o)))
    return tuple(out)
