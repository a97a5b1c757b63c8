"""A fence of the previous instance that lands while a new one joins (the watermark
service fences a silent instance through its transactional id, which the new instance
shares): the new one must join anyway, and every write it acknowledges replicate.

Tries to break: the fence between the new instance's init_transactions and its JOIN (the
race seen in the survivor disasters), twice in a row (the second time it must fail with
a clear error: a real newer instance wins, never two).
"""

from __future__ import annotations

import pytest

from connectors.kafka.reading import iter_range
from connectors.kafka.topics import CgTopics
from pipeline.errors import FencedError
from pipeline.primary.fencing import fence_interceptors
from pipeline.primary.interceptor import Interceptor
from pipeline.primary.volume import ConsistencyGroup
from schemas import codec
from schemas.records import Progress, ProgressKind
from tests.replication_helpers import FAST


def _fencing_join(monkeypatch, kafka_conf, cg: str, times: int) -> list[int]:
    real = Interceptor._join
    calls: list[int] = []

    def join(self):
        calls.append(1)
        if len(calls) <= times:  # the service's fence, just before our JOIN commits
            fence_interceptors(kafka_conf, cg, 0, [self.config.interceptor_id])
        return real(self)

    monkeypatch.setattr(Interceptor, "_join", join)
    return calls


def test_a_fence_between_init_and_join_is_ridden_out(kafka_conf, unique_name, tmp_path,
                                                     monkeypatch):  # fmt: skip
    calls = _fencing_join(monkeypatch, kafka_conf, unique_name, times=1)
    with ConsistencyGroup.open(unique_name, tmp_path / "p", kafka_conf, **FAST) as cg:
        vol = cg.create_volume("v", 1 << 20)
        vol.write(0, b"after the race")
        cg.flush()
        epoch = cg.interceptor.epoch
    assert len(calls) == 2, "the fence did not make the first JOIN fail: proved nothing"
    kinds = [
        (p.kind, p.epoch)
        for m in iter_range(kafka_conf, CgTopics(unique_name).progress)
        for p in [codec.decode(m.value(), Progress)]
    ]
    # one JOIN (a JOIN's epoch is its offset), and every later report is of that instance
    assert [k for k, _e in kinds].count(ProgressKind.JOIN) == 1, f"a fenced JOIN committed: {kinds}"
    assert {e for k, e in kinds if k is not ProgressKind.JOIN} == {epoch}, kinds
    assert kinds[-1][0] is ProgressKind.LEAVE, kinds


def test_a_second_fence_while_joining_fails_clearly(kafka_conf, unique_name, tmp_path,
                                                   monkeypatch):  # fmt: skip
    _fencing_join(monkeypatch, kafka_conf, unique_name, times=2)
    with pytest.raises(FencedError, match="fenced by a newer instance"):
        ConsistencyGroup.open(unique_name, tmp_path / "p", kafka_conf, **FAST)
