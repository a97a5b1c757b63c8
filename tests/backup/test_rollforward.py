"""Roll-forward with reads, tried to break: random interleavings (seeds) of foreground
reads and writes with the worker, threaded and stepped; the spill path; a crash mid-way
rebuilt from the same ops; the lock rule; and a real NBD client reading while it runs.

The model of every read: the image at the cut (the base overlaid with the backlog, in
order) overlaid with the foreground writes so far."""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest

from pipeline.backup.images import ImageSet
from pipeline.backup.plan import ApplyOp, ApplyPlanner, OpKind
from pipeline.backup.rollforward import (
    Backlog,
    RollForward,
    RollForwardExport,
    apply_volume_changes,
)
from schemas.records import VolumeChange, VolumeOp
from tests.backup.plan_logs import IMAGE_SIZE, expected_ops, image_at, make_log, ready_take
from tests.prereqs import require_tool, unavailable

SIZE = 4096
VOLS = ("v0", "v1")


def op(
    kind: OpKind,
    vol: str,
    ts: int,
    offset: int,
    length: int,
    data: bytes | None = None,
    record: VolumeChange | None = None,
) -> ApplyOp:
    return ApplyOp(kind, vol, ts, offset, length, data, record, "i0", 0)


def change(vop: VolumeOp, vol: str, ts: int, size: int) -> ApplyOp:
    rec = VolumeChange(vop, vol, vol, size, {}, ts, "i0", 0)
    return op(OpKind.VOLUME_CHANGE, vol, ts, 0, 0, record=rec)


def make_backlog_ops(rng: random.Random, n: int, size: int = SIZE) -> list[ApplyOp]:
    """Writes, zeroes and trims of random extents over VOLS, in ts order, plus markers."""
    ops = []
    for ts in range(1, n + 1):
        vol = rng.choice(VOLS)
        offset = rng.randrange(size)
        length = min(rng.choice((1, 7, 64, 512, 1500)), size - offset)
        r = rng.random()
        if r < 0.7:
            data = rng.randbytes(length)
            ops.append(op(OpKind.WRITE, vol, ts, offset, length, data))
        elif r < 0.85:
            ops.append(op(OpKind.ZERO, vol, ts, offset, length))
        elif r < 0.97:
            ops.append(op(OpKind.TRIM, vol, ts, offset, length))
        else:
            ops.append(op(OpKind.MARKER, None, ts, 0, 0))  # type: ignore[arg-type]
    return ops


def apply_model(images: dict[str, bytearray], o: ApplyOp) -> None:
    if o.kind is OpKind.WRITE:
        assert o.data is not None
        images[o.volume_id or ""][o.offset : o.offset + o.length] = o.data
    elif o.kind in (OpKind.ZERO, OpKind.TRIM):
        images[o.volume_id or ""][o.offset : o.offset + o.length] = bytes(o.length)
    elif o.kind is OpKind.VOLUME_CHANGE:
        rec = o.record
        assert isinstance(rec, VolumeChange)
        if rec.op is VolumeOp.DELETE:
            images.pop(rec.volume_id, None)
        else:
            img = images.setdefault(rec.volume_id, bytearray())
            del img[rec.size :]
            img.extend(bytes(rec.size - len(img)))


class MemImages:
    """An ImageSink and the images an inner export serves: bytearrays shared by both."""

    def __init__(self, base: dict[str, bytearray]) -> None:
        self.images = {v: bytearray(b) for v, b in base.items()}
        self.applied = 0
        self.on_apply: list = []  # type: ignore[type-arg]

    def apply(self, o: ApplyOp) -> None:
        for hook in self.on_apply:
            hook(o)
        apply_model(self.images, o)
        self.applied += 1

    def sync(self) -> None:
        pass


class MemExport:
    """The inner export of one volume of MemImages (what FileExport is over a file)."""

    read_only = False
    can_multi_conn = True
    description = "memory"

    def __init__(self, images: MemImages, vol: str) -> None:
        self.images, self.name = images, vol

    @property
    def size(self) -> int:
        return len(self.images.images[self.name])

    def pread(self, offset: int, length: int) -> bytes:
        return bytes(self.images.images[self.name][offset : offset + length])

    def write(self, offset: int, data: bytes, fua: bool) -> None:
        self.images.images[self.name][offset : offset + len(data)] = data

    def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> None:
        self.images.images[self.name][offset : offset + length] = bytes(length)

    def trim(self, offset: int, length: int, fua: bool) -> None:
        self.write_zeroes(offset, length, fua, True)

    def flush(self) -> None:
        pass


