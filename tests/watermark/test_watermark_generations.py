"""`lowmark watermark` following the roles, on a real broker (``run_watermark``).

Tries to break: a watermark service that keeps folding generation 0 after generation 1
was committed (the new primary's sync writes would never be covered), that publishes
generation 1's W into generation 0's topic or below generation 1's base_w, or whose old
generation's W keeps moving after the switch.
"""

from __future__ import annotations

import threading

import pytest

from pipeline.app.config import load_config
from pipeline.app.services import run_watermark
from pipeline.primary.volume import ConsistencyGroup
from pipeline.timesource import wall_us
from pipeline.topology.roles import initial_roles, plan_failover
from pipeline.topology.store import RolesStore
from pipeline.watermark.publisher import latest_watermark
from tests.replication_helpers import FAST, wait_until

pytestmark = pytest.mark.kafka


def test_the_watermark_service_moves_to_the_new_generation(kafka_conf, unique_name, tmp_path):
    cfg = load_config(
        None,
        {
            "kafka": {"bootstrap_servers": kafka_conf["bootstrap.servers"]},
            "cg": {"name": unique_name},
            "watermark": {"liveness_timeout_s": 30},
        },
        environ={},
    )
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            run_watermark(cfg, stop=stop)
        except BaseException as exc:
            errors.append(exc)

    service = threading.Thread(target=run, name="watermark", daemon=True)
    service.start()
    old = ConsistencyGroup.open(unique_name, tmp_path / "old", kafka_conf, **FAST)
    new = None
    try:
        wait_until(lambda: latest_watermark(kafka_conf, unique_name, 10) is not None, 30, "W g0")
        store = RolesStore(kafka_conf)
        g0 = store.commit(unique_name, None, initial_roles(unique_name, "main", now_us=wall_us()))
        w0 = latest_watermark(kafka_conf, unique_name, 10)
        assert w0 is not None
        g1 = plan_failover(g0, unique_name, "dr", w0.w, dict(w0.log_offsets), True, wall_us())
        store.commit(unique_name, 0, g1)
        # the old primary learns it from its own watch
        wait_until(lambda: old.interceptor.fenced_by_generation is not None, 10, "old fenced")
        opts = {**FAST, "generation": 1, "clock_floor_us": g1.base_w}
        new = ConsistencyGroup.open(unique_name, tmp_path / "new", kafka_conf, **opts)

        def w1() -> int:
            wm = latest_watermark(kafka_conf, unique_name, 10, generation=1)
            return 0 if wm is None else wm.w

        wait_until(lambda: w1() > g1.base_w, 30, f"a W of generation 1 above {g1.base_w}")
        first = w1()
        wait_until(lambda: w1() > first, 10, "generation 1's W moving")
        # generation 0's W stopped: its service is closed, its only member fenced
        g0_last = latest_watermark(kafka_conf, unique_name, 10)
        threading.Event().wait(1.5)
        assert latest_watermark(kafka_conf, unique_name, 10) == g0_last
        assert not errors, errors
    finally:
        stop.set()
        service.join(30)
        for cg in (old, new):
            if cg is not None:
                cg.close()
    assert not service.is_alive() and not errors, errors
