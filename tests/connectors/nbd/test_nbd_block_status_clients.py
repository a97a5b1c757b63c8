"""Block status and sparse reads against clients we did not write: nbdinfo --map,
qemu-img map and convert, nbdcopy, nbdsh (libnbd's Python shell).

Tries to break: a map that differs from the file's real layout (a data extent called a
hole loses it in every copy), a copy that reads the holes anyway (the export counts the
bytes it preads: with block status they must be the data, not the image), a copy whose
destination is not byte-identical or not sparse, and libnbd seeing no base:allocation,
more than one extent under REQ_ONE, or data chunks where the file has holes. Each
capability is run on and off (the server switches): the cost of the holes must come back
when it is off, or the test proved nothing.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from connectors.nbd import protocol as p
from connectors.nbd.file_export import FileExport
from tests.connectors.nbd.test_nbd_clients import need, run
from tests.nbd_helpers import ServerThread
from tests.primary.test_zero_allocation import nbdsh_env

pytestmark = pytest.mark.tools

M = 1 << 20
SIZE = 256 * M
H = p.STATE_HOLE | p.STATE_ZERO


class Counting:
    """A FileExport that counts the bytes it is asked to read."""

    def __init__(self, inner: FileExport) -> None:
        self.inner = inner
        self.name, self.size, self.description = inner.name, inner.size, inner.description
        self.read_only, self.can_multi_conn = inner.read_only, True
        self.read_bytes = 0
        self.extents = inner.extents

    def pread(self, offset: int, length: int) -> bytes:
        self.read_bytes += length
        return self.inner.pread(offset, length)

    def write(self, offset: int, data: bytes, fua: bool) -> None:
        self.inner.write(offset, data, fua)

    def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> None:
        self.inner.write_zeroes(offset, length, fua, may_trim)

    def trim(self, offset: int, length: int, fua: bool) -> None:
        self.inner.trim(offset, length, fua)

    def flush(self) -> None:
        self.inner.flush()


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, list[tuple[int, int]]]:
    """256 MiB with 8 random 1 MiB data extents (never touching: each its own extent) and
    one 4 KiB one; returns the path and the true (offset, length) data extents."""
    rng = random.Random(1717)
    slots = sorted(rng.sample(range(0, SIZE // M, 2), 8))
    data = [(slot * M, M) for slot in slots] + [(SIZE - 8192, 4096)]
    path = tmp_path / "sparse.img"
    with path.open("wb") as f:
        f.truncate(SIZE)
        for offset, length in data:
            f.seek(offset)
            f.write(rng.randbytes(length))
    return path, sorted(data)


def layout(data: list[tuple[int, int]]) -> list[tuple[int, int, bool]]:
    """(offset, length, is_data) covering the image."""
    out, pos = [], 0
    for offset, length in data:
        if offset > pos:
            out.append((pos, offset - pos, False))
        out.append((offset, length, True))
        pos = offset + length
    if pos < SIZE:
        out.append((pos, SIZE - pos, False))
    return out


@pytest.fixture
def served(image: tuple[Path, list[tuple[int, int]]], request: Any) -> Iterator[Any]:
    path, _ = image
    export = Counting(FileExport(path, "", read_only=True))
    options = getattr(request, "param", {})
    with ServerThread({"": export}, **options) as srv:
        yield srv, export
        assert not srv.loop_errors, srv.loop_errors


def test_nbdinfo_map_is_the_file_layout(served: Any, image: Any) -> None:
    need("nbdinfo")
    srv, export = served
    out = json.loads(run("nbdinfo", "--map", "--json", srv.uri()).stdout)
    got = [(e["offset"], e["length"], e["type"]) for e in out]
    assert got == [(o, n, 0 if d else H) for o, n, d in layout(image[1])]
    assert export.read_bytes == 0  # mapping reads nothing


def test_qemu_img_map_over_nbd_shows_the_holes(served: Any, image: Any) -> None:
    need("qemu-img")
    srv, _ = served
    out = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", srv.uri()).stdout)
    got = [(e["start"], e["length"], e["data"], e["zero"]) for e in out]
    assert got == [(o, n, d, not d) for o, n, d in layout(image[1])]


@pytest.mark.parametrize(
    ("served", "tool"),
    [({}, "nbdcopy"), ({}, "qemu-img"),
     ({"structured_replies": False}, "nbdcopy"), ({"block_status": False}, "qemu-img")],
    indirect=["served"],
)  # fmt: skip
def test_copy_reads_only_the_data_and_stays_sparse(
    served: Any, image: Any, tool: str, tmp_path: Path
) -> None:
    need(tool)
    srv, export = served
    path, data = image
    dest = tmp_path / "copy.img"
    if tool == "nbdcopy":
        run("nbdcopy", srv.uri(), str(dest))
    else:
        run("qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri(), str(dest))
    assert dest.read_bytes() == path.read_bytes()
    data_bytes = sum(n for _, n in data)
    # Whatever the server said, the destination is sparse (both tools also skip zeroes
    # they read); what block status changes is what had to be read to know it.
    assert allocated(dest) <= data_bytes + 2 * M
    stats = srv.server.stats
    if not srv.config.structured_replies:  # every byte asked for, read and sent
        assert stats.requests[p.CMD_BLOCK_STATUS] == 0
        assert export.read_bytes >= SIZE, export.read_bytes
    elif not srv.config.block_status:  # every byte asked for, the holes not read
        assert stats.requests[p.CMD_BLOCK_STATUS] == 0
        assert stats.bytes_read >= SIZE, stats.bytes_read
        assert export.read_bytes <= data_bytes + 2 * M, export.read_bytes
    else:  # the holes not even asked for
        assert stats.requests[p.CMD_BLOCK_STATUS] > 0
        assert stats.bytes_read <= data_bytes + 2 * M, stats.bytes_read
        assert export.read_bytes <= data_bytes + 2 * M, export.read_bytes


NBDSH_SCRIPT = """
import json
assert h.get_structured_replies_negotiated()
assert h.can_meta_context("base:allocation")
assert h.can_df()
out = {"one": [], "all": [], "chunks": []}
def status(key):
    def cb(meta, offset, entries, err):
        assert meta == "base:allocation", meta
        out[key].append((offset, list(entries)))
        return 0
    return cb
h.block_status(SIZE, 0, status("one"), nbd.CMD_FLAG_REQ_ONE)
h.block_status(SIZE, 0, status("all"))
def chunk(buf, offset, kind, err):
    out["chunks"].append((offset, len(buf), kind))
    return 0
h.pread_structured(READ, 0, chunk)
print(json.dumps(out))
"""


def test_nbdsh_sees_base_allocation_req_one_and_hole_chunks(served: Any, image: Any) -> None:
    srv, export = served
    env = nbdsh_env()
    first_data = image[1][0][0]
    read = first_data + M  # a hole, then the first data extent
    script = NBDSH_SCRIPT.replace("SIZE", str(SIZE)).replace("READ", str(read))
    proc = subprocess.run(
        ["nbdsh", "--base-allocation", "-u", srv.uri(), "-c", script],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    expect = [(o, n, 0 if d else H) for o, n, d in layout(image[1])]
    ((at, one),) = out["one"]
    assert at == 0 and one == [expect[0][1], expect[0][2]]
    pairs = [x for _, entries in out["all"] for x in entries]
    assert list(zip(pairs[::2], pairs[1::2], strict=True)) == [(n, f) for _, n, f in expect]
    assert out["chunks"] == [
        [0, first_data, 2],  # LIBNBD_READ_HOLE
        [first_data, M, 1],  # LIBNBD_READ_DATA
    ]
    assert export.read_bytes == M
