"""``lowmark tail``: the CG's log records, decoded, one line each, as they are committed.

Reads read_committed (what a backup would apply), never joins a consumer group and never
commits offsets, so it can run beside the services without disturbing them. A record that
does not decode is printed as type ``BAD`` with the decode error: the tail is the tool an
operator reaches for when the applier halted, so it must not halt on the same record.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from crc32c import crc32c

from connectors.kafka.consumer import BEGINNING, END, Consumer
from connectors.kafka.errors import PARTITION_EOF, as_error
from connectors.kafka.settings import ToolSettings
from connectors.kafka.topics import CgTopics
from pipeline.errors import RecordError
from pipeline.ops.restore import log_bounds
from pipeline.topology.store import current_generation
from schemas import codec
from schemas.records import (
    LOG_RECORDS,
    LogRecord,
    Marker,
    Snapshot,
    VolumeChange,
    Write,
    WriteExtent,
    Zero,
    record_class,
)
from schemas.ts import format_ts


@dataclass(frozen=True)
class TailFilter:
    volumes: frozenset[str] = frozenset()  # empty: every volume
    types: frozenset[str] = frozenset()  # lower-case record types, "bad" included
    from_ts: int | None = None
    to_ts: int | None = None

    def matches(self, item: Mapping[str, Any]) -> bool:
        if self.types and item["type"].lower() not in self.types:
            return False
        if self.volumes and item.get("volume_id") not in self.volumes:
            return False
        if item["type"] == "BAD" or (self.from_ts is None and self.to_ts is None):
            return True  # a bad record's ts is not to be trusted: show it to be safe
        tss = item["ts_list"]
        low = self.from_ts if self.from_ts is not None else 0
        high = self.to_ts if self.to_ts is not None else 2**63
        return any(low <= t <= high for t in tss)


def describe(
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    headers: list[tuple[str, bytes]] | None,
    *,
    with_data: bool = False,
) -> dict[str, Any]:
    """Pure: one log message -> a flat dict of everything in it (data as length + crc32c)."""
    # "log_offset", not "offset": Zero records have an "offset" field of their own
    base: dict[str, Any] = {
        "partition": partition,
        "log_offset": offset,
        "key": key.decode(errors="replace") if key is not None else None,
    }
    try:
        rec = codec.decode(value or b"", LOG_RECORDS)
    except RecordError as exc:
        hdr = {k: v.decode(errors="replace") for k, v in (headers or [])}
        return {
            **base,
            "type": "BAD",
            "error": f"{type(exc).__name__}: {exc}",
            "header_type": hdr.get("type"),
            "volume_id": hdr.get("volume"),
            "bytes": len(value or b""),
            "ts_list": [],
        }
    item: dict[str, Any] = {**base, "type": rec.TYPE, "bytes": len(value or b"")}
    for k, v in rec.to_avro().items():
        if k != "extents":
            item[k] = v
    item["ts_list"] = rec.timestamps()
    if isinstance(rec, Write):
        item["extents"] = [_extent(x, with_data) for x in rec.extents]
        item["ts"] = item["ts_list"][0]
        item["data_bytes"] = sum(len(x.data) for x in rec.extents)
    return item


def _extent(x: WriteExtent, with_data: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "ts": x.ts,
        "offset": x.offset,
        "write_length": x.write_length,
        "fragment_index": x.fragment_index,
        "fragment_count": x.fragment_count,
        "data_len": len(x.data),
        "data_crc32c": crc32c(x.data),
    }
    if with_data:
        out["data_hex"] = bytes(x.data).hex()
    return out


def _write_detail(item: Mapping[str, Any]) -> str:
    ext = item["extents"]
    first = ext[0]
    span = f"off={first['offset']} len={sum(x['data_len'] for x in ext)}"
    frag = ""
    if any(x["fragment_count"] > 1 for x in ext):
        frag = f" frag={first['fragment_index'] + 1}/{first['fragment_count']}"
    return f"{span} ext={len(ext)}{frag} data={item['data_bytes']}B"


#: the detail column of ``render_line``, per record class (a new log record adds its line)
_DETAIL: dict[type[LogRecord], Callable[[Mapping[str, Any]], str]] = {
    Write: _write_detail,
    Zero: lambda i: f"off={i['offset']} len={i['length']} {i['kind']}",
    VolumeChange: lambda i: f"{i['op']} name={i['name']} size={i['size']}",
    Marker: lambda i: f"name={i['name']}",
    Snapshot: lambda i: f"name={i['name']} volumes={','.join(i['volume_ids'])}",
}


def render_line(item: Mapping[str, Any]) -> str:
    where = f"p{item['partition']}@{item['log_offset']}"
    kind = item["type"]
    if kind == "BAD":
        return (
            f"{'-':<32} BAD          {item.get('volume_id') or '-':<16} {item['bytes']}B "
            f"{where}  error: {item['error']}"
        )
    when = format_ts(item["ts"])
    who = f"{item['interceptor_id']}/e{item['epoch']}"
    vol = item.get("volume_id") or "-"
    cls = record_class(kind)
    detail = _DETAIL[cls](item) if cls in _DETAIL else ""
    return f"{when:<32} {kind:<12} {vol:<16} {detail}  {who}  {where}"


def render_json(item: Mapping[str, Any]) -> str:
    out = {k: v for k, v in item.items() if k != "ts_list"}
    if out.get("type") != "BAD":
        out["time"] = format_ts(out["ts"])
    return orjson.dumps(out).decode()


def tail(
    kafka_conf: Mapping[str, Any],
    cg: str,
    out: Callable[[str], None],
    *,
    follow: bool = True,
    from_end: bool = False,
    filt: TailFilter | None = None,
    as_json: bool = False,
    with_data: bool = False,
    stop: threading.Event | None = None,
    generation: int | None = None,
) -> int:
    """Print the log's records until ``stop`` (or, without ``follow``, the end as of now);
    of ``generation``'s log, by default the current generation's.

    Returns how many records were printed.
    """
    filt = filt or TailFilter()
    if generation is None:
        generation = current_generation(kafka_conf, cg)
    topic = CgTopics(cg, generation).log
    bounds = log_bounds(kafka_conf, cg, generation)
    # without follow: stop at the end as of now (records committed later are not shown)
    ends = {p: hi for p, (_lo, hi) in bounds.items()}
    todo = set(p for p, (lo, hi) in bounds.items() if follow or (hi > lo and not from_end))
    c = Consumer(ToolSettings(kafka_conf).log_reader(auto_offset_reset="earliest"))
    start = END if from_end else BEGINNING
    printed = 0
    try:
        c.assign(topic, {p: start for p in bounds})
        while todo and not (stop is not None and stop.is_set()):
            for msg in c.consume(500, 0.2):
                p = msg.partition()
                err = msg.error()
                if err is not None:
                    if err.code() == PARTITION_EOF:
                        if not follow and msg.offset() >= ends[p]:
                            todo.discard(p)
                        continue
                    exc = as_error(err, f"reading {topic}[{p}]")
                    if exc.retriable:
                        continue
                    raise exc
                if not follow and msg.offset() >= ends[p]:
                    todo.discard(p)
                    continue
                item = describe(
                    p, msg.offset(), msg.key(), msg.value(), msg.headers(), with_data=with_data
                )
                if filt.matches(item):
                    out(render_json(item) if as_json else render_line(item))
                    printed += 1
                if not follow and msg.offset() + 1 >= ends[p]:
                    todo.discard(p)
    finally:
        c.close()
    return printed
