"""Raw writers of a generation's log and watermarks, and the oracle, for the tests of a
backup following generations.

The interceptor is being made generation-aware elsewhere, so these tests write each
generation's records themselves: a transactional producer on ``CgTopics(cg, g).log``
(the interceptor's transactional id of that generation) with records encoded by
``schemas.codec``, and W records on ``CgTopics(cg, g).watermark``. ``Oracle`` keeps what
a site must hold: generation g's writes with ts <= base_w that were in the log before the
cut was chosen, then generation g + 1's writes with ts <= its W.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from connectors.kafka.reading import end_offsets
from connectors.kafka.topics import ensure_topics
from pipeline.site import SiteDir
from pipeline.topology.roles import initial_roles, plan_failover
from pipeline.topology.store import RolesStore
from schemas import codec
from schemas.records import (
    CgRoles,
    Record,
    VolumeChange,
    VolumeOp,
    Watermark,
    WatermarkMember,
    Write,
    WriteExtent,
)

SIZE = 64 << 10
#: volume -> the log partition its records go to
PARTITION = {"v1": 0, "v2": 1, "v3": 2}
IID = "i1"


@dataclass
class GenLog:
    """One generation's writer: what the primary of that generation does, by hand."""

    conf: dict[str, Any]
    cg: str
    generation: int
    epoch: int = 0
    #: volume -> [(ts, offset, data)] written, in ts order
    writes: dict[str, list[tuple[int, int, bytes]]] = field(default_factory=dict)
    last_ts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.topics = ensure_topics(self.conf, self.cg, generation=self.generation)
        self.producer = Producer(
            {**self.conf, "transactional.id": self.topics.transactional_id(IID)}
        )
        self.producer.init_transactions(30)

    def commit(self, records: list[Record]) -> None:
        """One transaction of records (each to its volume's partition)."""
        self.producer.begin_transaction()
        for rec in records:
            vid = rec.volume_id  # type: ignore[attr-defined]
            self.producer.produce(
                self.topics.log,
                codec.encode(rec),
                key=vid,
                partition=PARTITION[vid],
                headers=codec.headers_for(rec),
            )
        self.producer.commit_transaction(30)

    def create(self, vid: str, ts: int) -> None:
        self.commit([VolumeChange(VolumeOp.CREATE, vid, vid, SIZE, {}, ts, IID, self.epoch)])
        self.last_ts[vid] = ts

    def write(self, vid: str, ts: int, offset: int, data: bytes, *, record: bool = True) -> Write:
        """A one-extent write; ``record=False``: not the primary's (the oracle skips it)."""
        rec = Write(vid, IID, self.epoch, (WriteExtent(ts, offset, len(data), 0, 1, data),))
        if record:
            self.writes.setdefault(vid, []).append((ts, offset, data))
            self.last_ts[vid] = ts
        return rec

    def random_writes(self, rng: random.Random, ts_from: int, n: int, per_txn: int = 3) -> int:
        """``n`` writes over v1/v2 with ts from ``ts_from`` up; returns the last ts."""
        ts = ts_from
        batch: list[Record] = []
        for _ in range(n):
            vid = rng.choice(["v1", "v2"])
            off = rng.randrange(0, SIZE - 4096, 512)
            batch.append(self.write(vid, ts, off, rng.randbytes(rng.choice([512, 1024, 4096]))))
            ts += rng.randint(1, 3)
            if len(batch) >= per_txn:
                self.commit(batch)
                batch = []
        if batch:
            self.commit(batch)
        return ts - 1

    def ends(self) -> dict[int, int]:
        return end_offsets(self.conf, self.topics.log)

    def publish_w(self, w: int) -> Watermark:
        """A W of this generation at the log's committed end now."""
        wm = Watermark(
            self.cg,
            w,
            self.ends(),
            0,
            w,
            (WatermarkMember(IID, self.epoch, w, w, 0),),
            time.time_ns() // 1000,
        )
        p = Producer(self.conf)
        p.produce(self.topics.watermark, codec.encode(wm), key=self.cg)
        assert p.flush(30) == 0
        return wm

    def close(self) -> None:
        self.producer.flush(10)


def raw_producer(conf: dict[str, Any], cg: str, generation: int) -> GenLog:
    """Another instance with the same transactional id (fences the first): what a restarted
    old primary, or anyone holding its id, can still write into its generation's log."""
    return GenLog(conf, cg, generation)


