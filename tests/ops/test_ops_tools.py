"""Operator tools on a real broker: restore --at, replay, tail, verify.

Tries to break: a restore that is not exactly the cut at TS (off by one record at a write's
ts, a fragment of a large write applied alone, a volume created later, a zero/trim, a
snapshot base one step too new or too old), a restore that quietly succeeds when the log's
head was deleted or TS is above W, a replay that does not continue a restored copy to the
same bytes, a tail that drops, reorders or misreports records or dies on a bad one, and a
verify that says OK for a checkpoint or a snapshot copy that is wrong.

Restored images are compared by their bytes with the log replayed independently
(``rebuild_from_log``), and the digests a manifest claims against ``tests.oracles``: no
check goes through the product's digest code.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner
from confluent_kafka import Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from crc32c import crc32c

from connectors.kafka.config import KafkaConnection
from connectors.kafka.topics import CgTopics, ensure_topics
from pipeline.app.cli_ops import COMMANDS
from pipeline.backup import snapshots as snapshot_store
from pipeline.errors import ApplierHaltedError, RestoreError
from pipeline.ops import restore as rs
from pipeline.ops.replay import ReplayPlan
from pipeline.ops.status import latest_checkpoints
from pipeline.ops.verify import verify_site
from pipeline.primary.volume import ConsistencyGroup
from pipeline.site import SiteDir
from pipeline.timesource import wall_us
from schemas import codec
from schemas.records import Checkpoint, Marker, VolumeChange, VolumeOp, Write, WriteExtent
from schemas.ts import format_ts
from tests.kafka_helpers import unique
from tests.oracles import claimed_digest, first_difference, read_image
from tests.replication_helpers import read_log, rebuild_from_log, running_backup, wait_until

CMD = {c.name: c for c in COMMANDS}
# small fragments and records: large writes span several records, cheaply
FAST = {
    "tick_interval_s": 0.005,
    "replication_timeout_s": 10.0,
    "fragment_bytes": 16 << 10,
    "max_record_bytes": 40 << 10,
    "max_unreplicated_bytes": 8 << 20,
}
SIZES = {"a": 1 << 20, "b": 512 << 10, "c": 256 << 10}
SITE = "dr1"


def _cli(kafka_conf: dict[str, str], cg: str, name: str, *args: str) -> Any:
    base = ["--bootstrap-servers", kafka_conf["bootstrap.servers"], "--cg", cg]
    return CliRunner().invoke(CMD[name], [*base, *args], catch_exceptions=True)


def _marker(cg: ConsistencyGroup, name: str) -> int:
    """Emit a Marker the way an application-consistent point does: quiesced, one ts."""
    engine = cg.interceptor
    with cg.quiesced():
        token, ts = engine.stamp()
        iid, epoch = engine.origin
        ticket = engine.append_record(token, Marker(name, ts, iid, epoch, wall_us()))
    ticket.wait(10)
    return ts


def _workload(cg: ConsistencyGroup, rng: random.Random, n: int, write_ts: list[int]) -> None:
    vols = list(cg.volumes.values())
    for _ in range(n):
        vol = rng.choice(vols)
        length = min(vol.size, rng.choice([512, 4096, 4096, 20_000, 70_000]) // 512 * 512)
        off = rng.randrange(0, vol.size - length + 1) // 512 * 512
        r = rng.random()
        if r < 0.06:
            write_ts.append(vol.write_zeroes(off, length))
        elif r < 0.1:
            write_ts.append(vol.trim(off, length))
        else:
            write_ts.append(vol.write(off, rng.randbytes(length)))


def _reference(records: list, ts: int) -> dict[str, bytes]:
    """The reference images at ts: volumes created at or before ts only."""
    created = {
        rec["volume_id"]: rec["ts"]
        for t, rec, _p, _o in records
        if t == "VolumeChange" and rec["op"] == "CREATE"
    }
    ref = rebuild_from_log(records, SIZES, upto_ts=ts)
    return {v: bytes(ref[v]) for v, c in created.items() if c <= ts}


def _expect(records: list, ts: int) -> dict[str, str]:
    """The digests a manifest of the cut at ts must claim (the documented format over the
    reference images, ``oracles.claimed_digest``)."""
    return {v: claimed_digest(data) for v, data in _reference(records, ts).items()}


def _digests(manifest: dict[str, Any]) -> dict[str, str]:
    return {v["volume_id"]: v["digest"] for v in manifest["volumes"]}


def _assert_images(site: SiteDir, want: dict[str, bytes], what: str) -> None:
    """The restored images hold exactly the reference bytes, and no other volume."""
    got = sorted(site.image_files())
    assert got == sorted(want), f"{what}: images {got}, wanted {sorted(want)}"
    for vid, data in want.items():
        disk = read_image(site.image_path(vid), len(data))
        assert disk == data, f"{what}: volume {vid}: {first_difference(disk, data)}"


def _newest_snapshot_w(site_dir: Path) -> int:
    snaps = snapshot_store.list_snapshots(site_dir)
    return snaps[-1][0] if snaps else -1


@pytest.fixture(scope="module")
def cg_run(kafka, tmp_path_factory) -> dict[str, Any]:
    """One CG with a backup site taking snapshots; its log, W and write timestamps."""
    conf = KafkaConnection(kafka.bootstrap_servers, client_id="lowmark-test").librdkafka()
    name = unique("ops")
    tmp = tmp_path_factory.mktemp("ops")
    site_dir = tmp / SITE
    rng = random.Random(11)
    write_ts: list[int] = []
    with ConsistencyGroup.open(name, tmp / "primary", conf, **FAST) as cg:
        cg.create_volume("a", SIZES["a"])
        cg.create_volume("b", SIZES["b"])
        created_us = wall_us()
        with running_backup(
            conf,
            name,
            site_dir,
            site=SITE,
            checkpoint_interval_s=0.05,
            snapshot_interval_s=0.15,
            snapshots_kept=1000,
        ) as (wm, ap):
            newest = -1
            for round_ in range(8):
                _workload(cg, rng, 40, write_ts)
                if round_ == 2:
                    cg.create_volume("c", SIZES["c"])  # a volume that appears mid-log
                if round_ == 4:
                    marker_ts = _marker(cg, "before-upgrade")
                cg.flush()
                # snapshots spread over the log, for the snapshot-base cut points: one newer
                # than the last round's (taken while this round was written, or just after)
                wait_until(
                    lambda n=newest: ap.error is not None or _newest_snapshot_w(site_dir) > n,
                    30,
                    f"a snapshot during round {round_}",
                )
                ap.check()
                newest = _newest_snapshot_w(site_dir)
            # one last checkpoint that is also a snapshot, for verify --at-checkpoint: the
            # applier stopped, checkpoint until one is due for a snapshot (its interval)
            ap.stop(close=False)
            checkpoints: list[Checkpoint] = []

            def snapshot_at_checkpoint() -> bool:
                checkpoints.append(ap.service.checkpoint())
                return _newest_snapshot_w(site_dir) == checkpoints[-1].w

            wait_until(snapshot_at_checkpoint, 10, "a checkpoint that is a snapshot", 0.05)
            last_ckpt = checkpoints[-1]
            wm.check()
    records = read_log(conf, name)
    w = rs.latest_watermark(conf, name).w
    snaps = snapshot_store.list_snapshots(site_dir)
    assert len(snaps) >= 3, "the applier took too few snapshots for a snapshot base test"
    assert snaps[-1][0] == last_ckpt.w
    return {
        "conf": conf,
        "cg": name,
        "tmp": tmp,
        "site_dir": site_dir,
        "records": records,
        "w": w,
        "write_ts": write_ts,
        "marker_ts": marker_ts,
        "created_us": created_us,
        "snaps": [s for s, _p in snaps],
    }


def _cut_points(run: dict[str, Any], n: int = 20) -> list[int]:
    rng = random.Random(5)
    ts = sorted(t for t in run["write_ts"] if t <= run["w"])
    picks = rng.sample(ts, 6) + [t - 1 for t in rng.sample(ts, 5)]
    snaps = run["snaps"]  # just below the first snapshot: the log's start is the base
    picks += [run["w"], snaps[0] - 1, snaps[0], snaps[1] - 1, run["marker_ts"]]
    low, high = ts[0] - 1, run["w"]
    picks += [rng.randint(low, high) for _ in range(n - len(picks))]
    return picks


@pytest.mark.parametrize("use_snapshots", [True, False], ids=["snapshot-base", "log-start"])
def test_restore_at_equals_the_log_applied_to_ts(cg_run, tmp_path, use_snapshots):
    run = cg_run
    bases = set()
    for i, ts in enumerate(_cut_points(run)):
        out = rs.restore(
            run["conf"],
            run["cg"],
            ts,
            tmp_path / f"r{i}",
            site_dir=run["site_dir"],
            site=SITE,
            use_snapshots=use_snapshots,
        )
        m = out.manifest
        bases.add(m["base"]["kind"])
        assert m["w"] == ts and m["exact"]
        if use_snapshots and ts >= run["snaps"][0]:
            # the newest snapshot at or below ts, not any older one
            assert m["base"]["w"] == max(s for s in run["snaps"] if s <= ts)
        _assert_images(
            SiteDir(tmp_path / f"r{i}"), _reference(run["records"], ts), f"restore at {ts}"
        )
        assert _digests(m) == _expect(run["records"], ts), f"restore at {ts}: wrong digests"
        shutil.rmtree(tmp_path / f"r{i}")
    assert bases == ({"snapshot", "log-start"} if use_snapshots else {"log-start"})


def test_restore_cli_by_iso_time_and_marker_then_replay_continues(cg_run, tmp_path):
    run = cg_run
    recs = run["records"]
    mid = sorted(run["write_ts"])[len(run["write_ts"]) // 2]
    res = _cli(
        run["conf"],
        run["cg"],
        "restore",
        "--at",
        format_ts(mid),
        "--to",
        str(tmp_path / "iso"),
        "--site-dir",
        str(run["site_dir"]),
        "--site",
        SITE,
    )
    assert res.exit_code == 0, res.output
    assert f"at W {mid} " in res.stdout
    manifest = orjson.loads((tmp_path / "iso" / "restore.json").read_bytes())
    _assert_images(SiteDir(tmp_path / "iso"), _reference(recs, mid), "restore --at")
    assert _digests(manifest) == _expect(recs, mid)
    for digest in _expect(recs, mid).values():
        assert digest in res.stdout

    res = _cli(
        run["conf"],
        run["cg"],
        "restore",
        "--marker",
        "before-upgrade",
        "--to",
        str(tmp_path / "mk"),
        "--from-log",
    )
    assert res.exit_code == 0, res.output
    m = orjson.loads((tmp_path / "mk" / "restore.json").read_bytes())
    assert m["w"] == run["marker_ts"] and m["marker"] == "before-upgrade"
    _assert_images(SiteDir(tmp_path / "mk"), _reference(recs, run["marker_ts"]), "--marker")
    assert _digests(m) == _expect(recs, run["marker_ts"])

    # replay the restored copy from its cut to W: the same bytes as a restore at W
    res = _cli(
        run["conf"],
        run["cg"],
        "replay",
        "--from-ts",
        str(mid),
        "--to-ts",
        str(run["w"]),
        "--images",
        str(tmp_path / "iso"),
    )
    assert res.exit_code == 0, res.output
    m = orjson.loads((tmp_path / "iso" / "restore.json").read_bytes())
    assert m["exact"] and m["w"] == run["w"]
    _assert_images(SiteDir(tmp_path / "iso"), _reference(recs, run["w"]), "replay to W")
    assert _digests(m) == _expect(recs, run["w"])
    # a range that leaves a gap after the copy's cut is a drill, and says so
    later = min(t for t in run["write_ts"] if t > run["marker_ts"])
    res = _cli(
        run["conf"],
        run["cg"],
        "replay",
        "--from-ts",
        str(later),
        "--to-ts",
        str(run["w"]),
        "--images",
        str(tmp_path / "mk"),
    )
    assert res.exit_code == 0 and "not a consistent cut" in res.output, res.output
    m = orjson.loads((tmp_path / "mk" / "restore.json").read_bytes())
    assert m["exact"] is False and m["w"] is None


def test_restore_refuses_a_cut_above_w(cg_run, tmp_path):
    run = cg_run
    with pytest.raises(RestoreError, match="above the latest published W"):
        rs.restore(run["conf"], run["cg"], run["w"] + 1, tmp_path / "x")
    assert not (tmp_path / "x" / "restore.json").exists()
    res = _cli(
        run["conf"], run["cg"], "restore", "--at", str(run["w"] + 1), "--to", str(tmp_path / "y")
    )
    assert isinstance(res.exception, RestoreError)


def _snapshot_at(site_dir: Path, ends: dict[int, tuple[int, int]]) -> Any:
    """The site's oldest snapshot whose replay offsets reach ``ends`` (None: none yet)."""
    at_end = [
        sn
        for sn in rs.site_snapshots(site_dir, SITE)
        if all(sn.offsets.get(p, 0) >= hi for p, (_lo, hi) in ends.items())
    ]
    return at_end[0] if at_end else None


