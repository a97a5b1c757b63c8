"""The topology fold (``pipeline.topology.model``), pure, tried as an adversary would.

Tries to break: an old primary's late entry undoing a newer generation's change; a
re-publish after a restart losing to the state before it; the order records arrive in
deciding the model (it must not, beyond the offset order of one key's equal entries); a
corrupt, unknown, mislabelled or other CG's record changing anything; a tombstone left
standing; roles of a lower generation winning.
"""

from __future__ import annotations

import random

import pytest

from pipeline.topology.model import fold, site_volumes
from pipeline.topology.roles import initial_roles, plan_failover
from schemas import codec
from schemas.records import Checkpoint, SiteEntry, VolumeDigest, VolumeEntry

CG = "cg1"


def vol(vid: str, size: int, gen: int = 0, ts: int = 1, deleted: bool = False) -> VolumeEntry:
    return VolumeEntry(CG, vid, vid, size, "async", {}, deleted, gen, "p", ts, 0,
                       {"p": "optimized"})  # fmt: skip


def site(name: str, kind: str = "backup", cg: str = CG) -> SiteEntry:
    return SiteEntry(cg, name, kind, "h", f"/d/{name}", "", "t", 1)


def rec(offset: int, key: str, r: object) -> tuple[int, str, bytes | None]:
    return offset, key, None if r is None else codec.encode(r)  # type: ignore[arg-type]


def test_the_newest_generation_and_ts_win_whatever_the_offset_order() -> None:
    rng = random.Random(7)
    entries = [vol("a", 512 * (g * 10 + t + 1), gen=g, ts=t) for g in range(3) for t in range(5)]
    for _ in range(200):
        rng.shuffle(entries)
        topo = fold(CG, [rec(i, f"volume/{CG}/a", e) for i, e in enumerate(entries)])
        assert topo.volumes["a"].generation == 2 and topo.volumes["a"].ts == 4
        assert not topo.rejected


def test_an_old_primarys_late_entry_does_not_undo_a_newer_generation() -> None:
    newer = vol("a", 8192, gen=2, ts=5)
    late = vol("a", 512, gen=1, ts=10**15)  # a larger ts, but an older generation
    topo = fold(CG, [rec(0, f"volume/{CG}/a", newer), rec(1, f"volume/{CG}/a", late)])
    assert topo.volumes["a"] == newer


OTHER_CG = VolumeEntry("other", "a", "a", 512, "async", {}, False, 9, "p", 9, 0, {})


@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        (f"volume/{CG}/a", b"\x00not avro", "magic"),
        (f"volume/{CG}/a", b"\xc3\x01" + b"\x11" * 8 + b"x", "fingerprint"),
        (f"volume/{CG}/a", codec.encode(site("dr1")), "SiteEntry"),  # wrong type under the key
        (f"volume/{CG}/a", codec.encode(vol("b", 512)), "describes volume 'b'"),
        (f"volume/{CG}/a", codec.encode(OTHER_CG), "of CG 'other'"),
        (f"site/{CG}/dr1", codec.encode(site("dr2")), "describes site 'dr2'"),
        (f"site/{CG}/dr1", b"", "short"),
    ],
)
def test_an_untrusted_record_is_rejected_and_changes_nothing(key, value, why) -> None:
    good = [rec(0, f"volume/{CG}/a", vol("a", 4096)), rec(1, f"site/{CG}/dr1", site("dr1"))]
    topo = fold(CG, [*good, (2, key, value)])
    assert topo.volumes["a"] == vol("a", 4096) and topo.sites["dr1"] == site("dr1")
    assert len(topo.rejected) == 1 and topo.rejected[0].offset == 2
    r = topo.rejected[0]
    assert r.key == key and why.lower() in r.why.lower(), r


def test_other_cgs_and_other_kinds_are_not_this_cgs_business() -> None:
    recs = [rec(0, "volume/cg10/a", vol("a", 512)),  # a CG whose name starts like ours
            rec(1, "site/cg2/dr1", site("dr1", cg="cg2")), (2, "drain/cg1", b"junk"),
            (3, "somebody/else", b"junk")]  # fmt: skip
    topo = fold(CG, recs)
    assert not topo.volumes and not topo.sites and not topo.rejected


def test_tombstones_remove_deleted_volumes_are_kept_apart() -> None:
    recs = [rec(0, f"volume/{CG}/a", vol("a", 512)), rec(1, f"volume/{CG}/b", vol("b", 512)),
            rec(2, f"site/{CG}/dr1", site("dr1")), rec(3, f"volume/{CG}/a", None),
            rec(4, f"site/{CG}/dr1", None),
            rec(5, f"volume/{CG}/b", vol("b", 512, ts=2, deleted=True))]  # fmt: skip
    topo = fold(CG, recs)
    assert "a" not in topo.volumes and not topo.sites
    assert topo.live() == {} and topo.as_dict()["deleted_volumes"] == ["b"]


def test_roles_highest_generation_wins_and_a_tombstone_leaves_them() -> None:
    r1 = plan_failover(initial_roles(CG, "a", now_us=1), CG, "b", 5, {0: 1}, False, 2)
    r2 = plan_failover(r1, CG, "a", 9, {0: 3}, False, 3)
    topo = fold(CG, [rec(0, f"roles/{CG}", r2), rec(1, f"roles/{CG}", r1),
                     rec(2, f"roles/{CG}", None)])  # fmt: skip
    assert topo.generation == 2 and topo.primary_site == r2.primary_site


def test_site_volumes_says_what_a_checkpoint_lacks() -> None:
    topo = fold(CG, [rec(0, f"volume/{CG}/a", vol("a", 1024)),
                     rec(1, f"volume/{CG}/b", vol("b", 2048)),
                     rec(2, f"volume/{CG}/c", vol("c", 512, deleted=True))])  # fmt: skip
    ck = Checkpoint("dr1", CG, 5, {}, (VolumeDigest("a", 1024, ""), VolumeDigest("b", 512, "")),
                    0, 0)  # fmt: skip
    assert site_volumes(topo, ck) == {"a": "ok", "b": "size 512: not yet applied"}
    assert site_volumes(topo, None) == {"a": "missing", "b": "missing"}
