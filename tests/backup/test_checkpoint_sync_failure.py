"""A failed fdatasync of the images stops the applier; no later checkpoint claims the data.

Found by reading the applier for the fsync-loss work (issue 16 item 2): the background
checkpoint took the set of changed images before its worker synced them, and on a failure
logged "will retry" and dropped that set. The next checkpoint, at a higher W, synced only
images changed since, and claimed data that had never reached the disk. Retrying the same
fdatasync is no better: after a failed one Linux may drop the dirty pages and report the
next one clean (PostgreSQL's fsync lesson), so the only safe answer is to stop and re-apply
from the last checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pipeline.backup.applier import Applier, ApplierConfig
from pipeline.errors import ApplyError
from tests.fake_time import FakeTime


class _Image:
    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.synced = 0

    def sync(self) -> None:
        if self.fail:
            raise OSError(5, "Input/output error")
        self.synced += 1


class _Checkpointer:
    def __init__(self) -> None:
        self.persisted: list[Any] = []

    def persist(self, rec: Any) -> Any:
        self.persisted.append(rec)
        return rec


def _applier(tmp_path: Path, images: list[_Image]) -> tuple[Applier, _Checkpointer]:
    a = Applier(ApplierConfig(cg="cg", site="dr", data_dir=tmp_path), {}, FakeTime(5.0).source())
    ck = _Checkpointer()
    a.checkpointer = ck  # type: ignore[assignment]
    a._checkpoint_record = lambda digests: {"w": a.applied_w}  # type: ignore[assignment,method-assign,return-value]
    a._checkpoint_written = lambda rec: None  # type: ignore[method-assign]
    a.site = SimpleNamespace(take_touched=lambda: list(images))  # type: ignore[assignment]
    return a, ck


def test_a_failed_image_sync_stops_the_applier_and_writes_no_checkpoint(tmp_path: Path) -> None:
    a, ck = _applier(tmp_path, [_Image(fail=False), _Image(fail=True)])
    a._checkpoint_background()
    with pytest.raises(ApplyError, match=r"fdatasync .* failed.*re-applies"):
        a._finish_background_checkpoint(wait=True)
    assert ck.persisted == [], "a checkpoint was written over images that did not sync"


def test_a_good_sync_writes_the_checkpoint(tmp_path: Path) -> None:
    img = _Image(fail=False)
    a, ck = _applier(tmp_path, [img])
    a._checkpoint_background()
    a._finish_background_checkpoint(wait=True)
    assert img.synced == 1 and len(ck.persisted) == 1
