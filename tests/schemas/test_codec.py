"""Try to break the record codec.

Round trips for every record type (hypothesis); thousands of seeded mutations of real
payloads that must each be refused with one of the four RecordError subclasses (never a
silent wrong decode, never another exception type); impossible values smuggled past the
encoder with a valid crc; plain-Avro readability checked against an independent
CRC-64-AVRO implementation; schema evolution through an old writer schema.

Records are built as the plain Avro dicts fastavro reads and writes (the shape the
schema files define) and turned into the typed records of ``schemas.records`` with
``from_avro``; ``test_avro_dicts_convert_losslessly`` pins that conversion.
"""

from __future__ import annotations

import dataclasses
import io
import json
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import fastavro
import pytest
from crc32c import crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import (
    ChecksumMismatchError,
    CorruptRecordError,
    RecordError,
    TruncatedRecordError,
    UnknownSchemaError,
)
from schemas import codec
from schemas.records import (
    RECORDS,
    CgRoles,
    Checkpoint,
    DrainRequest,
    Marker,
    MarkerPhase,
    Progress,
    Record,
    SiteEntry,
    Snapshot,
    VolumeChange,
    VolumeEntry,
    Watermark,
    Write,
    WriteExtent,
    Zero,
)
from schemas.ts import parse_ts
from tests.schemas.record_strategies import AVRO_STRATEGIES

SCHEMA_DIR = Path(codec.__file__).parent

STRATEGIES: dict[type[Record], st.SearchStrategy[Record]] = {
    cls: strategy.map(cls.from_avro) for cls, strategy in AVRO_STRATEGIES.items()
}


_VOLUME = {"cg": "cg1", "volume_id": "v1", "name": "db", "size": 1 << 30, "mode": "sync",
           "metadata": {"owner": "ops"}, "deleted": False, "generation": 1,
           "interceptor_id": "p", "ts": 2**57, "updated_us": 3, "access": {"p": "optimized"}}
_SITE = {"cg": "cg1", "site": "dr3", "kind": "backup", "host": "h", "data_dir": "/d",
         "metrics": "", "version": "0.3", "registered_us": 4}


def test_strategies_cover_every_type() -> None:
    assert set(STRATEGIES) == set(RECORDS)


@pytest.mark.parametrize("cls", RECORDS)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_avro_dicts_convert_losslessly(cls: type[Record], data: st.DataObject) -> None:
    d = data.draw(AVRO_STRATEGIES[cls])
    record = cls.from_avro(d)
    assert type(record) is cls
    assert record.to_avro() == d


@pytest.mark.parametrize("rtype", RECORDS)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_round_trip(rtype: type[Record], data: st.DataObject) -> None:
    record = data.draw(STRATEGIES[rtype])
    payload = codec.encode(record)
    assert payload[:2] == b"\xc3\x01"
    assert codec.class_of(payload) is rtype
    decoded = codec.decode(payload, expected=rtype)
    assert type(decoded) is rtype and decoded == record
    assert codec.writer_fingerprint(payload) == codec.fingerprint(rtype)
    assert codec.decode(bytearray(payload)) == record


# ---------------------------------------------------------------- plain Avro


def _crc64_avro(data: bytes) -> int:
    """CRC-64-AVRO (Rabin) straight from the Avro specification, independent of fastavro."""
    empty = 0xC15D213AA4D7A795
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (empty & -(fp & 1))
        table.append(fp)
    fp = empty
    for byte in data:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp


@pytest.mark.parametrize("rtype", RECORDS)
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_payload_is_plain_avro_single_object(rtype: type[Record], data: st.DataObject) -> None:
    record = data.draw(STRATEGIES[rtype])
    payload = codec.encode(record)
    stem = rtype.SCHEMA
    raw_schema = json.loads((SCHEMA_DIR / f"{stem}.avsc").read_text())
    canonical = fastavro.schema.to_parsing_canonical_form(raw_schema)
    assert payload[2:10] == _crc64_avro(canonical.encode()).to_bytes(8, "little")
    assert codec.fingerprint(rtype) == _crc64_avro(canonical.encode())

    plain = fastavro.schemaless_reader(io.BytesIO(payload[10:]),
                                       fastavro.parse_schema(raw_schema, named_schemas={}))
    crc = plain.pop("crc32c")
    assert plain == record.to_avro()
    # The documented checksum rule, recomputed by hand: everything before the crc varint.
    varint_len = len(_zigzag_varint(crc))
    assert crc == crc32c(payload[:-varint_len])


