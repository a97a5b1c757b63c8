"""``lowmark console``: a live web page of the CG, served by lowmark itself.

aiohttp serves it: one well-kept asyncio library that is both the HTTP server and the
streaming response (Server-Sent Events) the page updates from, with no ASGI server to
pick and no build step for the page. A poll thread reads what ``lowmark status`` reads
(``cg_status``, the topology's site registry and each site's /metrics), builds the view
(``pipeline.ops.console_view``) once per refresh and hands it to every open page.

Read-only unless started with ``--actions``: then a marker or a snapshot can be taken
from the page, each POST carrying the token (``Authorization: Bearer``) and
``"confirm": true``, and each logged with its outcome (never the token).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from connectors.kafka.reading import bounds
from connectors.kafka.topics import CgTopics
from pipeline.app.config import parse_hostport
from pipeline.app.console_ops import Operations
from pipeline.errors import ConfigError, LowmarkError
from pipeline.logs import event
from pipeline.ops.console_view import RpoHistory, SiteLive, build_view
from pipeline.ops.status import cg_status, scrape

log = logging.getLogger("lowmark.console")

ACTIONS = ("marker", "snapshot", "drill", "drill-stop", "failover")
TOPOLOGY_EVERY_S = 10.0  # sites register rarely; their /metrics are scraped every refresh


@dataclass(frozen=True)
class ConsoleConfig:
    cg: str
    kafka_conf: dict[str, Any]
    listen: str = "127.0.0.1:8480"
    refresh_s: float = 1.0
    history_s: float = 3600.0
    actions: bool = False
    token: str = field(default="", repr=False)
    #: (data dir, site) on this host whose unfinished resync the page shows (as status)
    data_dirs: tuple[tuple[Path, str], ...] = ()
    #: the config the drill and failover children read, and where their dirs/logs go
    config_path: Path | None = None
    work_dir: Path = Path(".lowmark/console")

    def __post_init__(self) -> None:
        if self.actions and len(self.token) < 16:
            raise ConfigError(
                "lowmark console --actions needs a token of at least 16 characters: put one "
                "in a file (--token-file) or in LOWMARK_CONSOLE_TOKEN"
            )
        if not 0.1 <= self.refresh_s <= 60:
            raise ConfigError(f"--refresh {self.refresh_s} s: give 0.1 to 60 seconds")


class Console:
    """The poll thread and the latest view; ``run`` serves it until ``stop`` is set."""

    def __init__(self, cfg: ConsoleConfig, now: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.now = now
        self.history = RpoHistory(cfg.history_s)
        self.latest: dict[str, Any] = {"cg": cfg.cg, "loading": True}
        self.version = 0
        self.stats = {"polls": 0, "poll_errors": 0, "poll_s": 0.0, "clients": 0,
                      "actions": 0, "actions_refused": 0}  # fmt: skip
        self._sites: dict[str, str] = {}  # backup site -> its /metrics address
        self._sites_at = -1e9
        self.ops = Operations(cfg.config_path, cfg.work_dir)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next: asyncio.Future[None] | None = None  # done when the next view is in

    # ---------------------------------------------------------------- the poll thread

    def _site_urls(self) -> dict[str, str]:
        if time.monotonic() - self._sites_at >= TOPOLOGY_EVERY_S:
            from pipeline.topology.catalog import read_topology

            topo = read_topology(self.cfg.kafka_conf, self.cfg.cg, timeout_s=5.0)
            self._sites = {n: e.metrics for n, e in topo.sites.items()
                           if e.kind == "backup" and e.metrics}  # fmt: skip
            self._sites_at = time.monotonic()
        return self._sites

    def poll(self) -> dict[str, Any]:
        """One view of the CG (I/O: Kafka, the sites' /metrics)."""
        from pipeline.app.cli_roles import render_roles

        status = cg_status(self.cfg.kafka_conf, self.cfg.cg, data_dirs=self.cfg.data_dirs)
        live = {}
        for site, addr in self._site_urls().items():
            numbers = scrape(addr, timeout_s=min(1.0, self.cfg.refresh_s))
            live[site] = SiteLive(answers=bool(numbers), numbers=numbers)
        roles = status.pop("roles", None)
        history = render_roles(self.cfg.cg, roles).splitlines()[1:] if roles else []
        dl = bounds(self.cfg.kafka_conf, CgTopics(self.cfg.cg, status["generation"]).deadletter)
        dead = sum(end - low for low, end in dl.values()) if dl else 0
        return build_view(status, live, [h.strip() for h in history], dead)

    def poll_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                view = self.poll()
                self.history.add(self.now(), view)
                self.stats["polls"] += 1
                error = None
            except (LowmarkError, OSError) as exc:
                view, error = dict(self.latest), str(exc)
                self.stats["poll_errors"] += 1
                event(log, "console cannot read the CG; the page shows the last view",
                      logging.WARNING, cg=self.cfg.cg, error=error)  # fmt: skip
            self.stats["poll_s"] = round(time.monotonic() - t0, 4)
            self.latest = {**view, "error": error, "rpo_history": self.history.to_json(),
                           "actions": list(ACTIONS) if self.cfg.actions else [],
                           "refresh_s": self.cfg.refresh_s,
                           "console": dict(self.stats),
                           "operations": self.ops.states()}  # fmt: skip
            self.version += 1
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._bump)
            stop.wait(max(0.0, self.cfg.refresh_s - (time.monotonic() - t0)))

    def _bump(self) -> None:
        """In the loop: wake every open page (each waits on the same future)."""
        assert self._loop is not None
        done, self._next = self._next, self._loop.create_future()
        if done is not None and not done.done():
            done.set_result(None)

    # ---------------------------------------------------------------- HTTP

    async def page(self, _req: web.Request) -> web.Response:
        html = resources.files("pipeline.app").joinpath("console.html").read_text()
        return web.Response(text=html, content_type="text/html")

    async def status(self, _req: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.latest, option=orjson.OPT_NON_STR_KEYS),
                            content_type="application/json")  # fmt: skip

    async def events(self, req: web.Request) -> web.StreamResponse:
        """Server-Sent Events: the view each time it changes."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})  # fmt: skip
        await resp.prepare(req)
        self.stats["clients"] += 1
        seen = -1
        try:
            while True:
                if self.version != seen:
                    seen = self.version
                    body = orjson.dumps(self.latest, option=orjson.OPT_NON_STR_KEYS)
                    await resp.write(b"data: " + body + b"\n\n")
                assert self._next is not None
                if self.version == seen:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(self._next), 15)
                if self.version == seen:
                    await resp.write(b": keep-alive\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.stats["clients"] -= 1
        return resp

    async def action(self, req: web.Request) -> web.Response:
        kind = req.match_info["kind"]
        who = req.remote or "?"
        if not self.cfg.actions or kind not in ACTIONS:
            return self._refuse(kind, who, 404, "actions are off: start the console with "
                                "--actions and a token to take markers or snapshots")  # fmt: skip
        given = req.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), self.cfg.token.encode()):
            return self._refuse(kind, who, 403, "wrong or missing token")
        try:
            body = await req.json()
        except ValueError:
            body = {}
        name = str(body.get("name", "")).strip()
        if body.get("confirm") is not True or not name:
            return self._refuse(kind, who, 400, 'send {"name": ..., "confirm": true}')
        if kind == "failover" and body.get("typed") != name:
            return self._refuse(kind, who, 400, "a failover is confirmed by typing the "
                                "site's name (\"typed\")")  # fmt: skip
        self.stats["actions"] += 1
        event(log, "console action", action=kind, label=name, remote=who, cg=self.cfg.cg)
        try:
            result = await asyncio.get_running_loop().run_in_executor(None, self._act, kind, name)
        except (LowmarkError, OSError) as exc:
            event(log, "console action failed", logging.WARNING, action=kind, label=name,
                  remote=who, error=str(exc))  # fmt: skip
            return web.json_response({"ok": False, "error": str(exc)}, status=409)
        event(log, "console action done", action=kind, label=name, remote=who, **result)
        return web.json_response({"ok": True, **result})

    def _refuse(self, kind: str, who: str, code: int, why: str) -> web.Response:
        self.stats["actions_refused"] += 1
        event(log, "console action refused", logging.WARNING, action=kind, remote=who,
              status=code, why=why)  # fmt: skip
        return web.json_response({"ok": False, "error": why}, status=code)

    def _act(self, kind: str, name: str) -> dict[str, Any]:
        from pipeline.ops import snapshot
        from pipeline.ops.marker import MarkerOptions, take_marker

        if kind == "drill":
            op = self.ops.drill(name)
            return {"pid": op.proc.pid, "nbd": op.nbd, "log": str(op.log_path)}
        if kind == "drill-stop":
            return {"exit_code": self.ops.stop("drill", name)}
        if kind == "failover":
            op = self.ops.failover(name)
            return {"pid": op.proc.pid, "log": str(op.log_path)}
        opts = MarkerOptions(name)
        if kind == "snapshot":
            res = snapshot.create(self.cfg.kafka_conf, self.cfg.cg, opts)
        else:
            res = take_marker(self.cfg.kafka_conf, self.cfg.cg, opts)
        return {"ts": res.ts, "emitter": res.emitter, "max_hold_s": res.max_hold_s}

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes([
            web.get("/", self.page), web.get("/api/status", self.status),
            web.get("/api/events", self.events), web.post("/api/actions/{kind}", self.action),
        ])  # fmt: skip
        return app

    async def run(self, stop: threading.Event, ready: Callable[[int], None] | None = None) -> None:
        addr = parse_hostport(self.cfg.listen, "--listen")
        if addr is None:
            raise ConfigError("--listen: give host:port")
        self._loop = asyncio.get_running_loop()
        self._next = self._loop.create_future()
        poller = threading.Thread(target=self.poll_forever, args=(stop,), daemon=True,
                                  name="lowmark-console-poll")  # fmt: skip
        poller.start()
        # no access log: every action is an event of its own, a page poll is not news
        runner = web.AppRunner(self.app(), shutdown_timeout=1.0, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, addr[0], addr[1])
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(f"cannot serve the console on {self.cfg.listen}: {exc}; "
                              "choose a free port with --listen") from None  # fmt: skip
        port = runner.addresses[0][1]
        event(log, "console serving", url=f"http://{addr[0]}:{port}/", cg=self.cfg.cg,
              actions=self.cfg.actions)  # fmt: skip
        if ready is not None:
            ready(port)
        try:
            while not stop.is_set():
                await asyncio.sleep(0.2)
        finally:
            await runner.cleanup()
            poller.join(5)
            self.ops.close()


__all__ = ["ACTIONS", "Console", "ConsoleConfig"]
