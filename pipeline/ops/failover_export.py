"""The NBD export of one volume while a failover rolls it forward.

Three layers, outermost first:

- ``FailoverExport``: reads are answered at once (the cut's bytes: the index over the
  image). Writes wait until the new generation's interceptor runs (``primary_ready``); until
  the roll-forward is done each write is acknowledged only once it is durable in the new
  generation's log, so a re-run after a crash finds every acknowledged write there and drops
  its range from the rebuilt index (``Failover.build_backlog``). After the roll-forward a
  write is acknowledged as ``lowmark serve`` would (per the volume's mode).
- ``RollForwardExport`` (``pipeline.backup.rollforward``): the index laid over the image;
  a write drops its range from the index (the write wins).
- ``SiteImageExport``: reads the site's image file; writes go to the new primary's
  ``VolumeExport`` (image + stamped record in the new generation's log).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from connectors.image.image import Image
from connectors.nbd.server import Export
from pipeline.backup.rollforward import Backlog, ImageSink, RollForwardExport
from pipeline.errors import FailoverError
from pipeline.primary.interceptor import Interceptor
from pipeline.primary.nbd_volume import VolumeExport, callback_future
from pipeline.primary.volume import ConsistencyGroup


class SiteImageExport:
    """Reads from the site's image; writes through the new primary once it runs."""

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.description = f"lowmark volume {name} (failover)"
        self.read_only = False
        self.can_multi_conn = True
        self._image = Image(path)
        self.volume: VolumeExport | None = None

    @property
    def size(self) -> int:
        return self._image.size

    def pread(self, offset: int, length: int) -> bytes:
        return self._image.pread(offset, length)

    def _target(self) -> VolumeExport:
        if self.volume is None:  # FailoverExport lets no write through before that
            raise FailoverError(f"volume {self.name}: the new primary is not running yet")
        return self.volume

    def write(self, offset: int, data: bytes, fua: bool) -> Awaitable[None] | None:
        return self._target().write(offset, data, fua)

    def write_zeroes(
        self, offset: int, length: int, fua: bool, may_trim: bool
    ) -> Awaitable[None] | None:
        return self._target().write_zeroes(offset, length, fua, may_trim)

    def trim(self, offset: int, length: int, fua: bool) -> Awaitable[None] | None:
        return self._target().trim(offset, length, fua)

    def flush(self) -> Awaitable[None] | None:
        return self._target().flush() if self.volume is not None else None

    def close(self) -> None:
        self._image.close()


class Gate:
    """Shared by the exports of one failover: is the new primary running, is the
    roll-forward done, when was the first read answered."""

    def __init__(self, started_mono: float) -> None:
        self.started_mono = started_mono
        self.primary_ready = threading.Event()
        self.rolled_forward = threading.Event()
        self.failed: BaseException | None = None
        self.first_read_s: float | None = None
        self.on_first_read: Callable[[float], None] | None = None
        self.interceptor: Interceptor | None = None
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._lock = threading.Lock()

    def read_answered(self) -> None:
        if self.first_read_s is None:
            self.first_read_s = time.monotonic() - self.started_mono
            if self.on_first_read is not None:
                self.on_first_read(self.first_read_s)

    def open(self, cg: ConsistencyGroup) -> None:
        """The new primary runs: let writes through (thread-safe)."""
        self.interceptor = cg.interceptor
        self._release(None)

    def fail(self, exc: BaseException) -> None:
        self.failed = exc
        self._release(exc)

    def _release(self, exc: BaseException | None) -> None:
        with self._lock:
            self.primary_ready.set()
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            loop.call_soon_threadsafe(_settle, fut, exc)

    async def wait_ready(self) -> None:
        with self._lock:
            if not self.primary_ready.is_set():
                loop = asyncio.get_running_loop()
                fut: asyncio.Future[None] = loop.create_future()
                self._waiters.append((loop, fut))
            else:
                fut = None  # type: ignore[assignment]
        if fut is not None:
            await fut
        if self.failed is not None:
            raise FailoverError(f"writes are refused: the failover failed: {self.failed}")

    async def durable(self) -> None:
        """Every record stamped so far is durable in the new generation's log."""
        engine = self.interceptor
        assert engine is not None
        await callback_future(asyncio.get_running_loop(), engine.barrier().add_done_callback)


def _settle(fut: asyncio.Future[None], exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)


class FailoverExport:
    """What the NBD server serves for one volume during and after a failover."""

    def __init__(
        self,
        name: str,
        volume_id: str,
        image_path: Path,
        backlog: Backlog,
        images: ImageSink,
        gate: Gate,
    ) -> None:
        self.site_image = SiteImageExport(name, image_path)
        self.inner = RollForwardExport(self.site_image, backlog, volume_id, images=images)
        self.gate = gate
        self.name = name
        self.description = self.site_image.description
        self.read_only = False
        self.can_multi_conn = True

    @property
    def size(self) -> int:
        return self.inner.size

    def attach(self, volume: VolumeExport) -> None:
        self.site_image.volume = volume

    def pread(self, offset: int, length: int) -> bytes:
        data = self.inner.pread(offset, length)
        self.gate.read_answered()
        return data

    def write(self, offset: int, data: bytes, fua: bool) -> Awaitable[None] | None:
        return self._guarded(lambda: self.inner.write(offset, data, fua))

    def write_zeroes(
        self, offset: int, length: int, fua: bool, may_trim: bool
    ) -> Awaitable[None] | None:
        return self._guarded(lambda: self.inner.write_zeroes(offset, length, fua, may_trim))

    def trim(self, offset: int, length: int, fua: bool) -> Awaitable[None] | None:
        return self._guarded(lambda: self.inner.trim(offset, length, fua))

    def flush(self) -> Awaitable[None] | None:
        if not self.gate.primary_ready.is_set():
            return None  # nothing was written yet
        return self.inner.flush()

    def _guarded(self, submit: Callable[[], Awaitable[None] | None]) -> Awaitable[None] | None:
        gate = self.gate
        if gate.primary_ready.is_set() and gate.failed is None and gate.rolled_forward.is_set():
            return submit()  # a plain primary now
        return self._later(submit)

    async def _later(self, submit: Callable[[], Awaitable[None] | None]) -> None:
        gate = self.gate
        await gate.wait_ready()
        pending = submit()
        if pending is not None:
            await pending
        if not gate.rolled_forward.is_set():
            await gate.durable()

    def close(self) -> None:
        self.site_image.close()


def exports_for(
    volumes: list[dict[str, object]],
    site_images: Callable[[str], Path],
    backlog: Backlog,
    images: ImageSink,
    gate: Gate,
) -> dict[str, FailoverExport]:
    """One ``FailoverExport`` per catalogued volume, by name."""
    out: dict[str, FailoverExport] = {}
    for entry in volumes:
        vid, name = str(entry["volume_id"]), str(entry["name"])
        out[name] = FailoverExport(name, vid, site_images(vid), backlog, images, gate)
    return out


__all__ = ["Export", "FailoverExport", "Gate", "SiteImageExport", "exports_for"]
