"""The interceptor's outbox entries and their encoding into log records.

Pure functions of a tick's batch: the tick thread (``pipeline.primary.interceptor``) hands a batch
here and produces what comes back in one transaction with its PROGRESS record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from schemas import codec

#: (key, value, headers) of one Kafka message
Message = tuple[str, bytes, list[tuple[str, bytes]]]


@dataclass
class Entry:
    seq: int
    volume_id: str
    kind: str  # "write" | "zero" | "trim" | "volume_change" | "marker" | "snapshot"
    ts: int
    offset: int
    data: bytes | None
    length: int
    extra: dict[str, Any] | None = None


def entry_bytes(e: Entry) -> int:
    """What an entry counts against the outbox bounds (its data plus a header's worth)."""
    return (len(e.data) if e.data is not None else 0) + 64


def encode_batch(
    batch: list[Entry],
    *,
    interceptor_id: str,
    epoch: int,
    fragment_bytes: int,
    max_record_bytes: int,
) -> list[Message]:
    """Log records in per-volume ts order; consecutive writes of a volume coalesce.

    A write larger than ``fragment_bytes`` is cut into fragments sharing its ts, so a
    record never exceeds ``max_record_bytes`` (Kafka's message size limit).
    """
    out: list[Message] = []
    by_volume: dict[str, list[Entry]] = {}
    for e in batch:
        by_volume.setdefault(e.volume_id, []).append(e)
    frag = fragment_bytes
    for volume_id, entries in by_volume.items():
        entries.sort(key=lambda e: e.ts)
        extents: list[dict[str, Any]] = []
        size = 0
        for e in entries:
            if e.kind != "write":
                if extents:
                    out.append(_write_record(interceptor_id, epoch, volume_id, extents))
                    extents, size = [], 0
                out.append(_other_record(interceptor_id, epoch, e))
                continue
            data = e.data or b""
            count = max(1, -(-len(data) // frag))
            for i in range(count):
                piece = data[i * frag : (i + 1) * frag]
                if size + len(piece) + 64 > max_record_bytes and extents:
                    out.append(_write_record(interceptor_id, epoch, volume_id, extents))
                    extents, size = [], 0
                extents.append(
                    {
                        "ts": e.ts,
                        "offset": e.offset + i * frag,
                        "write_length": len(data),
                        "fragment_index": i,
                        "fragment_count": count,
                        "data": piece,
                    }
                )
                size += len(piece) + 64
        if extents:
            out.append(_write_record(interceptor_id, epoch, volume_id, extents))
    return out


def _write_record(
    interceptor_id: str, epoch: int, volume_id: str, extents: list[dict[str, Any]]
) -> Message:
    rec = {
        "volume_id": volume_id,
        "interceptor_id": interceptor_id,
        "epoch": epoch,
        "extents": extents,
    }
    return volume_id, codec.encode("Write", rec), codec.headers_for("Write", rec)


def _other_record(interceptor_id: str, epoch: int, e: Entry) -> Message:
    base = {"interceptor_id": interceptor_id, "epoch": epoch, "ts": e.ts}
    if e.kind in ("zero", "trim"):
        rec = {
            **base,
            "volume_id": e.volume_id,
            "offset": e.offset,
            "length": e.length,
            "kind": "ZERO" if e.kind == "zero" else "TRIM",
        }
        rtype = "Zero"
    elif e.kind == "volume_change":
        rec = {**base, "volume_id": e.volume_id, **(e.extra or {})}
        rtype = "VolumeChange"
    elif e.kind == "marker":
        rec = {**base, **(e.extra or {})}
        rtype = "Marker"
    elif e.kind == "snapshot":
        rec = {**base, **(e.extra or {})}
        rtype = "Snapshot"
    else:  # pragma: no cover - programmer error
        raise AssertionError(f"unknown entry kind {e.kind}")
    return e.volume_id, codec.encode(rtype, rec), codec.headers_for(rtype, rec)
