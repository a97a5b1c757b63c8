"""Encode and decode lowmark records: Avro single-object encoding plus a crc32c field.

Wire format of every record (see ``schemas/README.md``)::

    C3 01 | fingerprint (8 bytes, CRC-64-AVRO of the schema's canonical form, little-endian)
          | Avro binary of the record's fields, the last of which is ``crc32c`` (long)

``crc32c`` covers every byte before its own varint, header included, so a flipped bit
anywhere (a field, a length prefix, the fingerprint) is caught, not only in ``data``.
Encoding costs one Avro write and one crc pass: the record is written with crc32c=0,
whose zigzag varint is the single byte 0x00, that byte is dropped, the rest is crc'd and
the crc's varint appended. Decoding parses once, then crcs the payload minus the crc's
varint.

Every decoding failure is one of the four ``RecordError`` subclasses, whatever the bytes.
Values are checked after the crc (``CorruptRecordError``) and also before encoding, so an
impossible record is refused at both ends.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import fastavro
from crc32c import crc32c as _crc32c_gil
from fastavro.schema import fingerprint as _avro_fingerprint
from fastavro.schema import to_parsing_canonical_form

from pipeline.errors import (
    ChecksumMismatchError,
    ConfigError,
    CorruptRecordError,
    RecordError,
    TruncatedRecordError,
    UnknownSchemaError,
)

__all__ = [
    "RECORD_TYPES",
    "Decoded",
    "decode",
    "encode",
    "fingerprint",
    "headers_for",
    "schema_of",
    "type_of",
]

RECORD_TYPES: tuple[str, ...] = (
    "Write",
    "Zero",
    "Marker",
    "Snapshot",
    "VolumeChange",
    "Progress",
    "Watermark",
    "Checkpoint",
)

MAGIC = b"\xc3\x01"
HEADER_LEN = 10
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
CRC_FIELD = "crc32c"

_SCHEMA_DIR = Path(__file__).resolve().parent
_FILE_OF = {
    "Write": "write",
    "Zero": "zero",
    "Marker": "marker",
    "Snapshot": "snapshot",
    "VolumeChange": "volume_change",
    "Progress": "progress",
    "Watermark": "watermark",
    "Checkpoint": "checkpoint",
}


def _crc32c(data: memoryview | bytes) -> int:
    # keep the GIL: the crc of a record takes ~0.1 ms, and handing the GIL to a busy writer
    # thread and waiting to get it back cost 20x that in the interceptor's tick thread
    return _crc32c_gil(data, gil_release_mode=0)


class Decoded(NamedTuple):
    """A decoded record: its type, its fields (without crc32c) and its writer fingerprint."""

    type: str
    record: dict[str, Any]
    fingerprint: int


class _Entry(NamedTuple):
    type: str
    writer: dict[str, Any]
    reader: dict[str, Any] | None  # None: the writer schema is the current one
    fingerprint: int
    header: bytes


# ---------------------------------------------------------------- schema registry


def _load(path: Path) -> tuple[dict[str, Any], bytes]:
    """Parse one self-contained .avsc; return the parsed schema and its 8 fingerprint bytes."""
    raw = json.loads(path.read_text(encoding="utf-8"))
    # A fresh named-type table per file: PartitionOffset is defined in several files.
    parsed = fastavro.parse_schema(raw, named_schemas={})
    fields = parsed.get("fields") or []
    if not fields or fields[-1]["name"] != CRC_FIELD or fields[-1]["type"] != "long":
        raise ConfigError(
            f"{path}: the last field must be 'crc32c' of type long; the codec's one-pass "
            "checksum depends on it. Fix the schema file."
        )
    # fastavro renders CRC-64-AVRO as the hex of the little-endian bytes, which is exactly
    # the byte order single-object encoding puts on the wire.
    fp = bytes.fromhex(_avro_fingerprint(to_parsing_canonical_form(raw), "CRC-64-AVRO"))
    return parsed, fp


def _build_registry(schema_dir: Path) -> tuple[dict[str, _Entry], dict[bytes, _Entry]]:
    """Current schema per type, and every readable writer schema by fingerprint bytes."""
    current: dict[str, _Entry] = {}
    by_fp: dict[bytes, _Entry] = {}
    for rtype, stem in _FILE_OF.items():
        parsed, fp = _load(schema_dir / f"{stem}.avsc")
        if parsed["name"] != f"lowmark.{rtype}":
            raise ConfigError(f"{stem}.avsc defines {parsed['name']}, expected lowmark.{rtype}")
        entry = _Entry(rtype, parsed, None, int.from_bytes(fp, "little"), MAGIC + fp)
        current[rtype] = entry
        by_fp[fp] = entry
        # Old writer schemas (write.v1.avsc, ...) stay readable forever: they resolve to
        # the current schema through Avro schema resolution.
        for old in sorted(schema_dir.glob(f"{stem}.v*.avsc")):
            old_parsed, old_fp = _load(old)
            if old_fp in by_fp:
                continue  # identical canonical form; nothing to resolve
            by_fp[old_fp] = _Entry(
                rtype, old_parsed, parsed, int.from_bytes(old_fp, "little"), MAGIC + old_fp
            )
    return current, by_fp


_CURRENT, _BY_FP = _build_registry(_SCHEMA_DIR)


def fingerprint(record_type: str) -> int:
    """CRC-64-AVRO fingerprint of the current schema of ``record_type``, as an unsigned int."""
    return _entry(record_type).fingerprint


def schema_of(record_type: str) -> dict[str, Any]:
    """The parsed (fastavro) current schema of ``record_type``. Do not mutate it."""
    return _entry(record_type).writer


def _entry(record_type: str) -> _Entry:
    try:
        return _CURRENT[record_type]
    except KeyError:
        raise UnknownSchemaError(
            f"unknown record type {record_type!r}; known: {', '.join(RECORD_TYPES)}"
        ) from None


# ---------------------------------------------------------------- varints


def _crc_varint(crc: int) -> bytes:
    """Avro long encoding (zigzag varint) of a non-negative crc."""
    z = crc << 1
    out = bytearray()
    while z >= 0x80:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def _crc_varint_len(crc: int) -> int:
    return max(1, ((crc << 1).bit_length() + 6) // 7)


# ---------------------------------------------------------------- encode


def encode(record_type: str, record: dict[str, Any]) -> bytes:
    """Encode ``record`` (every field but crc32c) as a single-object-encoded payload.

    Raises ``UnknownSchemaError`` for an unknown type and ``CorruptRecordError`` when a
    field is missing, mistyped or impossible (the same checks ``decode`` applies).
    """
    entry = _entry(record_type)
    if record_type == "Write":
        return _encode_write(entry.header, record)
    try:
        _VALIDATORS[record_type](record)
        buf = io.BytesIO()
        buf.write(entry.header)
        fastavro.schemaless_writer(buf, entry.writer, {**record, CRC_FIELD: 0})
    except RecordError:
        raise
    except Exception as exc:  # fastavro raises assorted types for a mistyped field
        raise CorruptRecordError(
            f"cannot encode {record_type}: {type(exc).__name__}: {exc}. "
            "The caller built a record that does not match schemas/"
            f"{_FILE_OF[record_type]}.avsc."
        ) from exc
    # Drop the 0x00 written for crc32c=0; crc everything before it.
    buf.seek(-1, io.SEEK_END)
    buf.truncate()
    with buf.getbuffer() as view:
        crc = _crc32c(view)
    buf.write(_crc_varint(crc))
    return buf.getvalue()


def _zz(n: int) -> bytes:
    """Avro long/int: zigzag varint."""
    z = (n << 1) ^ (n >> 63)
    if z < 0x80:
        return _SMALL_VARINTS[z]
    out = bytearray()
    while z >= 0x80:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


_SMALL_VARINTS = [bytes([i]) for i in range(0x80)]


def _encode_write(header: bytes, record: dict[str, Any]) -> bytes:
    """The Write record, byte for byte what fastavro writes, with one copy of the data.

    Writes carry the block data, so they are most of what the interceptor encodes: going
    through a BytesIO costs two extra copies of every byte (measured: 64 KiB writes spent
    a fifth of the tick thread there). test_codec checks the bytes equal fastavro's.
    """
    try:
        _VALIDATORS["Write"](record)
        vid = record["volume_id"].encode()
        iid = record["interceptor_id"].encode()
        extents = record["extents"]
        parts: list[bytes | memoryview] = [
            header,
            _zz(len(vid)) + vid + _zz(len(iid)) + iid + _zz(record["epoch"]) + _zz(len(extents)),
        ]
        for x in extents:
            data = x["data"]
            parts.append(
                _zz(x["ts"])
                + _zz(x["offset"])
                + _zz(x["write_length"])
                + _zz(x["fragment_index"])
                + _zz(x["fragment_count"])
                + _zz(len(data))
            )
            parts.append(data)
        parts.append(b"\x00")  # end of the extents array
    except RecordError:
        raise
    except Exception as exc:
        raise CorruptRecordError(
            f"cannot encode Write: {type(exc).__name__}: {exc}. "
            "The caller built a record that does not match schemas/write.avsc."
        ) from exc
    try:
        crc = 0
        for part in parts:
            crc = _crc32c_gil(part, crc, gil_release_mode=0)
        parts.append(_crc_varint(crc))
        return b"".join(parts)
    except TypeError as exc:  # data that is not bytes-like
        raise CorruptRecordError(f"cannot encode Write: {exc}; data must be bytes") from exc


# ---------------------------------------------------------------- decode


def type_of(payload: bytes) -> str:
    """The record type named by the payload's header, without decoding the body."""
    return _header_entry(payload).type


