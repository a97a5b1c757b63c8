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

This module owns the listening side (``NbdServer``: sockets, TLS context, close and
drain), the ``Export`` interface, the configuration and the counters. A connection's
handshake is ``connection.py``, its transmission phase ``transmission.py``; the wire
format is ``protocol.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from connectors.nbd import protocol as p
from connectors.nbd.allocator import reuse_receive_buffers
from connectors.nbd.connection import Connection
from connectors.nbd.transmission import CMD_SLOTS
from pipeline.errors import ConfigError, SetupError

log = logging.getLogger(__name__)


class Export(Protocol):
    """What the server serves. lowmark's replicating volume adapter implements it too.

    ``write``, ``write_zeroes``, ``trim`` and ``flush`` return None when done
    synchronously, or an awaitable that completes when done. ``pread`` is synchronous.
    Ranges are already checked against ``size`` and ``read_only`` by the server.
    """

    name: str
    read_only: bool
    can_multi_conn: bool

    @property
    def description(self) -> str: ...  # may change while served (an access state)

    @property
    def size(self) -> int:  # read-only: a volume's size changes only through its own API
        ...

    def pread(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes, fua: bool) -> Awaitable[None] | None: ...

    def write_zeroes(
        self, offset: int, length: int, fua: bool, may_trim: bool
    ) -> Awaitable[None] | None: ...

    def trim(self, offset: int, length: int, fua: bool) -> Awaitable[None] | None: ...

    def flush(self) -> Awaitable[None] | None: ...


class ExtentsExport(Protocol):
    """An export that can say where its holes are has this method too (optional: the
    server looks it up; without it BLOCK_STATUS reports the whole range as data, which
    the protocol allows, and reads send every byte).

    ``extents(offset, length, limit)`` returns at most ``limit`` ``(length, flags)``
    pairs covering a prefix of ``[offset, offset + length)`` (the server clips anything
    past the range), flags ``protocol.STATE_HOLE | STATE_ZERO`` for a hole, 0 for data.
    It runs on the event loop, synchronously: lseeks, not I/O. A range it calls a hole
    must read as zeroes at that moment, and a write acknowledged before the request must
    not be in one; see each export's promises for writes still in flight.
    """

    def extents(self, offset: int, length: int, limit: int) -> list[tuple[int, int]]: ...


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
    # Off, NBD_OPT_STRUCTURED_REPLY (and with it block status) is answered UNSUP: every
    # READ is a simple reply with all its bytes (the benchmark's baseline).
    structured_replies: bool = True
    # Off, the metadata context options are answered UNSUP: no BLOCK_STATUS.
    block_status: bool = True
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
    requests: list[int] = field(default_factory=lambda: [0] * CMD_SLOTS)
    errors: list[int] = field(default_factory=lambda: [0] * CMD_SLOTS)
    bytes_read: int = 0
    #: of ``bytes_read``, bytes answered as OFFSET_HOLE chunks: never read nor sent
    bytes_read_holes: int = 0
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
            "bytes_read_holes": self.bytes_read_holes,
            "bytes_written": self.bytes_written,
            "async_completions": self.async_completions,
            "read_pauses": self.read_pauses,
        }


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
        self._connections: set[Connection] = set()
        self.closing = False

    def add_export(self, name: str, export: Export) -> None:
        """Serve one more export from now on (a volume created while serving); clients
        already connected keep theirs."""
        if len(name.encode()) > p.MAX_NAME:
            raise ConfigError(f"NBD export name {name[:40]!r}... exceeds {p.MAX_NAME} bytes")
        self.exports[name] = export

    def connections_of(self, export: Export) -> int:
        return sum(1 for c in self._connections if c.export is export)

    async def disconnect(self, export: Export, grace_s: float = 0.0) -> int:
        """Close every connection serving ``export`` once the requests it already passed
        have been answered (a volume that moved away: its clients reconnect where it is
        served now). ``grace_s``: first let the clients leave by themselves (a client told
        ESHUTDOWN should disconnect; closing under it can hide which of its requests were
        refused). Returns how many connections there were."""
        conns = [c for c in self._connections if c.export is export]
        deadline = asyncio.get_running_loop().time() + grace_s
        while any(c in self._connections for c in conns):
            if asyncio.get_running_loop().time() >= deadline:
                break
            await asyncio.sleep(0.01)
        left = [c for c in conns if c in self._connections]
        drained = [c.shutdown() for c in left]
        if drained:
            await asyncio.wait(drained, timeout=self.config.close_timeout_s)
        for conn, done in zip(left, drained, strict=True):
            if not done.done():
                conn.abort(force=True)  # drained ones close once their replies are out
        return len(conns)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        reuse_receive_buffers()  # see connectors/nbd/allocator.py: receive buffers reused
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

    def _new_connection(self) -> Connection:
        return Connection(self)


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
