"""One NBD client connection: the asyncio protocol and the handshake phase.

:class:`Connection` receives the bytes (``data_received`` dispatches by phase), runs the
fixed-newstyle handshake (client flags, options answered by ``protocol.answer_option``,
STARTTLS and its upgrade, the handshake timeout) and hands over to the transmission phase
it inherits from :class:`~connectors.nbd.transmission.Transmission`; ``shutdown`` drains it
when the server closes.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING

from connectors.nbd import protocol as p
from connectors.nbd.transmission import (
    PHASE_CLOSED,
    PHASE_FLAGS,
    PHASE_OPTIONS,
    PHASE_TLS_UPGRADE,
    PHASE_TRANSMISSION,
    Transmission,
)

if TYPE_CHECKING:
    from connectors.nbd.server import Export, NbdServer

log = logging.getLogger("connectors.nbd.server")  # one logger for the whole server

_MAX_OPTIONS = 1024  # a client needs a handful; a looping one gets cut off
_WRITE_HIGH_WATER = 8 << 20  # transport write buffer that pauses reading


class Connection(Transmission, asyncio.Protocol):
    """One client: handshake, then requests. Not thread-safe; lives on the loop."""

    def __init__(self, server: NbdServer) -> None:
        super().__init__(server)
        self._no_zeroes = False
        self._tls = False
        self._options_seen = 0
        self._timer: asyncio.TimerHandle | None = None
        self._lost = False
        self._served = False  # reached transmission
        self._meta: p.MetaSelection | None = None  # what SET_META_CONTEXT selected last
        self._next_context_id = 1

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
        self._phase = PHASE_CLOSED
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

    def data_received(self, data: bytes | memoryview) -> None:
        if self._phase == PHASE_CLOSED:
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
            if self._phase == PHASE_TRANSMISSION:
                self._serve(data)
                return
            self._buf += data
            if self._phase == PHASE_TLS_UPGRADE:
                # Decrypted options that came with the end of the TLS handshake, before
                # start_tls() returned: kept until _upgrade() takes the new transport.
                pass
            elif self._phase != PHASE_CLOSED:
                self._negotiate()
        except Exception:
            log.exception("NBD connection from %s: internal error; closing it", self._peer)
            self.abort()

    # --- server-side control -----------------------------------------------------------

    def shutdown(self) -> asyncio.Future[None]:
        """Stop taking requests; the future completes once in-flight ones are answered."""
        self._closing = True
        if self._phase != PHASE_TRANSMISSION:
            self.abort()
        self._update_blocked()
        self._drained = self._loop.create_future()
        self._check_drained()
        return self._drained

    # --- handshake ---------------------------------------------------------------------

    def _handshake_timeout(self) -> None:
        if self._phase in (PHASE_FLAGS, PHASE_OPTIONS):
            log.info("NBD client %s did not finish the handshake in time; closing", self._peer)
            self.abort()

    def _negotiate(self) -> None:
        buf = self._buf
        pos = 0
        while self._phase == PHASE_FLAGS or self._phase == PHASE_OPTIONS:
            avail = len(buf) - pos
            if self._phase == PHASE_FLAGS:
                if avail < 4:
                    break
                (flags,) = p.CLIENT_FLAGS.unpack_from(buf, pos)
                pos += 4
                if flags & ~p.KNOWN_CLIENT_FLAGS:
                    self._violation(f"unknown client flags {flags:#x}")
                    return
                self._no_zeroes = bool(flags & p.FLAG_C_NO_ZEROES)
                self._phase = PHASE_OPTIONS
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
        if self._phase == PHASE_TRANSMISSION and buf:
            self._serve()
        elif self._phase == PHASE_TLS_UPGRADE and buf:
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
                structured=self._structured,
                structured_enabled=server.config.structured_replies,
                block_status_enabled=server.config.block_status,
                next_context_id=self._next_context_id,
            ),
        )
        if outcome.reply:
            self._transport.write(outcome.reply)
        if outcome.structured:
            self._structured = True
        if outcome.meta is not p.KEEP_META:
            self._meta = outcome.meta
            if outcome.meta is not None:
                self._next_context_id += 1  # a new id per selection: clients must not cache it
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
            self._phase = PHASE_TLS_UPGRADE
            # The protocol: nothing negotiated before STARTTLS survives it.
            self._structured = False
            self._meta = None
            # Nothing may be parsed until the TLS layer owns the socket.
            self._transport.pause_reading()
            self._loop.create_task(self._upgrade(server.ssl_context))
        elif nxt is p.Next.CLOSE:
            self.abort()
        else:
            self._violation(outcome.problem)

    async def _upgrade(self, ctx: ssl.SSLContext) -> None:
        if self._phase != PHASE_TLS_UPGRADE:
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
        if transport is None or self._phase != PHASE_TLS_UPGRADE:
            return
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._tls = True
        self._phase = PHASE_OPTIONS
        if self._buf:
            self.data_received(b"")  # options that arrived during the upgrade

    def _start_transmission(self, export: Export) -> None:
        self._export = export
        meta = self._meta
        # The selection counts only for the export it named (by the name the client used).
        if meta is not None and self._server.exports.get(meta.export) is export:
            self._meta_id = meta.context_id
        self._extents = getattr(export, "extents", None)
        self._size = export.size
        self._read_only = export.read_only
        self._phase = PHASE_TRANSMISSION
        self._served = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