def _header_entry(payload: bytes) -> _Entry:
    head = bytes(payload[:HEADER_LEN])
    if head[:2] != MAGIC[: len(head[:2])]:
        raise UnknownSchemaError(
            f"payload starts with {head[:2].hex()}, not the Avro single-object magic c301; "
            "this is not a lowmark record (wrong topic, or written by another producer)"
        )
    if len(head) < HEADER_LEN:
        raise TruncatedRecordError(
            f"payload is {len(head)} bytes, shorter than the 10-byte single-object header"
        )
    entry = _BY_FP.get(head[2:])
    if entry is None:
        raise UnknownSchemaError(
            f"unknown schema fingerprint {head[2:].hex()}; the record was written by a "
            "newer lowmark or is corrupt. Upgrade this reader or inspect the record."
        )
    return entry


def decode(
    payload: bytes,
    expected: str | tuple[str, ...] | None = None,
) -> Decoded:
    """Decode and verify one payload. ``expected`` restricts the accepted record types.

    Raises only ``UnknownSchemaError``, ``TruncatedRecordError``, ``ChecksumMismatchError``
    or ``CorruptRecordError``, for any input bytes.
    """
    entry = _header_entry(payload)
    if expected is not None and (
        entry.type != expected if isinstance(expected, str) else entry.type not in expected
    ):
        raise UnknownSchemaError(
            f"got a {entry.type} record where {expected!r} was expected; "
            "a record on the wrong topic, or a producer bug"
        )
    bio = io.BytesIO(payload)
    bio.seek(HEADER_LEN)
    try:
        record = fastavro.schemaless_reader(bio, entry.writer, entry.reader)
    except EOFError as exc:
        raise TruncatedRecordError(
            f"{entry.type} record ends early ({len(payload)} bytes): {exc}"
        ) from exc
    except Exception as exc:  # invalid UTF-8, enum index out of range, negative length, ...
        raise CorruptRecordError(
            f"{entry.type} record does not parse: {type(exc).__name__}: {exc}"
        ) from exc
    end = bio.tell()
    if end != len(payload):
        raise TruncatedRecordError(
            f"{entry.type} record has {len(payload) - end} trailing bytes after its end"
        )
    if not isinstance(record, dict):
        raise CorruptRecordError(f"{entry.type} payload did not decode to a record")
    crc = record.pop(CRC_FIELD, None)
    if not isinstance(crc, int) or not 0 <= crc < 2**32:
        raise ChecksumMismatchError(f"{entry.type} record carries an impossible crc32c {crc!r}")
    with memoryview(payload) as view:
        actual = _crc32c(view[: len(payload) - _crc_varint_len(crc)])
    if actual != crc:
        raise ChecksumMismatchError(
            f"{entry.type} record crc32c is {actual:#010x}, the record says {crc:#010x}: "
            "its bytes changed after it was written"
        )
    try:
        _VALIDATORS[entry.type](record)
    except RecordError:
        raise
    except Exception as exc:
        raise CorruptRecordError(
            f"{entry.type} record has a malformed field: {type(exc).__name__}: {exc}"
        ) from exc
    return Decoded(entry.type, record, entry.fingerprint)