def setup(rng: random.Random, n_ops: int, **backlog_kw: object):  # type: ignore[no-untyped-def]
    base = {v: bytearray(rng.randbytes(SIZE)) for v in VOLS}
    ops = make_backlog_ops(rng, n_ops)
    model = {v: bytearray(b) for v, b in base.items()}
    for o in ops:
        apply_model(model, o)
    backlog = Backlog(**backlog_kw)  # type: ignore[arg-type]
    backlog.add_all(ops)
    sink = MemImages(base)
    exports = {v: RollForwardExport(MemExport(sink, v), backlog, v) for v in VOLS}
    return base, ops, model, backlog, sink, exports


def foreground(
    rng: random.Random,
    exports: dict[str, RollForwardExport],
    model: dict[str, bytearray],
    wrote: list[tuple[str, int, int]],
) -> None:
    """One random foreground request, checked against the model."""
    vol = rng.choice(VOLS)
    exp = exports[vol]
    offset = rng.randrange(SIZE)
    length = min(rng.choice((1, 100, 512, 4096)), SIZE - offset)
    r = rng.random()
    if r < 0.6:
        assert exp.pread(offset, length) == bytes(model[vol][offset : offset + length])
        return
    if r < 0.85:
        data = rng.randbytes(length)
        exp.write(offset, data, False)
    else:
        data = bytes(length)
        (
            exp.trim(offset, length, False)
            if r < 0.92
            else exp.write_zeroes(offset, length, False, r < 0.96)
        )
    model[vol][offset : offset + length] = data
    wrote.append((vol, offset, length))


@pytest.mark.parametrize("seed", range(12))
def test_stepped_interleaving_reads_equal_the_model(seed: int) -> None:
    rng = random.Random(seed)
    _, _, model, backlog, sink, exports = setup(rng, 300)
    worker = RollForward(backlog, sink, batch_bytes=rng.choice((1, 500, 4096)))
    wrote: list[tuple[str, int, int]] = []
    while worker.step():
        for _ in range(rng.randrange(4)):
            foreground(rng, exports, model, wrote)
    for _ in range(50):
        foreground(rng, exports, model, wrote)
    assert backlog.bytes_left == 0
    assert sink.images == model
    assert worker.bytes_done + backlog.dropped_by_writes == worker.bytes_total


@pytest.mark.parametrize("seed", range(8))
def test_threaded_worker_with_foreground_requests(seed: int) -> None:
    rng = random.Random(1000 + seed)
    _, _, model, backlog, sink, exports = setup(rng, 2000)
    sink.on_apply.append(lambda _o: time.sleep(0) if rng.random() < 0.5 else None)
    worker = RollForward(backlog, sink, batch_bytes=rng.choice((64, 1024, 8192)))
    wrote: list[tuple[str, int, int]] = []
    fg = random.Random(seed)
    worker.start()
    n = 0
    while not worker.ended.is_set() or n < 200:
        foreground(fg, exports, model, wrote)
        n += 1
    assert worker.wait(30)
    worker.stop()
    assert worker.error is None
    for vol in VOLS:
        assert exports[vol].pread(0, SIZE) == bytes(model[vol])
    assert sink.images == model
    m = worker.metrics()
    assert m["done"] and m["bytes_left"] == 0 and m["extents_left"] == 0


def test_spill_path_serves_and_rolls_forward(tmp_path: Path) -> None:
    rng = random.Random(7)
    _, _, model, backlog, sink, exports = setup(
        rng, 400, max_memory_bytes=2000, spill_dir=tmp_path / "spill"
    )
    assert backlog.spilled_bytes > 0 and backlog.index.resident_bytes <= 2000
    spills = list((tmp_path / "spill").iterdir())
    assert len(spills) == 1
    wrote: list[tuple[str, int, int]] = []
    for _ in range(100):  # before any roll-forward: most reads hit the index
        foreground(rng, exports, model, wrote)
    worker = RollForward(backlog, sink, batch_bytes=300)
    while worker.step():
        foreground(rng, exports, model, wrote)
    assert sink.images == model
    backlog.close()
    assert not spills[0].exists()


def test_over_budget_without_spill_dir_says_what_to_do() -> None:
    backlog = Backlog(max_memory_bytes=10)
    with pytest.raises(Exception, match="spill directory"):
        backlog.add(op(OpKind.WRITE, "v0", 1, 0, 11, bytes(11)))


