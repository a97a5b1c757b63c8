"""Kill -9 the watermark service and the applier, again and again, while the primary writes.

Tries to break invariants 2 (watermark safety) and 4 (crash-safe apply): both backup-side
services run as processes of their own (``tests.service_runner``) and get SIGKILL at
random instants, one or both at a time, and are restarted at once, while an in-process
primary (one async and one sync volume) writes, zeroes and trims. Checked:

- an observer reading the watermark topic throughout sees W never decrease, and after the
  fact every published W bounds the log: no record with ts <= W lies at or above that
  W's log_offsets;
- once the workload stops, the restarted services converge: backup images byte-identical
  to the primary's, and the final checkpoint's digests are those of the primary's bytes;
- every checkpoint ever written is a cut: every volume's digest equals that of the log
  replayed to its W (a restarted applier must not checkpoint images that still hold data
  of a later W), and none is missing;
- no service exits on its own between kills (a halted applier, a crashed service): each
  victim must still be running when its kill comes, and each stops cleanly at the end.

Images are compared by their bytes; checkpoint digests against ``tests.oracles``.

The scenario runs once per module; each test asserts one of the properties. Replay a run
with ``LOWMARK_KILL_SEED=<seed>`` (printed; the kill instants follow it, the scheduling
of the processes does not).
"""

from __future__ import annotations

import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from connectors.kafka.config import KafkaConnection
from connectors.kafka.reading import iter_range
from connectors.kafka.topics import CgTopics
from pipeline.backup.applier import Applier, ApplierConfig
from pipeline.primary.volume import ConsistencyGroup
from pipeline.site import SiteDir
from pipeline.timesource import wall_us
from pipeline.watermark.service import WatermarkService, WatermarkServiceConfig
from schemas import codec
from schemas.records import Checkpoint, Watermark
from tests.kafka_helpers import unique
from tests.oracles import claimed_digest, first_difference, reader_bytes
from tests.replication_helpers import (
    ServiceThread,
    create_cg_topics,
    read_log_from,
    record_ts_index,
    replay_digests,
    wait_until,
    watermark_bound_violations,
    watermark_history,
)
from tests.service_runner import ChildProcess

pytestmark = pytest.mark.kafka

DEFAULT_KILLS = 50
TORTURE_KILLS = 400
SIZES = {"a": 4 << 20, "b": 1 << 20}
MODES = {"a": "async", "b": "sync"}
SITE = "backup"


@dataclass
class KillRun:
    seed: int
    cg: str
    kills: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    observed: list[tuple[int, int]] = field(default_factory=list)  # (offset, W), live
    history: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    records: list[tuple[str, dict[str, Any], int, int]] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    primary: dict[str, bytes] = field(default_factory=dict)  # volume -> what a reader sees
    backup: dict[str, bytes | None] = field(default_factory=dict)  # None: no image
    final_checkpoint: dict[str, Any] | None = None
    converge_error: str = ""
    stop_problems: list[str] = field(default_factory=list)
    target_ts: int = 0
    applier_starts_us: list[int] = field(default_factory=list)


# ---------------------------------------------------------------- the pieces


class Services:
    """The two backup-side processes; ``kill`` and ``restart`` them, ``stop`` both."""

    def __init__(self, kafka_conf: dict[str, Any], cg: str, root: Path) -> None:
        self.kafka_conf = kafka_conf
        self.cg = cg
        self.root = root
        self.procs: dict[str, ChildProcess] = {}
        self.starts = dict.fromkeys(("watermark", "applier"), 0)
        self.started_us: dict[str, list[int]] = {"watermark": [], "applier": []}

    def spec(self, name: str) -> dict[str, Any]:
        if name == "watermark":
            config: dict[str, Any] = {"cg": self.cg, "liveness_timeout_s": 10.0}
        else:
            config = {
                "cg": self.cg,
                "site": SITE,
                "data_dir": str(self.root / SITE),
                "checkpoint_interval_s": 0.1,
                "digest_interval_s": 0.0,  # every checkpoint carries digests to check
            }
        return {"service": name, "kafka": self.kafka_conf, "config": config}

    def start(self, name: str) -> ChildProcess:
        self.starts[name] += 1
        self.started_us[name].append(wall_us())
        proc = ChildProcess("tests.service_runner", self.spec(name), self.root / f"{name}.log")
        self.procs[name] = proc
        return proc

    def kill(self, name: str) -> None:
        """SIGKILL the victim, which must still be running: one that already exited did so
        on its own (it failed or halted), and restarting it would hide that."""
        proc = self.procs[name]
        if not proc.alive():
            proc.reap()
            raise AssertionError(
                f"{name} (pid {proc.pid}) exited on its own with exit code "
                f"{proc.proc.returncode} before its kill; its log ends with:\n{proc.log_tail()}"
            )
        proc.kill()

    def stop(self) -> list[str]:
        """Stop both gracefully; what went wrong (exited before, or not cleanly)."""
        problems = []
        for name, proc in self.procs.items():
            if not proc.alive():
                proc.reap()
                problems.append(
                    f"{name} had exited on its own with {proc.proc.returncode} before the "
                    f"end: {proc.log_tail()}"
                )
                continue
            rc = proc.stop()
            if rc != 0:
                problems.append(f"{name} stopped with exit code {rc}: {proc.log_tail()}")
        return problems

    def died_on_its_own(self) -> str:
        """A service that exited without being killed (it failed): name and log tail."""
        for name, proc in self.procs.items():
            if not proc.alive():
                return f"{name} exited with {proc.proc.returncode}: {proc.log_tail()}"
        return ""


