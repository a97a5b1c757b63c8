"""A replicating lowmark volume as an NBD export.

What an NBD client's acknowledgements mean here (the nbdkit-plugin way of stating it):

- WRITE / WRITE_ZEROES / TRIM, async volume: replied after the local write took effect
  (and the clock's commit wait); the record reaches Kafka at the next tick.
- same, sync volume: replied only once the write is inside a published cut: W >= ts
  (durable in Kafka, and no member of the CG holds W below it; ``pipeline.primary.cut_follower``),
  and the primary image is fdatasynced first, FUA or not: a sync write lost from the image
  in a power cut would be republished at the restart as the bytes the image kept, and
  the backups would lose it too (tests/fsloss/test_primary_loss.py).
- same, async volume with NBD_CMD_FLAG_FUA: replied once the primary image is fdatasynced
  and the record is durable in Kafka (not necessarily inside a cut yet).
- a replication failure, or no W covering a sync write within ``replication_timeout_s``,
  is an EIO reply, never a success.
- the volume's access state (NVMe ANA's, ``pipeline.primary.migration``): ``optimized``
  serves everything; ``change`` (a migration's cutover) parks writes until it ends, reads
  go on; ``inaccessible`` (moved to another interceptor) answers every request ESHUTDOWN
  and the server closes the volume's connections. As with NVMe ANA, the path stays
  visible: a new client still negotiates (``nbdinfo`` shows the state in the export's
  description) and gets ESHUTDOWN at its first request, the error a multipath client
  takes as "try the next path".
- once the interceptor is fenced (a newer generation of the CG exists: this site is no
  longer the primary), every WRITE, WRITE_ZEROES, TRIM and FLUSH gets an EIO reply, also
  one already in flight: each success passes ``Interceptor.admit_ack`` just before it.
- FLUSH: the primary image is fdatasynced and every record of this interceptor written
  before the flush is durable in Kafka. Because that covers all connections, the export
  advertises CAN_MULTI_CONN.
- WRITE_ZEROES with NBD_CMD_FLAG_NO_HOLE keeps the range allocated (a ZERO record);
  without it, and TRIM, it is deallocated (a TRIM record). Both read back as zeroes, at the
  primary and at every backup.
- a write never blocks the event loop on Kafka: when too many bytes wait for Kafka
  (backpressure), the write waits in a worker thread and the connection stops reading.
- every WRITE, WRITE_ZEROES and TRIM is replied only once its regions are durably set in
  the volume's dirty-region log (``pipeline.primary.region_log``); a write to a region not
  yet set waits for the log's group-committed fdatasync through a callback (the loop never
  blocks on it), and takes effect on the image only after it.
- BLOCK_STATUS (``base:allocation``) and the holes of a structured READ come from the
  image file's SEEK_DATA / SEEK_HOLE. A range is reported a hole only if, when asked,
  the image has no data there *and* no NBD WRITE / WRITE_ZEROES / TRIM accepted by this
  export is still on its way to the image (waiting for its dirty-region mark, for
  space, or for a marker's hold): those ranges are reported as data (always allowed)
  until the write has taken effect. A write acknowledged before the request has taken
  effect on the image (the ack comes after it), so it is never in a hole. Writes from
  the Python volume API in other threads are concurrent with the answer, as two NBD
  clients are; a range they are writing at that moment may be either.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable

from connectors.image.allocation import with_data
from connectors.nbd.protocol import STATE_HOLE, STATE_ZERO
from pipeline.errors import LowmarkError, ReplicationError, VolumeMovedError
from pipeline.primary.gate import WriteHeld
from pipeline.primary.interceptor import Ticket
from pipeline.primary.region_log import Mark
from pipeline.primary.volume import Volume


class VolumeExport:
    read_only = False
    can_multi_conn = True

    def __init__(self, volume: Volume, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.volume = volume
        self.name = volume.name
        self._loop = loop
        self._engine = volume._cg.interceptor  # the CG's interceptor
        # writes accepted but not yet on the image: (start, end) by a serial; loop thread only
        self._landing: dict[int, tuple[int, int]] = {}
        self._serial = itertools.count()

    @property
    def size(self) -> int:
        return self.volume.size

    @property
    def description(self) -> str:  # nbdinfo shows it
        v = self.volume
        return f"lowmark volume {v.name} ({v.mode} replication, access {v.access})"

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def pread(self, offset: int, length: int) -> bytes:
        if self.volume.access == "inaccessible":
            raise self.volume.moved()
        return self.volume.image.pread(offset, length)

    def extents(self, offset: int, length: int, limit: int) -> list[tuple[int, int]]:
        if self.volume.access == "inaccessible":
            raise self.volume.moved()
        runs = self.volume.image.allocation(offset, length, limit)
        if self._landing:
            runs = with_data(runs, offset, self._landing.values())[:limit]
        return [(n, _HOLE if hole else 0) for n, hole in runs]

    def write(self, offset: int, data: bytes, fua: bool) -> Awaitable[None] | None:
        # an exception here (FencedError from stamp, ...) is an EIO reply (connectors/nbd)
        if self.volume.access == "inaccessible":
            raise self.volume.moved()  # before a mark: nothing of it touches the volume
        mark = self.volume.mark(offset, len(data))

        def submit(block: bool) -> Ticket:
            return self.volume.submit_write(offset, data, commit_wait=block, mark=mark,
                                            gate_wait=block)  # fmt: skip

        if mark.durable and self._engine.has_space(len(data)):
            try:
                return self._finish(submit(False), fua)
            except WriteHeld:
                pass  # a marker holds writes: wait for it off the loop's back
        return self._after_mark(mark, len(data), submit, fua, (offset, offset + len(data)))

    def write_zeroes(
        self, offset: int, length: int, fua: bool, may_trim: bool
    ) -> Awaitable[None] | None:
        # NO_HOLE (may_trim False) keeps the range allocated; the record carries the choice
        # (ZERO or TRIM), so the backup allocates or deallocates it the same way
        return self._zero(offset, length, fua, trim=may_trim)

    def trim(self, offset: int, length: int, fua: bool) -> Awaitable[None] | None:
        return self._zero(offset, length, fua, trim=True)

    def _zero(self, offset: int, length: int, fua: bool, trim: bool) -> Awaitable[None] | None:
        if self.volume.access == "inaccessible":
            raise self.volume.moved()
        mark = self.volume.mark(offset, length)

        def submit(block: bool) -> Ticket:
            return self.volume.submit_zero(offset, length, trim=trim, commit_wait=block,
                                           mark=mark, gate_wait=block)  # fmt: skip

        if mark.durable:
            try:
                return self._finish(submit(False), fua)
            except WriteHeld:
                pass
        return self._after_mark(mark, 0, submit, fua, (offset, offset + length))

    def flush(self) -> Awaitable[None] | None:
        if self.volume.access == "inaccessible":
            raise self.volume.moved()  # every request: the client reconnects, flushes there
        return self._flush()

    async def _flush(self) -> None:
        loop = self._get_loop()
        await loop.run_in_executor(None, self.volume.image.sync)
        await self._durable(self._engine.barrier(), writes=0)

    def _finish(self, ticket: Ticket, fua: bool) -> Awaitable[None] | None:
        wait_us = self._engine.clock.commit_wait_us(ticket.ts)
        sync = self.volume.mode == "sync"
        if fua or sync:
            return self._acknowledge(ticket, wait_us, fua=fua or sync, covered=sync)
        if wait_us > 0:
            return self._wait_then_admit(wait_us)
        self._engine.admit_ack()  # raises once fenced: an EIO reply
        return None

    async def _wait_then_admit(self, wait_us: int) -> None:
        await asyncio.sleep(wait_us / 1e6)
        self._engine.admit_ack()

    async def _acknowledge(self, ticket: Ticket, wait_us: int, *, fua: bool, covered: bool) -> None:
        if fua:
            await self._get_loop().run_in_executor(None, self.volume.image.sync)
        if wait_us > 0:
            await asyncio.sleep(wait_us / 1e6)
        await (self._covered(ticket) if covered else self._durable(ticket))

    def _after_mark(
        self, mark: Mark, nbytes: int, submit: Callable[[bool], Ticket], fua: bool,
        span: tuple[int, int],
    ) -> Awaitable[None]:  # fmt: skip
        """The write's range is landing from now until it took effect (or failed to):
        registered before this returns, so a BLOCK_STATUS behind it never calls it a hole."""
        key = next(self._serial)
        self._landing[key] = span
        return self._land(mark, nbytes, submit, fua, key)

    async def _land(
        self, mark: Mark, nbytes: int, submit: Callable[[bool], Ticket], fua: bool, key: int
    ) -> None:
        """The write's regions are durably dirty first (the ack waits for that fsync anyway;
        the image is not touched before it, so it never differs from Kafka unmarked), then
        it takes effect: on the loop, or in a worker thread when it must wait for space.
        While a marker holds the CG's writes it waits for the gate, also off the loop."""
        handed = False  # submit owns the mark once called (it ends it, also on failure)
        try:
            if not mark.durable:
                await self._mark_durable(mark)
            while True:
                handed = True
                if not self._engine.has_space(nbytes):
                    ticket = await self._get_loop().run_in_executor(None, submit, True)
                    break
                try:
                    ticket = submit(False)
                    break
                except WriteHeld:  # nothing touched, the mark is still ours
                    handed = False
                    await callback_future(self._get_loop(), self._gate_open)
        except BaseException:
            if not handed:
                mark.release(touched=False)
            raise
        finally:
            self._landing.pop(key, None)  # on the image now (or never will be)
        done = self._finish(ticket, fua)
        if done is not None:
            await done

    def _gate_open(self, fn: Callable[[BaseException | None], None]) -> None:
        """Once both the CG's gate (a marker) and the volume's (a cutover) are open; the
        retried submit re-checks both, and the volume's access state."""
        vol = self.volume
        vol._cg.gate.when_open(lambda: vol.gate.when_open(lambda: fn(None)))

    def _mark_durable(self, mark: Mark) -> asyncio.Future[None]:
        return callback_future(self._get_loop(), mark.add_done_callback)

    def _settler(
        self, fut: asyncio.Future[None], writes: int
    ) -> Callable[[BaseException | None], None]:
        """Settles ``fut`` on the loop thread; a success passes the fence gate first."""
        engine = self._engine

        def settle(exc: BaseException | None) -> None:
            if fut.done():
                return
            if exc is None:
                try:
                    engine.admit_ack(writes)
                except LowmarkError as refused:
                    exc = refused
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)

        return settle

    def _durable(self, ticket: Ticket, writes: int = 1) -> asyncio.Future[None]:
        """Durable in Kafka (a FUA write or a flush), answered within
        ``replication_timeout_s`` as ``Interceptor.wait_durable``: an error, not a hang."""
        loop = self._get_loop()
        fut: asyncio.Future[None] = loop.create_future()
        settle = self._settler(fut, writes)
        timeout_s = self._engine.config.replication_timeout_s
        timer = loop.call_later(timeout_s, settle, _not_durable(ticket, writes, timeout_s))
        fut.add_done_callback(lambda _: timer.cancel())

        def wake(exc: BaseException | None) -> None:  # on the tick thread
            loop.call_soon_threadsafe(settle, exc)

        ticket.add_done_callback(wake)
        return fut

    def _covered(self, ticket: Ticket) -> asyncio.Future[None]:
        """Durable, then inside a published cut (W >= ts): chained callbacks, so no thread
        of the executor is held per in-flight sync write. Both within one
        ``replication_timeout_s`` once it took effect, as ``Volume._acknowledge``: the
        durability callback alone has no deadline (the tick thread retries a transaction
        for as long as the brokers are away), so a timer answers the client with an error."""
        loop = self._get_loop()
        fut: asyncio.Future[None] = loop.create_future()
        engine = self._engine
        settle = self._settler(fut, 1)
        timeout_s = engine.config.replication_timeout_s
        deadline = engine.time_source.monotonic() + timeout_s
        timer = loop.call_later(timeout_s, settle, _late(ticket, timeout_s))
        fut.add_done_callback(lambda _: timer.cancel())

        def reply(exc: BaseException | None) -> None:
            loop.call_soon_threadsafe(settle, exc)

        def durable(exc: BaseException | None) -> None:
            if exc is not None:
                reply(exc)
            else:
                left = max(0.0, deadline - engine.time_source.monotonic())
                engine.on_covered(ticket.ts, reply, left)

        ticket.add_done_callback(durable)
        return fut


