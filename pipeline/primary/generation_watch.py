"""Fencing that holds across a partition: an interceptor stops acknowledging writes once
it learns that its CG moved on to a newer generation.

Kafka fences the old primary's transactional ids (``pipeline.primary.fencing``), but only
where the orchestrator's requests reach; a primary cut off from it keeps its producer
until it comes back. So each interceptor also reads the CG's roles itself (``RolesStore``,
every ``generation_check_s``) and, when they name a generation newer than its own, fails
with a ``FencedError`` (``superseded``): from then on it stamps nothing, no write of it is
acknowledged (sync waiters fail, a flush fails) and it commits nothing more.

A read that fails (brokers away, a partition) is logged and retried, never fatal: the
watch can only ever stop writes, so an unreadable roles record must not stop them either.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from pipeline.errors import FencedError
from pipeline.logs import event
from pipeline.primary.engine_config import InterceptorConfig
from pipeline.topology.drain import concerns, latest_drain
from pipeline.topology.store import RolesStore
from schemas.records import CgRoles, DrainRequest
from schemas.ts import format_ts

__all__ = ["GenerationWatch", "superseded"]

log = logging.getLogger("lowmark.interceptor")

#: a failing read is logged at most this often (it is retried every interval)
_LOG_EVERY_S = 30.0


def superseded(
    roles: CgRoles | None, cg: str, generation: int, interceptor_id: str
) -> FencedError | None:
    """The error that ends an interceptor of ``generation`` once ``roles`` (the CG's latest
    roles; None: none recorded) name a newer generation; None while it is current.

    Pure: the decision and its words, so both are tested without Kafka.
    """
    if roles is None or roles.generation <= generation:
        return None
    last = roles.last_transition
    since = ""
    if last is not None:
        since = (
            f" since the {last.kind.value.lower()} from {last.from_site or 'an unrecorded site'}"
            f" at W {last.w} ({format_ts(last.w)})"
        )
    return FencedError(
        f"interceptor {interceptor_id} of CG {cg} (generation {generation}) is fenced: the "
        f"CG is at generation {roles.generation}, whose primary is {roles.primary_site!r}"
        f"{since}. This site is no longer the primary: it acknowledges no more writes, and "
        f"its writes since the failover cut are not replicated (no backup applies them). "
        f"Stop using it; the way back is a failback (`lowmark failback`), which resyncs "
        f"this site from the new primary. `lowmark roles show` prints the roles."
    )


class GenerationWatch:
    """A daemon thread that calls ``on_superseded(error)`` once, when ``read_roles()``
    returns roles newer than ``generation``; then it stops."""

    def __init__(
        self,
        read_roles: Callable[[], CgRoles | None],
        cg: str,
        generation: int,
        interceptor_id: str,
        on_superseded: Callable[[FencedError], None],
        interval_s: float = 1.0,
        now: Callable[[], float] | None = None,
        read_drain: Callable[[], DrainRequest | None] | None = None,
        on_drain: Callable[[DrainRequest], None] | None = None,
    ) -> None:
        self._read = read_roles
        self._read_drain = read_drain
        self._on_drain = on_drain
        self.drained: DrainRequest | None = None
        self.cg = cg
        self.generation = generation
        self.interceptor_id = interceptor_id
        self._on_superseded = on_superseded
        self.interval_s = interval_s
        self._now = now
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_error_log = -1e18
        #: reads done, and reads that failed (metrics, tests)
        self.checks = 0
        self.errors = 0
        self.fired: FencedError | None = None

    @classmethod
    def of(
        cls,
        config: InterceptorConfig,
        kafka_conf: dict[str, Any],
        on_superseded: Callable[[FencedError], None],
        now: Callable[[], float],
        read_roles: Callable[[], CgRoles | None] | None = None,
        on_drain: Callable[[DrainRequest], None] | None = None,
    ) -> GenerationWatch:
        """The watch of one interceptor; by default it reads ``RolesStore.latest`` (and
        the CG's drain request, when ``on_drain`` is given and the roles are read here)."""
        read_drain = None
        if on_drain is not None and read_roles is None:

            def read_drain() -> DrainRequest | None:
                return latest_drain(kafka_conf, config.cg)

        if read_roles is None:
            store = RolesStore(kafka_conf, timeout_s=10.0)

            def read_roles() -> CgRoles | None:
                return store.latest(config.cg)

        return cls(
            read_roles,
            config.cg,
            config.generation,
            config.interceptor_id,
            on_superseded,
            config.generation_check_s,
            now,
            read_drain,
            on_drain,
        )

    def check(self) -> FencedError | None:
        """Read the roles once; on a newer generation, fence (once) and return the error.
        A failed read is logged and returns None."""
        try:
            roles = self._read()
        except Exception as exc:  # a KafkaError mostly; whatever it is, never fatal
            self._read_failed(exc)
            return None
        finally:
            self.checks += 1
        error = superseded(roles, self.cg, self.generation, self.interceptor_id)
        if error is None:
            self._check_drain()
        if error is not None and self.fired is None:
            self.fired = error
            event(
                log,
                "a newer generation exists: interceptor fenced",
                level=logging.ERROR,
                cg=self.cg,
                interceptor=self.interceptor_id,
                generation=self.generation,
                newer_generation=None if roles is None else roles.generation,
                primary_site=None if roles is None else roles.primary_site,
            )
            self._on_superseded(error)
        return error

    def _check_drain(self) -> None:
        if self._read_drain is None or self._on_drain is None or self.drained is not None:
            return
        try:
            request = self._read_drain()
        except Exception as exc:  # as for the roles: never fatal
            self._read_failed(exc)
            return
        if concerns(request, self.cg, self.generation):
            assert request is not None
            self.drained = request
            self._on_drain(request)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._run, name=f"lowmark-generation-{self.interceptor_id}", daemon=True
        )
        self._thread.start()

    def close(self, timeout_s: float = 1.0) -> None:
        # short: a read in progress may wait for an unreachable cluster; a late answer is
        # harmless (fencing a closed interceptor changes nothing)
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self.check() is not None:
                return

    def _read_failed(self, exc: BaseException) -> None:
        self.errors += 1
        now = self._now() if self._now is not None else 0.0
        if self._now is None or now - self._last_error_log >= _LOG_EVERY_S:
            self._last_error_log = now
            event(
                log,
                "cannot read the CG's roles; retrying (writes go on meanwhile)",
                level=logging.WARNING,
                cg=self.cg,
                interceptor=self.interceptor_id,
                error=str(exc),
                retry_in_s=self.interval_s,
            )