def _zigzag_varint(n: int) -> bytes:
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z >= 0x80:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def _encode_unchecked(
    rtype: type[Record], record: dict[str, Any], header: bytes | None = None
) -> bytes:
    """A second encoder that skips the value checks: smuggles impossible values past them."""
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, codec.schema_of(rtype), {**record, "crc32c": 0})
    head = header if header is not None else (
        b"\xc3\x01" + codec.fingerprint(rtype).to_bytes(8, "little"))
    body = head + buf.getvalue()[:-1]
    return body + _zigzag_varint(crc32c(body))


def test_unchecked_encoder_matches_codec() -> None:
    for rtype, record in SAMPLES:
        assert _encode_unchecked(rtype, record) == codec.encode(rtype.from_avro(record))


# ---------------------------------------------------------------- impossible values

WRITE_OK: dict[str, Any] = {
    "volume_id": "v", "interceptor_id": "i", "epoch": 1,
    "extents": [
        {"ts": 10, "offset": 0, "write_length": 4, "fragment_index": 0, "fragment_count": 1,
         "data": b"abcd"},
        {"ts": 11, "offset": 100, "write_length": 6, "fragment_index": 0, "fragment_count": 2,
         "data": b"abc"},
        {"ts": 11, "offset": 103, "write_length": 6, "fragment_index": 1, "fragment_count": 2,
         "data": b"def"},
    ],
}


def _ext(i: int, **changes: Any) -> dict[str, Any]:
    extents = [dict(e) for e in WRITE_OK["extents"]]
    extents[i].update(changes)
    return {**WRITE_OK, "extents": extents}


_PHASE = {"marker_id": "m-1", "name": "nightly", "step": "QUIESCE", "interceptor_id": "",
          "ts": 0, "emitter": "a", "timeout_ms": 2000, "members": ["a", "b"], "error": "",
          "sent_us": 7, "snapshot": True, "volumes": []}

