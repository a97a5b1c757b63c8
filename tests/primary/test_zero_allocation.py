"""WRITE_ZEROES with NBD_CMD_FLAG_NO_HOLE keeps the range allocated, at the primary and at
the backup (the issue: lowmark always punched a hole).

Tries to break: the image primitive punching a hole for a ZERO, the shared apply rule
(applier, restore, replay) deallocating a ZERO op, the NBD export ignoring NO_HOLE, the
Zero record losing the choice (ZERO vs TRIM) between the primary and the backup.

Allocation is measured with st_blocks, not SEEK_DATA: FALLOC_FL_ZERO_RANGE leaves
unwritten extents, which hold the blocks (what NO_HOLE asks for: no ENOSPC on a later
write, no fragmentation) yet SEEK_DATA reports as holes on ext4 and xfs.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from connectors.image.image import Image, file_digest
from pipeline.backup.images import ImageSet
from pipeline.backup.plan import ApplyOp, OpKind
from pipeline.primary.nbd_volume import VolumeExport
from pipeline.primary.volume import ConsistencyGroup
from pipeline.site import SiteDir
from schemas.records import VolumeChange, VolumeOp
from tests.nbd_helpers import ServerThread
from tests.prereqs import require_tool, unavailable
from tests.replication_helpers import FAST, read_log, running_backup, wait_until

K64 = 64 << 10
SIZE = 1 << 20


def allocated(path: Path) -> int:
    """Bytes of disk the file holds (holes hold none)."""
    return os.stat(path).st_blocks * 512


def _supports_punch(path: Path) -> bool:
    """Whether this filesystem deallocates on punch (tmpfs and ext4 do; some do not)."""
    with Image(path, create_size=K64) as img:
        img.pwrite(0, b"x" * K64)
        img.sync()
        img.zero(0, K64, punch=True)
        return allocated(path) == 0


@pytest.fixture
def punching_fs(tmp_path: Path) -> Path:
    if not _supports_punch(tmp_path / "probe.img"):
        unavailable(f"{tmp_path} does not deallocate punched holes")
    return tmp_path


# ---- the image and apply layer (fast, no Kafka) ---------------------------------------------


def test_image_zero_without_punch_keeps_range_allocated(punching_fs: Path) -> None:
    path = punching_fs / "v.img"
    with Image(path, create_size=SIZE) as img:
        img.pwrite(0, b"a" * K64)
        img.pwrite(2 * K64, b"b" * K64)
        img.zero(0, K64, punch=False)  # written, then zeroed: stays allocated
        img.zero(4 * K64, K64, punch=False)  # never written: gets allocated
        img.zero(2 * K64, K64, punch=True)  # may deallocate: does
        img.sync()
        assert img.pread(0, 6 * K64) == bytes(6 * K64)
    assert allocated(path) == 2 * K64, f"{allocated(path)} of {2 * K64} bytes allocated"


def _op(kind: OpKind, ts: int, offset: int = 0, length: int = 0) -> ApplyOp:
    return ApplyOp(kind, "v", ts, offset, length, None, None, "i0", 0)


@pytest.mark.parametrize(("kind", "expect"), [(OpKind.ZERO, 2 * K64), (OpKind.TRIM, 0)])
def test_imageset_apply_zero_allocates_trim_deallocates(
    punching_fs: Path, kind: OpKind, expect: int
) -> None:
    """The one apply rule the applier, restore and replay share."""
    site = ImageSet(punching_fs / "site")
    create = VolumeChange(VolumeOp.CREATE, "v", "v", SIZE, {}, 1, "i0", 0)
    site.apply(ApplyOp(OpKind.VOLUME_CHANGE, "v", 1, 0, 0, None, create, "i0", 0))
    site.apply(ApplyOp(OpKind.WRITE, "v", 2, 0, K64, b"w" * K64, None, "i0", 0))
    site.apply(_op(kind, 3, 0, K64))  # over data
    site.apply(_op(kind, 4, 4 * K64, K64))  # over a hole
    img = site.images["v"]
    img.sync()
    assert img.pread(0, 6 * K64) == bytes(6 * K64)
    got = allocated(site.image_path("v"))
    assert got == expect, f"{kind}: {got} of {expect} bytes allocated"


# ---- over NBD with a real client, replicated through a real broker ---------------------------

# nbdsh is libnbd's own shell (python3-libnbd): a client we did not write. NO_HOLE twice
# (over data and over a hole), a plain WRITE_ZEROES (may trim) and a TRIM over data.
NBDSH_SCRIPT = f"""
h.pwrite(b"a" * {K64}, 0)
h.pwrite(b"b" * {K64}, {2 * K64})
h.pwrite(b"c" * {K64}, {6 * K64})
h.flush()
h.zero({K64}, 0, nbd.CMD_FLAG_NO_HOLE)
h.zero({K64}, {4 * K64}, nbd.CMD_FLAG_NO_HOLE)
h.zero({K64}, {2 * K64})
h.trim({K64}, {6 * K64})
h.flush()
assert h.pread({8 * K64}, 0) == bytes({8 * K64})
h.shutdown()
"""
KEPT = 2 * K64  # the two NO_HOLE ranges


def nbdsh_env() -> dict[str, str]:
    """An environment whose ``python3`` imports libnbd's module: nbdsh runs ``python3 -mnbd``
    from PATH, and a pyenv or venv python3 ahead of the system one does not have it."""
    require_tool("nbdsh")
    path = os.environ.get("PATH", "")
    for candidate in (path, f"/usr/bin:{path}"):
        env = {**os.environ, "PATH": candidate}
        probe = subprocess.run(["python3", "-c", "import nbd"], env=env, capture_output=True)
        if probe.returncode == 0:
            return env
    unavailable("no python3 on PATH imports nbd (apt-get install python3-libnbd)")


@pytest.mark.tools
def test_nbd_no_hole_zero_stays_allocated_at_primary_and_backup(
    kafka_conf: dict[str, str], unique_name: str, punching_fs: Path
) -> None:
    env = nbdsh_env()
    tmp = punching_fs
    with ConsistencyGroup.open(unique_name, tmp / "primary", kafka_conf, **FAST) as cg:
        vol = cg.create_volume("v", SIZE)
        with running_backup(kafka_conf, unique_name, tmp / "backup") as (wm, ap):
            with ServerThread({"v": VolumeExport(vol)}) as srv:
                proc = subprocess.run(
                    ["nbdsh", "-u", srv.uri("v"), "-c", NBDSH_SCRIPT],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                assert proc.returncode == 0, proc.stderr[-2000:]
                assert srv.loop_errors == []
            cg.flush()
            primary_path = vol.image.path
            vol.image.sync()
            primary = allocated(primary_path)
            target = cg.interceptor.last_s
            wait_until(lambda: ap.service.applied_w >= target or ap.error, 30, "backup reaches W")
            assert ap.error is None and wm.error is None
            ap.service.checkpoint()  # fsyncs the backup images
            backup_path = SiteDir(tmp / "backup").image_path(vol.volume_id)
            backup = allocated(backup_path)
            # both sides at once, so a failure shows where the allocation was lost
            assert (primary, backup) == (KEPT, KEPT), (
                f"{primary} (primary) and {backup} (backup) of {KEPT} bytes allocated"
            )
            assert file_digest(backup_path) == file_digest(primary_path)
    zeros = [
        (rec["offset"], rec["kind"])
        for rtype, rec, _p, _o in read_log(kafka_conf, unique_name)
        if rtype == "Zero"
    ]
    # the record carries the client's choice: NO_HOLE -> ZERO, may trim / TRIM -> TRIM
    assert sorted(zeros) == [(0, "ZERO"), (2 * K64, "TRIM"), (4 * K64, "ZERO"), (6 * K64, "TRIM")]
