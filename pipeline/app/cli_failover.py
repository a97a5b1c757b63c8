"""``lowmark failover``: make a backup site the primary and serve its volumes over NBD.

The command runs in the foreground as the new primary, like ``lowmark serve``, until
SIGINT/SIGTERM. The steps and their crash rules are in ``pipeline.ops.failover``; this
module orders them for a short time to the first read: the backlog is indexed while the
new generation is committed, the NBD server starts as soon as the index is built (reads
are answered from then on), writes are let through once the new interceptor runs, and
the roll-forward then runs in the background with a progress line.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from pipeline.app.cli_ops import ProgressLine, _site, _ts
from pipeline.app.cli_services import build_config, config_options
from pipeline.app.config import LowmarkConfig, parse_hostport, parse_size
from pipeline.app.metrics import serve_metrics
from pipeline.app.progress import ProgressBar
from pipeline.app.runtime import nbd_config, primary_metrics, stop_on_signals
from pipeline.backup.images import ImageSet
from pipeline.backup.rollforward import Backlog, RollForward
from pipeline.errors import FailoverError, LowmarkError
from pipeline.logs import event
from pipeline.ops.failover import Failover, FailoverConfig
from pipeline.ops.failover_export import FailoverExport, Gate, exports_for
from pipeline.ops.failover_state import Action
from pipeline.primary.nbd_volume import VolumeExport
from pipeline.site import REGIONS
from pipeline.timesource import REAL_TIME, TimeSource
from schemas.records import TransitionKind
from schemas.ts import format_ts, ts_physical_us

log = logging.getLogger("lowmark.failover")

STATUS_EVERY_S = 10.0


class Run:
    """One ``lowmark failover`` process: the failover, its exports, its numbers."""

    def __init__(self, cfg: LowmarkConfig, fc: FailoverConfig, time_source: TimeSource) -> None:
        self.cfg = cfg
        self.fc = fc
        self.time = time_source
        self.started = time.monotonic()
        self.gate = Gate(self.started)
        self.f = Failover(fc, cfg.kafka_conf(), time_source)
        self.backlog: Backlog | None = None
        self.images: ImageSet | None = None
        self.worker: RollForward | None = None
        self.exports: dict[str, FailoverExport] = {}
        self.phase = "planning"
        self.timings: dict[str, float] = {}
        self.gate.on_first_read = self._first_read
        self._commit_error: BaseException | None = None
        self._index_built = threading.Event()  # set when indexing ended (done or failed)
        self._catalog_ready = threading.Event()  # volume changes applied (or failed)
        self._exports_ready = threading.Event()

    def _mark(self, what: str) -> None:
        self.timings[what] = round(time.monotonic() - self.started, 3)

    def _first_read(self, after_s: float) -> None:
        self.timings["first_read_s"] = round(after_s, 3)
        event(log, "first read answered", cg=self.fc.cg, site=self.fc.site, after_s=after_s)

    # ---------------------------------------------------------------- the steps

    def prepare(self) -> None:
        r = self.f.prepare()
        self._mark("planned_s")
        rpo = max(0.0, (r.started_us - ts_physical_us(r.cut_ts)) / 1e6)
        click.echo(
            f"failover of CG {r.cg} to site {r.site}: generation {r.from_generation} -> "
            f"{r.generation}, cut {r.cut_ts} ({format_ts(r.cut_ts)}, {r.how}"
            f"{' ' + r.marker if r.marker else ''}), RPO {rpo:.3f} s"
            f"{', forced' if r.forced else ''}; {self.f.action.value if self.f.action else ''}",
            err=True,
        )
        if self.f.fenced:
            click.echo(f"fenced the old primary's interceptors: {self.f.fenced}", err=True)

    def commit_and_start(self) -> None:
        """In its own thread: commit (and fence, forced), apply the volume changes, roll
        forward in the background, start the new interceptor and let writes through."""
        try:
            self.phase = "committing"
            self.f.commit()
            self._mark("committed_s")
            if self.fc.force:
                threading.Thread(target=self.f.fence_all, name="fence", daemon=True).start()
            self._index_built.wait()
            if self.backlog is None:
                return  # indexing failed; the main thread reports it
            self.f.apply_changes(self.backlog)
            self._catalog_ready.set()
            self._exports_ready.wait()
            assert self.images is not None
            # the images are the new primary's from the commit on: roll forward now, the
            # interceptor starts alongside (writes wait for it, reads never do)
            self.phase = "rolling forward"
            self.worker = RollForward(
                self.backlog, self.images, rate_bytes_s=self.fc.rollforward_rate_bytes_s
            )
            self.worker.start()
            self._topics.join()
            if self._region_log_left():
                # the new interceptor republishes a crashed run's dirty regions from the
                # images at its start: they must hold the cut's bytes there by then, not
                # a half-rolled mix (writes wait for it; a re-run only)
                self.worker.wait()
            cg = self.f.open_primary()
            for name, exp in self.exports.items():
                exp.attach(VolumeExport(cg.volume(name)))
            self.gate.open(cg)
            self._mark("writes_s")
            self.worker.wait()
            if self.worker.error is not None:
                raise self.worker.error
            if self.worker.done.is_set():
                self.f.rolled_forward()
                self.gate.rolled_forward.set()
                self._mark("rolled_forward_s")
                self.phase = "primary"
        except BaseException as exc:
            self._commit_error = exc
            self.phase = "failed"
            self.gate.fail(exc)
            event(log, "failover failed", level=logging.ERROR, error=str(exc))
        finally:
            self._catalog_ready.set()

    def _region_log_left(self) -> bool:
        """Whether an earlier run of this site's interceptor left a dirty-region log."""
        regions = self.f.site.state_dir / REGIONS
        return regions.is_dir() and any(regions.iterdir())

    def _prepare_topics(self) -> None:
        try:
            self.f.prepare_topics()
        except LowmarkError as exc:  # open_primary creates them again, and says why not
            event(log, "could not create the new generation's topics yet", error=str(exc))

    def run(self, stop: threading.Event, ready: threading.Event | None = None) -> None:
        self.prepare()
        done_already = self.f.action is Action.DONE
        if done_already:
            self.gate.rolled_forward.set()
        self._topics = threading.Thread(target=self._prepare_topics, name="topics", daemon=True)
        self._topics.start()
        starter = threading.Thread(target=self.commit_and_start, name="failover", daemon=True)
        starter.start()
        try:
            self.phase = "indexing"
            backlog = Backlog() if done_already else self.f.build_backlog(ProgressLine("indexing"))
            self._mark("indexed_s")
        finally:
            self._index_built.set()
        self.backlog = backlog
        self._index_built.set()
        if backlog.volume_changes:
            self._catalog_ready.wait()  # sizes change before serving, after the commit
            if self._commit_error is not None:
                starter.join(5)
                raise self._commit_error
        self.images = ImageSet(self.f.site)
        self.exports = exports_for(
            # no digests: they read every allocated byte of every image before serving
            self.images.volumes(digests=False),
            self.f.site.image_path,
            backlog,
            self.images,
            self.gate,
        )
        self._exports_ready.set()
        try:
            asyncio.run(self._serve(stop, ready))
        finally:
            stop.set()
            if self.worker is not None:
                self.worker.stop()
            starter.join(5)
            for exp in self.exports.values():
                exp.close()
            self.images.close()
            backlog.close()
            self.f.close()
        if self._commit_error is not None:
            raise self._commit_error

    async def _serve(self, stop: threading.Event, ready: threading.Event | None) -> None:
        from connectors.nbd.server import NbdServer

        server = NbdServer(dict(self.exports), nbd_config(self.cfg))
        await server.start()
        self._mark("serving_s")
        event(
            log,
            "serving",
            cg=self.fc.cg,
            site=self.fc.site,
            exports=sorted(self.exports),
            listen=self.cfg.serve.listen,
            unix_socket=self.cfg.serve.unix_socket,
            after_s=self.timings["serving_s"],
        )
        click.echo(f"serving {sorted(self.exports)} on {self._where()}", err=True)
        if self.cfg.serve.metrics:
            serve_metrics(
                self.cfg.serve.metrics,
                "failover",
                lambda: self.metrics(server),
                {"cg": self.fc.cg, "site": self.fc.site},
            )
        if ready is not None:
            ready.set()
        bar = _RollForwardBar()
        last_status = time.monotonic()
        while not stop.is_set() and self._commit_error is None:
            await asyncio.sleep(0.1)
            if self.worker is not None and not self.gate.rolled_forward.is_set():
                bar.show(self.worker.metrics())
            elif bar.shown and self.gate.rolled_forward.is_set():
                bar.show(self.worker.metrics() if self.worker else {"progress": 1.0})
                bar.close()
                self._report_done()
            cg = self.f.cg
            if cg is not None and cg.interceptor.failure is not None:
                event(
                    log,
                    "replication failed; stopping",
                    level=logging.ERROR,
                    error=str(cg.interceptor.failure),
                )
                break
            if time.monotonic() - last_status >= STATUS_EVERY_S:
                event(
                    log,
                    "failover status",
                    **{k: v for k, v in self.metrics(server).items() if not isinstance(v, dict)},
                )
                last_status = time.monotonic()
        bar.close()
        await server.close()

    def _report_done(self) -> None:
        t = self.timings
        gen = self.f.record.generation if self.f.record else "?"
        click.echo(
            f"rolled forward in {t.get('rolled_forward_s', 0) - t.get('writes_s', 0):.2f} s; "
            f"first read after {t.get('first_read_s', float('nan')):.3f} s; site "
            f"{self.fc.site} is the primary of generation {gen}",
            err=True,
        )

    def _where(self) -> str:
        s = self.cfg.serve
        return " and ".join(x for x in (s.listen and f"nbd://{s.listen}", s.unix_socket) if x)

    def metrics(self, server: Any = None) -> dict[str, Any]:
        r = self.f.record
        m: dict[str, Any] = {
            "failover_phase": self.phase,
            "generation": r.generation if r else 0,
            "cut_ts": r.cut_ts if r else 0,
            **{f"failover_{k}": v for k, v in self.timings.items()},
        }
        if self.worker is not None:
            m.update(
                {
                    f"rollforward_{k}": v
                    for k, v in self.worker.metrics().items()
                    if not isinstance(v, str | type(None))
                }
            )
        if self.f.cg is not None:
            m.update(primary_metrics(self.f.cg, server))
        return m