@pytest.mark.parametrize("seed", range(10))
def test_crash_mid_way_then_rebuild_converges(seed: int) -> None:
    rng = random.Random(2000 + seed)
    _, ops, model, backlog, sink, exports = setup(rng, 400)
    worker = RollForward(backlog, sink, batch_bytes=rng.choice((100, 700)))
    wrote: list[tuple[str, int, int]] = []
    for _ in range(rng.randrange(1, 12)):
        worker.step()
        for _ in range(3):
            foreground(rng, exports, model, wrote)
    # crash: the index is gone; the images hold whatever was written. Rebuild from the same
    # ops, minus the ranges written in the foreground since serving began
    rebuilt = Backlog()
    rebuilt.add_all(ops)
    for vol, offset, length in wrote:
        rebuilt.index.drop(vol, offset, length)
    again = {v: RollForwardExport(MemExport(sink, v), rebuilt, v) for v in VOLS}
    for vol in VOLS:  # reads after the restart already equal the model
        assert again[vol].pread(0, SIZE) == bytes(model[vol])
    RollForward(rebuilt, sink).run()
    assert sink.images == model


def test_stop_mid_way_keeps_the_rest_and_a_failure_is_reported() -> None:
    rng = random.Random(9)
    _, _, model, backlog, sink, exports = setup(rng, 500)
    worker = RollForward(backlog, sink, batch_bytes=256)
    sink.on_apply.append(lambda _o: sink.applied == 20 and worker.request_stop())
    worker.start()
    assert worker.ended.wait(10)
    worker.stop()
    assert worker.ended.is_set() and not worker.done.is_set() and worker.error is None
    m = worker.metrics()
    assert 0 < m["bytes_left"] < m["bytes_total"] and 0 < m["progress"] < 1
    for v in VOLS:  # half rolled forward, still the cut
        assert exports[v].pread(0, SIZE) == bytes(model[v])

    def broken(_o: ApplyOp) -> None:
        raise OSError(5, "EIO")

    sink.on_apply.append(broken)
    failing = RollForward(backlog, sink)
    with pytest.raises(OSError):
        failing.run()
    assert not failing.wait(1) and isinstance(failing.error, OSError)
    assert failing.metrics()["error"]


def test_foreground_write_waits_for_a_batch_in_flight_and_wins() -> None:
    """The worker took an extent and is writing it: a foreground write of that range waits
    for the batch (the lock), then lands on top. Without the lock it would be overwritten."""
    backlog = Backlog()
    backlog.add(op(OpKind.WRITE, "v0", 1, 0, 8, b"R" * 8))
    sink = MemImages({"v0": bytearray(16)})
    export = RollForwardExport(MemExport(sink, "v0"), backlog, "v0")
    in_batch, release = threading.Event(), threading.Event()

    def slow(_o: ApplyOp) -> None:
        in_batch.set()
        assert release.wait(5)

    sink.on_apply.append(slow)
    worker = RollForward(backlog, sink)
    worker.start()
    assert in_batch.wait(5)
    assert backlog.bytes_left == 0  # taken, not yet written
    t = threading.Thread(target=export.write, args=(2, b"F" * 4, False))
    t.start()
    t.join(0.2)
    assert t.is_alive()  # waits for the batch in flight
    release.set()
    t.join(5)
    assert worker.wait(5)
    assert bytes(sink.images["v0"][:8]) == b"RRFFFFRR"
    assert export.pread(0, 8) == b"RRFFFFRR"


def test_read_waits_for_a_batch_in_flight() -> None:
    """An extent taken but not yet written is in neither place: a read of it must wait for
    the batch, never see the image's bytes from before the cut."""
    backlog = Backlog()
    backlog.add(op(OpKind.WRITE, "v0", 1, 0, 8, b"C" * 8))
    sink = MemImages({"v0": bytearray(b"o" * 16)})
    export = RollForwardExport(MemExport(sink, "v0"), backlog, "v0")
    in_batch, release = threading.Event(), threading.Event()
    sink.on_apply.append(lambda _o: (in_batch.set(), release.wait(5)))
    worker = RollForward(backlog, sink)
    worker.start()
    assert in_batch.wait(5)
    got: list[bytes] = []
    t = threading.Thread(target=lambda: got.append(export.pread(0, 12)))
    t.start()
    t.join(0.2)
    assert t.is_alive()
    release.set()
    t.join(5)
    assert worker.wait(5)
    assert got == [b"C" * 8 + b"o" * 4]


class DeferredExport(MemExport):
    """An inner export that writes its image only later, as VolumeExport does under Kafka
    backpressure (the write waits in a thread)."""

    def __init__(self, images: MemImages, vol: str) -> None:
        super().__init__(images, vol)
        self.pending: list[tuple[int, bytes]] = []

    def write(self, offset: int, data: bytes, fua: bool) -> None:
        self.pending.append((offset, data))

    def land(self) -> None:
        for offset, data in self.pending:
            super().write(offset, data, False)
        self.pending.clear()