IMPOSSIBLE: list[tuple[type[Record], dict[str, Any]]] = [
    (Write, {**WRITE_OK, "extents": []}),
    (Write, {**WRITE_OK, "volume_id": ""}),
    (Write, {**WRITE_OK, "epoch": -1}),
    (Write, _ext(0, offset=-1)),
    (Write, _ext(0, ts=-5)),
    (Write, _ext(0, fragment_index=1)),          # index >= count
    (Write, _ext(0, fragment_count=0)),
    (Write, _ext(0, write_length=3)),            # data longer than the write
    (Write, _ext(0, write_length=8)),            # whole write, bytes missing
    (Write, _ext(0, data=b"")),
    (Write, _ext(0, ts=12)),                     # ts goes backwards
    (Write, _ext(2, offset=104)),                # fragment not contiguous
    (Write, _ext(2, fragment_index=0)),          # fragment repeated
    (Write, _ext(1, ts=10)),                     # second write shares first's ts
    (Write, _ext(1, fragment_index=1)),          # a write starts mid-record at fragment 1
    (Write, _ext(2, ts=12, fragment_index=1)),   # fragment split from its write
    (Write, _ext(0, offset=2**63 - 2)),          # offset + length overflows
    # a write cut off by the next one inside the record
    (Write, {**WRITE_OK, "extents": [*WRITE_OK["extents"][:2],
                                       {**WRITE_OK["extents"][0], "ts": 20}]}),
    (Zero, {"volume_id": "v", "interceptor_id": "i", "epoch": 0, "ts": 1, "offset": 0,
              "length": 0, "kind": "ZERO"}),
    (Zero, {"volume_id": "v", "interceptor_id": "i", "epoch": 0, "ts": 1, "offset": -4,
              "length": 4, "kind": "TRIM"}),
    (Marker, {"name": "", "ts": 1, "interceptor_id": "i", "epoch": 0, "created_us": 1}),
    (Snapshot, {"name": "s", "ts": 1, "volume_ids": ["a", "a"], "interceptor_id": "i",
                  "epoch": 0}),
    (VolumeChange, {"op": "CREATE", "volume_id": "v", "name": "n", "size": -1,
                      "metadata": {}, "ts": 1, "interceptor_id": "i", "epoch": 0}),
    (Progress, {"interceptor_id": "i", "epoch": -2, "kind": "JOIN", "s": 0,
                  "partition_offsets": [], "wall_us": 0}),
    (Progress, {"interceptor_id": "i", "epoch": 0, "kind": "PROGRESS", "s": 0,
                  "partition_offsets": [{"partition": 1, "offset": 0},
                                        {"partition": 1, "offset": 5}], "wall_us": 0}),
    (Watermark, {"cg": "c", "w": 0, "log_offsets": [{"partition": -1, "offset": 0}],
                   "progress_offset": 0, "max_s": 0, "members": [], "published_us": 0}),
    (Watermark, {"cg": "c", "w": 0, "log_offsets": [], "progress_offset": 0, "max_s": 0,
                   "members": [{"interceptor_id": "a", "epoch": 0, "s": 0, "effective_s": 0,
                                "last_progress_offset": 0}] * 2, "published_us": 0}),
    (Checkpoint, {"site": "s", "cg": "c", "w": -1, "log_offsets": [], "volumes": [],
                    "written_us": 0}),
    (CgRoles, {"cg": "c", "generation": 1, "primary_site": "dr", "base_w": 5,
                 "base_offsets": [], "history": [], "updated_us": 0}),  # no transition made it
    (CgRoles, {"cg": "c", "generation": 0, "primary_site": "a", "base_w": 5,
                 "base_offsets": [], "history": [], "updated_us": 0}),  # gen 0 has no cut
    (CgRoles, {"cg": "c", "generation": 1, "primary_site": "a", "base_w": 5,
                 "base_offsets": [], "updated_us": 0, "history": [
                     {"generation": 1, "kind": "FAILOVER", "from_site": "a", "to_site": "a",
                      "w": 5, "forced": False, "at_us": 0}]}),  # to itself
    (DrainRequest, {"cg": "c", "generation": -1, "to_site": "dr", "requested_us": 0}),
    (DrainRequest, {"cg": "c", "generation": 0, "to_site": "", "requested_us": 0}),
    (VolumeEntry, {**_VOLUME, "size": 1000}),  # not whole sectors
    (VolumeEntry, {**_VOLUME, "size": 0}),  # an existing volume of no size
    (VolumeEntry, {**_VOLUME, "mode": "fast"}),
    (VolumeEntry, {**_VOLUME, "access": {"p": "open"}}),
    (VolumeEntry, {**_VOLUME, "volume_id": ""}),
    (SiteEntry, {**_SITE, "kind": "primary-ish"}),
    (SiteEntry, {**_SITE, "site": ""}),
    (MarkerPhase, {**_PHASE, "interceptor_id": "a"}),  # a coordinator's step from a member
    (MarkerPhase, {**_PHASE, "members": ["a", "a"]}),
    (MarkerPhase, {**_PHASE, "timeout_ms": 0}),
    (MarkerPhase, {**_PHASE, "emitter": "c"}),  # an emitter that is not a member
    (MarkerPhase, {**_PHASE, "step": "RESUMED"}),  # a member's step without its id
    (MarkerPhase, {**_PHASE, "volumes": ["v1", "v1"]}),
    (MarkerPhase, {**_PHASE, "volumes": [""]}),
    (Checkpoint, {"site": "s", "cg": "c", "w": 1, "log_offsets": [], "volumes": [],
                    "written_us": 0, "snapshots": [{"name": "a", "ts": 1, "size": 0}] * 2}),
    (Checkpoint, {"site": "s", "cg": "c", "w": 1, "log_offsets": [], "volumes": [],
                    "written_us": 0, "snapshots": [{"name": "a", "ts": -1, "size": 0}]}),
]


