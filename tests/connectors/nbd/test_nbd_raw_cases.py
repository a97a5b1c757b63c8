"""Targeted raw-socket cases for the NBD server: error mapping, back-pressure, shutdown,
handshake timeouts, configuration.

Tries to break: an export error that reaches the client as the wrong NBD error (or a
short read), a server that buffers replies for a client that does not read them, one that
passes more requests to a slow export than its in-flight limit, a close that drops
in-flight requests or keeps listening, a handshake timeout that spares a silent client
or hits one already in transmission. Each "it did not happen" is asserted only after an
event that shows the server went past the point where it would have happened.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from connectors.nbd import protocol as p
from connectors.nbd.server import NbdServer, NbdServerConfig
from tests.nbd_helpers import ServerThread
from tests.nbd_raw_client import Client, collect_errors, wait_for


class Scripted:
    """An export whose calls do what the test says: raise, suspend, wait on a gate."""

    def __init__(self, size: int = 1 << 20) -> None:
        self.name = "s"
        self.size = size
        self.description = ""
        self.read_only = False
        self.can_multi_conn = False
        self.raise_: BaseException | None = None
        self.mode = "sync"  # sync | eager (coroutine, no suspension) | suspend | gate
        self.gate: asyncio.Event | None = None
        self.calls: list[tuple[int, int]] = []
        self.read_result: bytes | None = None

    def pread(self, offset: int, length: int) -> bytes:
        if self.raise_ is not None:
            raise self.raise_
        return self.read_result if self.read_result is not None else bytes(length)

    def write(self, offset: int, data: bytes, fua: bool) -> Any:
        self.calls.append((offset, len(data)))
        if self.mode == "sync":
            if self.raise_ is not None:
                raise self.raise_
            return None

        async def run() -> None:
            if self.mode == "suspend":
                await asyncio.sleep(0)
            elif self.mode == "gate":
                assert self.gate is not None
                await self.gate.wait()
            if self.raise_ is not None:
                raise self.raise_

        return run()

    def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> Any:
        return self.write(offset, bytes(length), fua)

    def trim(self, offset: int, length: int, fua: bool) -> Any:
        return self.write(offset, bytes(length), fua)

    def flush(self) -> Any:
        return self.write(0, b"", False)


def connected(srv: ServerThread, name: str = "s") -> Client:
    c = Client(srv.port)
    c.greet()
    c.go(name)
    return c


def loop_turns(srv: ServerThread, other: Client, turns: int = 5) -> None:
    """Round trips on another connection of the same server: each one needs the event
    loop to go through its selector again, where a connection that was not really paused
    would have been read (and its buffered requests served) too."""
    for _ in range(turns):
        assert other.call(p.CMD_READ, 0, 512) == (0, bytes(512))


@pytest.mark.parametrize("mode", ["sync", "eager", "suspend"])
def test_export_errors_become_nbd_errors(mode: str) -> None:
    from pipeline.errors import ReplicationError, VolumeError, VolumeMovedError

    export = Scripted()
    export.mode = mode
    cases = [
        (VolumeError("offset out of range"), p.EINVAL),
        (VolumeMovedError("migrated to b"), p.ESHUTDOWN),  # the client should reconnect
        (ReplicationError("Kafka did not take it"), p.EIO),
        (OSError(28, "No space left on device"), p.ENOSPC),
        (OSError(122, "Disk quota exceeded"), p.ENOSPC),
        (OSError(5, "Input/output error"), p.EIO),
        (RuntimeError("a bug in the export"), p.EIO),
        (None, 0),
    ]
    with collect_errors("connectors.nbd") as logged, ServerThread({"s": export}) as srv:
        c = connected(srv)
        for exc, code in cases:
            export.raise_ = exc
            assert c.call(p.CMD_WRITE, 0, 16, payload=b"x" * 16)[0] == code, exc
            assert c.call(p.CMD_FLUSH, 0, 0)[0] == code, exc
        export.mode = "sync"
        export.raise_ = OSError(5, "bad sector")
        assert c.call(p.CMD_READ, 0, 512) == (p.EIO, b"")
        export.raise_ = None
        export.read_result = b"short"
        assert c.call(p.CMD_READ, 0, 512) == (p.EIO, b"")  # never a short read on the wire
        export.read_result = None
        assert c.call(p.CMD_READ, 0, 512) == (0, bytes(512))  # still serving
        stats = srv.call(srv.server.stats.snapshot)
        c.close()
    # Only the unexpected exception is logged as an error (with its traceback).
    assert [r.exc_info is not None for r in logged] == [True, True]
    assert stats["async_completions"] == (16 if mode == "suspend" else 0)


def test_disconnect_closes_an_exports_connections_after_their_requests() -> None:
    """``disconnect`` (a volume migrated away) closes every connection of that export once
    the requests already passed on are answered, leaves the others alone, and the export
    is listed with the description it has now (nbdinfo shows the access state there)."""
    moved, other = Scripted(), Scripted()
    moved.name, other.name = "m", "s"
    moved.mode = "gate"
    with ServerThread({"m": moved, "s": other}) as srv:
        moved.gate = srv.call(asyncio.Event)
        c, c2, keep = connected(srv, "m"), connected(srv, "m"), connected(srv, "s")
        cookie = c.request(p.CMD_WRITE, 0, 16, payload=b"x" * 16)
        wait_for(lambda: moved.calls, what="the write to reach the export")
        moved.description = "volume m (access inaccessible: migrated to b)"
        fut = srv.call(lambda: asyncio.ensure_future(srv.server.disconnect(moved)))
        time.sleep(0.1)
        srv.call(moved.gate.set)  # the write in flight is answered, then the close
        got, err, _ = c.reply()
        assert (got, err) == (cookie, 0)
        c.expect_closed()
        c2.expect_closed()
        wait_for(fut.done, what="disconnect to finish")
        assert fut.result() == 2
        assert keep.call(p.CMD_READ, 0, 512) == (0, bytes(512))  # untouched
        fresh = Client(srv.port)
        fresh.greet()
        fresh.option(p.OPT_LIST)
        listed = fresh.option_replies(p.OPT_LIST)
        assert any(b"access inaccessible: migrated to b" in d for _t, d in listed), listed
        keep.close()
        fresh.close()


def test_slow_reader_pauses_the_server() -> None:
    """A client that sends reads but does not read replies must not make the server
    buffer every reply: it stops reading requests until the client catches up."""
    with ServerThread({"s": Scripted(size=256 << 20)}) as srv:
        c = connected(srv)
        n = 200
        for i in range(n):
            c.request(p.CMD_READ, i << 20, 1 << 20)
        wait_for(lambda: srv.call(lambda: srv.server.stats.read_pauses) > 0, 10, "a pause")
        # a server that did not really stop would serve on while the loop turns (the
        # kernel's socket buffers may still take a few replies: hence n // 2, not exact)
        other = connected(srv)
        loop_turns(srv, other, turns=5)
        served_early = srv.call(lambda: srv.server.stats.requests[p.CMD_READ]) - 5
        assert served_early < n // 2, f"served {served_early} of {n} reads nobody read"
        other.close()
        for _ in range(n):
            _, err, data = c.reply()
            assert err == 0 and len(data) == 1 << 20
        stats = srv.call(srv.server.stats.snapshot)
        c.close()
    assert stats["requests"]["read"] == n + 5 and stats["read_pauses"] > 0  # + loop_turns


def test_inflight_limit_stops_reading_until_requests_complete() -> None:
    export = Scripted()
    export.mode = "gate"
    with ServerThread({"s": export}, max_inflight_per_conn=4) as srv:
        export.gate = srv.call(asyncio.Event)
        c = connected(srv)
        for i in range(10):
            c.request(p.CMD_WRITE, i * 16, 16, payload=b"y" * 16)
        wait_for(lambda: len(export.calls) >= 4, 10, "4 writes passed to the export")
        # a server ignoring the limit would pass on the rest while the loop turns
        other = connected(srv)
        loop_turns(srv, other)
        other.close()
        assert len(export.calls) == 4  # the rest waits in the socket
        srv.loop.call_soon_threadsafe(export.gate.set)
        for _ in range(10):
            assert c.reply()[1] == 0
        assert len(export.calls) == 10
        c.close()


def test_close_answers_inflight_requests_then_disconnects() -> None:
    export = Scripted()
    export.mode = "gate"
    srv = ServerThread({"s": export})
    with srv:
        export.gate = srv.call(asyncio.Event)
        c = connected(srv)
        port = srv.port
        cookie = c.request(p.CMD_WRITE, 0, 16, payload=b"z" * 16)
        wait_for(lambda: bool(export.calls), 10, "the write passed to the export")
        closing = asyncio.run_coroutine_threadsafe(srv.server.close(), srv.loop)
        # close() ran up to its wait: it no longer listens and shut the connection down
        wait_for(lambda: srv.call(lambda: srv.server.closing), 10, "close() to start")
        with pytest.raises(ConnectionRefusedError):  # no longer listening
            Client(port)
        # a close() that did not wait would finish within these turns of the loop
        for _ in range(20):
            srv.call(lambda: None)
        assert not closing.done(), "close() did not wait for the in-flight write"
        srv.loop.call_soon_threadsafe(export.gate.set)
        assert c.reply()[:2] == (cookie, 0)
        c.expect_closed()
        closing.result(10)
        c.close()


def test_handshake_timeout_drops_silent_clients() -> None:
    with ServerThread({"s": Scripted()}, handshake_timeout_s=0.2) as srv:
        busy = connected(srv)  # a client in transmission is never timed out
        # a silent client connected after `busy`: once its timeout fired, busy's would have
        c = Client(srv.port)
        assert c.recvn(18) == p.GREETING
        start = time.monotonic()
        c.expect_closed()
        assert time.monotonic() - start < 5
        c.close()
        assert busy.call(p.CMD_FLUSH, 0, 0)[0] == 0
        busy.close()
        wait_for(lambda: srv.call(lambda: srv.server.stats.connections_open) == 0, 10, "all closed")
        stats = srv.call(srv.server.stats.snapshot)
    assert stats["handshakes_failed"] == 1 and stats["connections_open"] == 0


def test_config_is_validated() -> None:
    from pipeline.errors import ConfigError, SetupError

    with pytest.raises(ConfigError, match="nowhere to listen"):
        NbdServerConfig(host=None, unix_path=None)
    with pytest.raises(ConfigError, match="tls_cert"):
        NbdServerConfig(tls_cert="x.pem")
    with pytest.raises(ConfigError, match="tls_required"):
        NbdServerConfig(tls_required=True)
    with pytest.raises(ConfigError, match="max_inflight"):
        NbdServerConfig(max_inflight_per_conn=0)
    with ServerThread({"s": Scripted()}) as srv:
        taken = NbdServer({"s": Scripted()}, NbdServerConfig(port=srv.port))
        with pytest.raises(SetupError, match="cannot listen"):
            asyncio.run(taken.start())