@pytest.mark.parametrize("seed", range(6))
def test_settling_export_never_shows_pre_cut_bytes_before_a_deferred_write_lands(
    seed: int,
) -> None:
    rng = random.Random(3000 + seed)
    base = {v: bytearray(rng.randbytes(SIZE)) for v in VOLS}
    ops = make_backlog_ops(rng, 300)
    cut = {v: bytearray(b) for v, b in base.items()}
    for o in ops:
        apply_model(cut, o)
    backlog = Backlog()
    backlog.add_all(ops)
    sink = MemImages(base)
    inner = {v: DeferredExport(sink, v) for v in VOLS}
    exports = {v: RollForwardExport(inner[v], backlog, v, images=sink) for v in VOLS}
    model = {v: bytearray(b) for v, b in cut.items()}
    worker = RollForward(backlog, sink, batch_bytes=500)
    for _ in range(60):
        vol = rng.choice(VOLS)
        offset = rng.randrange(SIZE)
        length = min(rng.choice((1, 100, 1000)), SIZE - offset)
        data = rng.randbytes(length)
        exports[vol].write(offset, data, False)
        # not landed yet: the range reads as the cut (or an earlier landed write)
        assert exports[vol].pread(offset, length) == bytes(model[vol][offset : offset + length])
        inner[vol].land()
        model[vol][offset : offset + length] = data
        assert exports[vol].pread(0, SIZE) == bytes(model[vol])
        worker.step()
    worker.run()
    assert sink.images == model