# ---------------------------------------------------------------- headers


def headers_for(record_type: str, record: dict[str, Any]) -> list[tuple[str, bytes]]:
    """Plain-text Kafka headers so ``kcat -f '%k %h\\n'`` shows what a record is.

    ``ts`` is rendered by ``pipeline.primary.clock.format_ts`` (``parse_ts`` reads it back
    exactly); for a Write it is the ts of its last (largest) extent, for Progress ``s``,
    for Watermark and Checkpoint ``w``.
    """
    from pipeline.primary.clock import format_ts  # late: keeps `import schemas.codec` light

    _entry(record_type)
    headers: list[tuple[str, bytes]] = [("type", record_type.encode())]
    ts: int | None
    if record_type == "Write":
        ts = record["extents"][-1]["ts"] if record["extents"] else None
    elif record_type == "Progress":
        ts = record["s"]
    elif record_type in ("Watermark", "Checkpoint"):
        ts = record["w"]
    else:
        ts = record.get("ts")
    if ts is not None:
        headers.append(("ts", format_ts(ts).encode()))
    if "volume_id" in record:
        headers.append(("volume", record["volume_id"].encode()))
    if "interceptor_id" in record:
        headers.append(("interceptor", record["interceptor_id"].encode()))
    if "epoch" in record:
        headers.append(("epoch", str(record["epoch"]).encode()))
    return headers


