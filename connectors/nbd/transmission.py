"""The NBD transmission phase of one connection: requests in, export calls, replies out.

Parses requests straight out of the received bytes (the hot path, :meth:`Transmission._serve`),
collects a WRITE's payload before the export sees it, answers READs, passes the other
commands on, steps an export's coroutine once and only makes a task of one that really
suspends, and stops reading under the in-flight limits or write back-pressure. The
contract with the export is in ``server.py``'s docstring; the handshake that leads here
is ``connection.py``. A connection that negotiated structured replies gets its READs
and errors as chunks and may ask BLOCK_STATUS (what each reply holds: ``structured.py``).
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Awaitable, Coroutine, Generator
from typing import TYPE_CHECKING, Any

from connectors.nbd import protocol as p
from connectors.nbd import structured as sr
from pipeline.errors import LowmarkError, VolumeError, VolumeMovedError

if TYPE_CHECKING:
    from connectors.nbd.server import Export, NbdServer

log = logging.getLogger("connectors.nbd.server")  # one logger for the whole server

_MAX_DISCARD = 2 * p.MAX_PAYLOAD
_READ_BATCH = 1 << 20  # flush batched replies once they hold this much read data
CMD_SLOTS = max(p.COMMAND_NAMES) + 2  # one counter per command, the last for unknown ones
# Runs asked of an export's ``extents`` per request: each costs a couple of lseeks on the
# loop, so a badly fragmented file answers a prefix (allowed) and the client asks again.
READ_RUNS = 1024
STATUS_RUNS = 8192

# The phases of a connection, plain ints: compared on every received chunk.
PHASE_FLAGS, PHASE_OPTIONS, PHASE_TLS_UPGRADE, PHASE_TRANSMISSION, PHASE_CLOSED = range(5)


def nbd_errno(exc: BaseException) -> int:
    """The NBD error a failed export call is reported as."""
    if isinstance(exc, VolumeMovedError):
        return p.ESHUTDOWN  # the client should reconnect: the volume is served elsewhere
    if isinstance(exc, VolumeError):
        return p.EINVAL
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return p.ENOSPC
    return p.EIO


class Transmission:
    """The connection state and request handling shared by every phase; the asyncio
    protocol and the handshake are :class:`~connectors.nbd.connection.Connection`, which
    derives from it. Not thread-safe; lives on the loop."""

    def __init__(self, server: NbdServer) -> None:
        self._server = server
        self._stats = server.stats
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport = None  # type: ignore[assignment]
        self._peer: Any = None
        self._buf = bytearray()
        self._phase = PHASE_FLAGS
        self._export: Export = None  # type: ignore[assignment]
        self._size = 0
        self._read_only = True
        self._discard = 0  # payload bytes of a refused WRITE still to skip
        # A WRITE whose payload is still arriving: its header, the chunks so far (kept as
        # received, joined once: one copy, not one per chunk) and the bytes still due.
        self._pending_write: tuple[int, bytes, int] = (0, b"", 0)
        self._chunks: list[bytes | memoryview] = []
        self._payload_due = 0
        self._discard_reply = b""
        self._inflight: dict[asyncio.Future[Any], tuple[bytes, int, int, int]] = {}
        self._inflight_bytes = 0
        self._write_paused = False
        self._reading_paused = False
        self._blocked = False  # stop parsing: limits, write back-pressure or closing
        self._closing = False  # DISC received or server closing: no new requests
        self._drained: asyncio.Future[None] | None = None
        self._serving = False  # inside _serve()
        self._structured = False  # NBD_OPT_STRUCTURED_REPLY was acknowledged
        self._meta_id = 0  # base:allocation's context id for this export; 0: none selected
        self._extents: Any = None  # the export's ``extents`` method, if it has one
        self._said: set[tuple[int, int]] = set()  # (cmd, error) refusals logged already

    # --- connection control (every phase) -------------------------------------------

    @property
    def export(self) -> Export | None:
        """The export this connection serves (None before its handshake ends)."""
        return self._export

    def abort(self, force: bool = False) -> None:
        """Close the connection; replies already written still go out unless ``force``."""
        if self._phase != PHASE_CLOSED:
            self._phase = PHASE_CLOSED
            self._transport.close()
        if force:
            self._transport.abort()

    def _violation(self, what: str) -> None:
        """The peer broke the protocol in a way we cannot answer: drop the connection."""
        self._stats.protocol_errors += 1
        log.info("NBD client %s: %s; closing the connection", self._peer, what)
        self.abort()

    # --- transmission ------------------------------------------------------------------

    def _skip(self, data: bytes | memoryview) -> bytes | memoryview:
        """Swallow payload of a refused WRITE; answer it once all of it is gone."""
        n = min(self._discard, len(data))
        self._discard -= n
        if self._discard == 0:
            self._reply(self._discard_reply)
        return data[n:]

    def _collect(self, data: bytes | memoryview) -> bytes | memoryview:
        """Gather a WRITE payload; pass it on once whole. Returns the bytes after it
        (views, not copies: received bytes never change)."""
        due = self._payload_due
        if len(data) < due:
            self._chunks.append(data)
            self._payload_due = due - len(data)
            return b""
        self._chunks.append(memoryview(data)[:due] if len(data) > due else data)
        self._payload_due = 0
        payload = b"".join(self._chunks)
        self._chunks = []
        flags, cookie, offset = self._pending_write
        reply = self._write(flags, cookie, offset, payload)
        if reply:
            self._reply(reply)
        return memoryview(data)[due:]

    def _write(self, flags: int, cookie: bytes, offset: int, payload: bytes) -> bytes:
        """Pass a complete, valid WRITE to the export; the reply, or b"" if it comes later."""
        length = len(payload)
        self._stats.requests[p.CMD_WRITE] += 1
        self._stats.bytes_written += length
        try:
            result = self._export.write(offset, payload, bool(flags & p.CMD_FLAG_FUA))
        except Exception as exc:
            return self._failed(exc, p.CMD_WRITE, cookie, offset, length)
        if result is None:
            return p.SIMPLE_REPLY_OK + cookie
        return self._settle(result, cookie, p.CMD_WRITE, offset, length)

    def _reply(self, data: bytes) -> None:
        if self._phase != PHASE_CLOSED:
            self._transport.write(data)

    def _serve(self, data: bytes | memoryview = b"") -> None:
        """Answer every complete request in the buffer plus ``data`` (the hot path).

        With nothing left over from the last call (the usual case) requests are parsed
        straight from ``data``, and only an incomplete tail is copied to the buffer."""
        buf = self._buf
        src: bytes | bytearray | memoryview
        if not buf:
            src = data
        else:
            buf += data
            src = buf
        end = len(src)
        pos = 0
        out: list[bytes] = []  # replies, written in one go
        out_bytes = 0
        unpack = p.REQUEST_HEADER.unpack_from
        self._serving = True  # a re-entrant call would resize buf under our memoryview
        try:
            with memoryview(src) as view:
                while end - pos >= p.REQUEST_SIZE and not self._blocked:
                    magic, flags, cmd, cookie, offset, length = unpack(src, pos)
                    if magic != p.REQUEST_MAGIC:
                        self._flush(out)
                        self._violation(f"bad request magic {magic:#x}")
                        return
                    if cmd == p.CMD_WRITE:
                        pos = self._write_request(
                            view, pos, end, flags, cookie, offset, length, out
                        )
                        if pos < 0:
                            return
                        continue
                    pos += p.REQUEST_SIZE
                    if cmd == p.CMD_READ:
                        out_bytes += self._read(flags, cookie, offset, length, out)
                        if out_bytes >= _READ_BATCH:
                            # Hand big reads to the transport now, so its high-water mark
                            # (pause_writing -> self._blocked) bounds what we hold.
                            self._flush(out)
                            out_bytes = 0
                        continue
                    reply = self._command(cmd, flags, cookie, offset, length)
                    if reply:
                        out.append(reply)
        finally:
            self._serving = False
        if src is buf:
            del buf[:pos]
        elif pos < end:
            buf += memoryview(src)[pos:]
        self._flush(out)
        if self._closing and self._phase == PHASE_TRANSMISSION:
            buf.clear()  # requests after DISC are ignored
            self._check_drained()

    def _write_request(
        self,
        view: memoryview,
        pos: int,
        end: int,
        flags: int,
        cookie: bytes,
        offset: int,
        length: int,
        out: list[bytes],
    ) -> int:
        """Handle the WRITE at ``pos``; the position after what it used, -1 if it closed
        the connection. A payload not yet all there is collected by ``_collect`` (or, for
        a refused WRITE, skipped by ``_skip``) as it arrives."""
        need = pos + p.REQUEST_SIZE + length
        err = p.check_request(p.CMD_WRITE, flags, offset, length, self._size, self._read_only)
        if err:
            self._stats.errors[p.CMD_WRITE] += 1
            if length > _MAX_DISCARD:
                self._flush(out)
                self._violation(f"WRITE of {length} bytes (max {p.MAX_PAYLOAD})")
                return -1
            reply = self._refused(err, p.CMD_WRITE, flags, cookie, offset, length)
            if need <= end:
                out.append(reply)
                return need
            self._discard = need - end
            self._discard_reply = reply
            return end
        if need > end:
            self._pending_write = (flags, cookie, offset)
            head = view[pos + p.REQUEST_SIZE : end]
            # A view of immutable received bytes will do; the buffer is about to change.
            self._chunks = [bytes(head) if view.obj is self._buf else head]
            self._payload_due = need - end
            return end
        reply = self._write(flags, cookie, offset, bytes(view[pos + p.REQUEST_SIZE : need]))
        if reply:
            out.append(reply)
        return need

    def _read(self, flags: int, cookie: bytes, offset: int, length: int, out: list[bytes]) -> int:
        """Answer a READ into ``out``; the number of data bytes added."""
        if self._structured:
            return self._read_chunks(flags, cookie, offset, length, out)
        err = p.check_request(p.CMD_READ, flags, offset, length, self._size, self._read_only)
        if err:
            self._stats.errors[p.CMD_READ] += 1
            out.append(self._refused(err, p.CMD_READ, flags, cookie, offset, length))
            return 0
        self._stats.requests[p.CMD_READ] += 1
        try:
            data = self._export.pread(offset, length)
            if len(data) != length:  # a short reply would desynchronise the client
                raise OSError(errno.EIO, f"export returned {len(data)} of {length} bytes")
        except Exception as exc:
            out.append(self._failed(exc, p.CMD_READ, cookie, offset, length))
            return 0
        self._stats.bytes_read += length
        out.append(p.SIMPLE_REPLY_OK + cookie)
        out.append(data)
        return length

    def _read_chunks(
        self, flags: int, cookie: bytes, offset: int, length: int, out: list[bytes]
    ) -> int:
        """A READ as structured chunks: holes the export knows of are OFFSET_HOLE (not
        read), the rest OFFSET_DATA; the last chunk carries DONE. Every byte is read
        before a chunk is queued, so no chunk is marked done while an error may follow."""
        err = p.check_request(p.CMD_READ, flags, offset, length, self._size, self._read_only, True)
        if err:
            self._stats.errors[p.CMD_READ] += 1
            out.append(self._refused(err, p.CMD_READ, flags, cookie, offset, length))
            return 0
        self._stats.requests[p.CMD_READ] += 1
        runs = [(offset, length, False)]
        if self._extents is not None and not flags & p.CMD_FLAG_DF:
            try:
                runs = sr.read_runs(self._extents(offset, length, READ_RUNS), offset, length)
            except Exception as exc:
                out.append(self._failed(exc, p.CMD_READ, cookie, offset, length))
                return 0
        if len(runs) == 1 and not runs[0][2]:  # all data, the usual case: one chunk
            try:
                data = self._export.pread(offset, length)
                if len(data) != length:
                    raise OSError(errno.EIO, f"export returned {len(data)} of {length} bytes")
            except Exception as exc:
                out.append(self._failed(exc, p.CMD_READ, cookie, offset, length))
                return 0
            out.append(sr.data_header(True, cookie, offset, length))
            out.append(data)
            self._stats.bytes_read += length
            return length
        chunks: list[bytes] = []
        sent = holes = 0
        last = len(runs) - 1
        for i, (pos, n, zero) in enumerate(runs):
            if zero:
                chunks.append(sr.hole(i == last, cookie, pos, n))
                holes += n
                continue
            try:
                data = self._export.pread(pos, n)
                if len(data) != n:
                    raise OSError(errno.EIO, f"export returned {len(data)} of {n} bytes")
            except Exception as exc:
                if not chunks:
                    out.append(self._failed(exc, p.CMD_READ, cookie, offset, length))
                    return 0
                # What was read is sent; the error says where the rest failed.
                code, message = self._failure(exc, p.CMD_READ, pos, n)
                chunks.append(sr.error_offset(cookie, code, message, pos))
                out.extend(chunks)
                return sent
            chunks.append(sr.data_header(i == last, cookie, pos, n))
            chunks.append(data)
            sent += n
        out.extend(chunks)
        self._stats.bytes_read += length
        self._stats.bytes_read_holes += holes
        return sent

    def _block_status(self, flags: int, cookie: bytes, offset: int, length: int) -> bytes:
        """BLOCK_STATUS of ``base:allocation``: the export's extents (all data for an
        export that cannot tell), as a prefix of the range, never past it."""
        cmd = p.CMD_BLOCK_STATUS
        err = p.check_request(
            cmd, flags, offset, length, self._size, self._read_only,
            structured=self._structured, block_status=self._meta_id != 0,
        )  # fmt: skip
        if err:
            self._stats.errors[cmd] += 1
            return self._refused(err, cmd, flags, cookie, offset, length)
        self._stats.requests[cmd] += 1
        req_one = bool(flags & p.CMD_FLAG_REQ_ONE)
        try:
            if self._extents is None:
                raw: Any = [(length, 0)]
            else:
                raw = self._extents(offset, length, 1 if req_one else STATUS_RUNS)
            extents = sr.status_extents(raw, length, req_one)
        except Exception as exc:
            return self._failed(exc, cmd, cookie, offset, length)
        return sr.block_status(cookie, self._meta_id, extents)

    def _refused(
        self, err: int, cmd: int, flags: int, cookie: bytes, offset: int, length: int
    ) -> bytes:
        """The reply to a request ``check_request`` refused: a simple reply, or an ERROR
        chunk saying why once structured replies are on. Each kind is logged once per
        connection: a client that repeats it is not news."""
        name = p.COMMAND_NAMES.get(cmd, f"command {cmd}")
        why = f"{name} flags={flags:#x} offset={offset} length={length}"
        if cmd == p.CMD_BLOCK_STATUS and not self._meta_id:
            why += " without base:allocation selected (NBD_OPT_SET_META_CONTEXT for this export)"
        else:
            why += f" on an export of {self._size} bytes"
        message = f"{why}: {p.ERROR_NAMES.get(err, err)}"
        if (cmd, err) not in self._said:
            self._said.add((cmd, err))
            log.info("NBD client %s: %s (said once per connection)", self._peer, message)
        if self._structured:
            return sr.error(cookie, err, message)
        return p.simple_reply(err, cookie)

    def _flush(self, out: list[bytes]) -> None:
        if out:
            self._reply(b"".join(out) if len(out) > 1 else out[0])
            out.clear()

    def _command(self, cmd: int, flags: int, cookie: bytes, offset: int, length: int) -> bytes:
        """Everything but READ and WRITE: the reply to send now, or b"" if it comes later."""
        if cmd == p.CMD_DISC:
            self._stats.requests[cmd] += 1
            # Answer what is in flight, then close (DISC itself has no reply).
            self._closing = True
            self._update_blocked()
            return b""
        if cmd == p.CMD_BLOCK_STATUS:
            return self._block_status(flags, cookie, offset, length)
        err = p.check_request(cmd, flags, offset, length, self._size, self._read_only)
        if err:
            slot = min(cmd, CMD_SLOTS - 1)
            if slot == CMD_SLOTS - 1:
                self._stats.protocol_errors += 1
            self._stats.errors[slot] += 1
            return self._refused(err, cmd, flags, cookie, offset, length)
        self._stats.requests[cmd] += 1
        fua = bool(flags & p.CMD_FLAG_FUA)
        try:
            if cmd == p.CMD_FLUSH:
                result = self._export.flush()
            elif cmd == p.CMD_TRIM:
                result = self._export.trim(offset, length, fua)
            else:  # check_request lets nothing else through
                may_trim = not flags & p.CMD_FLAG_NO_HOLE
                result = self._export.write_zeroes(offset, length, fua, may_trim)
        except Exception as exc:
            return self._failed(exc, cmd, cookie, offset, length)
        if result is None:
            return p.SIMPLE_REPLY_OK + cookie
        return self._settle(result, cookie, cmd, offset, 0)

    def _failed(
        self, exc: BaseException, cmd: int, cookie: bytes, offset: int, length: int
    ) -> bytes:
        code, message = self._failure(exc, cmd, offset, length)
        if self._structured:
            return sr.error(cookie, code, message)
        return p.simple_reply(code, cookie)

    def _failure(
        self, exc: BaseException, cmd: int, offset: int, length: int
    ) -> tuple[int, str]:
        """Count and log a failed export call; its NBD error and the message for a client."""
        code = nbd_errno(exc)
        self._stats.errors[cmd] += 1
        what = (
            f"NBD {p.COMMAND_NAMES[cmd]} offset={offset} length={length} on {self._export.name!r}"
        )
        if isinstance(exc, (OSError, LowmarkError)):  # an operating error: say what, go on
            log.warning("%s failed (%s): %s", what, p.ERROR_NAMES[code], exc)
        else:  # a bug in the export: keep the traceback
            log.error("%s raised unexpectedly; answered EIO", what, exc_info=exc)
        return code, f"{what} failed: {exc}"

    # --- requests that wait on the export -----------------------------------------------

    def _settle(
        self, result: Awaitable[None], cookie: bytes, cmd: int, offset: int, nbytes: int
    ) -> bytes:
        """Reply now if ``result`` is already complete, else track it and return b""."""
        if isinstance(result, asyncio.Future):
            if result.done():
                return self._outcome(result, cookie, cmd, offset, nbytes)
            future: asyncio.Future[Any] = result
        elif asyncio.iscoroutine(result):
            try:
                first = result.send(None)
            except StopIteration:
                return p.SIMPLE_REPLY_OK + cookie
            except (Exception, asyncio.CancelledError) as exc:
                return self._failed(exc, cmd, cookie, offset, nbytes)
            future = self._loop.create_task(_finish(_Resume(result, first)))
        else:
            future = asyncio.ensure_future(result)
        self._stats.async_completions += 1
        self._inflight[future] = (cookie, cmd, offset, nbytes)
        self._inflight_bytes += nbytes
        future.add_done_callback(self._on_done)
        self._update_blocked()
        return b""

    def _outcome(
        self, future: asyncio.Future[Any], cookie: bytes, cmd: int, offset: int, nbytes: int
    ) -> bytes:
        if future.cancelled():
            exc: BaseException | None = OSError(errno.EIO, "export operation was cancelled")
        else:
            exc = future.exception()
        if exc is None:
            return p.SIMPLE_REPLY_OK + cookie
        return self._failed(exc, cmd, cookie, offset, nbytes)

    def _on_done(self, future: asyncio.Future[Any]) -> None:
        cookie, cmd, offset, nbytes = self._inflight.pop(future)
        self._inflight_bytes -= nbytes
        self._reply(self._outcome(future, cookie, cmd, offset, nbytes))
        self._update_blocked()
        self._check_drained()

    def _update_blocked(self) -> None:
        cfg = self._server.config
        blocked = (
            self._closing
            or self._write_paused
            or len(self._inflight) >= cfg.max_inflight_per_conn
            or self._inflight_bytes >= cfg.max_inflight_bytes_per_conn
        )
        was_blocked = self._blocked
        self._blocked = blocked
        if self._phase != PHASE_TRANSMISSION:
            return
        if blocked and not self._reading_paused:
            self._reading_paused = True
            self._stats.read_pauses += 1
            self._transport.pause_reading()
        elif not blocked and self._reading_paused:
            self._reading_paused = False
            self._transport.resume_reading()
        if was_blocked and not blocked and self._buf and not self._serving:
            self._serve()  # requests that arrived before we paused

    def _check_drained(self) -> None:
        if self._inflight or not (self._closing or self._phase == PHASE_CLOSED):
            return
        if self._phase == PHASE_TRANSMISSION:
            self.abort()  # DISC or shutdown, all answered: close (flushes the replies)
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)


class _Resume:
    """Finishes a coroutine whose first step already ran outside any task, so that only
    coroutines that really suspend pay for a task (Python 3.12's eager tasks, by hand)."""

    __slots__ = ("_coro", "_first")

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self._coro = coro
        self._first = first

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, pending = self._coro, self._first
        self._first = None
        while True:
            try:
                value = yield pending
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:
                try:
                    pending = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    pending = coro.send(value)
                except StopIteration as stop:
                    return stop.value


async def _finish(step: _Resume) -> Any:
    return await step
