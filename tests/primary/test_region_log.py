"""The dirty-region log's files and group commit (``pipeline.primary.region_log``).

Tries to break: a mark reported durable that a crash loses (every write since the last
fdatasync dropped, kept, or torn at 512-byte sectors, at random instants while writers
run), an fsync failure that lets a write be acknowledged, group commit that fsyncs once
per write, a restart with another region size that forgets dirty bytes, a clean close
that leaves regions dirty; with the activity log on top (extents a write waits for, the
fine bitmap flushed behind them): an extent evicted before its fine bits are durable, a
restart that forgets an active extent's regions, a clean close that leaves extents active.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import pytest

from pipeline.primary.region_log import FileOps, RegionLog, RegionLogError
from pipeline.site import SiteDir

RB = 4096
SIZE = 256 * RB


class CrashableFiles(FileOps):
    """Keeps every fd's bytes in memory: ``durable`` as of its last fdatasync, the writes
    since then in order. ``crash`` writes to the real file what a power cut could leave."""

    def __init__(self, rng: random.Random, fail_sync: bool = False) -> None:
        self.rng = rng
        self.fail_sync = fail_sync
        self.lock = threading.Lock()
        self.durable: dict[str, bytearray] = {}
        self.unsynced: dict[str, list[tuple[int, bytes]]] = {}
        self.syncs = 0

    def _path(self, fd: int) -> str:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path not in self.durable:
            self.durable[path] = bytearray(Path(path).read_bytes())
            self.unsynced[path] = []
        return path

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        with self.lock:
            self.unsynced[self._path(fd)].append((offset, bytes(data)))

    def fdatasync(self, fd: int) -> None:
        if self.fail_sync:
            raise OSError(5, "Input/output error")
        with self.lock:
            path = self._path(fd)
            for offset, data in self.unsynced[path]:
                self.durable[path][offset : offset + len(data)] = data
            self.unsynced[path] = []
            self.syncs += 1

    def crash(self) -> None:
        with self.lock:
            for path, base in self.durable.items():
                image = bytearray(base)
                for offset, data in self.unsynced[path]:
                    for s in range(0, len(data), 512):  # each sector: old or new
                        if self.rng.random() < 0.5:
                            image[offset + s : offset + s + 512] = data[s : s + 512]
                Path(path).write_bytes(bytes(image))


def open_log(
    root: Path,
    files: FileOps | None = None,
    durable=lambda: 0,
    rb: int = RB,
    eb: int = 0,
    keep_s: float = 0.0,
):
    kw = {"files": files} if files is not None else {}
    log = RegionLog(
        SiteDir(root), rb, durable, extent_bytes=eb, keep_s=keep_s, clear_interval_s=0.002, **kw
    )
    vol = log.open_volume("v", SIZE)
    log.start()
    return log, vol


@pytest.mark.parametrize("extent_bytes", [0, 8 * RB], ids=["fine", "activity-log"])
@pytest.mark.parametrize("seed", range(12))
def test_a_crash_never_loses_a_durable_mark(tmp_path, seed, extent_bytes):
    rng = random.Random(seed)
    files = CrashableFiles(rng)
    state = {"durable": 0}
    # keep 0 or a few ms: extents are evicted (and fine bits cleared) while writers run
    keep = rng.choice([0.0, 0.003])
    log, vol = open_log(tmp_path, files, lambda: state["durable"], eb=extent_bytes, keep_s=keep)
    must_survive: list[range] = []
    lock = threading.Lock()
    stop = threading.Event()
    small = iter(range(1, 10**6))
    never = iter(range(10**9, 2 * 10**9))  # seqs Kafka never makes durable

    def writer(wseed: int) -> None:
        wrng = random.Random(wseed)
        while not stop.is_set():
            off = wrng.randrange(0, SIZE - 3 * RB)
            mark = vol.mark(off, wrng.randrange(1, 3 * RB))
            try:
                mark.wait(5)
            except RegionLogError:
                return
            with lock:
                if wrng.random() < 0.3:
                    mark.assign(next(never))  # its record never got to Kafka: must survive
                    must_survive.append(mark.marked.regions)
                else:
                    s = next(small)
                    mark.assign(s)
                    state["durable"] = s  # these may be cleared, lazily

    threads = [threading.Thread(target=writer, args=(seed * 10 + i,)) for i in range(4)]
    for t in threads:
        t.start()
    threading.Event().wait(rng.uniform(0.01, 0.15))
    if extent_bytes and keep:  # a loaded machine: crash only once eviction has run
        deadline = time.monotonic() + 10
        while not log.stats["activity_evicted"] and time.monotonic() < deadline:
            threading.Event().wait(0.005)
    with lock:
        survivors = [r for rs in must_survive for r in rs]
    log.crash()  # the thread stops; nothing more is written
    stop.set()
    for t in threads:
        t.join(5)
    files.crash()
    # the restart may turn the activity log on or off: either way it holds every region
    again = RegionLog(SiteDir(tmp_path), RB, lambda: 0, extent_bytes=rng.choice([0, 8 * RB]))
    vol2 = again.open_volume("v", SIZE)
    held = set(vol2.state.held())
    lost = set(survivors) - held
    assert not lost, f"seed {seed}: durable marks lost in the crash: {sorted(lost)[:10]}"
    assert survivors, "the run made no durable marks to check"
    if extent_bytes:
        assert log.stats["activity_evicted"] or not keep, "no extent was evicted: proved little"
    again.crash()


def test_group_commit_shares_fsyncs_between_concurrent_writers(tmp_path):
    log, vol = open_log(tmp_path)
    barrier = threading.Barrier(16)

    def writer(i: int) -> None:
        barrier.wait()
        for j in range(20):
            m = vol.mark(((i * 20 + j) * RB) % SIZE, 1)
            m.wait(5)
            m.assign(1)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    m = log.metrics()
    log.close()
    assert m["region_marks_new"] >= 100
    assert m["region_fsyncs"] < m["region_marks_new"], m
    assert m["region_marks_per_fsync"] > 1.0


def test_an_already_dirty_region_costs_nothing(tmp_path):
    log, vol = open_log(tmp_path)
    first = vol.mark(0, 10)
    first.wait(5)
    fsyncs = log.stats["region_fsyncs"]
    for _ in range(50):
        m = vol.mark(100, 10)
        assert m.durable, "a set, fsynced region must not wait"
        m.assign(1)
    assert log.stats["region_fsyncs"] == fsyncs
    first.assign(1)
    log.close()


def test_a_failed_fsync_fails_the_write_and_every_later_new_mark(tmp_path):
    files = CrashableFiles(random.Random(0), fail_sync=True)
    log, vol = open_log(tmp_path, files)
    m = vol.mark(0, 1)
    got: list[BaseException | None] = []
    m.add_done_callback(got.append)
    with pytest.raises(RegionLogError, match="cannot write the dirty-region log"):
        m.wait(5)
    assert got and isinstance(got[0], RegionLogError)
    with pytest.raises(RegionLogError):
        vol.mark(10 * RB, 1)
    log.crash()


def test_clears_follow_kafka_durability_and_a_clean_close_leaves_nothing(tmp_path):
    state = {"durable": 0}
    log, vol = open_log(tmp_path, durable=lambda: state["durable"])
    marks = [vol.mark(i * RB, 1) for i in range(10)]
    for i, m in enumerate(marks):
        m.wait(5)
        m.assign(i + 1)
    state["durable"] = 5
    deadline = threading.Event()
    for _ in range(200):
        if log.dirty_regions() == 5:
            break
        deadline.wait(0.01)
    assert vol.state.dirty() == list(range(5, 10))
    state["durable"] = 10
    log.close()
    again = RegionLog(SiteDir(tmp_path), RB, lambda: 0)
    assert again.open_volume("v", SIZE).state.dirty() == []
    again.crash()


def test_restart_with_another_region_size_keeps_the_dirty_bytes(tmp_path):
    log, vol = open_log(tmp_path)
    m = vol.mark(14 * RB + 10, 3 * RB)  # regions 14..17 at 4 KiB
    m.wait(5)
    log.crash()
    big = RegionLog(SiteDir(tmp_path), 16 * RB, lambda: 0)
    vol16 = big.open_volume("v", SIZE)
    assert vol16.state.held() == [0, 1]  # 64 KiB regions 0 (14, 15) and 1 (16, 17)
    big.crash()
    small = RegionLog(SiteDir(tmp_path), RB, lambda: 0)
    assert small.open_volume("v", SIZE).state.held() == list(range(0, 32))
    small.crash()


def test_a_damaged_log_is_refused_with_what_to_do(tmp_path):
    log, _vol = open_log(tmp_path)
    log.close()
    path = SiteDir(tmp_path).region_log_path("v")
    path.write_bytes(b"garbage" * 10)
    with pytest.raises(RegionLogError, match=r"damaged.*Resync"):
        RegionLog(SiteDir(tmp_path), RB, lambda: 0).open_volume("v", SIZE)


def test_resize_rewrites_the_file_and_keeps_the_bits(tmp_path):
    log, vol = open_log(tmp_path)
    m = vol.mark(2 * RB, 1)
    m.wait(5)
    vol.resize(SIZE * 4)
    m2 = vol.mark(SIZE * 3, 1)
    m2.wait(5)
    log.crash()
    again = RegionLog(SiteDir(tmp_path), RB, lambda: 0)
    assert again.open_volume("v", SIZE * 4).state.held() == [2, (SIZE * 3) // RB]
    again.crash()


def test_the_activity_log_spares_the_fsync_of_a_hot_extent_and_a_crash_holds_it_whole(tmp_path):
    """A write to an active extent waits for nothing; after a crash every region of the
    active extents is held (republished) and the failback's scan names them too."""
    from pipeline.ops.resync_plan import Divergence
    from pipeline.ops.resync_scan import read_dirty_logs

    eb = 8 * RB
    log, vol = open_log(tmp_path, eb=eb, keep_s=60.0)
    first = vol.mark(0, 1)
    first.wait(5)
    first.assign(10**9)  # never durable in Kafka
    fsyncs = log.stats["region_fsyncs"]
    for i in range(1, 8):  # the rest of extent 0: no new bit, no wait
        m = vol.mark(i * RB, 1)
        assert m.durable, "a write to an active extent waited"
        m.assign(10**9)
    assert log.stats["region_fsyncs"] == fsyncs
    assert log.metrics()["activity_extents"] == 1
    log.crash()
    # the failback's scan reads the files as the crash left them: the activity log alone
    # (the fine bits may not have been flushed) names the extent's regions
    only_al = tmp_path / "only-al"
    (only_al / "state" / "regions").mkdir(parents=True)
    al_file = SiteDir(tmp_path).activity_log_path("v")
    (only_al / "state" / "regions" / al_file.name).write_bytes(al_file.read_bytes())
    div = Divergence(RB)
    read_dirty_logs(div, SiteDir(only_al))
    assert div.regions["v"] >= set(range(8)), div.regions
    again = RegionLog(SiteDir(tmp_path), RB, lambda: 0, extent_bytes=eb)
    vol2 = again.open_volume("v", SIZE)
    assert set(vol2.state.held()) >= set(range(8)), vol2.state.held()
    again.crash()


def test_a_clean_close_leaves_no_active_extent(tmp_path):
    state = {"durable": 0}
    log, vol = open_log(tmp_path, durable=lambda: state["durable"], eb=8 * RB, keep_s=60.0)
    for i in range(20):
        m = vol.mark(i * 3 * RB, 2 * RB)
        m.wait(5)
        m.assign(i + 1)
    state["durable"] = 20
    log.close()
    again = RegionLog(SiteDir(tmp_path), RB, lambda: 0, extent_bytes=8 * RB)
    assert again.open_volume("v", SIZE).state.held() == []
    again.crash()
