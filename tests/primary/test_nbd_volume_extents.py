"""VolumeExport.extents: what BLOCK_STATUS says of a replicating volume's image while NBD
writes are on their way to it.

Tries to break: a write accepted by the export but still waiting for its dirty-region
mark (the image untouched, the client not answered) reported as a hole: a copy tool
running then would skip it for good. Also a landing range that stays "data" after its
write failed or a TRIM made it a hole (a leak that would hide every later hole there).

The volume here is a stand-in with the real image and the export's real code; the
interceptor and the region log are stubs, because what is under test is the export's
ordering between accepting a write and it reaching the image, which needs no broker (the
broker-backed NBD tests in tests/primary drive the same export over Kafka).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from connectors.image.image import Image
from connectors.nbd import protocol as p
from pipeline.primary.nbd_volume import VolumeExport

K = 64 << 10
H = p.STATE_HOLE | p.STATE_ZERO


class SlowMark:
    """A dirty-region mark whose fsync the test completes (or fails)."""

    def __init__(self) -> None:
        self.durable = False
        self._callbacks: list[Callable[[BaseException | None], None]] = []
        self.released = False

    def add_done_callback(self, fn: Callable[[BaseException | None], None]) -> None:
        self._callbacks.append(fn)

    def finish(self, exc: BaseException | None = None) -> None:
        self.durable = exc is None
        for fn in self._callbacks:
            fn(exc)

    def release(self, touched: bool) -> None:
        self.released = True


class StandInVolume:
    name = "v"
    mode = "async"
    access = "optimized"

    def __init__(self, image: Image) -> None:
        self.image = image
        self.marks: list[SlowMark] = []
        engine = SimpleNamespace(
            has_space=lambda n: True,
            admit_ack=lambda writes=1: None,
            clock=SimpleNamespace(commit_wait_us=lambda ts: 0),
            config=SimpleNamespace(replication_timeout_s=5.0),
        )
        self._cg = SimpleNamespace(interceptor=engine)

    @property
    def size(self) -> int:
        return self.image.size

    def mark(self, offset: int, length: int) -> SlowMark:
        self.marks.append(SlowMark())
        return self.marks[-1]

    def submit_write(self, offset: int, data: bytes, **_: Any) -> Any:
        self.image.pwrite(offset, data)
        return SimpleNamespace(ts=1)

    def submit_zero(self, offset: int, length: int, *, trim: bool, **_: Any) -> Any:
        self.image.zero(offset, length, punch=trim)
        return SimpleNamespace(ts=1)


def test_a_write_waiting_for_its_mark_is_never_a_hole(tmp_path: Path) -> None:
    async def scenario() -> None:
        with Image(tmp_path / "v.img", create_size=8 * K) as image:
            vol = StandInVolume(image)
            export = VolumeExport(vol, asyncio.get_running_loop())  # type: ignore[arg-type]
            assert export.extents(0, 8 * K, 100) == [(8 * K, H)]
            pending = export.write(2 * K, b"x" * K, False)
            assert pending is not None  # waits for the mark: the image is untouched
            task = asyncio.ensure_future(pending)
            await asyncio.sleep(0)
            assert image.allocation(0, 8 * K, 100) == [(8 * K, True)]  # the premise
            during = [(2 * K, H), (K, 0), (5 * K, H)]
            assert export.extents(0, 8 * K, 100) == during
            assert export.extents(2 * K + 10, 100, 100) == [(100, 0)]
            assert export.extents(0, 8 * K, 1) == during[:1]
            vol.marks[-1].finish()
            await task
            assert export.extents(0, 8 * K, 100) == during  # now the image's own answer
            assert image.pread(2 * K, K) == b"x" * K

            # A TRIM waiting for its mark is data until it lands, then a hole again.
            trim = export.trim(2 * K, K, False)
            assert trim is not None
            trim_task = asyncio.ensure_future(trim)
            await asyncio.sleep(0)
            assert export.extents(0, 8 * K, 100) == during
            vol.marks[-1].finish()
            await trim_task
            assert export.extents(0, 8 * K, 100) == [(8 * K, H)]

            # A write whose mark fails never lands: its range is a hole again at once.
            failing = asyncio.ensure_future(export.write(6 * K, b"y" * K, False))  # type: ignore[arg-type]
            await asyncio.sleep(0)
            assert export.extents(6 * K, 2 * K, 100) == [(K, 0), (K, H)]
            vol.marks[-1].finish(OSError(5, "region log fsync failed"))
            try:
                await failing
            except OSError:
                pass
            else:
                raise AssertionError("the failed mark was acknowledged")
            assert vol.marks[-1].released
            assert export.extents(0, 8 * K, 100) == [(8 * K, H)]

    asyncio.run(scenario())