SAMPLES: list[tuple[type[Record], dict[str, Any]]] = [
    (Write, WRITE_OK),
    (Write, {"volume_id": "vol-ü", "interceptor_id": "host-a", "epoch": 2**33, "extents": [
        {"ts": 2**62 + 1, "offset": 4096 * 7, "write_length": 8192, "fragment_index": 1,
         "fragment_count": 2, "data": bytes(range(256)) * 16}]}),
    (Zero, {"volume_id": "v1", "interceptor_id": "i", "epoch": 3, "ts": 2**50, "offset": 512,
              "length": 1 << 20, "kind": "TRIM"}),
    (Marker, {"name": "before-upgrade", "ts": 2**55, "interceptor_id": "i", "epoch": 0,
                "created_us": 1_700_000_000_000_000}),
    (Snapshot, {"name": "nightly", "ts": 99, "volume_ids": ["a", "b", "c"],
                  "interceptor_id": "i", "epoch": 1}),
    (VolumeChange, {"op": "RESIZE", "volume_id": "v1", "name": "db", "size": 1 << 34,
                      "metadata": {"label": "x", "owner": "ops"}, "ts": 5,
                      "interceptor_id": "i", "epoch": 4}),
    (Progress, {"interceptor_id": "host-a", "epoch": 17, "kind": "PROGRESS", "s": 2**60,
                  "partition_offsets": [{"partition": 0, "offset": 12},
                                        {"partition": 3, "offset": 2**40}],
                  "wall_us": 1_700_000_000_000_000, "async_volumes": ["db", "logs"],
                  "resynced_volumes": ["db"]}),
    (Watermark, {"cg": "cg1", "w": 2**58, "log_offsets": [{"partition": 1, "offset": 9}],
                   "progress_offset": 1234, "max_s": 2**59,
                   "members": [{"interceptor_id": "a", "epoch": 3, "s": 10, "effective_s": 9,
                                "last_progress_offset": 1200, "async_volumes": ["db"]},
                               {"interceptor_id": "b", "epoch": 4, "s": 11, "effective_s": 11,
                                "last_progress_offset": 1234, "async_volumes": []}],
                   "published_us": 1_700_000_000_000_001,
                   "departed": [{"interceptor_id": "c", "epoch": 2, "s": 8}],
                   "holds": [{"interceptor_id": "c", "epoch": 2, "s": 2**58, "volumes": ["x"],
                              "until": -1}],
                   "lost": [{"interceptor_id": "d", "epoch": 1, "s": 7, "volumes": ["y"],
                             "declared_us": 1}]}),
    (Checkpoint, {"site": "dr", "cg": "cg1", "w": 2**58, "log_offsets": [],
                    "volumes": [{"volume_id": "v1", "size": 1 << 30, "digest": "blake2b:00ff"}],
                    "written_us": 7, "generation": 1,
                    "snapshots": [{"name": "nightly", "ts": 2**57, "size": 1 << 30}]}),
    (CgRoles, {"cg": "cg1", "generation": 2, "primary_site": "main", "base_w": 2**58,
                 "base_offsets": [{"partition": 0, "offset": 40}],
                 "history": [{"generation": 1, "kind": "FAILOVER", "from_site": "main",
                              "to_site": "dr", "w": 2**57, "forced": True, "at_us": 5},
                             {"generation": 2, "kind": "SWITCHOVER", "from_site": "dr",
                              "to_site": "main", "w": 2**58, "forced": False, "at_us": 9}],
                 "updated_us": 9}),
    (DrainRequest, {"cg": "cg1", "generation": 3, "to_site": "dr", "requested_us": 11}),
    (MarkerPhase, _PHASE),
    (VolumeEntry, _VOLUME),
    (SiteEntry, _SITE),
]


