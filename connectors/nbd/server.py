"""asyncio NBD server: serves ``Export`` objects to qemu, fio, nbdcopy, the kernel, ...

One ``asyncio.Protocol`` per connection parses requests straight out of a bytearray in
``data_received`` and answers with one ``transport.write`` per batch of replies: a
streams-based server reached 0.57x of ``nbdkit file`` at 4 KiB randwrite QD16, this
shape is on par with it (``bench/nbd.py``). A large WRITE's payload is kept as the chunks
received and joined once, not appended to the buffer chunk by chunk.

Contract with the export (see ``Export``):

- Calls reach the export in the order requests arrive on a connection.
- A WRITE reaches the export only once its whole payload has arrived, so a client that
  disconnects mid-request never causes a partial write.
- ``write``/``write_zeroes``/``trim``/``flush`` may return None (done) or an awaitable.
  A coroutine is stepped once right away; if it finishes without suspending it is
  answered at once, without a task (the common case of an async-mode write). Only a
  coroutine that really suspends becomes a task, answered when it completes; replies
  may then go out of request order, matched by cookie as the protocol allows. The
  first step runs outside any task: an export must not use ``asyncio.current_task()``
  or ``asyncio.timeout()`` before its first ``await``.
- Errors: ``VolumeError`` -> EINVAL, ``OSError`` ENOSPC/EDQUOT -> ENOSPC, any other
  ``OSError``, ``ReplicationError`` or exception -> EIO; each is logged with the request.

Malformed input (see ``protocol.check_request`` for the codes): a bad request magic
closes the connection (the stream cannot be resynchronised); invalid requests get an
error reply and the connection keeps serving. An invalid WRITE's payload is read and
discarded without buffering when it is at most ``2 * MAX_PAYLOAD`` (the nbdkit rule);
a longer one closes the connection, since a client announcing gigabytes is more likely
out of sync than honest.

Back-pressure: a connection stops reading while ``max_inflight_per_conn`` requests or
``max_inflight_bytes_per_conn`` payload bytes wait on the export, or while the
transport's write buffer is over its high-water mark (a client not reading its replies).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import ssl
from collections.abc import Awaitable, Coroutine, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from connectors.nbd import protocol as p
from pipeline.errors import ConfigError, LowmarkError, SetupError, VolumeError

log = logging.getLogger(__name__)

_MAX_OPTIONS = 1024  # a client needs a handful; a looping one gets cut off
_MAX_DISCARD = 2 * p.MAX_PAYLOAD
_READ_BATCH = 1 << 20  # flush batched replies once they hold this much read data
_WRITE_HIGH_WATER = 8 << 20  # transport write buffer that pauses reading
_CMD_SLOTS = max(p.COMMAND_NAMES) + 2  # one counter per command, the last for unknown ones


class Export(Protocol):
    """What the server serves. lowmark's replicating volume adapter implements it too.

    ``write``, ``write_zeroes``, ``trim`` and ``flush`` return None when done
    synchronously, or an awaitable that completes when done. ``pread`` is synchronous.
    Ranges are already checked against ``size`` and ``read_only`` by the server.
    """

    name: str
    size: int
    description: str
    read_only: bool
    can_multi_conn: bool

    def pread(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes, fua: bool) -> Awaitable[None] | None: ...

    def write_zeroes(
        self, offset: int, length: int, fua: bool, may_trim: bool
    ) -> Awaitable[None] | None: ...

    def trim(self, offset: int, length: int, fua: bool) -> Awaitable[None] | None: ...

    def flush(self) -> Awaitable[None] | None: ...


@dataclass(frozen=True)
class NbdServerConfig:
    """Where to listen and how much one connection may hold.

    ``port=0`` picks a free port (read it back from ``NbdServer.port``); ``host=None``
    or ``port=None`` disables TCP, ``unix_path`` adds a Unix socket. TLS needs both
    ``tls_cert`` and ``tls_key`` (PEM); ``tls_required`` refuses every option but
    STARTTLS until the connection is encrypted.
    """

    host: str | None = "127.0.0.1"
    port: int | None = 10809
    unix_path: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_required: bool = False
    max_inflight_per_conn: int = 64
    max_inflight_bytes_per_conn: int = 256 * 1024 * 1024
    handshake_timeout_s: float = 30.0
    close_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        tcp = self.host is not None and self.port is not None
        if not tcp and self.unix_path is None:
            raise ConfigError("NBD server has nowhere to listen: set host and port, or unix_path")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("NBD TLS needs both tls_cert and tls_key (PEM files)")
        if self.tls_required and self.tls_cert is None:
            raise ConfigError("NBD tls_required is set but no tls_cert/tls_key is configured")
        if self.max_inflight_per_conn < 1 or self.max_inflight_bytes_per_conn < p.MAX_PAYLOAD:
            raise ConfigError(
                "NBD max_inflight_per_conn must be >= 1 and max_inflight_bytes_per_conn >= "
                f"{p.MAX_PAYLOAD} (one maximal write)"
            )


@dataclass
class NbdStats:
    """Counters for metrics. ``requests``/``errors`` are indexed by NBD command number,
    the last slot counting commands the protocol does not define."""

    connections_total: int = 0
    connections_open: int = 0
    handshakes_failed: int = 0
    protocol_errors: int = 0
    requests: list[int] = field(default_factory=lambda: [0] * _CMD_SLOTS)
    errors: list[int] = field(default_factory=lambda: [0] * _CMD_SLOTS)
    bytes_read: int = 0
    bytes_written: int = 0
    #: requests whose export call suspended and became a task
    async_completions: int = 0
    #: times a connection stopped reading: in-flight limits or a client not reading
    read_pauses: int = 0

    def snapshot(self) -> dict[str, Any]:
        def name(cmd: int) -> str:
            return p.COMMAND_NAMES.get(cmd, "unknown")

        return {
            "connections_total": self.connections_total,
            "connections_open": self.connections_open,
            "handshakes_failed": self.handshakes_failed,
            "protocol_errors": self.protocol_errors,
            "requests": {name(c): n for c, n in enumerate(self.requests) if n},
            "errors": {name(c): n for c, n in enumerate(self.errors) if n},
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "async_completions": self.async_completions,
            "read_pauses": self.read_pauses,
        }


def nbd_errno(exc: BaseException) -> int:
    """The NBD error a failed export call is reported as."""
    if isinstance(exc, VolumeError):
        return p.EINVAL
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return p.ENOSPC
    return p.EIO


class NbdServer:
    """Serves ``exports`` (by name; "" is the default export) per ``config``."""

    def __init__(self, exports: Mapping[str, Export], config: NbdServerConfig) -> None:
        for name in exports:
            if len(name.encode()) > p.MAX_NAME:
                raise ConfigError(f"NBD export name {name[:40]!r}... exceeds {p.MAX_NAME} bytes")
        self.exports = dict(exports)
        self.config = config
        self.stats = NbdStats()
        self.ssl_context = _ssl_context(config)
        self._servers: list[asyncio.Server] = []
        self._connections: set[_Connection] = set()
        self.closing = False

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        try:
            if cfg.host is not None and cfg.port is not None:
                self._servers.append(
                    await loop.create_server(self._new_connection, cfg.host, cfg.port)
                )
            if cfg.unix_path is not None:
                self._servers.append(
                    await loop.create_unix_server(self._new_connection, cfg.unix_path)
                )
        except OSError as exc:
            for server in self._servers:
                server.close()
            raise SetupError(
                f"NBD server cannot listen on {cfg.host}:{cfg.port} / {cfg.unix_path}: {exc}; "
                "pick a free port (0 = any) or another socket path"
            ) from exc
        log.info("NBD server listening on %s", self.bound_addresses)

    @property
    def bound_addresses(self) -> list[Any]:
        return [sock.getsockname() for srv in self._servers for sock in srv.sockets]

    @property
    def port(self) -> int | None:
        """The TCP port actually bound (useful with ``port=0``)."""
        for address in self.bound_addresses:
            if isinstance(address, tuple):
                return int(address[1])
        return None

    async def serve_forever(self) -> None:
        await asyncio.gather(*(srv.serve_forever() for srv in self._servers))

    async def close(self) -> None:
        """Stop accepting, let requests already passed to exports finish and their
        replies go out, then close every connection."""
        self.closing = True
        for server in self._servers:
            server.close()
        connections = list(self._connections)
        drained = [conn.shutdown() for conn in connections]
        if drained:
            _done, pending = await asyncio.wait(drained, timeout=self.config.close_timeout_s)
            if pending:
                log.warning(
                    "NBD close: %d connections still had requests in flight after %.0f s",
                    len(pending),
                    self.config.close_timeout_s,
                )
        for conn, done in zip(connections, drained, strict=True):
            if not done.done():
                conn.abort(force=True)  # drained ones close once their replies are out
        for server in self._servers:
            await server.wait_closed()
        if self.config.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.config.unix_path)

    def _new_connection(self) -> _Connection:
        return _Connection(self)


def _ssl_context(config: NbdServerConfig) -> ssl.SSLContext | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"NBD TLS: cannot load certificate {config.tls_cert} / key {config.tls_key}: {exc}"
        ) from exc
    return ctx


_FLAGS, _OPTIONS, _TLS_UPGRADE, _TRANSMISSION, _CLOSED = range(5)


class _Connection(asyncio.Protocol):
    """One client: handshake, then requests. Not thread-safe; lives on the loop."""

    def __init__(self, server: NbdServer) -> None:
        self._server = server
        self._stats = server.stats
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport = None  # type: ignore[assignment]
        self._peer: Any = None
        self._buf = bytearray()
        self._phase = _FLAGS
        self._no_zeroes = False
        self._tls = False
        self._options_seen = 0
        self._timer: asyncio.TimerHandle | None = None
        # transmission state
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
        self._lost = False
        self._served = False  # reached transmission
        self._serving = False  # inside _serve()

    # --- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._peer = transport.get_extra_info("peername") or "unix"
        self._stats.connections_total += 1
        self._stats.connections_open += 1
        if self._server.closing:
            transport.abort()
            return
        self._server._connections.add(self)
        transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        transport.write(p.GREETING)
        self._timer = self._loop.call_later(
            self._server.config.handshake_timeout_s, self._handshake_timeout
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._stats.connections_open -= 1
        if not self._served:
            self._stats.handshakes_failed += 1
        self._phase = _CLOSED
        self._server._connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        # A WRITE still collecting its payload dies here: never passed on, never half.
        self._buf = bytearray()
        self._chunks = []
        self._payload_due = 0
        self._check_drained()

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_blocked()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_blocked()

    def data_received(self, data: bytes | memoryview) -> None:  # type: ignore[override]
        if self._phase == _CLOSED:
            return  # closing: nothing more is read, let alone passed to the export
        try:
            if self._discard:
                data = self._skip(data)
                if not data:
                    return
            if self._payload_due:
                data = self._collect(data)
                if not data:
                    return
            if self._phase == _TRANSMISSION:
                self._serve(data)
                return
            self._buf += data
            if self._phase == _TLS_UPGRADE:
                # Decrypted options that came with the end of the TLS handshake, before
                # start_tls() returned: kept until _upgrade() takes the new transport.
                pass
            elif self._phase != _CLOSED:
                self._negotiate()
        except Exception:
            log.exception("NBD connection from %s: internal error; closing it", self._peer)
            self.abort()

    # --- server-side control -----------------------------------------------------------

    def shutdown(self) -> asyncio.Future[None]:
        """Stop taking requests; the future completes once in-flight ones are answered."""
        self._closing = True
        if self._phase != _TRANSMISSION:
            self.abort()
        self._update_blocked()
        self._drained = self._loop.create_future()
        self._check_drained()
        return self._drained

    def abort(self, force: bool = False) -> None:
        """Close the connection; replies already written still go out unless ``force``."""
        if self._phase != _CLOSED:
            self._phase = _CLOSED
            self._transport.close()
        if force:
            self._transport.abort()

    # --- handshake ---------------------------------------------------------------------

    def _handshake_timeout(self) -> None:
        if self._phase in (_FLAGS, _OPTIONS):
            log.info("NBD client %s did not finish the handshake in time; closing", self._peer)
            self.abort()

    def _violation(self, what: str) -> None:
        """The peer broke the protocol in a way we cannot answer: drop the connection."""
        self._stats.protocol_errors += 1
        log.info("NBD client %s: %s; closing the connection", self._peer, what)
        self.abort()

    def _negotiate(self) -> None:
        buf = self._buf
        pos = 0
        while self._phase == _FLAGS or self._phase == _OPTIONS:
            avail = len(buf) - pos
            if self._phase == _FLAGS:
                if avail < 4:
                    break
                (flags,) = p.CLIENT_FLAGS.unpack_from(buf, pos)
                pos += 4
                if flags & ~p.KNOWN_CLIENT_FLAGS:
                    self._violation(f"unknown client flags {flags:#x}")
                    return
                self._no_zeroes = bool(flags & p.FLAG_C_NO_ZEROES)
                self._phase = _OPTIONS
                continue
            if avail < p.OPTION_HEADER.size:
                break
            magic, option, length = p.OPTION_HEADER.unpack_from(buf, pos)
            if magic != p.IHAVEOPT:
                self._violation(f"bad option magic {magic:#x}")
                return
            if length > p.MAX_OPTION_DATA:
                self._violation(f"option {option} with {length} bytes of data")
                return
            end = pos + p.OPTION_HEADER.size + length
            if end > len(buf):
                break
            data = bytes(buf[pos + p.OPTION_HEADER.size : end])
            pos = end
            self._options_seen += 1
            if self._options_seen > _MAX_OPTIONS:
                self._violation(f"more than {_MAX_OPTIONS} options")
                return
            self._option(option, data)
        del buf[:pos]
        if self._phase == _TRANSMISSION and buf:
            self._serve()
        elif self._phase == _TLS_UPGRADE and buf:
            self._violation("data sent after STARTTLS before the TLS handshake")

    def _option(self, option: int, data: bytes) -> None:
        server = self._server
        outcome = p.answer_option(
            option,
            data,
            p.Negotiation(
                server.exports,
                no_zeroes=self._no_zeroes,
                tls_configured=server.ssl_context is not None,
                tls_required=server.config.tls_required,
                tls_active=self._tls,
            ),
        )
        if outcome.reply:
            self._transport.write(outcome.reply)
        nxt = outcome.next
        if nxt is p.Next.OPTIONS:
            if outcome.problem:  # routine: clients probe for options we lack
                log.debug(
                    "NBD client %s: option %d refused: %s", self._peer, option, outcome.problem
                )
        elif nxt is p.Next.TRANSMISSION:
            assert outcome.export is not None
            self._start_transmission(outcome.export)  # type: ignore[arg-type]
        elif nxt is p.Next.STARTTLS:
            assert server.ssl_context is not None
            self._phase = _TLS_UPGRADE
            # Nothing may be parsed until the TLS layer owns the socket.
            self._transport.pause_reading()
            self._loop.create_task(self._upgrade(server.ssl_context))
        elif nxt is p.Next.CLOSE:
            self.abort()
        else:
            self._violation(outcome.problem)

    async def _upgrade(self, ctx: ssl.SSLContext) -> None:
        if self._phase != _TLS_UPGRADE:
            return
        try:
            transport = await self._loop.start_tls(
                self._transport,
                self,
                ctx,
                server_side=True,
                ssl_handshake_timeout=self._server.config.handshake_timeout_s,
            )
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            self._stats.protocol_errors += 1
            log.info("NBD client %s: TLS handshake failed: %s", self._peer, exc)
            self.abort()
            # The TLS layer never told us it was connected, so it will not tell us it
            # lost the connection either.
            self.connection_lost(None)
            return
        if transport is None or self._phase != _TLS_UPGRADE:
            return
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._tls = True
        self._phase = _OPTIONS
        if self._buf:
            self.data_received(b"")  # options that arrived during the upgrade

    def _start_transmission(self, export: Export) -> None:
        self._export = export
        self._size = export.size
        self._read_only = export.read_only
        self._phase = _TRANSMISSION
        self._served = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

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
        if self._phase != _CLOSED:
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
        if self._closing and self._phase == _TRANSMISSION:
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
            reply = p.simple_reply(err, cookie)
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
        err = p.check_request(p.CMD_READ, flags, offset, length, self._size, self._read_only)
        if err:
            self._stats.errors[p.CMD_READ] += 1
            out.append(p.simple_reply(err, cookie))
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
        err = p.check_request(cmd, flags, offset, length, self._size, self._read_only)
        if err:
            slot = min(cmd, _CMD_SLOTS - 1)
            if slot == _CMD_SLOTS - 1:
                self._stats.protocol_errors += 1
            self._stats.errors[slot] += 1
            return p.simple_reply(err, cookie)
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
        code = nbd_errno(exc)
        self._stats.errors[cmd] += 1
        what = (
            f"NBD {p.COMMAND_NAMES[cmd]} offset={offset} length={length} on {self._export.name!r}"
        )
        if isinstance(exc, (OSError, LowmarkError)):  # an operating error: say what, go on
            log.warning("%s failed (%s): %s", what, p.ERROR_NAMES[code], exc)
        else:  # a bug in the export: keep the traceback
            log.error("%s raised unexpectedly; answered EIO", what, exc_info=exc)
        return p.simple_reply(code, cookie)

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
        if self._phase != _TRANSMISSION:
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
        if self._inflight or not (self._closing or self._phase == _CLOSED):
            return
        if self._phase == _TRANSMISSION:
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
