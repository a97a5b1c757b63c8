"""Try to break the codec's hand-written Write path (the interceptor's and appliers' hot path).

Writes skip fastavro both ways: the encoder must produce fastavro's bytes exactly, and the
reader must read what fastavro reads, including array blocks another writer may use.
"""

from __future__ import annotations

import io
import random
import time
from typing import Any

import fastavro
from crc32c import crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import codec
from schemas.records import Write, WriteExtent
from tests.schemas.test_codec import AVRO_STRATEGIES, _zigzag_varint


def test_micro_timing() -> None:
    for n_extents in (1, 16):
        size = 4096 // n_extents
        record = Write(
            "vol-0001",
            "host-a",
            3,
            tuple(
                WriteExtent(
                    (1_700_000_000_000_000 << 12) + i, i * 8192, size, 0, 1, random.randbytes(size)
                )
                for i in range(n_extents)
            ),
        )
        rounds = 2000
        t0 = time.perf_counter()
        for _ in range(rounds):
            payload = codec.encode(record)
        t1 = time.perf_counter()
        for _ in range(rounds):
            codec.decode(payload)
        t2 = time.perf_counter()
        print(
            f"\n4 KiB Write, {n_extents:2d} extent(s): encode {(t1 - t0) / rounds * 1e6:.1f} µs,"
            f" decode {(t2 - t1) / rounds * 1e6:.1f} µs, {len(payload)} bytes"
        )
        assert codec.decode(payload) == record


def _fastavro_write(record: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    buf.write(b"\xc3\x01" + codec.fingerprint(Write).to_bytes(8, "little"))
    fastavro.schemaless_writer(buf, codec.schema_of(Write), {**record, "crc32c": 0})
    body = buf.getvalue()[:-1]
    return body + codec._crc_varint(crc32c(body))


@given(AVRO_STRATEGIES[Write])
@settings(max_examples=300, deadline=None)
def test_write_fast_path_is_byte_identical_to_fastavro(record):
    """Write records skip fastavro on the hot path; their bytes must not differ by one."""
    assert codec.encode(Write.from_avro(record)) == _fastavro_write(record)


@given(AVRO_STRATEGIES[Write], st.integers(1, 3))
@settings(max_examples=300, deadline=None)
def test_write_fast_reader_reads_what_fastavro_reads(record, block):
    """The hand-written Write reader against fastavro, on fastavro's own bytes and on
    extents split into array blocks with byte sizes (legal Avro another writer may use)."""
    payload = _fastavro_write(record)
    plain = fastavro.schemaless_reader(io.BytesIO(payload[10:]), codec.schema_of(Write))
    crc = plain.pop("crc32c")
    assert codec._read_write(payload) == (Write.from_avro(plain), crc)
    # the same extents as blocks of `block` items, each with a negative count and a size
    head = _zigzag_varint(len(record["volume_id"].encode())) + record["volume_id"].encode()
    head += _zigzag_varint(len(record["interceptor_id"].encode()))
    head += record["interceptor_id"].encode() + _zigzag_varint(record["epoch"])
    items = []
    for x in record["extents"]:
        items.append(
            b"".join(
                _zigzag_varint(x[k])
                for k in ("ts", "offset", "write_length", "fragment_index", "fragment_count")
            )
            + _zigzag_varint(len(x["data"]))
            + x["data"]
        )
    body = b""
    for i in range(0, len(items), block):
        chunk = b"".join(items[i : i + block])
        body += _zigzag_varint(-len(items[i : i + block])) + _zigzag_varint(len(chunk)) + chunk
    fields = b"\xc3\x01" + codec.fingerprint(Write).to_bytes(8, "little") + head + body + b"\x00"
    blocked = fields + _zigzag_varint(crc32c(fields))
    assert codec.decode(blocked) == Write.from_avro(record)
    assert (
        fastavro.schemaless_reader(io.BytesIO(blocked[10:]), codec.schema_of(Write))["extents"]
        == record["extents"]
    )
