"""Invariant 5 under attack: bad records among valid ones, on a real broker.

Tries to break: a valid record fetched in the same batch right after a bad one being applied
(the applier paused while they land, as with SIGSTOP, or running while they land); a
partition-EOF event or the position bookkeeping moving a checkpoint past a bad record; a
restart without ``--skip`` passing a bad record silently; a skip that is not logged; a second
bad record in another partition while the first one blocks. Three kinds of bad record:
random bytes, a valid single-object header (a known fingerprint) over garbage, and a real
Write with one bit flipped.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from connectors.kafka.reading import iter_range
from connectors.kafka.topics import CgTopics
from pipeline.backup.applier import Applier, ApplierConfig
from pipeline.errors import ApplierHaltedError
from pipeline.primary.volume import ConsistencyGroup
from pipeline.site import SiteDir
from pipeline.watermark.service import WatermarkService, WatermarkServiceConfig
from schemas import codec
from schemas.records import Checkpoint, Write
from tests.replication_helpers import FAST, ServiceThread, wait_until

pytestmark = pytest.mark.kafka

SIZE = 1 << 20
SEEDS = int(os.environ.get("LOWMARK_BAD_RECORD_SEEDS", "3"))


@dataclass
class Model:
    """What the primary holds: every write in issue order, and a byte image per volume."""

    sizes: dict[str, int]
    ops: list[tuple[str, int, int, bytes]] = field(default_factory=list)  # (vol, ts, off, data)

    def image_at(self, vid: str, w: int | None) -> bytes:
        img = bytearray(self.sizes[vid])
        for v, ts, off, data in sorted(self.ops, key=lambda o: o[1]):
            if v == vid and (w is None or ts <= w):
                img[off : off + len(data)] = data
        return bytes(img)


@dataclass(frozen=True)
class Bad:
    partition: int
    offset: int
    value: bytes
    first_after_ts: int  # ts of the first write issued after it was durable


def _bad_value(rng: random.Random, good: bytes) -> bytes:
    kind = rng.randrange(3)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 200))
    if kind == 1:  # a header any Avro tool accepts, then garbage
        return codec.MAGIC + codec.fingerprint(Write).to_bytes(8, "little") + rng.randbytes(50)
    flipped = bytearray(good)
    flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
    return bytes(flipped)


def _produce_raw(kafka_conf: dict[str, Any], topic: str, key: str, value: bytes) -> tuple[int, int]:
    """Like kcat -P: a plain producer, the interceptor's partitioner for the same key."""
    where: list[tuple[int, int]] = []
    p = Producer({**kafka_conf, "partitioner": "murmur2_random"})
    def delivered(err: Any, msg: Any) -> None:
        if err is None:
            where.append((msg.partition(), msg.offset()))

    p.produce(topic, value, key.encode(), on_delivery=delivered)
    assert p.flush(15) == 0 and where, "the raw record was not delivered"
    return where[0]


def _partitions(kafka_conf: dict[str, Any], topic: str) -> dict[str, tuple[int, bytes]]:
    """volume -> (its log partition, one of its valid records)."""
    out: dict[str, tuple[int, bytes]] = {}
    for p in range(4):
        for m in iter_range(kafka_conf, topic, p):
            vid = dict(m.headers() or []).get("volume")
            if vid is not None and m.value():
                out.setdefault(vid.decode(), (p, m.value()))
    return out


def _image(site: Path, vid: str) -> bytes:
    path = SiteDir(site).image_path(vid)
    # a volume whose creation is not in the cut yet reads as nothing at all
    data = path.read_bytes() if path.exists() else b""
    return data + bytes(SIZE - len(data))


class Stepper:
    """Steps an applier in a thread until it raises (the halt), like `lowmark apply`."""

    def __init__(self, applier: Applier) -> None:
        self.applier = applier
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                self.applier.step()
        except BaseException as exc:
            self.error = exc

    def join(self, timeout_s: float) -> BaseException | None:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "the applier did not halt"
        return self.error


def _run_to_halt(applier: Applier, timeout_s: float = 30.0) -> ApplierHaltedError | None:
    """Step until the applier halts; None when it has caught up without halting."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            applier.step()
        except ApplierHaltedError as exc:
            return exc
    return None


def _check_cut(applier: Applier, site: Path, model: Model, pending: list[Bad]) -> None:
    """The images are the primary at exactly applied_w, and nothing behind a bad record is
    consumed: not applied, not in the checkpoint's offsets."""
    w = applier.applied_w
    first = min(pending, key=lambda b: b.first_after_ts)
    assert w < first.first_after_ts, (
        f"W {w} applied a write issued after the bad record at "
        f"[{first.partition}]@{first.offset}"
    )
    for vid in model.sizes:
        assert _image(site, vid) == model.image_at(vid, w), f"volume {vid} is not the cut at {w}"
    ckpt_file = site / "checkpoint.avro"
    if ckpt_file.exists():
        offsets = codec.decode(ckpt_file.read_bytes(), Checkpoint).log_offsets
        for bad in pending:
            assert offsets.get(bad.partition, 0) <= bad.offset, (
                f"checkpoint offset {offsets[bad.partition]} of partition {bad.partition} "
                f"is past its bad record at {bad.offset}"
            )


