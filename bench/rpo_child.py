"""The child side of bench.rpo: one lowmark service in a process of its own.

``python -m bench.rpo _child apply|watermark ...`` lands in :func:`child_main`, which builds
the service with ``pipeline.app.services.make_*`` from the config the CLI uses, drives it
with the same ``step()`` loop as ``lowmark apply`` / ``lowmark watermark``, times its phases
(and the library calls they make) and publishes its state into a status block after every
step (``bench.rpo_status``). No ``__main__`` block: ``make bench`` runs bench.rpo only.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.rpo_status import (
    FAILED,
    HEAD_FIELDS,
    RUNNING,
    STOPPED,
    TIMER_INDEX,
    TIMERS,
    StatusBlock,
)
from pipeline.timesource import wall_us
from schemas import codec


class Timers:
    """Nanoseconds and calls per phase; ``wrap`` times any callable (bench instrumentation)."""

    def __init__(self) -> None:
        self.ns = [0] * len(TIMERS)
        self.n = [0] * len(TIMERS)

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        i, ns, n, clock = TIMER_INDEX[name], self.ns, self.n, time.perf_counter_ns

        def timed(*args: Any, **kwargs: Any) -> Any:
            t = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                ns[i] += clock() - t
                n[i] += 1

        return timed

    def flat(self) -> list[int]:
        return [v for pair in zip(self.ns, self.n, strict=True) for v in pair]


def _instrument_classes(timers: Timers) -> None:
    """Time the library calls the services make (this child process only)."""
    from connectors.image.image import Image
    from pipeline.backup.plan import ApplyPlanner

    codec.decode = timers.wrap("decode", codec.decode)
    Image.pwrite = timers.wrap("pwrite", Image.pwrite)  # type: ignore[method-assign]
    Image.sync = timers.wrap("sync", Image.sync)  # type: ignore[method-assign]
    Image.content_digest = timers.wrap("digest", Image.content_digest)  # type: ignore[method-assign]
    ApplyPlanner.add = timers.wrap("plan_add", ApplyPlanner.add)  # type: ignore[method-assign]
    ApplyPlanner.take = timers.wrap("plan_take", ApplyPlanner.take)  # type: ignore[method-assign]


def _die_with_parent(parent: int) -> None:
    """A crashed bench must not leave services consuming the broker.

    PR_SET_PDEATHSIG, set here after exec rather than in a preexec_fn (which is unsafe in
    a parent that runs threads); the loop also checks the parent every second.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the prctl took effect
        sys.exit(1)


def child_main(argv: Sequence[str]) -> int:
    """Run one service like ``lowmark watermark`` / ``lowmark apply``, publishing its state."""
    ap = argparse.ArgumentParser(prog="python -m bench.rpo _child")
    ap.add_argument("kind", choices=("apply", "watermark"))
    ap.add_argument("--cg", required=True)
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--status", type=Path, required=True)
    ap.add_argument("--parent", type=int, required=True)
    ap.add_argument("--data-dir", default="")
    ap.add_argument("--site", default="bench")
    ap.add_argument("--liveness-timeout-s", type=float, default=None)
    ap.add_argument("--profile", type=Path, default=None, help="write cProfile stats here")
    a = ap.parse_args(argv)
    _die_with_parent(a.parent)

    from pipeline.app.config import load_config
    from pipeline.app.services import make_applier, make_watermark_service
    from pipeline.logs import setup_logging

    setup_logging("warning", "text")
    cfg = load_config(None, {
        "kafka": {"bootstrap_servers": a.bootstrap},
        "cg": {"name": a.cg},
        "apply": {"site": a.site, "data_dir": a.data_dir},
        "watermark": {"liveness_timeout_s": a.liveness_timeout_s},
    })
    svc = make_applier(cfg) if a.kind == "apply" else make_watermark_service(cfg)
    child = ChildService(svc, a.kind, StatusBlock(a.status))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    prof = cProfile.Profile() if a.profile else None
    try:
        svc.start()
        child.instrument()
        child.publish(RUNNING)
        if prof is not None:
            prof.enable()
        child.loop(stop, a.parent)
        svc.close()
    except BaseException:
        child.block.set("state", FAILED)
        raise  # the traceback lands in the child's log, which the parent shows
    finally:
        if prof is not None:
            prof.disable()
            prof.dump_stats(a.profile)
    child.publish(STOPPED)
    return 0


class ChildService:
    """A service in a child process: its step loop, timers and status block."""

    def __init__(self, svc: Any, kind: str, block: StatusBlock) -> None:
        self.svc, self.kind, self.block = svc, kind, block
        self.timers = Timers()
        self.steps = 0
        self.first_apply_us = 0
        self.block.set("pid", os.getpid())
        _instrument_classes(self.timers)

    def instrument(self) -> None:
        """After ``start()``: wrap the service's own phases (instance attributes shadow them)."""
        names = (
            {"_read_watermarks": "read_wm", "_read_log": "read_log", "_apply_ready": "apply",
             "checkpoint": "checkpoint", "_spill": "spill"}
            if self.kind == "apply"
            else {"_fold": "fold", "_publish": "publish", "_log_end_offsets": "log_offsets",
                  "_fence_silent": "fence"}
        )
        for attr, name in names.items():
            setattr(self.svc, attr, self.timers.wrap(name, getattr(self.svc, attr)))

    def loop(self, stop: threading.Event, parent: int) -> None:
        svc, block, clock = self.svc, self.block, time.perf_counter_ns
        step_i, ns, n = TIMER_INDEX["step"], self.timers.ns, self.timers.n
        next_parent_check = time.monotonic() + 1
        while not stop.is_set():
            poll_us = block.get("poll_timeout_us")
            t = clock()
            if poll_us >= 0:
                svc.step(poll_us / 1e6)
            else:
                svc.step()  # the service's default timeout, as `lowmark apply` runs it
            ns[step_i] += clock() - t
            n[step_i] += 1
            self.steps += 1
            if not self.first_apply_us and self.kind == "apply" and svc.stats.applied_bytes:
                self.first_apply_us = wall_us()
            self.publish(RUNNING)
            if time.monotonic() >= next_parent_check:
                if os.getppid() != parent:
                    break
                next_parent_check = time.monotonic() + 1

    def publish(self, state: int) -> None:
        svc, st = self.svc, self.svc.stats
        if self.kind == "apply":
            v = {"w": svc.applied_w, "w2": svc.checkpoint_w, "bytes": st.applied_bytes,
                 "bytes_read": st.bytes_read, "records_read": st.records_read,
                 "pending": svc.planner.pending_bytes(), "count": st.checkpoints}
        else:
            v = {"w": svc.state.w, "w2": svc.published_w, "records_read": st.events,
                 "count": st.published}
        v.update(state=state, pid=os.getpid(), steps=self.steps,
                 first_apply_us=self.first_apply_us)
        head = [v.get(name, 0) for name in HEAD_FIELDS]
        tail = [wall_us(), 0, *self.timers.flat()]  # last_step_us, spare, timers
        self.block.publish(head, tail)