# ---------------------------------------------------------------- value checks


def _bad(record_type: str, why: str) -> CorruptRecordError:
    return CorruptRecordError(f"impossible {record_type} record: {why}")


def _nonempty(rt: str, rec: dict[str, Any], *names: str) -> None:
    for name in names:
        value = rec[name]
        if not isinstance(value, str) or not value:
            raise _bad(rt, f"{name} must be a non-empty string, got {value!r}")


def _at_least(rt: str, rec: dict[str, Any], low: int, *names: str) -> None:
    for name in names:
        value = rec[name]
        if not isinstance(value, int) or not low <= value <= INT64_MAX:
            raise _bad(rt, f"{name} must be an integer in [{low}, 2**63), got {value!r}")


def _partition_offsets(rt: str, name: str, items: Iterable[dict[str, Any]]) -> None:
    seen: set[int] = set()
    for po in items:
        p, off = po["partition"], po["offset"]
        if not 0 <= p <= INT32_MAX or p in seen:
            raise _bad(rt, f"{name} has a negative or repeated partition {p}")
        if not 0 <= off <= INT64_MAX:
            raise _bad(rt, f"{name} partition {p} has offset {off}")
        seen.add(p)


def _check_write(rec: dict[str, Any]) -> None:
    rt = "Write"
    _nonempty(rt, rec, "volume_id", "interceptor_id")
    _at_least(rt, rec, 0, "epoch")
    extents = rec["extents"]
    if not extents:
        raise _bad(rt, "no extents")
    prev: dict[str, Any] | None = None
    run_bytes = 0  # bytes of the current write seen so far in this record
    run_from_start = False  # the current write's fragment 0 is in this record
    for i, e in enumerate(extents):
        ts, off, wlen = e["ts"], e["offset"], e["write_length"]
        idx, cnt, data = e["fragment_index"], e["fragment_count"], e["data"]
        if not isinstance(data, bytes | bytearray):
            raise _bad(rt, f"extent {i} data must be bytes, got {type(data).__name__}")
        n = len(data)
        if not 0 <= ts <= INT64_MAX:
            raise _bad(rt, f"extent {i} has ts {ts}")
        if not 0 <= off <= INT64_MAX - n:
            raise _bad(rt, f"extent {i} has offset {off} (with {n} bytes)")
        if not 1 <= wlen <= INT64_MAX:
            raise _bad(rt, f"extent {i} has write_length {wlen}")
        if not 1 <= cnt <= min(wlen, INT32_MAX) or not 0 <= idx < cnt:
            raise _bad(rt, f"extent {i} is fragment {idx} of {cnt} of a {wlen}-byte write")
        if not 1 <= n <= wlen:
            raise _bad(rt, f"extent {i} carries {n} bytes of a {wlen}-byte write")
        if prev is not None and ts == prev["ts"]:
            # Fragments of one write share its ts and are appended together, in order.
            if (
                wlen != prev["write_length"]
                or cnt != prev["fragment_count"]
                or idx != prev["fragment_index"] + 1
                or off != prev["offset"] + len(prev["data"])
            ):
                raise _bad(rt, f"extent {i} shares ts {ts} but does not continue extent {i - 1}")
            run_bytes += n
        else:
            if prev is not None:
                if ts < prev["ts"]:
                    raise _bad(rt, f"extent {i} ts {ts} is below extent {i - 1} ts {prev['ts']}")
                # Only the first write may start, and only the last may end, outside
                # this record: a write's fragments are never interleaved with another's.
                if prev["fragment_index"] != prev["fragment_count"] - 1:
                    raise _bad(rt, f"the write before extent {i} stops before its last fragment")
                if idx != 0:
                    raise _bad(rt, f"extent {i} starts a write at fragment {idx}, not 0")
            run_bytes = n
            run_from_start = idx == 0
        if run_bytes > wlen or (run_from_start and idx == cnt - 1 and run_bytes != wlen):
            raise _bad(rt, f"the write ending at extent {i} has {run_bytes} of {wlen} bytes")
        prev = e


