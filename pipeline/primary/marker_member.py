"""An interceptor's part in the CG's markers: a thread on the control topic.

It follows ``lowmark.<cg>.control`` and acts out ``pipeline.primary.markers.MemberPhases``:
on QUIESCE it holds the CG's write gate (``pipeline.primary.gate``) and waits for the
admitted writes, stamps the cap (``Interceptor.stamp``: the in-flight ts keeps S below
it) and sends QUIESCED; once every member's QUIESCED stands before any ABORT, it raises
the clock to the marker's ts and resumes, the emitter writing the Marker record in the
cap's place; on ABORT, or when its own timeout passes, it resumes without a marker.
Reads never wait for any of this.

A Kafka problem here never touches the write path: the thread logs it, releases any hold,
and keeps trying; a marker meanwhile times out at the coordinator.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from pipeline.errors import KafkaError, LowmarkError
from pipeline.logs import event
from pipeline.primary.control import ControlChannel
from pipeline.primary.gate import WriteGate
from pipeline.primary.interceptor import Interceptor
from pipeline.primary.markers import Act, MemberAction, MemberPhases
from pipeline.primary.outbox import Ticket
from pipeline.primary.pit_snapshots import PrimarySnapshots
from schemas.control import MarkerPhase, MarkerStep
from schemas.records import Marker, Snapshot

log = logging.getLogger("lowmark.markers")

POLL_S = 0.05


class MarkerMember:
    def __init__(
        self, engine: Interceptor, gate: WriteGate, snapshots: PrimarySnapshots | None = None
    ) -> None:
        self.engine = engine
        self.gate = gate
        #: the volumes' copies for a snapshot's marker (None: this member takes none)
        self.snapshots = snapshots
        if snapshots is not None:
            snapshots.on_copied = self._copied
        self.iid = engine.config.interceptor_id
        ts = engine.time_source
        self.phases = MemberPhases(self.iid, ts.monotonic, ts.wall_us)
        self.channel = ControlChannel(engine.kafka_conf, engine.topics)
        self._token: int | None = None  # the cap's in-flight stamp while quiesced
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats: dict[str, Any] = {
            "markers_quiesced": 0, "markers_emitted": 0, "markers_aborted": 0,
            "markers_self_resumed": 0, "marker_last_hold_s": 0.0, "marker_max_hold_s": 0.0,
            "marker_last_ts": 0, "marker_last_step_lag_s": 0.0, "control_errors": 0,
        }  # fmt: skip

    def start(self) -> None:
        # the channel opens in the thread: a start of the interceptor never waits for it
        self._thread = threading.Thread(target=self._run, name=f"lowmark-markers-{self.iid}",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        self._resume(MemberAction(Act.RESUME, why="interceptor closing"), answer=False)
        self.channel.close()

    def _run(self) -> None:
        while not self._stop.is_set() and not self._open():
            self._stop.wait(1.0)
        while not self._stop.is_set() and not self.engine.crashed:
            try:
                steps = self.channel.read(POLL_S)
                for step in steps:
                    self._act(self.phases.on_step(step))
                    if step.step is MarkerStep.RESUMED and self.snapshots is not None:
                        self.snapshots.on_resumed(step.marker_id, step.interceptor_id,
                                                  step.ts, step.error)  # fmt: skip
                self._act(self.phases.poll())
            except KafkaError as exc:
                self.stats["control_errors"] += 1
                event(log, "control topic trouble; any hold is released", logging.WARNING,
                      interceptor=self.iid, error=str(exc))  # fmt: skip
                self._resume(MemberAction(Act.RESUME, why=str(exc)), answer=False)
                self._stop.wait(1.0)
            except Exception:
                log.exception("marker thread error; any hold is released")
                self._resume(MemberAction(Act.RESUME, why="internal error"), answer=False)
                self._stop.wait(1.0)
        if self.engine.crashed:  # a dead process answers nothing and holds nothing
            self._resume(MemberAction(Act.RESUME, why="interceptor crashed"), answer=False)
            self.channel.close(flush_s=0)

    def _open(self) -> bool:
        try:
            self.channel.open()
            return True
        except KafkaError as exc:
            self.stats["control_errors"] += 1
            event(log, "cannot open the control topic yet; markers wait for it", logging.WARNING,
                  interceptor=self.iid, error=str(exc))  # fmt: skip
            return False

    def _act(self, action: MemberAction) -> None:
        if action.act is Act.QUIESCE:
            self._quiesce(action)
        elif action.act in (Act.EMIT, Act.RESUME):
            self._resume(action)
        elif action.act is Act.ANSWER and action.reply is not None:
            if action.reply.error:
                event(log, "marker refused here", logging.WARNING, interceptor=self.iid,
                      marker=action.reply.name, id=action.reply.marker_id,
                      error=action.reply.error)  # fmt: skip
            self.channel.send(action.reply)

    def _quiesce(self, action: MemberAction) -> None:
        # drain within a quarter of the timeout: the coordinator waits half of it for all
        reply: MarkerPhase | None
        if not self.gate.hold(action.timeout_s / 4):
            reply = self.phases.failed(action.marker_id, "admitted writes did not drain in time")
        else:
            try:
                self._token, cap = self.engine.stamp()
            except LowmarkError as exc:
                reply = self.phases.failed(action.marker_id, str(exc))
            else:
                volumes, why = self._begin_copies(action)
                if not why:
                    self.stats["markers_quiesced"] += 1
                    for after in self.phases.quiesced(action.marker_id, cap, volumes):
                        self._act(after)
                    return
                token, self._token = self._token, None
                if token is not None:
                    self.engine.abandon(token)
                reply = self.phases.failed(action.marker_id, why)
        if reply is not None:
            self.channel.send(reply)
        self.gate.release()

    def _begin_copies(self, action: MemberAction) -> tuple[tuple[str, ...], str]:
        """A snapshot's marker: start the copies now, while nothing is written; the
        volumes copied, or why not."""
        if not action.snapshot:
            return (), ""
        if self.snapshots is None:
            return (), "this interceptor takes no snapshots (markers are off)"
        try:
            emitter = self.phases.hold.emitter if self.phases.hold is not None else ""
            return self.snapshots.begin(action.marker_id, action.name, emitter), ""
        except (LowmarkError, OSError) as exc:
            return (), f"cannot copy the volumes: {exc}"

    def _copied(self, marker_id: str, name: str, ts: int, volumes: tuple[str, ...],
                error: str) -> None:  # fmt: skip
        try:  # on the copy's thread: it must never raise there
            self.channel.send(self.phases.copied(marker_id, name, ts, volumes, error))
        except Exception as exc:
            event(log, "could not answer COPIED", logging.WARNING, error=repr(exc))

    def _resume(self, action: MemberAction, answer: bool = True) -> None:
        """Raise the clock to the marker's ts, write the Marker (the emitter) or drop the
        cap, open the gate: in this order, so no write is stamped at or below ts after."""
        token, self._token = self._token, None
        error, ticket = "", None
        if token is not None:
            if action.ts:
                self.engine.clock.observe(action.ts)
            if action.act is Act.EMIT:
                ticket, error = self._emit(token, action)
            else:
                self.engine.abandon(token)
            if action.snapshot and self.snapshots is not None:
                if action.ts and not error:
                    self.snapshots.confirm(action.marker_id, action.ts)
                else:
                    self.snapshots.cancel(action.marker_id)
        if not self.gate.held and token is None:
            return
        held = self.gate.release()
        if ticket is None:
            self._done(action, held, error, answer)
        else:  # the emitter answers once the Marker is durable (on the tick thread)
            ticket.add_done_callback(
                lambda exc: self._done(action, held, f"the Marker is not durable: {exc}"
                                       if exc else "", answer))  # fmt: skip

    def _emit(self, token: int, action: MemberAction) -> tuple[Ticket | None, str]:
        iid, epoch = self.engine.origin
        wall = self.engine.time_source.wall_us()
        try:
            record: Marker | Snapshot = (
                Snapshot(action.name, action.ts, action.volumes, iid, epoch)
                if action.snapshot
                else Marker(action.name, action.ts, iid, epoch, wall)
            )
            return self.engine.append_record(token, record), ""
        except LowmarkError as exc:
            self.engine.abandon(token)
            return None, f"could not queue the {'Snapshot' if action.snapshot else 'Marker'}: {exc}"

    def _done(self, action: MemberAction, held: float, error: str, answer: bool) -> None:
        self._count(action, held, error)
        if answer:
            try:  # may run on the tick thread (the emitter): it must never raise there
                self.channel.send(self.phases.resumed(action, round(held * 1e6), error))
            except Exception as exc:  # the coordinator times out and says so
                event(log, "could not answer RESUMED", logging.WARNING, error=repr(exc))

    def _count(self, action: MemberAction, held: float, error: str) -> None:
        st = self.stats
        st["marker_last_hold_s"] = held
        st["marker_max_hold_s"] = max(st["marker_max_hold_s"], held)
        if action.act is Act.EMIT and not error:
            st["markers_emitted"] += 1
        if action.ts and not error:
            st["marker_last_ts"] = action.ts
            st["marker_last_step_lag_s"] = self.phases.last_lag_us / 1e6
        elif "by itself" in action.why:
            st["markers_self_resumed"] += 1
        else:
            st["markers_aborted"] += 1
        event(log, "marker resumed" if action.ts else "marker abandoned",
              level=logging.INFO if action.ts and not error else logging.WARNING,
              interceptor=self.iid, marker=action.name, id=action.marker_id, ts=action.ts,
              emitter=action.act is Act.EMIT, held_ms=round(held * 1000, 3),
              step_lag_ms=round(self.phases.last_lag_us / 1000, 3) if action.ts else None,
              error=error or action.why or None)  # fmt: skip

    def metrics(self) -> dict[str, Any]:
        return {**self.stats, **{f"gate_{k}": v for k, v in self.gate.stats.items()},
                "marker_holding": int(self.gate.held)}  # fmt: skip


__all__ = ["MarkerMember"]