class Observer(threading.Thread):
    """Reads the watermark topic from the start while the services die and restart."""

    def __init__(self, kafka_conf: dict[str, Any], cg: str) -> None:
        super().__init__(name="w-observer", daemon=True)
        self.seen: list[tuple[int, int]] = []
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self._consumer = Consumer(
            {**kafka_conf, "group.id": unique("w-observer"), "enable.auto.commit": False}
        )
        self._consumer.assign([TopicPartition(CgTopics(cg).watermark, 0, 0)])

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                for msg in self._consumer.consume(500, 0.1):
                    if not msg.error():
                        w = codec.decode(msg.value(), Watermark).w
                        self.seen.append((msg.offset(), w))
        except BaseException as exc:
            self.error = exc
        finally:
            self._consumer.close()


def _workload(cg: ConsistencyGroup, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    vols = list(cg.volumes.values())
    while not stop.is_set():
        vol = rng.choice(vols)
        length = min(vol.size, rng.choice([512, 4096, 4096, 16384, 65536, 700_000]))
        offset = rng.randrange(0, vol.size - length + 1) // 512 * 512
        r = rng.random()
        if r < 0.05:
            vol.write_zeroes(offset, length)
        elif r < 0.08:
            vol.trim(offset, length)
        else:
            vol.write(offset, rng.randbytes(length))
        time.sleep(0.004)  # a steady stream, not a flood the restarted applier never catches


def _read_checkpoint(path: Path) -> dict[str, Any] | None:
    try:
        return codec.decode(path.read_bytes(), Checkpoint).to_avro()
    except FileNotFoundError:
        return None


# ---------------------------------------------------------------- the scenario


def run_kills(kafka_conf: dict[str, Any], cg: str, root: Path, kills: int, seed: int) -> KillRun:
    run = KillRun(seed, cg)
    rng = random.Random(seed)
    create_cg_topics(kafka_conf, cg)
    started = time.monotonic()
    services = Services(kafka_conf, cg, root)
    observer = Observer(kafka_conf, cg)
    stop_writes = threading.Event()
    primary = ConsistencyGroup.open(
        cg, root / "primary", kafka_conf, tick_interval_s=0.01, replication_timeout_s=20.0
    )
    writer: threading.Thread | None = None
    try:
        for name, size in SIZES.items():
            primary.create_volume(name, size, mode=MODES[name])
        for name in ("watermark", "applier"):
            services.start(name).expect("READY", 60)
        observer.start()
        writer = threading.Thread(target=_workload, args=(primary, stop_writes, seed), daemon=True)
        writer.start()
        run.kills = dict.fromkeys(("watermark", "applier"), 0)
        for _ in range(kills):
            time.sleep(rng.uniform(0.1, 1.5))  # the kill instant: random on purpose
            r = rng.random()
            victims = (
                ["watermark"] if r < 0.45 else ["applier"] if r < 0.9 else ["watermark", "applier"]
            )
            for name in victims:
                services.kill(name)
                run.kills[name] += 1
            for name in victims:
                services.start(name)  # not waiting for READY: the next kill may hit start-up
        stop_writes.set()
        writer.join(60)
        primary.flush()
        run.target_ts = primary.interceptor.last_s
        ckpt_path = root / SITE / "checkpoint.avro"

        def converged() -> bool:
            ck = _read_checkpoint(ckpt_path)
            return bool(services.died_on_its_own()) or (ck is not None and ck["w"] >= run.target_ts)

        try:
            wait_until(converged, 120, "the backup checkpointing a W past the last write", 0.1)
            run.converge_error = services.died_on_its_own()
        except AssertionError as exc:
            run.converge_error = f"{exc}; applier log: {services.procs['applier'].log_tail()}"
        run.final_checkpoint = _read_checkpoint(ckpt_path)
        run.primary = {v.volume_id: v.pread(0, v.size) for v in primary.volumes.values()}
        for vid, size in SIZES.items():
            run.backup[vid] = reader_bytes(SiteDir(root / SITE).image_path(vid), size)
    finally:
        stop_writes.set()
        if writer is not None:
            writer.join(60)
        run.stop_problems = services.stop()
        observer.stop_event.set()
        observer.join(30)
        primary.close()
    if observer.error is not None:
        raise observer.error
    run.seconds = time.monotonic() - started
    run.applier_starts_us = services.started_us["applier"]
    run.observed = observer.seen
    run.history = watermark_history(kafka_conf, cg)
    run.records, _ends = read_log_from(kafka_conf, cg)
    run.checkpoints = [
        codec.decode(m.value(), Checkpoint).to_avro()
        for m in iter_range(kafka_conf, CgTopics(cg).checkpoints)
    ]
    print(
        f"\nservice kills (seed {seed}): {run.kills} in {run.seconds:.0f} s; "
        f"{len(run.history)} watermarks, {len(run.records)} log records, "
        f"{len(run.checkpoints)} checkpoints; starts {services.starts}"
    )
    return run


# ---------------------------------------------------------------- the properties


def check_w_monotonic(run: KillRun) -> None:
    ws = [w for _o, w in run.observed]
    drops = [(a, b) for a, b in zip(run.observed, run.observed[1:], strict=False) if b[1] < a[1]]
    assert len(ws) > 10, f"the observer saw only {len(ws)} watermarks"
    assert not drops, f"W decreased (offset, W) -> (offset, W): {drops[:5]}"
    published = [rec["w"] for _o, rec in run.history]
    assert published == sorted(published), "W decreased in the watermark topic"
    bad = watermark_bound_violations(record_ts_index(run.records), run.history)
    assert not bad, f"{len(bad)} published watermarks do not bound the log:\n" + "\n".join(bad[:5])


def check_converged(run: KillRun) -> None:
    assert not run.converge_error, run.converge_error
    assert not run.stop_problems, "\n".join(run.stop_problems)
    assert run.kills["watermark"] > 0 and run.kills["applier"] > 0
    for vid, data in run.primary.items():
        backup = run.backup.get(vid)
        assert backup is not None, f"the backup has no image of {vid}"
        assert backup == data, f"backup image {vid} differs: {first_difference(backup, data)}"
    ck = run.final_checkpoint
    assert ck is not None and ck["w"] >= run.target_ts
    assert {v["volume_id"]: v["digest"] for v in ck["volumes"]} == {
        vid: claimed_digest(data) for vid, data in run.primary.items()
    }, "the final checkpoint's digests are not those of the primary's bytes"


def check_checkpoints_are_cuts(run: KillRun) -> None:
    assert len(run.checkpoints) > 5, f"only {len(run.checkpoints)} checkpoints were written"
    replayed = replay_digests(run.records, SIZES, [ck["w"] for ck in run.checkpoints])
    bad = []
    for i, ck in enumerate(run.checkpoints):
        # every checkpoint carries digests (digest_interval_s=0): one without is no cut
        # anybody could check, so it counts as wrong, not as skipped
        got = {v["volume_id"]: v["digest"] for v in ck["volumes"]}
        want = replayed[ck["w"]]
        if got != want:
            wrong = sorted(set(got) ^ set(want) | {v for v in got if got[v] != want.get(v)})
            since = [ck["written_us"] - t for t in run.applier_starts_us if t <= ck["written_us"]]
            bad.append(
                f"checkpoint #{i} at W={ck['w']}: volumes {wrong} are not the log at W "
                f"(written {min(since) / 1e6:.2f} s after the applier process started)"
            )
    assert not bad, (
        f"{len(bad)} of {len(run.checkpoints)} checkpoints are not cuts of the log:\n"
        + "\n".join(bad[:10])
    )


@pytest.fixture(scope="module")
def kill_run(kafka, tmp_path_factory) -> KillRun:
    conf = KafkaConnection(kafka.bootstrap_servers, client_id="lowmark-test").librdkafka()
    seed = int(os.environ.get("LOWMARK_KILL_SEED") or random.randrange(1 << 30))
    print(f"\nreplay the service kills with LOWMARK_KILL_SEED={seed}")
    return run_kills(
        conf, unique("service-kills"), tmp_path_factory.mktemp("kills"), DEFAULT_KILLS, seed
    )


def test_w_never_decreases_and_bounds_the_log(kill_run):
    check_w_monotonic(kill_run)


def test_backup_converges_to_the_primary(kill_run):
    check_converged(kill_run)


def test_every_checkpoint_is_a_cut(kill_run):
    check_checkpoints_are_cuts(kill_run)


@pytest.mark.torture
@pytest.mark.timeout(3600)
def test_service_kills_torture(kafka_conf, unique_name, tmp_path, request):
    if "torture" not in (request.config.getoption("-m") or ""):
        pytest.skip(f"{TORTURE_KILLS} kills: run with -m torture")
    run = run_kills(kafka_conf, unique_name, tmp_path, TORTURE_KILLS, random.randrange(1 << 30))
    check_w_monotonic(run)
    check_converged(run)
    check_checkpoints_are_cuts(run)


# ---------------------------------------------------------------- a restart, step by step


def test_restarted_applier_checkpoints_only_cuts(kafka_conf, unique_name, tmp_path):
    """The applier dies after applying past its last checkpoint (its images hold writes of
    a later W, as the page cache keeps them after kill -9). The restarted applier replays
    from the checkpoint; a checkpoint it writes before it is back past that later W covers
    images that are not the log at its W, and restore/snapshots trust checkpoints."""
    size = 8 << 20
    site_dir = tmp_path / "backup"
    create_cg_topics(kafka_conf, unique_name)
    with ConsistencyGroup.open(
        unique_name, tmp_path / "primary", kafka_conf, tick_interval_s=0.005
    ) as cg:
        vol = cg.create_volume("v", size)
        wm = ServiceThread(
            WatermarkService(WatermarkServiceConfig(cg=unique_name), kafka_conf), "wm"
        ).start()
        first = Applier(
            ApplierConfig(cg=unique_name, site=SITE, data_dir=site_dir, checkpoint_interval_s=3600),
            kafka_conf,
        )
        first.start()
        try:
            # ~2 s of writes to distinct blocks, W published every few ms; checkpoint a
            # quarter of the way in, keep applying to the end, then die without a checkpoint
            block = 0
            ckpt_w = 0
            t0 = time.monotonic()
            while time.monotonic() - t0 < 2.0:
                last = vol.write(block * 4096, block.to_bytes(4, "big") * 1024)
                block += 1
                first.step(0.002)
                if not ckpt_w and time.monotonic() - t0 > 0.5:
                    ckpt_w = first.checkpoint().w
            cg.flush()
            wait_until(lambda: first.step(0.01) or first.applied_w >= last, 30, "the first applier")
            applied_w = first.applied_w
            first.close(checkpoint=False)  # kill -9: images at applied_w, checkpoint at ckpt_w
            assert 0 < ckpt_w < applied_w
            second = Applier(
                ApplierConfig(
                    cg=unique_name,
                    site=SITE,
                    data_dir=site_dir,
                    checkpoint_interval_s=0.001,
                    digest_interval_s=0.0,
                ),
                kafka_conf,
            )
            second.start()
            try:
                wait_until(
                    lambda: second.step(0.01) or second.stats.checkpoints >= 1,
                    30,
                    "the restarted applier's first checkpoint",
                )
                ck = _read_checkpoint(site_dir / "checkpoint.avro")
            finally:
                second.close(checkpoint=False)
        finally:
            wm.stop()
    assert ck is not None and ck["w"] > ckpt_w
    records, _ends = read_log_from(kafka_conf, unique_name)
    replayed = replay_digests(records, {"v": size}, [ck["w"], applied_w])
    got = {v["volume_id"]: v["digest"] for v in ck["volumes"]}
    assert got == replayed[ck["w"]], (
        f"the restarted applier checkpointed W={ck['w']} (it had applied up to {applied_w} "
        f"before the crash, checkpointed {ckpt_w}) over images that are not the log at "
        f"W={ck['w']}; they are "
        + ("exactly" if got == replayed[applied_w] else "not even")
        + f" the log at the pre-crash W={applied_w}"
    )


# ---------------------------------------------------------------- the harness itself


def test_a_victim_that_exited_on_its_own_is_reported_not_restarted(tmp_path):
    """The kill loop restarts every victim; one that had already died on its own (here:
    an applier whose configuration it refuses) must fail the run with its exit code and
    log, not be silently restarted."""

    class BrokenApplier(Services):
        def spec(self, name: str) -> dict[str, Any]:
            spec = super().spec(name)
            spec["config"]["site"] = "no/such/site"  # ApplierConfig.validate refuses it
            return spec

    services = BrokenApplier({"bootstrap.servers": "127.0.0.1:9"}, "never", tmp_path)
    proc = services.start("applier")
    proc.proc.wait(60)  # it fails before READY, before touching Kafka
    with pytest.raises(AssertionError, match=r"exited on its own with exit code 1"):
        services.kill("applier")
    assert "site name" in proc.log_tail()