class _RollForwardBar:
    """The roll-forward's progress bar, from its metrics."""

    def __init__(self, every_s: float = 0.25) -> None:
        self.bar = ProgressBar("roll-forward", "MiB", quiet_s=0.0, every_s=every_s)

    def show(self, m: Mapping[str, Any]) -> None:
        self.bar.show(int(m.get("bytes_done", 0)), int(m.get("bytes_total", 0)))

    @property
    def shown(self) -> bool:
        return self.bar.shown

    def close(self) -> None:
        self.bar.close()


def failover_config(
    cfg: LowmarkConfig,
    site: str,
    site_dir: Path,
    *,
    at: int | None,
    marker: str | None,
    force: bool,
    interceptor_id: str | None,
    rollforward_rate: str | None = None,
    kind: TransitionKind = TransitionKind.FAILOVER,
    drain_timeout_s: float = 30.0,
    handover_timeout_s: float = 15.0,
) -> FailoverConfig:
    s = cfg.serve
    return FailoverConfig(
        cg=cfg.cg.name,
        site=site,
        site_dir=site_dir,
        interceptor_id=interceptor_id or site,
        at=at,
        marker=marker,
        force=force,
        reachable_s=cfg.watermark.liveness_timeout_s,
        kind=kind,
        drain_timeout_s=drain_timeout_s,
        handover_timeout_s=handover_timeout_s,
        rollforward_rate_bytes_s=float(parse_size(rollforward_rate, "--rollforward-rate"))
        if rollforward_rate
        else 0.0,
        log_partitions=cfg.cg.log_partitions,
        replication_factor=cfg.replication_factor,
        engine_options={
            "tick_interval_s": s.tick_interval_ms / 1000,
            "max_clock_skew_us": s.max_clock_skew_us,
            "replication_timeout_s": s.replication_timeout_s,
        },
    )