def test_restore_outside_retention_fails_naming_the_oldest_point(kafka_conf, unique_name, tmp_path):
    site_dir = tmp_path / SITE
    write_ts: list[int] = []
    rng = random.Random(3)
    with ConsistencyGroup.open(unique_name, tmp_path / "p", kafka_conf, **FAST) as cg:
        cg.create_volume("a", SIZES["a"])
        with running_backup(
            kafka_conf,
            unique_name,
            site_dir,
            site=SITE,
            checkpoint_interval_s=0.05,
            snapshot_interval_s=0.1,
        ) as (_wm, ap):
            newest = -1
            for round_ in range(5):
                _workload(cg, rng, 15, write_ts)
                cg.flush()
                wait_until(
                    lambda n=newest: ap.error is not None or _newest_snapshot_w(site_dir) > n,
                    30,
                    f"a snapshot during round {round_}",
                )
                ap.check()
                newest = _newest_snapshot_w(site_dir)
            target = cg.interceptor.last_s
            wait_until(lambda: ap.error is not None or ap.service.applied_w >= target, 30, "W")
            ap.check()
            # the check at the end needs a snapshot at the log's end: the applier takes one
            # at most every 0.1 s, and the one after the last write may not be due yet when
            # W passes it (seen failing in CI)
            ends = rs.log_bounds(kafka_conf, unique_name)
            wait_until(
                lambda: ap.error is not None or _snapshot_at(site_dir, ends) is not None,
                30,
                "a snapshot at the log's end",
            )
            ap.check()
    records = read_log(kafka_conf, unique_name)
    w = rs.latest_watermark(kafka_conf, unique_name).w
    snaps = rs.site_snapshots(site_dir, SITE)
    assert len(snaps) >= 2
    keep = snaps[-2]  # delete the log's head up to this snapshot's replay offsets
    topic = CgTopics(unique_name).log
    admin = AdminClient(kafka_conf)
    cut = [TopicPartition(topic, p, o) for p, o in keep.offsets.items() if o > 0]
    assert cut, "nothing to delete"
    for fut in admin.delete_records(cut, request_timeout=30).values():
        fut.result()

    early = min(write_ts)
    with pytest.raises(RestoreError) as info:
        rs.restore(kafka_conf, unique_name, early, tmp_path / "e", site_dir=site_dir, site=SITE)
    msg = str(info.value)
    # the oldest snapshot whose replay offsets survived (an earlier one may share keep's
    # offsets when no record was written between them)
    oldest = min(
        sn.w for sn in snaps if all(sn.offsets.get(p, 0) >= o for p, o in keep.offsets.items())
    )
    assert f"oldest restorable point is ts {oldest}" in msg, msg
    with pytest.raises(RestoreError, match="log no longer starts at offset 0"):
        rs.restore(kafka_conf, unique_name, w, tmp_path / "f", use_snapshots=False)
    # from the oldest retained snapshot on, restores are still exact
    for ts in (keep.w, (keep.w + w) // 2, w):
        out = rs.restore(kafka_conf, unique_name, ts, tmp_path / f"ok{ts}", site_dir=site_dir)
        assert out.manifest["base"]["w"] >= keep.w
        want = {"a": bytes(rebuild_from_log(records, {"a": SIZES["a"]}, ts)["a"])}
        _assert_images(SiteDir(tmp_path / f"ok{ts}"), want, f"restore at {ts}")
        assert _digests(out.manifest) == {"a": claimed_digest(want["a"])}
    # retention past every record: only the last snapshot (at the log's end) is left
    ends = rs.log_bounds(kafka_conf, unique_name)
    everything = [TopicPartition(topic, p, hi) for p, (_lo, hi) in ends.items() if hi > 0]
    for fut in admin.delete_records(everything, request_timeout=30).values():
        fut.result()
    # the oldest snapshot already at the log's end is the oldest restorable point (idle
    # progress after the workload can leave several snapshots there)
    at_end = [
        sn
        for sn in rs.site_snapshots(site_dir, SITE)
        if all(sn.offsets.get(p, 0) >= hi for p, (_lo, hi) in ends.items())
    ]
    assert at_end, "no snapshot at the log's end"
    last = at_end[0].w
    with pytest.raises(RestoreError, match=f"oldest restorable point is ts {last} "):
        rs.restore(kafka_conf, unique_name, last - 1, tmp_path / "g", site_dir=site_dir)
    with pytest.raises(RestoreError, match="nothing is restorable from this log"):
        rs.restore(kafka_conf, unique_name, last, tmp_path / "h")  # no site: no base at all


def test_tail_json_matches_the_log(cg_run):
    run = cg_run
    res = _cli(run["conf"], run["cg"], "tail", "--json", "--no-follow")
    assert res.exit_code == 0, res.output
    items = [orjson.loads(line) for line in res.stdout.splitlines()]
    recs = run["records"]
    got = {(i["partition"], i["log_offset"]): i for i in items}
    assert len(got) == len(items) == len(recs)
    last_ts: dict[str, int] = {}
    for rtype, rec, p, off in sorted(recs, key=lambda r: (r[2], r[3])):
        item = got[(p, off)]
        assert item["type"] == rtype
        if rtype == "Write":
            assert item["volume_id"] == rec["volume_id"]
            assert [
                (x["ts"], x["offset"], x["write_length"], x["data_len"], x["data_crc32c"])
                for x in item["extents"]
            ] == [
                (x["ts"], x["offset"], x["write_length"], len(x["data"]), crc32c(x["data"]))
                for x in rec["extents"]
            ]
            tss = [x["ts"] for x in item["extents"]]
        else:
            assert {k: item[k] for k in rec} == rec
            tss = [rec["ts"]]
        if "volume_id" in rec:  # per-volume ts order, in log order
            vid = rec["volume_id"]
            assert min(tss) >= last_ts.get(vid, 0), f"volume {vid} goes back in ts at {p}@{off}"
            last_ts[vid] = max(tss)
    # filters: one volume's writes inside a ts window, human-readable
    lo, hi = sorted(run["write_ts"])[10], sorted(run["write_ts"])[60]
    res = _cli(
        run["conf"],
        run["cg"],
        "tail",
        "--no-follow",
        "--volume",
        "b",
        "--type",
        "write",
        "--from-ts",
        format_ts(lo),
        "--to-ts",
        str(hi),
    )
    assert res.exit_code == 0, res.output
    want = [
        (p, off)
        for t, rec, p, off in recs
        if t == "Write"
        and rec["volume_id"] == "b"
        and any(lo <= x["ts"] <= hi for x in rec["extents"])
    ]
    lines = res.stdout.splitlines()
    assert len(lines) == len(want) > 0
    assert all(" Write " in ln and " b " in ln for ln in lines)
    assert {ln.rsplit(" ", 1)[1] for ln in lines} == {f"p{p}@{o}" for p, o in want}


def test_tail_prints_bad_records_and_keeps_going(kafka_conf, unique_name):
    topics = ensure_topics(kafka_conf, unique_name)
    good = Marker("m", 12345 << 12, "x", 0, 1)
    value = codec.encode(good)
    p = Producer(kafka_conf)
    p.produce(topics.log, b"\x00garbage", b"k", partition=0)
    p.produce(topics.log, value[:-3], b"k", partition=0)  # truncated
    p.produce(topics.log, value, b"k", partition=0, headers=codec.headers_for(good))
    p.flush(10)
    res = CliRunner().invoke(
        CMD["tail"],
        [
            "--bootstrap-servers",
            kafka_conf["bootstrap.servers"],
            "--cg",
            unique_name,
            "--no-follow",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    items = [orjson.loads(line) for line in res.stdout.splitlines()]
    assert [i["type"] for i in items] == ["BAD", "BAD", "Marker"]
    assert "UnknownSchemaError" in items[0]["error"] and items[2]["name"] == "m"


def test_verify_ok_then_mismatch_on_a_wrong_checkpoint_or_snapshot(cg_run, tmp_path):
    run = cg_run
    conf, cg = run["conf"], run["cg"]
    report = verify_site(conf, cg, SITE, site_dir=run["site_dir"], at_checkpoint=True)
    assert report.ok, report
    assert {v.what for v in report.verdicts} == {"checkpoint", "snapshot"}
    res = _cli(conf, cg, "verify", "--site", SITE, "--site-dir", str(run["site_dir"]))
    assert res.exit_code == 0, res.output
    assert "MISMATCH" not in res.stdout and res.stdout.rstrip().endswith("OK")

    # a site whose checkpoint claims a digest one bit off: MISMATCH, exit 1
    ck = latest_checkpoints(conf, cg)[SITE]
    vol = ck.volumes[0]
    bad_digest = vol.digest[:-1] + ("0" if vol.digest[-1] != "0" else "1")
    forged = dataclasses.replace(
        ck, site="forged", volumes=(dataclasses.replace(vol, digest=bad_digest), *ck.volumes[1:])
    )
    p = Producer(conf)
    p.produce(CgTopics(cg).checkpoints, codec.encode(forged), b"forged")
    p.flush(10)
    res = _cli(conf, cg, "verify", "--site", "forged")
    assert res.exit_code == 1, res.output
    assert f"{vol.volume_id}" in res.stdout and "MISMATCH" in res.stdout

    # a running site's checkpoint without digests: nothing to compare is not a mismatch
    # (it said "MISMATCH: the site does not hold the cut it claims" and exited 1)
    bare = dataclasses.replace(
        ck, site="bare", volumes=tuple(dataclasses.replace(v, digest="") for v in ck.volumes)
    )
    p.produce(CgTopics(cg).checkpoints, codec.encode(bare), b"bare")
    p.flush(10)
    res = _cli(conf, cg, "verify", "--site", "bare")
    assert res.exit_code == 2, res.output
    assert "NO-DIGEST" in res.stdout and "MISMATCH" not in res.stdout, res.stdout
    assert "UNVERIFIED" in res.stdout and "digest_interval_s" in res.stdout

    # a snapshot copy with one byte changed on disk: --at-checkpoint catches it
    copy = tmp_path / "site-copy"
    shutil.copytree(SiteDir(run["site_dir"]).snapshots_dir, SiteDir(copy).snapshots_dir)
    snap = snapshot_store.newest_at_or_below(copy, ck.w)
    assert snap is not None and snap[0].w == ck.w
    img = SiteDir(snap[1]).image_path("a")
    data = bytearray(img.read_bytes())
    data[4097] ^= 0x01
    img.write_bytes(bytes(data))
    res = _cli(conf, cg, "verify", "--site", SITE, "--site-dir", str(copy), "--at-checkpoint")
    assert res.exit_code == 1, res.output
    assert any(
        "snapshot" in ln and " a " in ln and "MISMATCH" in ln for ln in res.stdout.splitlines()
    )


# ---------------------------------------------------------------- pure parts, no broker


def _write(vid: str, iid: str, epoch: int, *extents: tuple[int, int, int, int, int, bytes]):
    return Write(vid, iid, epoch, tuple(WriteExtent(*x) for x in extents))


def _create(vid: str, iid: str, ts: int, size: int = 4096):
    return VolumeChange(VolumeOp.CREATE, vid, vid, size, {}, ts, iid, 0)


def _feed(plan: ReplayPlan, records: list) -> list:
    ops = []
    for off, rec in enumerate(records):
        ops += plan.add(rec, 0, off)
    return ops + plan.finish()


def test_plan_keeps_a_later_volumes_lower_ts_in_a_shared_partition():
    # interceptor B's volume shows up in the partition after A's volume moved past its ts:
    # one applied W per partition would skip B's CREATE and write
    records = [
        _create("v1", "A", 10),
        _write("v1", "A", 0, (20, 0, 2, 0, 1, b"a1")),
        _write("v1", "A", 0, (40, 0, 2, 0, 1, b"a2")),
        _create("v2", "B", 5),
        _write("v2", "B", 0, (15, 0, 2, 0, 1, b"b1")),
        _write("v2", "B", 0, (35, 0, 2, 0, 1, b"b2")),
    ]
    plan = ReplayPlan(0, 30)
    got = [(op.volume_id, op.ts) for op in _feed(plan, records)]
    assert sorted(got) == [("v1", 10), ("v1", 20), ("v2", 5), ("v2", 15)]
    assert plan.resume_offsets({0: 6}) == {0: 2}  # the first record with a ts > 30


def test_plan_applies_a_fragmented_write_whole_or_not_at_all():
    frag = [(50, 0, 6, 0, 3, b"ab"), (50, 2, 6, 1, 3, b"cd"), (50, 4, 6, 2, 3, b"ef")]
    head = _write("v", "A", 0, (40, 8, 1, 0, 1, b"x"), frag[0], frag[1])
    tail = _write("v", "A", 0, frag[2], (60, 0, 1, 0, 1, b"z"))
    plan = ReplayPlan(0, 50)
    first = plan.add(head, 0, 1)
    assert [op.ts for op in first] == [40], "a write was applied before all its fragments"
    ops = plan.add(tail, 0, 2) + plan.finish()
    assert [(op.ts, op.offset, op.data) for op in ops] == [(50, 0, b"abcdef")]
    # the last fragment never came although its write is <= to_ts: refuse, never half-apply
    cut = ReplayPlan(0, 50)
    assert [op.ts for op in cut.add(head, 0, 1)] == [40]
    with pytest.raises(ApplierHaltedError):
        cut.finish()


def test_plan_rejects_a_fenced_epochs_record_seen_through_another_volume():
    records = [
        _create("v1", "A", 1),
        _create("v2", "A", 2),
        _write("v1", "A", 1, (10, 0, 3, 0, 1, b"new")),  # A's epoch 1 starts here
        _write("v2", "A", 0, (11, 0, 3, 0, 1, b"old")),  # a zombie of epoch 0, after it
    ]
    got = [(op.volume_id, op.ts) for op in _feed(ReplayPlan(0, 100), records)]
    assert ("v2", 11) not in got and ("v1", 10) in got


def test_choose_base_picks_the_newest_snapshot_in_retention():
    snaps = [
        rs.SnapshotInfo(100, {0: 5, 1: 2}, Path("/s/100"), SITE),
        rs.SnapshotInfo(200, {0: 9, 1: 4}, Path("/s/200"), SITE),
    ]
    intact = {0: 0, 1: 0}
    assert rs.choose_base(snaps, 50, intact).kind == "log-start"
    assert rs.choose_base(snaps, 150, intact).w == 100
    assert rs.choose_base(snaps, 200, intact).w == 200
    assert rs.choose_base(snaps, 150, intact, use_snapshots=False).kind == "log-start"
    trimmed = {0: 6, 1: 0}  # retention deleted records snapshot 100 still needs
    assert rs.choose_base(snaps, 250, trimmed).offsets == {0: 9, 1: 4}
    with pytest.raises(RestoreError, match="oldest restorable point is ts 200 "):
        rs.choose_base(snaps, 150, trimmed)
    with pytest.raises(RestoreError, match="oldest restorable point is ts 200 "):
        rs.choose_base(snaps, 50, trimmed)
    with pytest.raises(RestoreError, match="nothing is restorable"):
        rs.choose_base(snaps, 250, trimmed, use_snapshots=False)
