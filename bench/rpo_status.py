"""The status block of bench.rpo: how a service child tells the parent its state.

A child (``bench.rpo_child``) writes its W, counters and per-phase timers into a small
mmap'd file after every step; the parent (``bench.rpo_workload``) reads it, and writes the
one control word, the poll timeout the child passes to ``step``. Shared memory, because a
Prometheus scrape every 5 ms would steal the applier's own GIL.
"""

from __future__ import annotations

import mmap
import time
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import SetupError

# w: applied W (applier) or computed W (watermark); w2: checkpoint W or published W;
# count: checkpoints or publishes; records_read: log records or progress events folded
HEADER = ("seq", "state", "pid", "steps", "w", "w2", "bytes", "bytes_read", "records_read",
          "pending", "count", "first_apply_us", "spare0", "poll_timeout_us", "last_step_us",
          "spare")
TIMERS = ("step", "read_wm", "read_log", "decode", "plan_add", "apply", "plan_take", "pwrite",
          "checkpoint", "sync", "digest", "spill", "fold", "publish", "log_offsets", "fence")
FIELD_INDEX = {name: i for i, name in enumerate(HEADER)}
TIMER_INDEX = {name: i for i, name in enumerate(TIMERS)}
N_FIELDS = len(HEADER) + 2 * len(TIMERS)
STATUS_BYTES = 8 * N_FIELDS
STARTING, RUNNING, STOPPED, FAILED = 0, 1, 2, 3
CONTROL = FIELD_INDEX["poll_timeout_us"]  # the one field the parent writes
SEQ = FIELD_INDEX["seq"]
# what a child publishes before the control word, in this order
HEAD_FIELDS = HEADER[SEQ + 1 : CONTROL]


class StatusBlock:
    """A child's state in an mmap'd file: the child writes after every step, the parent reads.

    Words go through a ``memoryview`` cast to int64, whose item access is one aligned 8-byte
    copy, so a single field never tears (``struct.pack_into`` writes byte by byte and does).
    A whole snapshot is made consistent by a sequence lock: the writer makes ``seq`` odd,
    writes, makes it even; a reader retries until it saw the same even ``seq`` around its
    copy. The parent's one word (``poll_timeout_us``) is read by the child only.
    """

    def __init__(self, path: Path, create: bool = False) -> None:
        if create:
            path.write_bytes(bytes(STATUS_BYTES))
        self.path = path
        self._file = open(path, "r+b")  # noqa: SIM115 - lives as long as the mmap
        self._mm = mmap.mmap(self._file.fileno(), STATUS_BYTES)
        self._mv = memoryview(self._mm).cast("q")
        if create:
            self.set("poll_timeout_us", -1)

    def get(self, name: str) -> int:
        return self._mv[FIELD_INDEX[name]]

    def set(self, name: str, value: int) -> None:
        self._mv[FIELD_INDEX[name]] = value

    def publish(self, head: Sequence[int], tail: Sequence[int]) -> None:
        """``head``: the fields between ``seq`` and the control word; ``tail``: those after it."""
        mv = self._mv
        mv[SEQ] += 1  # odd: a write is under way
        mv[SEQ + 1 : CONTROL] = array("q", head)
        mv[CONTROL + 1 :] = array("q", tail)
        mv[SEQ] += 1

    def read(self, tries: int = 1000) -> dict[str, Any]:
        mv = self._mv
        for _ in range(tries):
            seq = mv[SEQ]
            if seq % 2 == 0:
                vals = mv.tolist()
                if mv[SEQ] == seq:
                    break
            time.sleep(0)
        else:
            raise SetupError(f"status block {self.path} stayed mid-write; is its child stuck?")
        out: dict[str, Any] = dict(zip(HEADER, vals[: len(HEADER)], strict=True))
        ns = vals[len(HEADER) :: 2]
        n = vals[len(HEADER) + 1 :: 2]
        out["timers"] = {t: (ns[i], n[i]) for i, t in enumerate(TIMERS)}
        return out

    def close(self) -> None:
        self._mv.release()
        self._mm.close()
        self._file.close()
