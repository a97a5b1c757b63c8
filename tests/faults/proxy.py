"""A TCP fault proxy on loopback, one listening port per broker, driven from a test.

Kafka clients reach each broker through its proxy (the broker advertises the proxy's port
on a CLIENT listener, ``KafkaCluster(client_listeners=...)``), while the brokers talk to
each other directly: a fault here cuts lowmark off from a broker without costing the
cluster its quorum. Faults, per proxy:

- ``partition("refuse")``: live connections are reset and new ones are reset on accept
  (what a client sees of a host that is down or firewalled with REJECT);
- ``partition("blackhole")``: bytes stop flowing both ways on every connection, old and
  new, and flow again at ``heal()`` (a dropped link that TCP rides out by retransmitting);
- ``delay(s)``: every chunk is delivered ``s`` seconds after it was read, in order;
- ``reset()``: every live connection is reset now (RST, not FIN).

All proxies share one asyncio loop on a daemon thread; every control call is thread-safe
and returns once the loop applied it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

_CHUNK = 1 << 16


@dataclass
class ProxyStats:
    accepted: int = 0
    refused: int = 0
    resets: int = 0
    bytes_up: int = 0  # client -> server
    bytes_down: int = 0


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST: SO_LINGER 0, then abort (no FIN, nothing flushed)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One client connection and its upstream one, pumped both ways."""

    def __init__(self, proxy: FaultProxy, c_r: Any, c_w: Any, s_r: Any, s_w: Any) -> None:
        self.proxy = proxy
        self.writers: tuple[asyncio.StreamWriter, asyncio.StreamWriter] = (c_w, s_w)
        self.tasks = [
            asyncio.ensure_future(self._pump(c_r, s_w, up=True)),
            asyncio.ensure_future(self._pump(s_r, c_w, up=False)),
        ]

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, up: bool) -> None:
        # reading and writing are separate tasks so a delay holds bytes without holding
        # the reader: latency is added per chunk, not serialised across chunks
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        sender = asyncio.ensure_future(self._send(queue, dst, up))
        try:
            while True:
                data = await src.read(_CHUNK)
                if not data:
                    break
                await queue.put((time.monotonic() + self.proxy.delay_s, data))
            await queue.put((0.0, b""))
            await sender
        except (ConnectionError, OSError, asyncio.CancelledError):
            sender.cancel()
        finally:
            self.close(reset=False)

    async def _send(self, queue: asyncio.Queue[tuple[float, bytes]], dst: Any, up: bool) -> None:
        while True:
            due, data = await queue.get()
            if not data:
                with contextlib.suppress(OSError):
                    dst.write_eof()
                return
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await self.proxy.flowing.wait()  # a blackhole holds bytes until heal()
            dst.write(data)
            await dst.drain()
            if up:
                self.proxy.stats.bytes_up += len(data)
            else:
                self.proxy.stats.bytes_down += len(data)

    def close(self, reset: bool) -> None:
        for w in self.writers:
            if reset:
                _rst(w)
            else:
                w.close()
        for t in self.tasks:
            if t is not asyncio.current_task():
                t.cancel()
        self.proxy.links.discard(self)


@dataclass
class FaultProxy:
    """Forwards 127.0.0.1:``listen_port`` to 127.0.0.1:``upstream_port``."""

    name: str
    listen_port: int
    upstream_port: int
    delay_s: float = 0.0
    refusing: bool = False
    links: set[_Link] = field(default_factory=set)
    stats: ProxyStats = field(default_factory=ProxyStats)
    flowing: asyncio.Event = field(default_factory=asyncio.Event)
    server: asyncio.Server | None = None

    async def start(self) -> None:
        self.flowing.set()
        self.server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.listen_port, reuse_address=True
        )

    async def _accept(self, c_r: asyncio.StreamReader, c_w: asyncio.StreamWriter) -> None:
        if self.refusing:
            self.stats.refused += 1
            _rst(c_w)
            return
        try:
            s_r, s_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            _rst(c_w)  # the broker is down: the client sees a refused connection
            return
        self.stats.accepted += 1
        self.links.add(_Link(self, c_r, c_w, s_r, s_w))

    def reset_all(self) -> int:
        links = list(self.links)
        for link in links:
            link.close(reset=True)
        self.stats.resets += len(links)
        return len(links)

    async def close(self) -> None:
        self.reset_all()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


class ProxySet:
    """One FaultProxy per broker on a loop thread of its own; ``{node: proxy}``."""

    def __init__(self, routes: dict[int, tuple[int, int]]) -> None:
        """``routes``: {node: (proxy listen port, broker's client listener port)}."""
        self.loop = asyncio.new_event_loop()
        self.proxies = {n: FaultProxy(f"node{n}", lp, up) for n, (lp, up) in routes.items()}
        self.thread = threading.Thread(target=self.loop.run_forever, name="fault-proxy",
                                       daemon=True)  # fmt: skip

    def __enter__(self) -> ProxySet:
        self.thread.start()
        for p in self.proxies.values():
            self._run(p.start())
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.proxies.values():
            self._run(p.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def _call(self, fn: Callable[[], Any]) -> Any:
        async def run() -> Any:
            return fn()

        return self._run(run())

    # ---- faults (node: the broker behind the proxy)

    def partition(self, node: int, how: str = "refuse") -> None:
        p = self.proxies[node]
        if how == "refuse":
            self._call(lambda: (setattr(p, "refusing", True), p.reset_all()))
        elif how == "blackhole":
            self._call(p.flowing.clear)
        else:
            raise ValueError(f"partition how={how!r}: 'refuse' or 'blackhole'")

    def delay(self, node: int, seconds: float) -> None:
        p = self.proxies[node]
        self._call(lambda: setattr(p, "delay_s", seconds))

    def reset(self, node: int) -> int:
        p = self.proxies[node]
        return int(self._call(p.reset_all))

    def heal(self, node: int | None = None) -> None:
        """Undo every fault on ``node`` (every node when None)."""
        for n, p in self.proxies.items():
            if node is None or n == node:
                self._call(lambda p=p: (setattr(p, "refusing", False),
                                        setattr(p, "delay_s", 0.0), p.flowing.set()))  # fmt: skip

    def stats(self, node: int) -> ProxyStats:
        return self.proxies[node].stats
