"""A ConsistencyGroup whose open fails after its interceptor started leaves nothing running.

Found by the primary fsync-loss run: a republish that failed (the disk went away mid-way)
left the interceptor's thread and transactional producer running in the process, and the
next open of the same data directory raced it. Tries to break: a thread left behind, the
dirty regions cleared though their republish never finished.
"""

from __future__ import annotations

import threading

import pytest

from pipeline.errors import ReplicationError
from pipeline.primary import volume as volume_mod
from pipeline.primary.volume import ConsistencyGroup
from tests.replication_helpers import wait_until

pytestmark = pytest.mark.kafka


def _interceptor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("lowmark-") and t.is_alive()]


def test_a_failed_republish_stops_the_interceptor_and_keeps_the_regions(
    kafka_conf, unique_name, tmp_path, monkeypatch
):
    with ConsistencyGroup.open(unique_name, tmp_path, kafka_conf) as cg:
        cg.create_volume("v", 1 << 20).write(0, b"x" * 4096)
        cg.flush()
    before = set(_interceptor_threads())

    def failing(cg: ConsistencyGroup) -> None:
        raise ReplicationError("republish failed (injected)")

    monkeypatch.setattr(volume_mod, "republish", failing)
    with pytest.raises(ReplicationError, match="injected"):
        ConsistencyGroup.open(unique_name, tmp_path, kafka_conf)
    wait_until(lambda: not (set(_interceptor_threads()) - before), 10,
               "the half-opened CG's interceptor thread to stop")  # fmt: skip
    monkeypatch.undo()
    with ConsistencyGroup.open(unique_name, tmp_path, kafka_conf) as again:  # not refused
        assert again.volume("v").pread(0, 4096) == b"x" * 4096