def test_samples_cover_every_type() -> None:
    assert {rtype for rtype, _ in SAMPLES} == set(RECORDS)
    for rtype, record in SAMPLES:
        assert codec.decode(codec.encode(rtype.from_avro(record))).to_avro() == record


def test_write_ok_is_valid() -> None:
    assert codec.decode(codec.encode(Write.from_avro(WRITE_OK))).to_avro() == WRITE_OK


@pytest.mark.parametrize(("rtype", "record"), IMPOSSIBLE)
def test_impossible_values_refused_at_both_ends(
    rtype: type[Record], record: dict[str, Any]
) -> None:
    # (a repeated partition cannot even be built: the typed record holds a dict)
    with pytest.raises(CorruptRecordError):
        codec.encode(rtype.from_avro(record))
    # Smuggled past the encoder with a valid crc, the decoder still refuses it.
    with pytest.raises(CorruptRecordError):
        codec.decode(_encode_unchecked(rtype, record))


def test_a_record_missing_a_field_cannot_be_built() -> None:
    with pytest.raises(TypeError):
        Write("v", "i", (WriteExtent(10, 0, 4, 0, 1, b"abcd"),))  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "record",
    [
        {**WRITE_OK, "epoch": "1"},                            # wrong type
        _ext(0, data="abcd"),                                  # str, not bytes
        {**WRITE_OK, "epoch": 2**64},                          # does not fit a long
    ],
)
def test_encode_refuses_malformed(record: dict[str, Any]) -> None:
    with pytest.raises(CorruptRecordError):
        codec.encode(Write.from_avro(record))


@dataclasses.dataclass(frozen=True, slots=True)
class Nope(Record):
    """A record class nobody registered."""

    TYPE = "Nope"
    SCHEMA = "nope"
    x: int = 0


def test_unknown_and_unexpected_types() -> None:
    with pytest.raises(UnknownSchemaError):
        codec.encode(Nope())
    with pytest.raises(UnknownSchemaError):
        codec.fingerprint(Nope)
    with pytest.raises(UnknownSchemaError):
        codec.headers_for(Nope())
    payload = codec.encode(Write.from_avro(WRITE_OK))
    assert type(codec.decode(payload, expected=(Zero, Write))) is Write
    with pytest.raises(UnknownSchemaError):
        codec.decode(payload, expected=Zero)
    with pytest.raises(UnknownSchemaError):
        codec.decode(payload, expected=Nope)  # a registered class, not any Record
    with pytest.raises(UnknownSchemaError):
        codec.decode(payload, expected=(Zero, Marker))
    with pytest.raises(UnknownSchemaError):
        codec.class_of(b"{json}")
    with pytest.raises(TruncatedRecordError):
        codec.class_of(payload[:9])


def test_bad_enum_index_is_corrupt() -> None:
    record = {"volume_id": "v", "interceptor_id": "i", "epoch": 0, "ts": 1, "offset": 0,
              "length": 1, "kind": "TRIM"}
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, codec.schema_of(Zero), {**record, "crc32c": 0})
    header = b"\xc3\x01" + codec.fingerprint(Zero).to_bytes(8, "little")
    # kind is the field before crc32c: TRIM is index 1 (varint 02); make it index 7 (0e).
    fields = buf.getvalue()[:-1]
    assert fields[-1:] == b"\x02"
    body = header + fields[:-1] + b"\x0e"
    with pytest.raises(CorruptRecordError):
        codec.decode(body + _zigzag_varint(crc32c(body)))


# ---------------------------------------------------------------- mutations


def _samples() -> list[tuple[type[Record], bytes]]:
    return [(rtype, codec.encode(rtype.from_avro(record))) for rtype, record in SAMPLES]


