"""Helpers shared by the replication tests: run the services in threads, rebuild from the log."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from connectors.kafka.topics import CgTopics
from pipeline.applier import Applier, ApplierConfig
from pipeline.watermark_service import WatermarkService, WatermarkServiceConfig
from schemas import codec


class ServiceThread:
    """Runs a service's ``step`` in a thread; ``stop`` joins it and reports its failure."""

    def __init__(self, service: Any, name: str) -> None:
        self.service = service
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            self.service.run(self.stop_event)
        except BaseException as exc:
            self.error = exc

    def start(self) -> ServiceThread:
        self.service.start()
        self.thread.start()
        return self

    def stop(self, close: bool = True) -> None:
        self.stop_event.set()
        self.thread.join(30)
        if close:
            self.service.close()


@contextlib.contextmanager
def running_backup(
    kafka_conf: dict[str, Any], cg: str, site_dir: Path, site: str = "backup", **applier_opts: Any
) -> Iterator[tuple[ServiceThread, ServiceThread]]:
    wm = ServiceThread(
        WatermarkService(WatermarkServiceConfig(cg=cg, liveness_timeout_s=30), kafka_conf),
        "watermark",
    ).start()
    ap = ServiceThread(
        Applier(ApplierConfig(cg=cg, site=site, data_dir=site_dir, **applier_opts), kafka_conf),
        "applier",
    ).start()
    try:
        yield wm, ap
    finally:
        ap.stop()
        wm.stop()


def wait_until(pred: Any, timeout_s: float, what: str, interval_s: float = 0.02) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def read_log(
    kafka_conf: dict[str, Any], cg: str, partitions: int = 4
) -> list[tuple[str, dict[str, Any], int, int]]:
    """Every committed log record as (type, record, partition, offset)."""
    topic = CgTopics(cg).log
    c = Consumer(
        {
            **kafka_conf,
            "group.id": f"reader-{time.time_ns()}",
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "enable.auto.commit": False,
        }
    )
    c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    ends = {}
    for p in range(partitions):
        ends[p] = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)[1]
    done: set[int] = {p for p, e in ends.items() if e == 0}
    out = []
    deadline = time.monotonic() + 60
    while len(done) < partitions and time.monotonic() < deadline:
        for msg in c.consume(1000, 0.2):
            if msg.error():
                if msg.error().code() == -191:
                    done.add(msg.partition())
                continue
            dec = codec.decode(msg.value())
            out.append((dec.type, dec.record, msg.partition(), msg.offset()))
    c.close()
    return out


def rebuild_from_log(
    records: list[tuple[str, dict[str, Any], int, int]],
    sizes: dict[str, int],
    upto_ts: int | None = None,
) -> dict[str, bytearray]:
    """Reference images: every write / zero with ts <= upto_ts applied in ts order."""
    ops = []
    frags: dict[tuple[str, int], dict[int, dict[str, Any]]] = {}
    for rtype, rec, _p, _o in records:
        if rtype == "Write":
            for ext in rec["extents"]:
                key = (rec["volume_id"], ext["ts"])
                frags.setdefault(key, {})[ext["fragment_index"]] = ext
                if len(frags[key]) == ext["fragment_count"]:
                    parts = [frags[key][i] for i in range(ext["fragment_count"])]
                    data = b"".join(x["data"] for x in parts)
                    ops.append((ext["ts"], rec["volume_id"], parts[0]["offset"], data))
        elif rtype == "Zero":
            ops.append((rec["ts"], rec["volume_id"], rec["offset"], bytes(rec["length"])))
    ops.sort(key=lambda o: o[0])
    images = {v: bytearray(n) for v, n in sizes.items()}
    for ts, vid, off, data in ops:
        if upto_ts is not None and ts > upto_ts:
            continue
        images[vid][off : off + len(data)] = data
    return images