def run_failover(
    cfg: LowmarkConfig,
    fc: FailoverConfig,
    ready: threading.Event | None = None,
    stop: threading.Event | None = None,
    time_source: TimeSource = REAL_TIME,
) -> Run:
    if stop is None:
        stop = threading.Event()
        stop_on_signals(stop)
    run = Run(cfg, fc, time_source)
    run.run(stop, ready)
    return run


def _serving_options(fn: Any) -> Any:
    """The options failover and switchover share: the site, its NBD server, the roll-forward."""
    for option in reversed(
        [
            click.option(
                "--site",
                default=None,
                help="the backup site that becomes the primary ([apply] site)",
            ),
            click.option(
                "--data-dir",
                "site_dir",
                default=None,
                type=click.Path(file_okay=False, path_type=Path),
                help="that site's data dir ([apply] data_dir when --site is the config's)",
            ),
            click.option(
                "--interceptor-id",
                default=None,
                help="the new primary's interceptor (default: the site)",
            ),
            click.option(
                "--listen", default=None, help="NBD host:port ([serve] listen; '' for none)"
            ),
            click.option("--unix-socket", default=None, help="also serve NBD on this unix socket"),
            click.option(
                "--metrics", default=None, help="host:port for the Prometheus /metrics endpoint"
            ),
            click.option(
                "--rollforward-rate",
                default=None,
                help="roll forward at most this much per second (e.g. 200MiB; default: no limit)",
            ),
            click.option(
                "--handover-timeout-s",
                default=15.0,
                show_default=True,
                help="how long the site's running applier gets to hand the site over (0: "
                "refuse while it runs)",
            ),
        ]
    ):
        fn = option(fn)
    return config_options(fn)


