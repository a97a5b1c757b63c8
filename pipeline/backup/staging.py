"""A paused site's stage: what its applier read past its checkpoint, kept on disk.

A paused applier (``lowmark pause``) stops changing its images, so they stay the cut its
checkpoint names, but it keeps reading the log: every op the planner hands out (ts <= W)
goes into the site's stage instead of the images. The stage is two files under
``state/staged/``:

- ``data``: the write data, appended;
- ``ops.sqlite``: one row per op in the planner's order (kind, volume, offset, length, the
  data's position in ``data``, a volume change's record) and, in ``meta``, the checkpoint
  the stage starts from (its encoded bytes: the *base*), the W it reaches and the log
  offsets a planner resumes from there (what a checkpoint at that W would say).

**The images at the base checkpoint plus the stage's ops, in order, are the cut at the
stage's W.** A *mark* makes that true on disk: the data file is fdatasynced first, then
the rows since the last mark and the new W and offsets are committed in one sqlite
transaction (synchronous=FULL), so a crash leaves the last mark whole. Nothing but the
applier that created a stage writes to it, and only while it holds the site lock.

The stage is a cache, never the truth: ``load`` accepts it only if its base is the very
checkpoint the site's file holds now and every row's data lies inside the data file;
anything else is reported and the caller reads the log from Kafka, as without a stage.
``lowmark failover`` folds an accepted stage into its roll-forward backlog (an index of
positions in ``data``: no byte of it is read before a client asks for it), so a paused
site with a large backlog serves its first read without reading that backlog again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson

from pipeline.backup.plan import ApplyOp, OpKind
from pipeline.backup.rollforward import Backlog
from pipeline.errors import RecordError
from pipeline.site import STATE, SiteDir
from schemas import codec
from schemas.records import VolumeChange

STAGED = "staged"
DATA = "data"
OPS = "ops.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS ops (
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    volume_id TEXT NOT NULL,
    "offset" INTEGER NOT NULL,
    length INTEGER NOT NULL,
    pos INTEGER,
    record BLOB
);
"""
_KINDS = (OpKind.WRITE, OpKind.ZERO, OpKind.TRIM, OpKind.VOLUME_CHANGE)

Row = tuple[str, str, int, int, int | None, bytes | None]


def stage_dir(site: SiteDir) -> Path:
    return site.root / STATE / STAGED


def discard(site: SiteDir) -> bool:
    """Delete the site's stage; whether there was one."""
    d = stage_dir(site)
    if not d.exists():
        return False
    shutil.rmtree(d)
    return True


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA synchronous=FULL")
    return db


class Stage:
    """The writer: a paused applier's stage from ``base`` (the checkpoint's encoded bytes).

    An ``ImageSink`` (``apply``, ``sync``), so the applier hands it the ops it would have
    applied. Creating one throws away whatever stage the site had."""

    def __init__(self, site: SiteDir, base: bytes) -> None:
        discard(site)
        d = stage_dir(site)
        d.mkdir(parents=True)
        self.path = d / DATA
        self._data = open(self.path, "wb", buffering=1 << 20)  # noqa: SIM115 (closed in close)
        self._db = _connect(d / OPS)
        self._db.executescript(_SCHEMA)
        self._db.execute("INSERT INTO meta VALUES ('base', ?)", (base,))
        self._rows: list[Row] = []
        self._pos = 0
        #: the W and offsets of the last mark (None: not marked yet, not usable)
        self.w: int | None = None
        self.ops = 0
        self.bytes = 0
        self.marks = 0

    def apply(self, op: ApplyOp) -> None:
        vid = op.volume_id or ""
        if op.kind is OpKind.WRITE:
            assert op.data is not None
            self._data.write(op.data)
            self._rows.append((op.kind.value, vid, op.offset, len(op.data), self._pos, None))
            self._pos += len(op.data)
            self.bytes += len(op.data)
        elif op.kind in (OpKind.ZERO, OpKind.TRIM):
            self._rows.append((op.kind.value, vid, op.offset, op.length, None, None))
        elif op.kind is OpKind.VOLUME_CHANGE:
            assert isinstance(op.record, VolumeChange)
            self._rows.append((op.kind.value, vid, 0, 0, None, codec.encode(op.record)))
        else:
            return  # markers and snapshots change no image
        self.ops += 1

    def sync(self) -> None:
        """Nothing: a mark is what makes the stage durable (it needs the W and offsets)."""

    def mark(self, w: int, offsets: dict[int, int]) -> None:
        """Make the ops so far durable as the cut at ``w``, resumable from ``offsets``."""
        self._data.flush()
        os.fdatasync(self._data.fileno())
        with contextlib.closing(self._db.cursor()) as cur:
            cur.execute("BEGIN")
            cur.executemany(
                'INSERT INTO ops (kind, volume_id, "offset", length, pos, record) '
                "VALUES (?, ?, ?, ?, ?, ?)",
                self._rows,
            )
            cur.execute("INSERT OR REPLACE INTO meta VALUES ('w', ?)", (str(w).encode(),))
            cur.execute(
                "INSERT OR REPLACE INTO meta VALUES ('offsets', ?)",
                (orjson.dumps({str(p): o for p, o in offsets.items()}),),
            )
            cur.execute("COMMIT")
        self._rows.clear()
        self.w = w
        self.marks += 1

    def close(self) -> None:
        """Close the files (call ``mark`` first to keep what was staged since the last)."""
        self._data.close()
        self._db.close()