def oracle(
    writes: list[tuple[dict[str, list[tuple[int, int, bytes]]], int]], vids: list[str]
) -> dict[str, bytes]:
    """Images after each generation's writes with ts <= its bound, in generation order."""
    out = {v: bytearray(SIZE) for v in vids}
    for gen_writes, upto in writes:
        for vid, ws in gen_writes.items():
            for ts, off, data in sorted(ws, key=lambda w: w[0]):
                if ts <= upto:
                    out[vid][off : off + len(data)] = data
    return {v: bytes(b) for v, b in out.items()}


def site_images(site_dir: Path, vids: list[str]) -> dict[str, bytes]:
    sd = SiteDir(site_dir)
    return {v: sd.image_path(v).read_bytes() if sd.image_path(v).exists() else b"" for v in vids}


VIDS = ["v1", "v2", "v3"]


@dataclass
class World:
    """A CG failed over once: what each generation holds, and the bounds."""

    cg: str
    gen0: GenLog
    gen1: GenLog
    base_w: int
    base_offsets: dict[int, int]
    w1: int
    roles: CgRoles

    def expected(self) -> dict[str, bytes]:
        return oracle([(self.gen0.writes, self.base_w), (self.gen1.writes, self.w1)], VIDS)


def old_primary_tail(conf: dict[str, Any], cg: str, base_w: int, rng: random.Random) -> GenLog:
    """The old primary's split-brain tail, written after the cut into generation 0."""
    raw = raw_producer(conf, cg, 0)  # fences generation 0's primary, writes on with its id
    above = [
        raw.write(v, base_w + 5 + i, 512 * i, rng.randbytes(512), record=False)
        for i, v in enumerate(["v1", "v2"])
    ]
    raw.commit(above)
    # ts <= base_w but at offsets >= base_offsets: W promised none would come
    raw.commit(
        [
            raw.write("v1", base_w, 0, b"\xee" * 4096, record=False),
            raw.write("v2", base_w - 1, 4096, b"\xdd" * 512, record=False),
        ]
    )
    garbage = Producer({**conf, "transactional.id": raw.topics.transactional_id("i1")})
    garbage.init_transactions(30)
    garbage.begin_transaction()
    garbage.produce(raw.topics.log, b"\xc3\x01not a record", key="v1", partition=PARTITION["v1"])
    garbage.commit_transaction(30)
    return raw


def build_world(conf: dict[str, Any], cg: str, seed: int, applier_up: Any = None) -> World:
    """Generation 0, the failover at its last W, the tail, generation 1 and its W.

    ``applier_up(world_so_far)``: called at the points where a live applier should catch
    up (after generation 0's first W, and after the roles commit)."""
    rng = random.Random(seed)
    store = RolesStore(conf)
    g0roles = store.commit(cg, None, initial_roles(cg, "main", now_us=1))
    gen0 = GenLog(conf, cg, 0)
    gen0.create("v1", 1)
    gen0.create("v2", 2)
    t = gen0.random_writes(rng, 10, 25)
    gen0.publish_w(t // 2)
    gen0.publish_w(t)
    if applier_up is not None:
        applier_up("w0", t)
    t = gen0.random_writes(rng, t + 1, 25)
    cut = gen0.publish_w(t)  # the failover cut: the latest W of generation 0
    base_w, base_offsets = cut.w, dict(cut.log_offsets)
    if applier_up is not None:
        applier_up("cut", base_w)
    g1roles = store.commit(
        cg, 0, plan_failover(g0roles, cg, "dr-new", base_w, base_offsets, True, 2)
    )
    old_primary_tail(conf, cg, base_w, rng)
    if applier_up is not None:
        applier_up("roles", base_w)
    gen1 = GenLog(conf, cg, 1)
    gen1.create("v3", base_w + 1)
    t1 = gen1.random_writes(rng, base_w + 2, 20)
    gen1.publish_w(t1 - 3)
    gen1.publish_w(t1)
    raw = raw_producer(conf, cg, 0)  # and the old primary still writes, later
    raw.commit([raw.write("v1", base_w + 100, 0, b"\xaa" * 512, record=False)])
    return World(cg, gen0, gen1, base_w, base_offsets, t1, g1roles)
