"""Named snapshots at the primary, two interceptors on a real broker.

Tries to break: a primary copy that is not the image at the snapshot's ts while writes
race the copy; a copy left behind by a snapshot that failed (a hook, a member that cannot
copy, a name in use at one member); a copy sealed although the emitter never confirmed
the Snapshot record (a snapshot no backup would take); a resize under a copy.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from pipeline.errors import SnapshotError, VolumeError
from pipeline.ops import snapshot as sn
from pipeline.ops.marker import MarkerError, MarkerOptions
from pipeline.snapshot_store import SnapshotStore
from tests.primary import test_markers
from tests.replication_helpers import read_log, wait_until
from tests.system.marker_scene import SIZES, check_pairs, replay_states

pytestmark = pytest.mark.kafka

two = test_markers.two  # the fixture: interceptors a (volume A) and b (volume B), a watermark


def _opts(name: str, **kw) -> MarkerOptions:
    return MarkerOptions(name, timeout_s=5.0, copy_timeout_s=30.0, **kw)


def _partials(tmp: Path) -> list[str]:
    return [p.name for d in ("a", "b") if (tmp / d / "named").is_dir()
            for p in (tmp / d / "named").iterdir() if p.name.startswith(".")]  # fmt: skip


def test_copies_under_racing_writes_are_the_images_at_the_snapshot_ts(
    two, kafka_conf, tmp_path
):
    for cg in (two.a, two.b):  # a slow copy: every write meets chunks not yet copied
        object.__setattr__(cg.interceptor.config, "snapshot_copy_rate", 256 << 10)
    t = threading.Thread(target=two.workload, daemon=True)
    t.start()
    try:
        results = [sn.create(kafka_conf, two.cg, _opts(f"s{i}")) for i in range(5)]
    finally:
        two.stop.set()
        t.join(10)
    assert not two.errors, two.errors
    for r in results:
        assert r.volumes == ("A", "B") and r.copied == {"a": "", "b": ""}, r
    assert sum(cg.snapshots.stats["snapshots_sealed"] for cg in (two.a, two.b)) == 10
    two.a.flush()
    two.b.flush()
    log = read_log(kafka_conf, two.cg)
    states = {ts: {v: bytes(b) for v, b in im.items()}
              for ts, im in replay_states(log, sorted(r.ts for r in results))}  # fmt: skip
    for r in results:
        want = states[r.ts]
        check_pairs({v: bytearray(b) for v, b in want.items()})
        for vid, d in (("A", "a"), ("B", "b")):
            snap = SnapshotStore(tmp_path / d).get(r.name)
            assert snap is not None and snap.ts == r.ts and snap.taken_at == "primary"
            assert snap.dir.image_path(vid).read_bytes() == want[vid], (r.name, vid)
            assert sn.verify(snap) == {vid: ""}
    assert _partials(tmp_path) == []


def test_a_failed_snapshot_leaves_no_copy_and_writes_flow(two, kafka_conf, tmp_path):
    with pytest.raises(MarkerError, match="pre-hook"):
        sn.create(kafka_conf, two.cg, _opts("hooked", pre_hook="exit 3"))
    # a name held at one member: that member cannot copy, the snapshot aborts everywhere
    SnapshotStore(tmp_path / "b").begin("taken")
    SnapshotStore(tmp_path / "b").commit("taken", 1, cg=two.cg, taken_at="primary", site="b",
                                         created_us=0, catalog=[], digests={})  # fmt: skip
    with pytest.raises(MarkerError, match="exists here already"):
        sn.create(kafka_conf, two.cg, _opts("taken"), check_name=False)
    wait_until(lambda: not two.a.snapshots.copying(), 10, "a's copy cancelled")
    # the cancelled copier removes its partial after it stops copying: wait for that too
    wait_until(lambda: _partials(tmp_path) == [], 10, "the partial copy removed")
    assert SnapshotStore(tmp_path / "a").get("taken") is None
    # the marker thread cancels the copies, then releases its hold: wait for the release
    # too (CI saw the hold a moment after the cancel), bounded well below the marker timeout
    wait_until(lambda: not two.a.gate.held and not two.b.gate.held, 2, "the holds released")
    two.vol_a.write(0, b"x" * 512)  # writes flow
    with pytest.raises(SnapshotError, match="invalid"):
        sn.create(kafka_conf, two.cg, _opts("../escape"))
    log = read_log(kafka_conf, two.cg)
    assert not [r for t, r, _p, _o in log if t == "Snapshot"]


def test_a_copy_is_sealed_only_once_the_emitter_confirmed_the_record(two, kafka_conf):
    """The emitter (a) cannot queue its Snapshot record: b's copy must not be sealed."""
    orig = two.a.interceptor.append_record

    def refuse(token, record):
        if type(record).__name__ == "Snapshot":
            raise VolumeError("injected: the outbox refuses the record")
        return orig(token, record)

    two.a.interceptor.append_record = refuse  # type: ignore[method-assign]
    with pytest.raises(MarkerError, match="emitter"):
        sn.create(kafka_conf, two.cg, _opts("orphan"))
    wait_until(lambda: not two.b.snapshots.copying(), 30, "b's copy decided")
    assert SnapshotStore(two.b.data_dir).get("orphan") is None
    assert SnapshotStore(two.a.data_dir).get("orphan") is None
    two.a.interceptor.append_record = orig  # type: ignore[method-assign]
    ok = sn.create(kafka_conf, two.cg, _opts("after"))
    assert ok.copied == {"a": "", "b": ""}


def test_a_volume_under_a_copy_cannot_be_resized(two):
    two.a.snapshots.begin("m1", "held-open")
    try:
        with pytest.raises(VolumeError, match="being copied"):
            two.a.resize_volume("A", SIZES["A"] * 2)
    finally:
        two.a.snapshots.cancel("m1")
    two.a.resize_volume("A", SIZES["A"] * 2)