@dataclass(frozen=True)
class Staged:
    """A stage ``load`` accepted: the cut at ``w`` over the base checkpoint's images."""

    data_path: Path
    w: int
    offsets: dict[int, int]
    rows: list[Row]
    bytes: int


def load(site: SiteDir, base: bytes) -> tuple[Staged | None, str]:
    """The site's stage if it is usable over the checkpoint ``base``; else None and why."""
    d = stage_dir(site)
    if not (d / OPS).exists():
        return None, "the site has no stage"
    try:
        with contextlib.closing(_connect(d / OPS)) as db:
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            if meta.get("base") != base:
                return None, "the stage starts from another checkpoint than the site's"
            if "w" not in meta:
                return None, "the stage was never marked"
            rows: list[Row] = db.execute(
                'SELECT kind, volume_id, "offset", length, pos, record FROM ops ORDER BY seq'
            ).fetchall()
        w = int(meta["w"])
        offsets = {int(p): int(o) for p, o in orjson.loads(meta["offsets"]).items()}
    except (sqlite3.Error, ValueError, orjson.JSONDecodeError) as exc:
        return None, f"the stage is unreadable ({exc})"
    try:
        size = (d / DATA).stat().st_size
    except OSError as exc:
        return None, f"the stage's data file is unreadable ({exc})"
    need = 0
    kinds = {k.value for k in _KINDS}
    for kind, _vid, _off, length, pos, record in rows:
        if kind not in kinds or length < 0 or (kind == OpKind.WRITE and pos is None):
            return None, f"the stage holds an op it cannot be sure of ({kind!r})"
        if kind == OpKind.VOLUME_CHANGE:
            try:
                codec.decode(record or b"", VolumeChange)
            except RecordError as exc:
                return None, f"the stage holds a volume change it cannot decode ({exc})"
        if pos is not None:
            need = max(need, pos + length)
    if need > size:
        return None, f"the stage's data file is short ({size} of {need} bytes)"
    total = sum(r[3] for r in rows if r[0] == OpKind.WRITE)
    return Staged(d / DATA, w, offsets, rows, total), ""


class FoldInBackground:
    """``load`` a site's stage over ``base`` and ``fold_into`` a new backlog, in a thread:
    a failover does it while its plan waits on Kafka. ``result`` joins it."""

    def __init__(self, site: SiteDir, base: bytes, make_backlog: Callable[[], Backlog]) -> None:
        self.site, self.base, self.make_backlog = site, base, make_backlog
        self._out: tuple[Staged | None, str, Backlog | None] = (None, "", None)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="stage-fold", daemon=True)

    def start(self) -> FoldInBackground:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            staged, why = load(self.site, self.base)
            backlog = None
            if staged is not None:
                backlog = self.make_backlog()
                fold_into(staged, backlog)
            self._out = (staged, why, backlog)
        except BaseException as exc:  # handed to the caller of result()
            self._error = exc

    def result(self) -> tuple[Staged | None, str, Backlog | None]:
        """(the stage or None, why not, the backlog it was folded into or None)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._out


def staged_w(site: SiteDir) -> int | None:
    """The W the site's stage reaches over its current checkpoint (None: no usable stage)."""
    try:
        base = site.checkpoint_path.read_bytes()
    except OSError:
        return None
    staged, _why = load(site, base)
    return staged.w if staged is not None else None


def fold_into(staged: Staged, backlog: Backlog) -> None:
    """Fold an accepted stage into a backlog, in order, reading none of its data."""
    backlog.adopt_spill(staged.data_path)
    for kind, vid, offset, length, pos, record in staged.rows:
        if kind == OpKind.WRITE:
            assert pos is not None
            backlog.add_spilled(vid, offset, length, pos)
        elif kind == OpKind.VOLUME_CHANGE:
            assert record is not None
            rec = codec.decode(record, VolumeChange)
            backlog.add(ApplyOp(OpKind.VOLUME_CHANGE, vid, 0, 0, 0, None, rec, "stage", 0))
        else:
            backlog.add(ApplyOp(OpKind(kind), vid, 0, offset, length, None, None, "stage", 0))
