"""An NbdServer on its own event loop thread, for tests that drive it from other threads
or processes (shared by the client and fuzz tests)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping
from typing import Any

from connectors.nbd.server import Export, NbdServer, NbdServerConfig


class ServerThread:
    """Runs an NbdServer on its own event loop thread; records loop-level errors."""

    def __init__(self, exports: Mapping[str, Export], **config: Any) -> None:
        self.exports = exports
        self.config = NbdServerConfig(**{"host": "127.0.0.1", "port": 0, **config})
        self.loop_errors: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.server = NbdServer(exports, self.config)

    def __enter__(self) -> ServerThread:
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.set_exception_handler(
                lambda _loop, ctx: self.loop_errors.append(str(ctx.get("exception") or ctx))
            )
            self.loop.run_until_complete(self.server.start())
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name="nbd-server", daemon=True)
        self.thread.start()
        assert started.wait(10), "NBD server did not start"
        return self

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server's loop thread and return its result."""

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    @property
    def port(self) -> int:
        port = self.server.port
        assert port is not None
        return port

    def uri(self, name: str = "") -> str:
        return f"nbd://127.0.0.1:{self.server.port}/{name}"

    def unix_uri(self, name: str = "") -> str:
        return f"nbd+unix:///{name}?socket={self.config.unix_path}"