def _check_zero(rec: dict[str, Any]) -> None:
    rt = "Zero"
    _nonempty(rt, rec, "volume_id", "interceptor_id")
    _at_least(rt, rec, 0, "epoch", "ts", "offset")
    _at_least(rt, rec, 1, "length")
    if rec["offset"] > INT64_MAX - rec["length"]:
        raise _bad(rt, f"offset {rec['offset']} + length {rec['length']} overflows")
    if rec["kind"] not in ("ZERO", "TRIM"):
        raise _bad(rt, f"unknown kind {rec['kind']!r}")


def _check_marker(rec: dict[str, Any]) -> None:
    _nonempty("Marker", rec, "name", "interceptor_id")
    _at_least("Marker", rec, 0, "ts", "epoch", "created_us")


def _check_snapshot(rec: dict[str, Any]) -> None:
    rt = "Snapshot"
    _nonempty(rt, rec, "name", "interceptor_id")
    _at_least(rt, rec, 0, "ts", "epoch")
    ids = rec["volume_ids"]
    if not all(isinstance(v, str) and v for v in ids) or len(set(ids)) != len(ids):
        raise _bad(rt, f"volume_ids must be distinct non-empty strings, got {ids!r}")


def _check_volume_change(rec: dict[str, Any]) -> None:
    rt = "VolumeChange"
    _nonempty(rt, rec, "volume_id", "interceptor_id")
    _at_least(rt, rec, 0, "size", "ts", "epoch")
    if rec["op"] not in ("CREATE", "RESIZE", "DELETE"):
        raise _bad(rt, f"unknown op {rec['op']!r}")
    if not isinstance(rec["name"], str) or not isinstance(rec["metadata"], dict):
        raise _bad(rt, "name must be a string and metadata a map of strings")


def _check_progress(rec: dict[str, Any]) -> None:
    rt = "Progress"
    _nonempty(rt, rec, "interceptor_id")
    # A JOIN is written before its own offset (the epoch) is known: -1 means "not yet".
    _at_least(rt, rec, -1, "epoch")
    _at_least(rt, rec, 0, "s", "wall_us")
    if rec["kind"] not in ("JOIN", "PROGRESS", "LEAVE", "FENCE"):
        raise _bad(rt, f"unknown kind {rec['kind']!r}")
    _partition_offsets(rt, "partition_offsets", rec["partition_offsets"])


def _check_watermark(rec: dict[str, Any]) -> None:
    rt = "Watermark"
    _nonempty(rt, rec, "cg")
    _at_least(rt, rec, 0, "w", "max_s", "published_us")
    _at_least(rt, rec, -1, "progress_offset")  # -1: no progress folded yet
    _partition_offsets(rt, "log_offsets", rec["log_offsets"])
    seen: set[str] = set()
    for m in rec["members"]:
        _nonempty(rt, m, "interceptor_id")
        _at_least(rt, m, 0, "epoch", "s", "effective_s", "last_progress_offset")
        if m["interceptor_id"] in seen:
            raise _bad(rt, f"member {m['interceptor_id']!r} listed twice")
        seen.add(m["interceptor_id"])


def _check_checkpoint(rec: dict[str, Any]) -> None:
    rt = "Checkpoint"
    _nonempty(rt, rec, "site", "cg")
    _at_least(rt, rec, 0, "w", "written_us")
    _partition_offsets(rt, "log_offsets", rec["log_offsets"])
    seen: set[str] = set()
    for v in rec["volumes"]:
        _nonempty(rt, v, "volume_id")
        _at_least(rt, v, 0, "size")
        if not isinstance(v["digest"], str) or v["volume_id"] in seen:
            raise _bad(rt, f"volume {v['volume_id']!r} listed twice or without a digest")
        seen.add(v["volume_id"])


_VALIDATORS: dict[str, Callable[[dict[str, Any]], None]] = {
    "Write": _check_write,
    "Zero": _check_zero,
    "Marker": _check_marker,
    "Snapshot": _check_snapshot,
    "VolumeChange": _check_volume_change,
    "Progress": _check_progress,
    "Watermark": _check_watermark,
    "Checkpoint": _check_checkpoint,
}
