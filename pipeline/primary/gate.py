"""The write gate of a consistency group: a marker holds new writes here, never reads.

Every write (and zero, trim, volume change) passes ``enter`` before it is stamped and
``exit`` once its record is queued. ``hold`` closes the gate and waits until every write
already inside has left: from then on no write of this interceptor is stamped until
``release``. The blocking API waits in ``enter``; the NBD export, whose event loop must
never block, asks ``try_enter`` and, when held, parks the request on ``when_open``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pipeline.errors import ReplicationError


class WriteHeld(Exception):
    """The gate is held: try again once it opens (``WriteGate.when_open``)."""


class WriteGate:
    def __init__(
        self, monotonic: Callable[[], float] = time.monotonic, holder: str = "a marker"
    ) -> None:
        self._now = monotonic
        self._holder = holder
        self._cv = threading.Condition()
        self._inside = 0
        self._held = False
        self._waiters: list[Callable[[], None]] = []
        #: writes that found the gate held, and the seconds it was held
        self.stats = {"held_writes": 0, "holds": 0, "held_s": 0.0}
        self._since = 0.0

    @property
    def held(self) -> bool:
        return self._held

    def try_enter(self) -> bool:
        with self._cv:
            if self._held:
                self.stats["held_writes"] += 1
                return False
            self._inside += 1
            return True

    def enter(self, timeout_s: float) -> None:
        """Wait while held (at most ``timeout_s``: a hold never outlasts its own timeout)."""
        with self._cv:
            if self._held:
                self.stats["held_writes"] += 1
                if not self._cv.wait_for(lambda: not self._held, timeout_s):
                    raise ReplicationError(
                        f"writes were held for {self._holder} for more than {timeout_s:.1f} "
                        "s; check `lowmark marker`, `lowmark migrate` and the control topic"
                    )
            self._inside += 1

    @contextmanager
    def admitted(self, wait: bool, timeout_s: float) -> Iterator[None]:
        """Inside the gate for the block. ``wait=False``: ``WriteHeld`` at once while it is
        held (the NBD export parks the request on ``when_open``)."""
        if wait:
            self.enter(timeout_s)
        elif not self.try_enter():
            raise WriteHeld()
        try:
            yield
        finally:
            self.exit()

    def exit(self) -> None:
        with self._cv:
            self._inside -= 1
            if self._inside == 0:
                self._cv.notify_all()

    def when_open(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` (on the releasing thread) once the gate opens; now if it is open."""
        with self._cv:
            if self._held:
                self._waiters.append(fn)
                return
        fn()

    def hold(self, timeout_s: float) -> bool:
        """Close the gate and wait until no write is inside; False (and the gate open
        again) if that took longer than ``timeout_s``."""
        with self._cv:
            if self._held:
                raise RuntimeError("the write gate is already held")
            self._held, self._since = True, self._now()
            self.stats["holds"] += 1
            drained = self._cv.wait_for(lambda: self._inside == 0, timeout_s)
        if not drained:
            self.release()
        return drained

    def release(self) -> float:
        """Open the gate; wake every parked and waiting write. Returns the seconds held."""
        with self._cv:
            if not self._held:
                return 0.0
            self._held = False
            held = self._now() - self._since
            self.stats["held_s"] += held
            waiters, self._waiters = self._waiters, []
            self._cv.notify_all()
        for fn in waiters:
            fn()
        return held
