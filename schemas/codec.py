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

The codec speaks the typed records of ``schemas.records``: ``encode(record)`` and
``decode(payload, expected)`` take and return those objects; the schema table is built
from the registry ``records.RECORDS``. Write records, most of what the interceptor and
the appliers handle, are written and read by hand here (byte for byte what fastavro
writes and reads; test_codec checks both); every other type goes through fastavro.

Every decoding failure is one of the four ``RecordError`` subclasses, whatever the bytes.
Values are checked after the crc (``CorruptRecordError``) and also before encoding, so an
impossible record is refused at both ends.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Any, NamedTuple, TypeVar, overload

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
from schemas.records import RECORDS, Record, Write, WriteExtent
from schemas.ts import format_ts

__all__ = [
    "class_of",
    "decode",
    "encode",
    "fingerprint",
    "headers_for",
    "schema_of",
    "writer_fingerprint",
]

R = TypeVar("R", bound=Record)

MAGIC = b"\xc3\x01"
HEADER_LEN = 10
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
CRC_FIELD = "crc32c"

_SCHEMA_DIR = Path(__file__).resolve().parent


def _crc32c(data: memoryview | bytes) -> int:
    # keep the GIL: the crc of a record takes ~0.1 ms, and handing the GIL to a busy writer
    # thread and waiting to get it back cost 20x that in the interceptor's tick thread
    return _crc32c_gil(data, gil_release_mode=0)


class _Entry(NamedTuple):
    cls: type[Record]
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
    fields = parsed.get("fields") if isinstance(parsed, dict) else None
    if (
        not isinstance(parsed, dict)
        or not fields
        or fields[-1]["name"] != CRC_FIELD
        or fields[-1]["type"] != "long"
    ):
        raise ConfigError(
            f"{path}: the last field must be 'crc32c' of type long; the codec's one-pass "
            "checksum depends on it. Fix the schema file."
        )
    # fastavro renders CRC-64-AVRO as the hex of the little-endian bytes, which is exactly
    # the byte order single-object encoding puts on the wire.
    fp = bytes.fromhex(_avro_fingerprint(to_parsing_canonical_form(raw), "CRC-64-AVRO"))
    return parsed, fp


def _build_registry(
    schema_dir: Path, records: tuple[type[Record], ...] = RECORDS
) -> tuple[dict[type[Record], _Entry], dict[bytes, _Entry]]:
    """Current schema per class, and every readable writer schema by fingerprint bytes.

    Refuses (``ConfigError``) a class whose fields are not its schema's, in order.
    """
    current: dict[type[Record], _Entry] = {}
    by_fp: dict[bytes, _Entry] = {}
    for cls in records:
        stem = cls.SCHEMA
        parsed, fp = _load(schema_dir / f"{stem}.avsc")
        if parsed["name"] != f"lowmark.{cls.TYPE}":
            raise ConfigError(f"{stem}.avsc defines {parsed['name']}, expected lowmark.{cls.TYPE}")
        names = [f["name"] for f in parsed["fields"][:-1]]
        mine = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        if names != mine:
            raise ConfigError(
                f"{stem}.avsc has fields {names} but schemas.records.{cls.__name__} has {mine}; "
                "the class must list the schema's fields in schema order (crc32c excepted)"
            )
        entry = _Entry(cls, parsed, None, int.from_bytes(fp, "little"), MAGIC + fp)
        current[cls] = entry
        by_fp[fp] = entry
        # Old writer schemas (write.v1.avsc, ...) stay readable forever: they resolve to
        # the current schema through Avro schema resolution.
        for old in sorted(schema_dir.glob(f"{stem}.v*.avsc")):
            old_parsed, old_fp = _load(old)
            if old_fp in by_fp:
                continue  # identical canonical form; nothing to resolve
            by_fp[old_fp] = _Entry(
                cls, old_parsed, parsed, int.from_bytes(old_fp, "little"), MAGIC + old_fp
            )
    return current, by_fp


_CURRENT, _BY_FP = _build_registry(_SCHEMA_DIR)


def fingerprint(cls: type[Record]) -> int:
    """CRC-64-AVRO fingerprint of the current schema of ``cls``, as an unsigned int."""
    return _entry(cls).fingerprint


def schema_of(cls: type[Record]) -> dict[str, Any]:
    """The parsed (fastavro) current schema of ``cls``. Do not mutate it."""
    return _entry(cls).writer


def _entry(cls: type[Record]) -> _Entry:
    entry = _CURRENT.get(cls)
    if entry is None:
        known = ", ".join(c.__name__ for c in _CURRENT)
        raise UnknownSchemaError(
            f"{getattr(cls, '__name__', cls)!r} is not a registered record type (known: "
            f"{known}); add it to schemas.records.RECORDS with its .avsc"
        )
    return entry


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


