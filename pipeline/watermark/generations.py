"""A watermark service that follows the CG's roles from one generation to the next.

``lowmark watermark`` runs this: at start it reads the roles (no record: generation 0)
and runs a ``WatermarkService`` for that generation; about once a second
(``check_every_s`` on the injected ``TimeSource``) it reads them again, and when they name
a newer generation it logs it, closes the service and starts one for the new generation.
The old generation's W stops moving there: nobody needs it any more (its records above
the failover cut are never applied, and those below it are bounded by the roles'
``base_offsets``, not by its W).

A failed read of the roles is logged and retried at the next check; the current
generation's W goes on meanwhile. It has the service's interface (``start``, ``step``,
``close``, ``metrics``), so the services' run loop drives it unchanged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from pipeline.errors import LowmarkError
from pipeline.logs import event
from pipeline.timesource import REAL_TIME, TimeSource
from pipeline.watermark.service import WatermarkService
from schemas.records import CgRoles

__all__ = ["GenerationalWatermark"]

log = logging.getLogger("lowmark.watermark")


class GenerationalWatermark:
    """``make(generation)`` builds the service of a generation; ``read_roles()`` returns the
    CG's latest roles (None: none recorded)."""

    def __init__(
        self,
        cg: str,
        make: Callable[[int], WatermarkService],
        read_roles: Callable[[], CgRoles | None],
        time_source: TimeSource = REAL_TIME,
        check_every_s: float = 1.0,
    ) -> None:
        self.cg = cg
        self._make = make
        self._read = read_roles
        self._now = time_source.monotonic
        self.check_every_s = check_every_s
        self.generation = -1  # none yet: start() reads the roles
        self._want = 0  # the generation the roles name (a failed switch is retried)
        self.service: WatermarkService | None = None
        self.switches = 0
        self.roles_errors = 0
        self._next_check = 0.0

    def start(self) -> None:
        roles = self._read()  # an error here is start's: the run loop retries it
        self._want = 0 if roles is None else roles.generation
        self._run_generation(self._want)
        self._next_check = self._now() + self.check_every_s

    def step(self, poll_timeout_s: float = 0.05) -> None:
        now = self._now()
        if now >= self._next_check:
            self._next_check = now + self.check_every_s
            self._follow()
        if self.service is None or self._want != self.generation:
            # raises while Kafka is away: the run loop backs off and comes back here
            self._run_generation(self._want)
        assert self.service is not None
        self.service.step(poll_timeout_s)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.step(0.05)

    def close(self) -> None:
        if self.service is not None:
            self.service.close()
            self.service = None

    def metrics(self) -> dict[str, Any]:
        inner = self.service.metrics() if self.service is not None else {}
        return {
            **inner,
            "generation": self.generation,
            "generation_switches": self.switches,
            "roles_errors": self.roles_errors,
        }

    def _follow(self) -> None:
        try:
            roles = self._read()
        except LowmarkError as exc:
            self.roles_errors += 1
            event(log, "cannot read the CG's roles; W goes on in this generation",
                  level=logging.WARNING, cg=self.cg, generation=self.generation,
                  error=str(exc))  # fmt: skip
            return
        if roles is None or roles.generation <= self._want:
            return
        event(
            log,
            "a newer generation exists: the watermark service moves to it",
            level=logging.WARNING,
            cg=self.cg,
            generation=self.generation,
            newer_generation=roles.generation,
            primary_site=roles.primary_site,
            base_w=roles.base_w,
        )
        self.switches += 1
        self._want = roles.generation

    def _run_generation(self, generation: int) -> None:
        self.close()
        svc = self._make(generation)
        try:
            svc.start()
        except BaseException:
            # half-started: drop its clients; the next step or start tries again
            svc.close()
            raise
        self.service = svc
        self.generation = generation