@pytest.mark.parametrize("paused", [True, False], ids=["applier-paused", "applier-running"])
@pytest.mark.parametrize(
    "seed",
    [*range(SEEDS), *(pytest.param(s, marks=pytest.mark.torture) for s in range(SEEDS, 40))],
)
def test_nothing_after_a_bad_record_is_applied_until_it_is_skipped(
    kafka_conf, unique_name, tmp_path, caplog, seed, paused
):
    rng = random.Random(seed * 7919 + paused)
    topics = CgTopics(unique_name)
    site = tmp_path / "backup"
    vids = [f"v{i}" for i in range(4)]
    model = Model({v: SIZE for v in vids})
    wm = ServiceThread(
        WatermarkService(WatermarkServiceConfig(cg=unique_name, liveness_timeout_s=30), kafka_conf),
        "wm",
    )

    def applier(skip: frozenset[tuple[int, int]] = frozenset()) -> Applier:
        a = Applier(ApplierConfig(cg=unique_name, site="b", data_dir=site, skip=skip), kafka_conf)
        a.start()
        return a

    with ConsistencyGroup.open(unique_name, tmp_path / "primary", kafka_conf, **FAST) as cg:
        vols = {v: cg.create_volume(v, SIZE) for v in vids}

        def write(vid: str) -> int:
            length = rng.choice([512, 4096, 65536])
            off = rng.randrange(0, SIZE - length) // 512 * 512
            data = rng.randbytes(length)
            ts = vols[vid].write(off, data)
            model.ops.append((vid, ts, off, data))
            return ts

        for vid in vids:
            write(vid)
        cg.flush()
        where = _partitions(kafka_conf, topics.log)
        assert set(where) == set(vids)
        wm.start()
        first = applier()
        stepper = None if paused else Stepper(first)
        bads: list[Bad] = []
        used: set[int] = set()
        try:
            for round_ in range(6):
                for _ in range(rng.randrange(2, 8)):
                    write(rng.choice(vids))
                cg.flush()
                if round_ in (1, 4) or (round_ == 2 and rng.random() < 0.5):
                    free = [v for v in vids if where[v][0] not in used]
                    if not free:
                        continue
                    vid = rng.choice(free)
                    value = _bad_value(rng, where[vid][1])
                    p, off = _produce_raw(kafka_conf, topics.log, vid, value)
                    assert p == where[vid][0], "the raw producer chose another partition"
                    used.add(p)
                    after = write(vid)  # same partition, right behind the bad record
                    cg.flush()
                    bads.append(Bad(p, off, value, after))
                    # a W published between two bad records: the earliest one must halt
                    wait_until(lambda a=after: wm.service.published_w >= a, 20, "W passes it")
            assert bads
            halt = stepper.join(30) if stepper is not None else _run_to_halt(first)
            assert isinstance(halt, ApplierHaltedError), f"no halt but {halt!r}"
            pending = sorted(bads, key=lambda b: b.first_after_ts)
            assert f"[{pending[0].partition}]@{pending[0].offset}" in str(halt)
            _check_cut(first, site, model, pending)
            first.close(checkpoint=False)

            skipped: set[tuple[int, int]] = set()
            while pending:
                head = pending[0]
                for _restart in range(2):  # without the skip: halts again at the same record
                    a = applier(frozenset(skipped))
                    try:
                        again = _run_to_halt(a)
                        assert again is not None, "a restart without --skip passed a bad record"
                        assert f"[{head.partition}]@{head.offset}" in str(again)
                        _check_cut(a, site, model, pending)
                    finally:
                        a.close(checkpoint=False)
                skipped.add((head.partition, head.offset))
                pending.pop(0)
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="lowmark.applier"):
                a = applier(frozenset(skipped))
                try:
                    last = max(o[1] for o in model.ops)
                    wait_until(
                        lambda: (a.step(), a.applied_w >= last)[1], 30, "the skipped-past cut"
                    )
                    for vid in vids:
                        assert _image(site, vid) == model.image_at(vid, None)
                finally:
                    a.close(checkpoint=False)
            logged = {
                (r.__dict__.get("partition"), r.__dict__.get("offset"))
                for r in caplog.records
                if "skipped by operator" in r.getMessage()
            }
            assert logged == skipped, f"skips logged {logged}, asked {skipped}"
            dead = {m.value() for m in iter_range(kafka_conf, topics.deadletter)}
            assert {b.value for b in bads} <= dead, "a bad record has no dead-letter copy"
        finally:
            wm.stop()