_HOLE = STATE_HOLE | STATE_ZERO


class ParkedExport:
    """A volume parked here (released to another interceptor, or staged from one): seen
    as an NVMe ANA path in the inaccessible state is, its state in its description, every
    request answered ESHUTDOWN."""

    read_only = True
    can_multi_conn = True

    def __init__(self, name: str, size: int, why: str) -> None:
        self.name, self._size, self.why = name, size, why
        self.description = f"lowmark volume {name} (access inaccessible: {why})"

    @property
    def size(self) -> int:
        return self._size

    def _refuse(self, *_: object) -> None:
        raise VolumeMovedError(self.why)

    def pread(self, offset: int, length: int) -> bytes:
        raise VolumeMovedError(self.why)

    write = trim = _refuse

    def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> None:
        raise VolumeMovedError(self.why)

    def flush(self) -> None:
        raise VolumeMovedError(self.why)


def parked_export(name: str, size: int, interceptor: str, role: str, peer: str) -> ParkedExport:
    where = f"being migrated here from {peer}" if role == "target" else f"migrated to {peer}"
    why = (f"volume {name} is inaccessible at interceptor {interceptor}: {where}; connect "
           "to the interceptor serving it")  # fmt: skip
    return ParkedExport(name, size, why)


def _not_durable(ticket: Ticket, writes: int, timeout_s: float) -> ReplicationError:
    what = f"write at ts {ticket.ts}" if writes else "flush"
    return ReplicationError(
        f"{what} is not durable in Kafka within replication_timeout_s ({timeout_s:.1f} s): "
        "the data is on the primary image but NOT replicated; check the brokers "
        "(min.insync.replicas, leaders), then retry"
    )


def _late(ticket: Ticket, timeout_s: float) -> ReplicationError:
    return ReplicationError(
        f"sync write at ts {ticket.ts} is not inside a published cut within "
        f"replication_timeout_s ({timeout_s:.1f} s): it is on the primary image but may be "
        "missing at the backup; check the brokers (min.insync.replicas, leaders) and "
        "`lowmark watermark`, then retry the write"
    )


def callback_future(
    loop: asyncio.AbstractEventLoop,
    add_done_callback: Callable[[Callable[[BaseException | None], None]], None],
) -> asyncio.Future[None]:
    """A future of ``loop`` settled when a thread-side ``add_done_callback(fn)`` calls
    ``fn(None)`` (done) or ``fn(exc)`` (failed): a ticket's or a mark's, say."""
    fut: asyncio.Future[None] = loop.create_future()

    def settle(exc: BaseException | None) -> None:
        if fut.done():
            return
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(exc)

    def wake(exc: BaseException | None) -> None:  # on the thread that completes it
        loop.call_soon_threadsafe(settle, exc)

    add_done_callback(wake)
    return fut
