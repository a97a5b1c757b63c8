"""The cut follower of a fenced interceptor, without Kafka.

Tries to break: a sync write acknowledged by a W that arrives after the fence (after a
failover that W may lie above the new generation's cut), a waiter left hanging, a
follower of generation g reading another generation's cuts.
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import FencedError
from pipeline.primary.cut_follower import CutFollower
from tests.primary.test_sync_cut import FakeClock, FakeConsumer, _watermark
from tests.replication_helpers import wait_until


def test_each_generation_follows_its_own_watermark_topic() -> None:
    assert CutFollower({}, "cg1").topic == "lowmark.cg1.watermark"
    assert CutFollower({}, "cg1", generation=2).topic == "lowmark.cg1.g2.watermark"


def test_a_failed_follower_covers_nothing_more() -> None:
    consumers: list[FakeConsumer] = []

    def factory(conf: dict[str, Any]) -> FakeConsumer:
        consumers.append(FakeConsumer(conf))
        return consumers[-1]

    f = CutFollower({}, "cg1", poll_s=0.01, now=FakeClock(), consumer_factory=factory)
    f.start()
    wait_until(lambda: bool(consumers and consumers[0].assigned), 5, "the follower assigning")
    got: dict[int, BaseException | None] = {}
    f.on_covered(10, lambda exc: got.__setitem__(10, exc), timeout_s=60)
    consumers[0].messages.put(_watermark(10))
    wait_until(lambda: 10 in got, 5, "the first waiter")
    assert got[10] is None
    f.on_covered(20, lambda exc: got.__setitem__(20, exc), timeout_s=60)
    fenced = FencedError("a newer generation exists")
    f.fail(fenced)
    assert got[20] is fenced, "a pending waiter must fail with the fence"
    consumers[0].messages.put(_watermark(30))  # too late: nobody reads it any more
    f.on_covered(5, lambda exc: got.__setitem__(5, exc), timeout_s=60)
    assert got[5] is fenced, "even a covered ts is refused once fenced"
    try:
        f.wait_covered(1, timeout_s=1)
    except FencedError as exc:
        assert exc is fenced
    else:
        raise AssertionError("wait_covered returned after the fence")
    f.close()