@pytest.mark.parametrize("seed", range(15))
def test_backlog_from_the_planner_serves_the_cut(seed: int) -> None:
    """The real feed: generated logs (fragments, epochs, zombies, volume changes) through
    ApplyPlanner from the site's applied W to the target cut, in its order."""
    rng = random.Random(4000 + seed)
    log = make_log(rng, rng.randint(1, 3), rng.randint(1, 3), 150)
    tss = sorted({o.ts for o in log.ops})
    w0 = rng.choice([0, *tss[: len(tss) // 2]])
    w1 = rng.choice(tss[len(tss) // 2 :])
    planner = ApplyPlanner(applied_w=w0)
    for p, recs in enumerate(log.parts):
        for r in recs:
            planner.add(r.record, p, r.offset)
        planner.note_position(p, recs[-1].offset + 1 if recs else 0)
    ops = ready_take(planner, w1, log.required_offsets(w1))
    assert ops == expected_ops(log, w0, w1)
    backlog = Backlog()
    backlog.add_all(ops)
    sink = MemImages(image_at(log, w0))
    apply_volume_changes(backlog, sink)
    cut = image_at(log, w1)
    exports = {v: RollForwardExport(MemExport(sink, v), backlog, v) for v in log.volumes}
    worker = RollForward(backlog, sink, batch_bytes=rng.choice((1, 16, 64)))
    while True:
        for v in log.volumes:
            offset = rng.randrange(IMAGE_SIZE)
            length = rng.randrange(IMAGE_SIZE - offset + 1)
            assert exports[v].pread(offset, length) == bytes(cut[v][offset : offset + length])
        if not worker.step():
            break
    assert sink.images == cut


def test_volume_changes_are_applied_first_and_trim_the_index() -> None:
    ops = [
        op(OpKind.WRITE, "v0", 1, 100, 8, b"a" * 8),
        change(VolumeOp.RESIZE, "v0", 2, 104),  # cuts the write in half
        change(VolumeOp.RESIZE, "v0", 3, 200),  # the cut-off half reads as zeroes
        op(OpKind.WRITE, "v1", 4, 0, 4, b"gone"),
        change(VolumeOp.DELETE, "v1", 5, 0),
        change(VolumeOp.CREATE, "v1", 6, 50),  # a recreate starts from zeroes
        op(OpKind.WRITE, "v1", 7, 10, 2, b"ok"),
        op(OpKind.MARKER, None, 8, 0, 0),  # type: ignore[arg-type]
    ]
    model: dict[str, bytearray] = {"v0": bytearray(SIZE), "v1": bytearray(SIZE)}
    for o in ops:
        apply_model(model, o)
    backlog = Backlog()
    backlog.add_all(ops)
    assert [o.ts for o in backlog.volume_changes] == [2, 3, 5, 6]
    sink = MemImages({"v0": bytearray(SIZE), "v1": bytearray(SIZE)})
    assert apply_volume_changes(backlog, sink) == 4
    RollForward(backlog, sink).run()
    assert sink.images == model
    assert bytes(model["v0"][100:108]) == b"aaaa" + bytes(4)


def test_through_imageset_and_file_images(tmp_path: Path) -> None:
    rng = random.Random(5)
    ops = [change(VolumeOp.CREATE, v, 0, SIZE) for v in VOLS] + make_backlog_ops(rng, 500)
    model: dict[str, bytearray] = {}
    for o in ops:
        apply_model(model, o)
    backlog = Backlog(max_memory_bytes=20_000, spill_dir=tmp_path / "spill")
    backlog.add_all(ops)
    with ImageSet(tmp_path / "site") as images:
        apply_volume_changes(backlog, images)
        RollForward(backlog, images, batch_bytes=1000).run()
        for v in VOLS:
            assert images.images[v].pread(0, SIZE) == bytes(model[v])
    backlog.close()


# ---- a real NBD client ------------------------------------------------------------------


def nbdsh_env() -> dict[str, str]:
    """An environment whose python3 imports libnbd's module (nbdsh runs ``python3 -mnbd``;
    a venv python3 ahead of the system one lacks it)."""
    require_tool("nbdsh")
    path = os.environ.get("PATH", "")
    for candidate in (f"/usr/bin:{path}", path):
        env = {**os.environ, "PATH": candidate}
        probe = subprocess.run(["python3", "-c", "import nbd"], env=env, capture_output=True)
        if probe.returncode == 0:
            return env
    unavailable("no python3 on PATH imports nbd (apt-get install python3-libnbd)")


NBD_SIZE = 4 * 1024 * 1024
# reads the whole export three times, writes 64 KiB at 1 MiB, reads it three times more
READ_SCRIPT = """
for i in range(6):
    if i == 3:
        h.pwrite(b"W" * 65536, 1048576)
        h.flush()
    with open(f"{out}.{i}", "wb") as f:
        f.write(h.pread(h.get_size(), 0))
h.shutdown()
"""


@pytest.mark.tools
def test_nbd_client_reads_the_cut_while_rolling_forward(tmp_path: Path) -> None:
    from connectors.nbd.file_export import FileExport
    from tests.nbd_helpers import ServerThread

    env = nbdsh_env()
    rng = random.Random(11)
    ops = [change(VolumeOp.CREATE, "v0", 0, NBD_SIZE)]
    for ts in range(1, 3000):  # 4 KiB writes and some zeroes over the volume
        offset = rng.randrange(NBD_SIZE // 4096) * 4096
        if rng.random() < 0.9:
            ops.append(op(OpKind.WRITE, "v0", ts, offset, 4096, rng.randbytes(4096)))
        else:
            length = 8192 if offset < NBD_SIZE - 4096 else 4096
            ops.append(op(OpKind.ZERO, "v0", ts, offset, length))
    model: dict[str, bytearray] = {}
    for o in ops:
        apply_model(model, o)
    backlog = Backlog()
    backlog.add_all(ops)
    with ImageSet(tmp_path / "site") as images:
        apply_volume_changes(backlog, images)
        inner = FileExport(images.image_path("v0"), "v0")
        export = RollForwardExport(inner, backlog, "v0")

        class SlowSink:  # keeps the worker busy while the client reads
            def apply(self, o: ApplyOp) -> None:
                images.apply(o)
                time.sleep(0.0005)

            def sync(self) -> None:
                images.sync()

        worker = RollForward(backlog, SlowSink(), batch_bytes=16384)
        with ServerThread({"v0": export}) as srv:
            worker.start()
            proc = subprocess.run(
                [
                    "nbdsh",
                    "-u",
                    srv.uri("v0"),
                    "-c",
                    f"out = {str(tmp_path / 'read')!r}\n" + READ_SCRIPT,
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            running_during_reads = not worker.done.is_set()
            assert proc.returncode == 0, proc.stderr[-2000:]
            assert worker.wait(120) and worker.error is None
            assert srv.loop_errors == []
        inner.close()
        assert running_during_reads, "the worker finished before the client read: slow it"
        cut = bytes(model["v0"])
        after = bytearray(cut)
        after[1048576 : 1048576 + 65536] = b"W" * 65536
        for i in range(6):
            got = (tmp_path / f"read.{i}").read_bytes()
            assert got == (cut if i < 3 else bytes(after)), f"read {i} differs from the model"
        assert images.images["v0"].pread(0, NBD_SIZE) == bytes(after)
        assert export.reads_from_index > 0
