"""Markers on a schedule (``[markers] interval_s``), taken by the active watermark service.

One watermark service is active per CG (the others stand by), so the schedule runs there
and nowhere else: ``MarkerSchedule`` asks ``is_active`` before every marker. Each marker
is named ``<name>-<UTC time>`` (``auto-20261202T045501.250Z``), restorable by that name.
A marker that fails is logged and counted; the next one is tried at its time. Markers
follow the CG's generation: after a failover they are taken at the new primary.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.errors import LowmarkError
from pipeline.logs import event
from pipeline.ops.marker import Coordinator, MarkerOptions

log = logging.getLogger("lowmark.marker")


@dataclass(frozen=True)
class ScheduleConfig:
    interval_s: float
    name: str = "auto"
    pre_hook: str = ""
    post_hook: str = ""
    timeout_s: float = 5.0


def marker_name(prefix: str, wall_us: int) -> str:
    t = dt.datetime.fromtimestamp(wall_us / 1e6, dt.UTC)
    return f"{prefix}-{t.strftime('%Y%m%dT%H%M%S')}.{t.microsecond // 1000:03d}Z"


class MarkerSchedule:
    def __init__(
        self,
        config: ScheduleConfig,
        kafka_conf: Mapping[str, Any],
        cg: str,
        is_active: Callable[[], bool],
        generation: Callable[[], int],
        wall_us: Callable[[], int],
    ) -> None:
        self.config, self.kafka_conf, self.cg = config, dict(kafka_conf), cg
        self._is_active, self._generation, self._wall_us = is_active, generation, wall_us
        self._coordinator: Coordinator | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats: dict[str, Any] = {"scheduled_markers": 0, "scheduled_marker_failures": 0,
                                      "last_marker_ts": 0, "last_marker_hold_s": 0.0}  # fmt: skip

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lowmark-marker-schedule",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.config.timeout_s * 3)
        if self._coordinator is not None:
            self._coordinator.close()

    def _run(self) -> None:
        while not self._stop.wait(self.config.interval_s):
            if self._is_active():
                self.take_one()

    def take_one(self) -> None:
        c = self.config
        name = marker_name(c.name, self._wall_us())
        try:
            generation = self._generation()
            if self._coordinator is None or self._coordinator.generation != generation:
                if self._coordinator is not None:
                    self._coordinator.close()
                self._coordinator = None
                self._coordinator = Coordinator(self.kafka_conf, self.cg, generation=generation)
            result = self._coordinator.take(
                MarkerOptions(name, c.pre_hook, c.post_hook, c.timeout_s)
            )
        except LowmarkError as exc:
            self.stats["scheduled_marker_failures"] += 1
            event(log, "scheduled marker failed", logging.WARNING, cg=self.cg, marker=name,
                  error=str(exc))  # fmt: skip
            return
        self.stats["scheduled_markers"] += 1
        self.stats["last_marker_ts"] = result.ts
        self.stats["last_marker_hold_s"] = result.max_hold_s
