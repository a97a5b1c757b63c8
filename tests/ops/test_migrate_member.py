"""Volumes parked at an interceptor by a migration (``pipeline.primary.access``), in
process, on a real broker.

Tries to break: a released volume that still takes a write (parked in its gate through
the cutover, or from the blocking API), comes back served after a crash, is created
again from the config or by `lowmark volume create`, or keeps a hold on W because its
crashed instance still named it; a stage that survives its unstage; a reclaim that
loses the data.
"""

from __future__ import annotations

import threading

import pytest

from pipeline.errors import MigrationError, VolumeError, VolumeMovedError
from pipeline.ops.migrate_member import MigrationMember
from pipeline.primary import interceptor as interceptor_mod
from pipeline.primary.volume import ConsistencyGroup, VolumeInfo
from pipeline.site import SiteDir

pytestmark = pytest.mark.kafka

MIB = 1 << 20


def crash(cg: ConsistencyGroup) -> None:
    """As SIGKILL leaves it: nothing more published, no LEAVE, files as they are."""
    cg.interceptor.crash()
    if cg.regions is not None:
        cg.regions.crash()
    for vol in cg.volumes.values():
        vol.image.close()


def test_a_released_volume_takes_no_write_and_stays_parked_across_a_crash(
    kafka_conf, unique_name, tmp_path
):
    cg = ConsistencyGroup.open(unique_name, tmp_path, kafka_conf, interceptor_id="a")
    vol = cg.create_volume("v", MIB)
    vol.write(0, b"1" * 4096)
    m = MigrationMember(cg)
    held = m.hold("v", "b", "v@a->b", lease_s=30)
    assert held["final_ts"] > 0 and vol.access == "change"
    # a write arriving during the hold waits in the gate, then is refused after release
    outcome: list[BaseException | None] = []

    def late_write() -> None:
        try:
            vol.write(4096, b"2" * 4096)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=late_write)
    t.start()
    t.join(0.3)
    assert t.is_alive(), "a write went through a held volume"
    m.release("v", "b", "v@a->b")
    t.join(10)
    assert outcome and isinstance(outcome[0], VolumeMovedError), outcome
    assert vol.image.pread(4096, 4096) == bytes(4096), "the refused write touched the image"
    with pytest.raises(VolumeMovedError, match="inaccessible at interceptor a"):
        vol.pread(0, 4096)
    with pytest.raises(VolumeError, match="parked here"):
        cg.create_volume("v", MIB)
    m.close()
    crash(cg)

    resynced: list[tuple[str, ...]] = []
    real = interceptor_mod.Interceptor.resynced

    def spy(self, seq: int, volumes: tuple[str, ...]) -> None:
        resynced.append(volumes)
        real(self, seq, volumes)

    interceptor_mod.Interceptor.resynced = spy  # type: ignore[method-assign]
    try:
        again = ConsistencyGroup.open(unique_name, tmp_path, kafka_conf, interceptor_id="a")
    finally:
        interceptor_mod.Interceptor.resynced = real  # type: ignore[method-assign]
    try:
        assert "v" not in again.volumes and again.parking.parked["v"].role == "source"
        # no tail of it is possible here: the hold of the crashed instance must lift
        assert resynced and "v" in resynced[0], resynced
        # an abort takes it back, data intact, and it is written again
        m2 = MigrationMember(again)
        vol2 = m2.reclaim("v")
        assert vol2 is not None and vol2.access == "optimized"
        assert vol2.pread(0, 4096) == b"1" * 4096
        vol2.write(8192, b"3" * 4096)
        m2.close()
    finally:
        again.close()


def test_a_forgotten_volume_leaves_a_tombstone_and_moving_back_replaces_it(
    kafka_conf, unique_name, tmp_path
):
    with ConsistencyGroup.open(unique_name, tmp_path, kafka_conf, interceptor_id="a") as cg:
        cg.create_volume("v", MIB).write(0, b"1" * 4096)
        m = MigrationMember(cg)
        m.hold("v", "b", "v@a->b", 30)
        m.release("v", "b", "v@a->b")
        m.forget("v", "v@a->b")
        m.forget("v", "v@a->b")  # done before: nothing happens
        assert m.state("v")["state"] == "absent"
        img = SiteDir(tmp_path).image_path("v")
        assert not img.exists()
        with pytest.raises(VolumeError, match="parked here"):
            cg.create_volume("v", MIB)
        m.close()
    # a restart reads the tombstone (its image is gone: not an error) and keeps it
    with ConsistencyGroup.open(unique_name, tmp_path, kafka_conf, interceptor_id="a") as cg:
        assert cg.parking.parked["v"].role == "moved" and "v" not in cg.volumes
        # moving back: a stage replaces the tombstone; unstage removes it all
        info = VolumeInfo("v", "v", MIB)
        img2 = cg.parking.stage(info, "b", "v@b->a")
        img2.close()
        assert cg.parking.parked["v"].role == "target"
        cg.parking.unstage("v")
        assert "v" not in cg.parking.parked and not SiteDir(tmp_path).image_path("v").exists()


def test_a_source_that_has_not_finished_releasing_cannot_take_the_volume_back_as_target(
    kafka_conf, unique_name, tmp_path
):
    with ConsistencyGroup.open(unique_name, tmp_path, kafka_conf, interceptor_id="a") as cg:
        cg.create_volume("v", MIB)
        m = MigrationMember(cg)
        m.hold("v", "b", "v@a->b", 30)
        m.release("v", "b", "v@a->b")
        with pytest.raises(MigrationError, match="not complete"):
            cg.parking.stage(VolumeInfo("v", "v", MIB), "b", "v@b->a")
        with pytest.raises(MigrationError, match="not held"):
            m.release("v", "c", "v@a->c")  # another migration's release: refused
        m.close()


def test_a_lapsed_hold_serves_the_volume_again(kafka_conf, unique_name, tmp_path):
    with ConsistencyGroup.open(unique_name, tmp_path, kafka_conf, interceptor_id="a") as cg:
        vol = cg.create_volume("v", MIB)
        m = MigrationMember(cg)
        m.hold("v", "b", "v@a->b", lease_s=0.2)
        assert vol.access == "change"
        with pytest.raises(MigrationError, match=r"held for migration v@a->b"):
            m.hold("v", "c", "v@a->c", 5)
        from tests.replication_helpers import wait_until

        wait_until(lambda: vol.access == "optimized", 5, "the hold to lapse")
        vol.write(0, b"4" * 4096)  # served again
        with pytest.raises(MigrationError, match="lease lapsed"):
            m.release("v", "b", "v@a->b")
        assert m.stats["migration_holds_lapsed"] == 1
        m.close()


def test_an_adopted_volume_writes_above_the_sources_final_ts_whatever_the_clocks(
    kafka_conf, unique_name, tmp_path
):
    """The target's clock is raised above the source's final ts before the volume is
    served: a source whose clock ran ahead (here: 5 s) must not see the volume's next
    write stamped below its own last one (the per-volume ts order the planner needs)."""
    with ConsistencyGroup.open(unique_name, tmp_path, kafka_conf, interceptor_id="b") as cg:
        ahead = cg.interceptor.clock.now() + (5_000_000 << 12)
        img = cg.parking.stage(VolumeInfo("v", "v", MIB), "a", "v@a->b")
        img.close()
        vol = cg.parking.adopt("v", ahead, {"a": "inaccessible", "b": "optimized"})
        ts = vol.write(0, b"5" * 4096)
        assert ts > ahead
        assert "v" in cg.interceptor.tail_volumes  # named in PROGRESS from now on