def encode(record: Record) -> bytes:
    """Encode ``record`` as a single-object-encoded payload (crc32c appended).

    Raises ``UnknownSchemaError`` for a class not in the registry and
    ``CorruptRecordError`` when a field is mistyped or impossible (the checks ``decode``
    applies).
    """
    entry = _entry(type(record))
    if type(record) is Write:
        return _encode_write(entry.header, record)
    try:
        record.check()
        buf = io.BytesIO()
        buf.write(entry.header)
        fastavro.schemaless_writer(buf, entry.writer, {**record.to_avro(), CRC_FIELD: 0})
    except RecordError:
        raise
    except Exception as exc:  # fastavro raises assorted types for a mistyped field
        raise CorruptRecordError(
            f"cannot encode {record.TYPE}: {type(exc).__name__}: {exc}. "
            "The caller built a record that does not match schemas/"
            f"{record.SCHEMA}.avsc."
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


def _encode_write(header: bytes, record: Write) -> bytes:
    """The Write record, byte for byte what fastavro writes, with one copy of the data.

    Writes carry the block data, so they are most of what the interceptor encodes: going
    through a BytesIO costs two extra copies of every byte (measured: 64 KiB writes spent
    a fifth of the tick thread there). test_codec checks the bytes equal fastavro's.
    """
    try:
        record.check()
        vid = record.volume_id.encode()
        iid = record.interceptor_id.encode()
        extents = record.extents
        parts: list[bytes | memoryview] = [
            header,
            _zz(len(vid)) + vid + _zz(len(iid)) + iid + _zz(record.epoch) + _zz(len(extents)),
        ]
        for x in extents:
            data = x.data
            parts.append(
                _zz(x.ts)
                + _zz(x.offset)
                + _zz(x.write_length)
                + _zz(x.fragment_index)
                + _zz(x.fragment_count)
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


def class_of(payload: bytes) -> type[Record]:
    """The record class named by the payload's header, without decoding the body."""
    return _header_entry(payload).cls


def writer_fingerprint(payload: bytes) -> int:
    """The fingerprint of the schema the payload was written with (an old one after an
    evolution), without decoding the body."""
    return _header_entry(payload).fingerprint


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


@overload
def decode(payload: bytes, expected: type[R]) -> R: ...
@overload
def decode(payload: bytes, expected: tuple[type[R], ...]) -> R: ...
@overload
def decode(payload: bytes, expected: None = None) -> Record: ...
def decode(
    payload: bytes,
    expected: type[Record] | tuple[type[Record], ...] | None = None,
) -> Record:
    """Decode and verify one payload. ``expected`` restricts the accepted record classes.

    Raises only ``UnknownSchemaError``, ``TruncatedRecordError``, ``ChecksumMismatchError``
    or ``CorruptRecordError``, for any input bytes.
    """
    entry = _header_entry(payload)
    cls = entry.cls
    if expected is not None and (
        cls is not expected if isinstance(expected, type) else cls not in expected
    ):
        want = expected.__name__ if isinstance(expected, type) else [c.__name__ for c in expected]
        raise UnknownSchemaError(
            f"got a {cls.TYPE} record where {want!r} was expected; "
            "a record on the wrong topic, or a producer bug"
        )
    record: Record
    if cls is Write and entry.reader is None:
        if type(payload) is not bytes:
            payload = bytes(payload)
        record, crc = _read_write(payload)
        _check_crc(cls, payload, crc)
    else:
        fields = _read_avro(entry, payload)
        crc = fields.pop(CRC_FIELD, None)
        _check_crc(cls, payload, crc)
        try:
            record = cls.from_avro(fields)
        except RecordError:
            raise
        except Exception as exc:
            raise CorruptRecordError(
                f"{cls.TYPE} record has a malformed field: {type(exc).__name__}: {exc}"
            ) from exc
    try:
        record.check()
    except RecordError:
        raise
    except Exception as exc:
        raise CorruptRecordError(
            f"{cls.TYPE} record has a malformed field: {type(exc).__name__}: {exc}"
        ) from exc
    return record


def _read_avro(entry: _Entry, payload: bytes) -> dict[str, Any]:
    rt = entry.cls.TYPE
    bio = io.BytesIO(payload)
    bio.seek(HEADER_LEN)
    try:
        fields = fastavro.schemaless_reader(bio, entry.writer, entry.reader)
    except EOFError as exc:
        raise TruncatedRecordError(f"{rt} record ends early ({len(payload)} bytes): {exc}") from exc
    except Exception as exc:  # invalid UTF-8, enum index out of range, negative length, ...
        raise CorruptRecordError(
            f"{rt} record does not parse: {type(exc).__name__}: {exc}"
        ) from exc
    end = bio.tell()
    if end != len(payload):
        raise TruncatedRecordError(
            f"{rt} record has {len(payload) - end} trailing bytes after its end"
        )
    if not isinstance(fields, dict):
        raise CorruptRecordError(f"{rt} payload did not decode to a record")
    return fields


def _check_crc(cls: type[Record], payload: bytes, crc: object) -> None:
    if not isinstance(crc, int) or not 0 <= crc < 2**32:
        raise ChecksumMismatchError(f"{cls.TYPE} record carries an impossible crc32c {crc!r}")
    with memoryview(payload) as view:
        actual = _crc32c(view[: len(payload) - _crc_varint_len(crc)])
    if actual != crc:
        raise ChecksumMismatchError(
            f"{cls.TYPE} record crc32c is {actual:#010x}, the record says {crc:#010x}: "
            "its bytes changed after it was written"
        )


class _Overlong(Exception):
    pass


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """The Avro long (zigzag varint) at ``pos`` and the position after it.

    IndexError when the buffer ends inside it.
    """
    b = buf[pos]
    if b < 0x80:
        return (b >> 1) ^ -(b & 1), pos + 1
    z = b & 0x7F
    shift = 7
    pos += 1
    while True:
        b = buf[pos]
        pos += 1
        z |= (b & 0x7F) << shift
        if b < 0x80:
            return (z >> 1) ^ -(z & 1), pos
        shift += 7
        if shift > 63:
            raise _Overlong


def _read_write(buf: bytes) -> tuple[Write, int]:
    """A current-schema Write payload -> (the record, its crc32c field), without fastavro.

    The decoding side of ``_encode_write``: reads what fastavro reads, Avro array blocks
    of any shape included (another writer may split the extents into several blocks).
    Writes are most of what an applier decodes, and fastavro's fixed cost per record
    (~7 µs) was more than the rest of a decode; so are Python calls, hence the one-byte
    varints (lengths, counts, small ints) read inline.
    """
    varint = _varint
    try:
        strings = []
        pos = HEADER_LEN
        for _ in range(2):  # volume_id, interceptor_id
            n = buf[pos]
            if n < 0x80:
                n, pos = (n >> 1) ^ -(n & 1), pos + 1
            else:
                n, pos = varint(buf, pos)
            end = pos + n
            if n < 0 or end > len(buf):
                raise IndexError if n >= 0 else ValueError(f"string length {n}")
            strings.append(buf[pos:end].decode())
            pos = end
        epoch, pos = varint(buf, pos)
        extents: list[WriteExtent] = []
        count = buf[pos]
        if count < 0x80:
            count, pos = (count >> 1) ^ -(count & 1), pos + 1
        else:
            count, pos = varint(buf, pos)
        while count:
            if count < 0:  # a block with its byte size: the size is not needed
                count = -count
                _size, pos = varint(buf, pos)
            for _ in range(count):
                ts, pos = varint(buf, pos)
                offset, pos = varint(buf, pos)
                wlen, pos = varint(buf, pos)
                index = buf[pos]
                if index < 0x80:
                    index, pos = (index >> 1) ^ -(index & 1), pos + 1
                else:
                    index, pos = varint(buf, pos)
                fcount = buf[pos]
                if fcount < 0x80:
                    fcount, pos = (fcount >> 1) ^ -(fcount & 1), pos + 1
                else:
                    fcount, pos = varint(buf, pos)
                n, pos = varint(buf, pos)
                end = pos + n
                if n < 0 or end > len(buf):
                    raise IndexError if n >= 0 else ValueError(f"bytes length {n}")
                extents.append(WriteExtent(ts, offset, wlen, index, fcount, buf[pos:end]))
                pos = end
            count = buf[pos]
            if count < 0x80:
                count, pos = (count >> 1) ^ -(count & 1), pos + 1
            else:
                count, pos = varint(buf, pos)
        crc, pos = varint(buf, pos)
    except IndexError:
        raise TruncatedRecordError(f"Write record ends early ({len(buf)} bytes)") from None
    except (ValueError, _Overlong) as exc:  # invalid UTF-8, a negative length, a long varint
        raise CorruptRecordError(
            f"Write record does not parse: {type(exc).__name__}: {exc}"
        ) from None
    if pos != len(buf):
        raise TruncatedRecordError(
            f"Write record has {len(buf) - pos} trailing bytes after its end"
        )
    return Write(strings[0], strings[1], epoch, tuple(extents)), crc


# ---------------------------------------------------------------- headers


def headers_for(record: Record) -> list[tuple[str, bytes]]:
    """Plain-text Kafka headers so ``kcat -f '%k %h\\n'`` shows what a record is.

    ``ts`` is rendered by ``schemas.ts.format_ts`` (``parse_ts`` reads it back
    exactly); it is the record's ``header_ts``: for a Write the ts of its last (largest)
    extent, for Progress ``s``, for Watermark and Checkpoint ``w``.
    """
    _entry(type(record))
    headers: list[tuple[str, bytes]] = [("type", record.TYPE.encode())]
    ts = record.header_ts
    if ts is not None:
        headers.append(("ts", format_ts(ts).encode()))
    volume_id = getattr(record, "volume_id", None)
    if volume_id is not None:
        headers.append(("volume", volume_id.encode()))
    interceptor_id = getattr(record, "interceptor_id", None)
    if interceptor_id is not None:
        headers.append(("interceptor", interceptor_id.encode()))
    epoch = getattr(record, "epoch", None)
    if epoch is not None:
        headers.append(("epoch", str(epoch).encode()))
    return headers
