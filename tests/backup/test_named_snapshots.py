"""A site's named snapshots without Kafka: the store, retention, and the applier's part.

Tries to break: a crash mid-copy leaving a partial that is taken for a snapshot; a record
re-applied after a restart making a second (or a later) copy; a reused name replacing
the copy held; a paused site copying images that are not at the snapshot's ts; a
retention rule that keeps different snapshots at different sites or empties the store.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from pipeline.backup.named import Retention, SiteSnapshots
from pipeline.errors import SnapshotError
from pipeline.site import SiteDir
from pipeline.snapshot_store import NamedSnapshot, SnapshotStore, retention_victims
from schemas.records import Snapshot
from schemas.ts import make_ts

NOW_US = 1_800_000_000_000_000


def _site(tmp: Path, data: dict[str, bytes]) -> tuple[SiteDir, dict[str, dict]]:
    site = SiteDir(tmp).create()
    catalog = {}
    for vid, b in data.items():
        site.image_path(vid).write_bytes(b)
        catalog[vid] = {"volume_id": vid, "name": vid, "size": len(b)}
    site.write_catalog(catalog.values())
    return site, catalog


def _snap(name: str, age_s: float) -> NamedSnapshot:
    ts = make_ts(NOW_US - int(age_s * 1e6))
    return NamedSnapshot(name, ts, "cg", "backup", "dr", 0, {}, Path("/nonexistent"))


@pytest.mark.parametrize(
    ("ages", "keep_last", "max_age_s", "doomed"),
    [
        ([30, 20, 10], 0, 0, []),  # no policy: keep all
        ([30, 20, 10], 2, 0, ["s30"]),
        ([30, 20, 10], 1, 0, ["s30", "s20"]),
        ([30, 20, 10], 5, 0, []),
        ([30, 20, 10], 0, 15, ["s30", "s20"]),
        ([30, 20, 10], 0, 5, ["s30", "s20"]),  # the newest is kept even when too old
        ([30, 20, 10], 2, 25, ["s30"]),
        ([30, 20, 10, 1], 3, 15, ["s30", "s20"]),  # both rules, the union
        ([], 1, 1, []),
    ],
)  # fmt: skip
def test_retention_victims(ages, keep_last, max_age_s, doomed):
    snaps = [_snap(f"s{a}", a) for a in ages]
    got = retention_victims(snaps, keep_last=keep_last, max_age_s=max_age_s, now_us=NOW_US)
    assert got == doomed


@pytest.mark.parametrize("seed", range(20))
def test_retention_is_the_same_whatever_order_a_site_lists_them(seed):
    rng = random.Random(seed)
    snaps = [_snap(f"n{i}", rng.uniform(0, 100)) for i in range(rng.randint(1, 12))]
    rule = {"keep_last": rng.randint(0, 5), "max_age_s": rng.choice([0, 30, 60]),
            "now_us": NOW_US}  # fmt: skip
    first = retention_victims(snaps, **rule)
    rng.shuffle(snaps)
    assert retention_victims(snaps, **rule) == first
    assert len(first) < len(snaps)  # never empties the store


def test_a_partial_copy_is_never_a_snapshot_and_is_removed(tmp_path):
    site, catalog = _site(tmp_path, {"v1": b"a" * 4096})
    store = SnapshotStore(site)
    partial = store.begin("s1")
    (partial.image_path("v1")).write_bytes(b"half")
    assert store.entries() == [] and store.get("s1") is None  # a crash here: nothing
    assert store.discard_partials() == ["s1"]
    assert not partial.root.exists()
    snap = store.copy_images("s1", 5, site, catalog.values(), lambda p: "d", cg="cg",
                             taken_at="backup", site="dr", created_us=1)  # fmt: skip
    assert [s.name for s in store.entries()] == ["s1"] and snap.size == 4096
    assert snap.dir.image_path("v1").read_bytes() == b"a" * 4096
    with pytest.raises(SnapshotError, match="already exists"):
        store.begin("s1")
        store.commit("s1", 6, cg="cg", taken_at="backup", site="dr", created_us=1,
                     catalog=[], digests={})  # fmt: skip
    assert store.get("s1").ts == 5  # type: ignore[union-attr]
    assert store.delete("s1") and not store.delete("s1") and store.entries() == []
    with pytest.raises(SnapshotError, match="invalid"):
        store.path("../x")


def _rec(name: str, ts: int) -> Snapshot:
    return Snapshot(name, ts, ("v1",), "i", 0)


def test_a_record_applied_again_keeps_exactly_the_first_copy(tmp_path):
    site, catalog = _site(tmp_path, {"v1": b"\x01" * 8192})
    named = SiteSnapshots(tmp_path, cg="cg", site="dr")
    named.take(_rec("s1", 10), catalog, staged=False)
    site.image_path("v1").write_bytes(b"\x02" * 8192)  # applied on past ts 10, then a crash
    named = SiteSnapshots(tmp_path, cg="cg", site="dr")  # the restarted applier
    named.take(_rec("s1", 10), catalog, staged=False)  # re-applied from the checkpoint
    assert named.stats["snapshots_already_held"] == 1
    copy = SnapshotStore(site).get("s1")
    assert copy is not None and copy.dir.image_path("v1").read_bytes() == b"\x01" * 8192
    assert [(h.name, h.ts, h.size) for h in named.held()] == [("s1", 10, 8192)]
    # the same name at another ts keeps the copy held, and says so
    named.take(_rec("s1", 11), catalog, staged=False)
    assert named.stats["snapshot_name_conflicts"] == 1
    assert SnapshotStore(site).get("s1").ts == 10  # type: ignore[union-attr]


def test_a_crash_mid_copy_is_cleaned_at_start_and_the_copy_taken_again(tmp_path):
    site, catalog = _site(tmp_path, {"v1": b"\x07" * 4096})
    SnapshotStore(site).begin("s1").image_path("v1").write_bytes(b"torn")
    named = SiteSnapshots(tmp_path, cg="cg", site="dr")
    assert not SnapshotStore(site).partial_path("s1").exists()
    named.take(_rec("s1", 3), catalog, staged=False)
    assert SnapshotStore(site).get("s1").dir.image_path("v1").read_bytes() == b"\x07" * 4096  # type: ignore[union-attr]


def test_a_paused_site_takes_no_copy_and_retention_prunes_alike(tmp_path):
    _, catalog = _site(tmp_path, {"v1": b"\x03" * 512})
    named = SiteSnapshots(tmp_path, cg="cg", site="dr", retention=Retention(keep_last=2),
                          wall_us=lambda: NOW_US)  # fmt: skip
    named.take(_rec("p", 1), catalog, staged=True)
    assert named.stats["snapshots_missed"] == 1 and named.held() == ()
    for i in range(1, 5):
        named.take(_rec(f"s{i}", make_ts(NOW_US - 1000 + i)), catalog, staged=False)
    assert [h.name for h in named.held()] == ["s3", "s4"]
    assert named.stats["snapshots_pruned"] == 2