def _start(
    config_path: Path | None,
    bootstrap_servers: str | None,
    cg_name: str | None,
    site: str | None,
    site_dir: Path | None,
    listen: str | None,
    unix_socket: str | None,
    metrics: str | None,
    **kw: Any,
) -> None:
    serve = {
        k: v
        for k, v in (("listen", listen), ("unix_socket", unix_socket), ("metrics", metrics))
        if v is not None
    }
    cfg = build_config(config_path, bootstrap_servers, cg_name, serve=serve)
    if listen == "":
        from dataclasses import replace

        cfg = replace(cfg, serve=replace(cfg.serve, listen=""))
    parse_hostport(cfg.serve.listen, "--listen")
    name, sdir = _site(cfg, site, site_dir)
    if sdir is None:
        raise FailoverError(f"no data dir for site {name}: pass --data-dir")
    run_failover(cfg, failover_config(cfg, name, sdir, **kw))


@click.command()
@_serving_options
@click.option("--at", "at", default=None, help="the cut: a ts (int or ISO time) <= W, or 'latest'")
@click.option("--at-marker", "marker", default=None, help="the cut: the ts of this marker")
@click.option("--force", is_flag=True, help="the primary cannot be reached: do not ask it to stop")
def failover(at, marker, force, interceptor_id, rollforward_rate, **kw) -> None:
    """Make SITE the primary of the next generation and serve its volumes over NBD.

    Chooses the cut (the latest W, --at TS or --at-marker NAME), fences the old primary,
    commits the new generation's roles, indexes the site's backlog up to the cut and serves
    at once: reads are answered from the index and the images while the roll-forward runs;
    writes go to the new generation's log. SITE's running applier hands the site over
    (paused, its stage is indexed unread: the first read does not wait for the backlog).
    Runs until Ctrl-C; run it again after a crash and it completes (or says why not).
    """
    if at is not None and marker is not None:
        raise click.UsageError("give at most one of --at TS and --at-marker NAME")
    at_ts = None if at in (None, "latest") else _ts(at, "--at")
    _start(at=at_ts, marker=marker, force=force, interceptor_id=interceptor_id,
           rollforward_rate=rollforward_rate, **kw)  # fmt: skip


@click.command()
@_serving_options
@click.option("--drain-timeout-s", default=30.0, show_default=True,
              help="how long the primary gets to drain")  # fmt: skip
def switchover(interceptor_id, rollforward_rate, drain_timeout_s, **kw) -> None:
    """Planned: move the primary to SITE, losing nothing, and serve its volumes over NBD.

    The primary drains first (it stops taking writes, makes every acknowledged write
    durable and publishes its last progress), the cut is the W that covers it, then SITE
    takes over as `lowmark failover` does. Run it at SITE; SITE's running applier hands
    the site over (it checkpoints, or keeps its stage if paused, and exits).
    """
    _start(at=None, marker=None, force=False, interceptor_id=interceptor_id,
           rollforward_rate=rollforward_rate, kind=TransitionKind.SWITCHOVER,
           drain_timeout_s=drain_timeout_s, **kw)  # fmt: skip


COMMANDS = [failover, switchover]
