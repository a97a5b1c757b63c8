"""The migration target's bulk copy (``pipeline.ops.migrate_sync``), without a broker.

Tries to break: a data run copied short or at the wrong place, a hole filled, a copy
across file systems (``copy_file_range`` refused with EXDEV) that stops instead of going
on by hand.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from connectors.image.image import Image
from pipeline.ops import migrate_sync
from pipeline.ops.migrate_sync import TargetSync

MIB = 1 << 20


def source(tmp: Path) -> Path:
    path = tmp / "src.img"
    with open(path, "wb") as f:
        f.truncate(32 * MIB)
        for off, byte in ((0, 1), (9 * MIB + 4096, 2), (30 * MIB, 3)):
            f.seek(off)
            f.write(bytes([byte]) * (MIB + 512))
    return path


def copy(tmp: Path, src: Path) -> tuple[TargetSync, Path]:
    dst = tmp / "dst.img"
    sync = TargetSync(Image(dst, create_size=32 * MIB), "v", src, {}, "topic", "m")
    sync._copy()
    sync.image.close()
    return sync, dst


@pytest.mark.parametrize("kernel", [True, False])
def test_the_copy_is_byte_for_byte_and_keeps_the_holes(tmp_path, monkeypatch, kernel):
    src = source(tmp_path)
    if not kernel:

        def refuse(*_a: object) -> int:
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(migrate_sync.os, "copy_file_range", refuse)
    sync, dst = copy(tmp_path, src)
    assert dst.read_bytes() == src.read_bytes()
    assert sync._in_kernel is kernel
    assert sync.state.copied_bytes == 32 * MIB
    # the big hole between the runs stays a hole (allocated blocks well below the size)
    assert os.stat(dst).st_blocks * 512 < 8 * MIB