def _mutate(rng: random.Random, payload: bytes, fps: list[bytes]) -> tuple[str, bytes]:
    b = bytearray(payload)
    kind = rng.choice(["flip", "flip", "replace", "truncate", "append", "swap_fp",
                       "garbage", "insert", "delete", "body_garbage"])
    if kind == "flip":
        i = rng.randrange(len(b) * 8)
        b[i // 8] ^= 1 << (i % 8)
    elif kind == "replace":
        b[rng.randrange(len(b))] = rng.randrange(256)
    elif kind == "truncate":
        del b[rng.randrange(len(b)):]
    elif kind == "append":
        b += rng.randbytes(rng.randint(1, 8))
    elif kind == "swap_fp":
        b[2:10] = rng.choice(fps)
    elif kind == "garbage":
        b = bytearray(rng.randbytes(rng.randint(0, 64)))
    elif kind == "insert":
        b.insert(rng.randrange(len(b) + 1), rng.randrange(256))
    elif kind == "delete":
        del b[rng.randrange(len(b))]
    else:  # a valid header in front of random bytes
        b[10:] = rng.randbytes(rng.randint(0, 64))
    return kind, bytes(b)


def _run_mutations(n: int, seed: int) -> Counter[str]:
    rng = random.Random(seed)
    samples = _samples()
    fps = [codec.fingerprint(t).to_bytes(8, "little") for t in RECORDS]
    outcomes: Counter[str] = Counter()
    for _ in range(n):
        rtype, payload = rng.choice(samples)
        kind, mutated = _mutate(rng, payload, fps)
        try:
            decoded = codec.decode(mutated)
        except RecordError as exc:
            assert type(exc) in (UnknownSchemaError, TruncatedRecordError,
                                 ChecksumMismatchError, CorruptRecordError), exc
            outcomes[type(exc).__name__] += 1
            continue
        # Anything that decodes must be the original, byte for byte (a no-op mutation).
        assert mutated == payload, f"{kind} mutation decoded as {decoded}"
        assert type(decoded) is rtype
        outcomes["no-op"] += 1
    return outcomes


def test_every_truncation_is_refused() -> None:
    for rtype, payload in _samples():
        for cut in range(len(payload)):
            with pytest.raises((TruncatedRecordError, UnknownSchemaError,
                                CorruptRecordError, ChecksumMismatchError)):
                codec.decode(payload[:cut])
        # Past the magic, a cut is reported as truncation or a failing crc, never accepted.
        with pytest.raises(TruncatedRecordError):
            codec.decode(payload[:9])
        with pytest.raises(TruncatedRecordError):
            codec.decode(payload + b"\x00")
        assert type(codec.decode(payload)) is rtype


def test_seeded_mutations_never_decode_wrong() -> None:
    outcomes = _run_mutations(6000, seed=20240501)
    print("mutation outcomes:", dict(outcomes))
    for name in ("UnknownSchemaError", "TruncatedRecordError", "ChecksumMismatchError",
                 "CorruptRecordError"):
        assert outcomes[name] > 0, (name, outcomes)


def test_every_single_bit_flip_is_refused() -> None:
    # crc32c catches every 1-bit error, wherever it lands: ts, offset, a length prefix.
    payload = codec.encode(Write.from_avro(WRITE_OK))
    for i in range(len(payload) * 8):
        b = bytearray(payload)
        b[i // 8] ^= 1 << (i % 8)
        with pytest.raises(RecordError):
            codec.decode(bytes(b))


@pytest.mark.torture
def test_mutations_torture() -> None:  # deselected unless -m names torture (conftest.py)
    outcomes = _run_mutations(300_000, seed=int(time.time()))
    print("mutation outcomes:", dict(outcomes))


# ---------------------------------------------------------------- headers, timing


def test_headers() -> None:
    headers = dict(codec.headers_for(Write.from_avro(WRITE_OK)))
    assert headers["type"] == b"Write"
    assert parse_ts(headers["ts"].decode()) == 11
    assert headers["volume"] == b"v"
    assert headers["interceptor"] == b"i"
    assert headers["epoch"] == b"1"
    wm = dict(codec.headers_for(Watermark.from_avro(dict(SAMPLES)[Watermark])))
    assert set(wm) == {"type", "ts"}
    assert parse_ts(wm["ts"].decode()) == 2**58
    snap = Snapshot("s", 77, ("a",), "i", 0)
    assert set(dict(codec.headers_for(snap))) == {"type", "ts", "interceptor", "epoch"}
