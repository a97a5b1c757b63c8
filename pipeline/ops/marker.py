"""``lowmark marker``: one application-consistent Marker across every interceptor of a CG.

The coordinator's I/O around ``pipeline.primary.markers.MarkerRun``:

1. the members are the interceptors of the CG's latest published W (its generation from
   the roles); with none the marker is refused;
2. the pre-hook runs (``fsfreeze -f /mnt``, a guest agent's freeze, a database's
   checkpoint). It runs *before* writes are held: a freeze flushes dirty data, and would
   wait forever on writes the gate holds;
3. QUIESCE → every member's QUIESCED (the marker is complete, at the largest cap) → every
   RESUMED (the emitter's once the Marker is durable in Kafka);
4. the post-hook runs once the pre-hook started, also when the marker failed: a frozen
   file system is always thawed.

A hook gets ``LOWMARK_CG``, ``LOWMARK_MARKER``, ``LOWMARK_MARKER_PHASE`` (pre/post) and,
in the post-hook of a marker that was emitted, ``LOWMARK_MARKER_TS``. A hook that fails
or outlives the timeout (its whole process group is killed) aborts the marker: nothing is
emitted. Every phase is bounded by ``timeout_s``; the interceptors resume by themselves
``timeout_s`` after they quiesced, whatever happens to this process.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from connectors.kafka.reading import bounds, iter_range
from connectors.kafka.topics import CgTopics
from pipeline.errors import LowmarkError, RecordError, RestoreError
from pipeline.logs import event
from pipeline.ops.restore import latest_watermark
from pipeline.primary.control import ControlChannel
from pipeline.primary.markers import MarkerRun, Stage, complete, emitted_markers
from pipeline.topology.store import RolesStore
from schemas import codec
from schemas.control import MarkerPhase

log = logging.getLogger("lowmark.marker")

#: how old the membership a marker uses may be: an interceptor that joined since is not
#: held by the marker (its writes are still ordered by ts: the cut stays causal)
MEMBERS_MAX_AGE_S = 2.0


class MarkerError(LowmarkError):
    """The marker was not emitted; the message says which phase failed and why."""


@dataclass(frozen=True)
class MarkerOptions:
    name: str
    pre_hook: str = ""
    post_hook: str = ""
    #: the bound of every phase, and of how long writes may be held
    timeout_s: float = 5.0
    #: a snapshot (``lowmark snapshot create``): the members copy their volumes at the
    #: marker's ts and the emitter writes a Snapshot record in place of the Marker
    snapshot: bool = False
    #: a snapshot: wait this long for every member's copy to be sealed (0: do not wait)
    copy_timeout_s: float = 0.0


@dataclass
class MarkerResult:
    name: str
    marker_id: str
    ts: int
    emitter: str
    generation: int
    members: tuple[str, ...]
    #: per member, how long its writes were held (µs)
    held_us: dict[str, int]
    #: seconds spent in each phase
    phases: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    #: a snapshot's volumes, and each member's COPIED answer ("" when sealed, else why not)
    volumes: tuple[str, ...] = ()
    copied: dict[str, str] = field(default_factory=dict)

    @property
    def max_hold_s(self) -> float:
        return max(self.held_us.values(), default=0) / 1e6


def run_hook(cmd: str, env: Mapping[str, str], timeout_s: float) -> str:
    """Run a hook through the shell; "" when it succeeded, else what went wrong."""
    try:
        proc = subprocess.Popen(cmd, shell=True, env={**os.environ, **env},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    except OSError as exc:
        return f"could not start: {exc}"
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the shell and whatever it started
        proc.communicate()
        return f"still running after {timeout_s:.3g} s; killed"
    if proc.returncode != 0:
        tail = out.decode(errors="replace").strip()[-300:]
        return f"exited {proc.returncode}" + (f": {tail}" if tail else "")
    return ""


class Coordinator:
    """Takes markers of one CG through one open control channel (a schedule reuses it)."""

    def __init__(
        self,
        kafka_conf: Mapping[str, Any],
        cg: str,
        *,
        generation: int | None = None,
        now: Callable[[], float] = time.monotonic,
        wall_us: Callable[[], int] = lambda: time.time_ns() // 1000,
    ) -> None:
        self.kafka_conf = dict(kafka_conf)
        self.cg = cg
        if generation is None:
            roles = RolesStore(self.kafka_conf).latest(cg)
            generation = 0 if roles is None else roles.generation
        self.generation = generation
        self._now, self._wall_us = now, wall_us
        topics = CgTopics(cg, generation)
        if bounds(self.kafka_conf, topics.control) is None:
            raise MarkerError(
                f"no marker: CG {cg} (generation {generation}) has no topic {topics.control}; "
                "its interceptors never started with markers: start (or restart) its "
                "`lowmark serve` processes, which create it"
            )
        self.channel = ControlChannel(self.kafka_conf, topics).open()
        self._members: tuple[float, tuple[str, ...]] | None = None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Coordinator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def members(self, max_age_s: float = 0.0) -> tuple[str, ...]:
        """The interceptors of the latest W, read at most ``max_age_s`` ago."""
        if self._members and self._now() - self._members[0] <= max_age_s:
            return self._members[1]
        try:
            wm = latest_watermark(self.kafka_conf, self.cg, self.generation)
        except RestoreError as exc:
            raise MarkerError(f"no marker: {exc}") from None
        ids = tuple(sorted({m.interceptor_id for m in wm.members}))
        if not ids:
            raise MarkerError(
                f"no marker: CG {self.cg} (generation {self.generation}) has no interceptor "
                "in its latest watermark; start `lowmark serve` and retry"
            )
        self._members = (self._now(), ids)
        return ids

    def take(self, opts: MarkerOptions) -> MarkerResult:
        """Take one marker; ``MarkerError`` if it was not emitted."""
        t0 = self._now()
        phases: dict[str, float] = {}
        # a schedule of markers reads the membership every few seconds, not every time
        members = self.members(MEMBERS_MAX_AGE_S)
        env = {"LOWMARK_CG": self.cg, "LOWMARK_MARKER": opts.name}
        ran_pre = False
        try:
            if opts.pre_hook:
                ran_pre = True
                why = run_hook(opts.pre_hook, {**env, "LOWMARK_MARKER_PHASE": "pre"},
                               opts.timeout_s)  # fmt: skip
                phases["pre_hook_s"] = self._now() - t0
                if why:
                    raise MarkerError(f"marker {opts.name!r} not emitted: the pre-hook {why}")
            run = self._coordinate(opts, members, phases)
        except BaseException as exc:
            if ran_pre and opts.post_hook:
                why = run_hook(opts.post_hook, {**env, "LOWMARK_MARKER_PHASE": "post"},
                               opts.timeout_s)  # fmt: skip
                if why:
                    event(log, "post-hook failed after a failed marker", logging.ERROR,
                          marker=opts.name, error=why)  # fmt: skip
            raise exc
        result = MarkerResult(
            opts.name, run.marker_id, run.ts, run.emitter, self.generation, run.members,
            dict(run.held_us), phases, list(run.warnings), run.volumes, dict(run.copied),
        )  # fmt: skip
        if opts.post_hook:
            t = self._now()
            why = run_hook(opts.post_hook, {**env, "LOWMARK_MARKER_PHASE": "post",
                           "LOWMARK_MARKER_TS": str(run.ts)}, opts.timeout_s)  # fmt: skip
            phases["post_hook_s"] = self._now() - t
            if why:
                result.warnings.append(f"the post-hook {why} (the marker was emitted)")
        phases["total_s"] = self._now() - t0
        event(log, "marker emitted", cg=self.cg, marker=opts.name, ts=run.ts,
              emitter=run.emitter, members=list(run.members),
              max_hold_ms=round(result.max_hold_s * 1000, 3),
              warnings=result.warnings or None)  # fmt: skip
        return result

    def _coordinate(
        self, opts: MarkerOptions, members: tuple[str, ...], phases: dict[str, float]
    ) -> MarkerRun:
        run = MarkerRun(uuid.uuid4().hex[:16], opts.name, members, opts.timeout_s, self._now,
                        snapshot=opts.snapshot)  # fmt: skip
        t = self._now()
        self.channel.send(run.start(self._wall_us()))
        try:
            while not run.finished:
                for step in self.channel.read(0.005):
                    run.on_step(step)
                out = run.poll(self._wall_us())
                if out is not None:
                    self.channel.send(out)
        except BaseException:
            abort = None if run.finished else run.abort("the coordinator was interrupted")
            if abort is not None:  # let the members go now, not at their timeout
                self.channel.send(abort, flush_s=2.0)
            raise
        if run.completed_at:
            phases["quiesce_s"] = run.completed_at - t
            phases["resume_s"] = self._now() - run.completed_at
        if run.stage is Stage.ABORTED:
            where = "after it was complete" if run.completed_at else "while quiescing"
            what = "snapshot" if opts.snapshot else "marker"
            raise MarkerError(f"{what} {opts.name!r} not emitted ({where}): {run.error}")
        if opts.snapshot and opts.copy_timeout_s > 0:
            t = self._now()
            self._await_copies(run, t + opts.copy_timeout_s)
            phases["copy_s"] = self._now() - t
        return run

    def _await_copies(self, run: MarkerRun, deadline: float) -> None:
        """Read COPIED answers until every member's copy is sealed, or the deadline."""
        while not complete(run.members, run.copied) and self._now() < deadline:
            for step in self.channel.read(0.05):
                run.on_step(step)
        for iid in run.members:
            if iid not in run.copied:
                run.warnings.append(f"interceptor {iid}: its copy was not sealed in time "
                                    "(see `lowmark snapshot list`)")  # fmt: skip
            elif run.copied[iid]:
                run.warnings.append(f"interceptor {iid}: its copy failed: {run.copied[iid]}")


def take_marker(kafka_conf: Mapping[str, Any], cg: str, opts: MarkerOptions) -> MarkerResult:
    with Coordinator(kafka_conf, cg) as coordinator:
        return coordinator.take(opts)


def latest_marker(
    kafka_conf: Mapping[str, Any], cg: str, generation: int, tail: int = 4000
) -> tuple[str, int, int] | None:
    """(name, ts, confirmed_us) of the newest marker emitted in the last ``tail`` steps of
    the control topic (None: none there, or no control topic)."""
    topic = CgTopics(cg, generation).control
    found = bounds(dict(kafka_conf), topic)
    if not found or 0 not in found or found[0][1] <= found[0][0]:
        return None
    low, end = found[0]
    steps = []
    for msg in iter_range(dict(kafka_conf), topic, 0, max(low, end - tail), end, timeout_s=10):
        try:
            steps.append(codec.decode(msg.value() or b"", MarkerPhase))
        except RecordError:
            continue  # a step that does not decode says nothing about markers
    emitted = emitted_markers(steps)
    return emitted[-1] if emitted else None
