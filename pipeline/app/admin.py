"""A running primary's local admin socket: volumes created, resized and listed live.

``lowmark serve`` listens on a unix socket (``[serve] admin_socket``, default
``<data_dir>/state/admin.sock``; file permissions are its access control, as with
``drbdsetup``'s netlink or ``lvm``'s lock dir: whoever may write the images may manage
them). One JSON request per line, one JSON answer per line::

    {"op": "create", "name": "db2", "size": 1073741824, "mode": "async"}
    {"op": "resize", "name": "db", "size": 2147483648}
    {"op": "list"}
    {"op": "whoami"}
    {"op": "migrate", "step": "state|hold|release|...", "volume": "db", ...}
    -> {"ok": true, "volume": {...}}  |  {"ok": false, "error": "..."}

``migrate`` requests are one interceptor's half of ``lowmark migrate``
(``pipeline.ops.migrate_member`` says what each step does); ``Exports`` is told after each
so the NBD server serves, parks or disconnects the volume's export.

A change goes through ``ConsistencyGroup`` (the record in the CG's log, in order with the
writes, then the entry in ``lowmark.config``) and the NBD export appears or grows at once.
``AdminClient`` is the other end (``lowmark volume``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import orjson

from pipeline.errors import ConfigError, LowmarkError, SetupError
from pipeline.logs import event
from pipeline.ops.migrate_member import MigrationMember
from pipeline.primary.volume import ConsistencyGroup, Volume

__all__ = ["AdminClient", "AdminServer", "Exports", "default_admin_socket"]

log = logging.getLogger("lowmark.admin")
ADMIN_SOCKET = "admin.sock"
_MAX_LINE = 64 << 10
#: sockaddr_un.sun_path holds 108 bytes with its NUL; a data dir can be deeper than that
_SUN_PATH_MAX = 107


def default_admin_socket(data_dir: Path | str) -> Path:
    return Path(data_dir) / "state" / ADMIN_SOCKET


@contextlib.contextmanager
def _reachable(path: Path) -> Iterator[str]:
    """A name for ``path`` that fits in a unix socket address.

    A deep data dir (a test's tmp dir, a mount under a long path) would otherwise refuse
    the default socket. Linux resolves ``/proc/self/fd/N/name`` through the open
    directory N, so bind and connect both work on the socket's real file."""
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def volume_json(vol: Volume) -> dict[str, Any]:
    return {"name": vol.name, "volume_id": vol.volume_id, "size": vol.size, "mode": vol.mode,
            "metadata": dict(vol.info.metadata or {}), "access": vol.access}  # fmt: skip


class Exports(Protocol):
    """What the NBD server does when a volume is served, parked or moved away here."""

    def serve(self, vol: Volume) -> None: ...

    def park(self, name: str) -> None: ...

    def drop(self, name: str) -> None: ...

    def disconnect(self, name: str) -> Awaitable[int]: ...


class AdminServer:
    """Answers admin requests for ``cg``; ``on_volume(vol)`` is called (in the event loop)
    after a volume is created or resized, so the NBD server can export it; ``exports``
    after a migration step changed what is served here."""

    def __init__(self, cg: ConsistencyGroup, path: Path, on_volume: Callable[[Volume], None],
                 exports: Exports | None = None,
                 migrations: MigrationMember | None = None):  # fmt: skip
        self.cg, self.path, self.on_volume = cg, path, on_volume
        self.exports = exports
        self.migrations = migrations
        self._server: asyncio.AbstractServer | None = None
        self.stats = {"requests": 0, "errors": 0}

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a stale socket of a process that is gone (the site lock)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _reachable(self.path) as name:
                sock.bind(name)
            self._server = await asyncio.start_unix_server(self._client, sock=sock,
                                                           limit=_MAX_LINE)  # fmt: skip
        except OSError as exc:
            sock.close()
            raise SetupError(f"admin socket {self.path}: {exc}; set [serve] admin_socket "
                             "to a writable path ('' disables it)") from None  # fmt: skip
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                answer = await self._answer(line)
                writer.write(orjson.dumps(answer) + b"\n")
                await writer.drain()
        except (ValueError, ConnectionError):  # a line over the limit, a client gone
            pass
        finally:
            writer.close()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        self.stats["requests"] += 1
        try:
            req = orjson.loads(line)
            if not isinstance(req, dict):
                raise ConfigError("an admin request is a JSON object with an 'op'")
            return {"ok": True, **await self._do(req)}
        except orjson.JSONDecodeError as exc:
            return self._error(f"the request is not JSON ({exc})")
        except LowmarkError as exc:
            return self._error(str(exc))
        except (TypeError, KeyError) as exc:
            return self._error(f"bad request: {exc!r} (see `lowmark volume --help`)")

    def _error(self, why: str) -> dict[str, Any]:
        self.stats["errors"] += 1
        return {"ok": False, "error": why}

    async def _do(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "list":
            parked = [{**p.catalog_entry(), "parked": p.role}
                      for _n, p in sorted(self.cg.parking.parked.items())]  # fmt: skip
            return {"volumes": [volume_json(v) for _n, v in sorted(self.cg.volumes.items())],
                    "parked": parked}  # fmt: skip
        if op == "whoami":
            engine = self.cg.interceptor
            return {"interceptor": engine.config.interceptor_id, "cg": engine.config.cg,
                    "generation": engine.config.generation,
                    "data_dir": str(self.cg.data_dir)}  # fmt: skip
        if op == "migrate":
            return await self._migrate(req)
        if op not in ("create", "resize"):
            raise ConfigError(f"unknown admin op {op!r}: create, resize, list, whoami or migrate")
        name, size = req["name"], req["size"]
        if not isinstance(name, str) or not isinstance(size, int) or isinstance(size, bool):
            raise ConfigError("name must be a string and size an integer number of bytes")
        if op == "create":
            mode, meta = req.get("mode", "async"), req.get("metadata") or {}
            vol = await asyncio.to_thread(self.cg.create_volume, name, size, mode=mode,
                                          metadata=dict(meta))  # fmt: skip
        else:
            vol = await asyncio.to_thread(self.cg.resize_volume, name, size)
        self.on_volume(vol)
        event(log, f"volume {op}d", volume=vol.name, size=vol.size, mode=vol.mode)
        return {"volume": volume_json(vol)}


    async def _migrate(self, req: dict[str, Any]) -> dict[str, Any]:
        m, ex = self.migrations, self.exports
        if m is None or ex is None:
            raise ConfigError("this `lowmark serve` takes no migrations (no NBD server)")
        step, name, mid = req["step"], str(req["volume"]), str(req.get("migration", ""))
        run = asyncio.to_thread
        if step == "state":
            return m.state(name)
        if step == "hold":
            return await run(m.hold, name, str(req["peer"]), mid, float(req["lease_s"]))
        if step == "release":
            out = await run(m.release, name, str(req["peer"]), mid)
            out["disconnected"] = await ex.disconnect(name)  # told ESHUTDOWN, then closed
            ex.park(name)
            return out
        if step == "reclaim":
            vol = await run(m.reclaim, name)
            if vol is not None:
                ex.serve(vol)
            return {}
        if step == "forget":
            await run(m.forget, name, mid)
            ex.drop(name)
            return {}
        if step == "prepare":
            out = await run(m.prepare, req["info"], str(req["source_image"]), str(req["peer"]),
                            mid)  # fmt: skip
            ex.park(name)
            return out
        if step == "catch_up":
            return await run(m.catch_up, name, mid, float(req["timeout_s"]),
                             bool(req.get("held", True)))  # fmt: skip
        if step == "activate":
            vol = await run(m.activate, name, mid, int(req["final_ts"]), str(req["source"]),
                            float(req["timeout_s"]))  # fmt: skip
            if vol is not None:
                ex.serve(vol)
            return {"ms": m.last_activation_ms}
        if step == "unstage":
            await run(m.unstage, name)
            ex.drop(name)
            return {}
        raise ConfigError(f"unknown migration step {step!r}")


class AdminClient:
    """``lowmark volume``'s end of the admin socket."""

    def __init__(self, path: Path, timeout_s: float = 60.0) -> None:
        self.path, self.timeout_s = path, timeout_s

    def request(self, req: dict[str, Any]) -> dict[str, Any]:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout_s)
        try:
            with _reachable(self.path) as name:
                s.connect(name)
        except OSError as exc:
            s.close()
            raise SetupError(f"no running `lowmark serve` answers on {self.path} ({exc}): "
                             "start it, or pass --admin-socket / --data-dir of the one "
                             "that is running") from None  # fmt: skip
        try:
            with s, s.makefile("rwb") as f:
                f.write(orjson.dumps(req) + b"\n")
                f.flush()
                line = f.readline()
        except OSError as exc:  # it died or stalled mid-request (a timeout is an OSError)
            raise SetupError(f"`lowmark serve` at {self.path} did not answer {req.get('op')!r} "
                             f"({exc!r}): is it still running? Run the command again once "
                             "it is") from None  # fmt: skip
        if not line:
            raise SetupError(f"`lowmark serve` at {self.path} closed the connection")
        answer: dict[str, Any] = orjson.loads(line)
        return answer
