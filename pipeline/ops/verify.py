"""``lowmark verify``: does a backup site's checkpoint equal the primary replayed to its W?

The site's latest checkpoint (from the compacted checkpoints topic) claims per-volume
digests at W. The reference is built independently of that site whenever the log still
starts at offset 0: empty images plus the log up to W. Only when retention has trimmed the
log is the site's own snapshot store the base (said in the report, since a base that is
already wrong would then agree with itself).

``--at-checkpoint`` additionally reads the bytes of the site's snapshot copy taken at that
very checkpoint (if the store has one), so the check covers what is on disk, not only what
the checkpoint claims.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from connectors.image.image import file_digest
from pipeline.errors import RestoreError
from pipeline.ops.replay import ProgressFn
from pipeline.ops.restore import log_bounds, restore
from pipeline.ops.status import checkpoints_upto
from pipeline.site import SiteDir
from pipeline.topology.store import current_generation

OK = "OK"
MISMATCH = "MISMATCH"
#: nothing to compare with: not a mismatch, but not a verification either
UNCHECKED = frozenset({"NO-DIGEST", "NO-SNAPSHOT"})


@dataclass(frozen=True)
class VolumeVerdict:
    volume_id: str
    status: str  # OK | MISMATCH | MISSING-AT-SITE | NOT-IN-LOG | NO-DIGEST | NO-SNAPSHOT
    site_digest: str | None
    replay_digest: str | None
    site_size: int | None
    replay_size: int | None
    what: str = "checkpoint"  # or "snapshot" (--at-checkpoint: the bytes on disk)


@dataclass
class VerifyReport:
    cg: str
    site: str
    w: int
    base: str
    verdicts: list[VolumeVerdict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(v.status == OK for v in self.verdicts)

    @property
    def mismatched(self) -> bool:
        """Some volume differs from the replay (as opposed to: could not be compared)."""
        return any(v.status != OK and v.status not in UNCHECKED for v in self.verdicts)


def compare(
    claimed: Mapping[str, tuple[int, str]],
    replayed: Mapping[str, tuple[int, str]],
    what: str = "checkpoint",
) -> list[VolumeVerdict]:
    """Pure: per volume, (size, digest) the site claims vs (size, digest) of the replay."""
    out = []
    for vid in sorted(set(claimed) | set(replayed)):
        c, r = claimed.get(vid), replayed.get(vid)
        if c is None:
            status = "MISSING-AT-SITE"
        elif r is None:
            status = "NOT-IN-LOG"
        elif not c[1]:
            status = "NO-DIGEST"  # the site runs without compute_digests: cannot verify
        else:
            status = OK if c == r else MISMATCH
        out.append(
            VolumeVerdict(
                vid,
                status,
                c[1] if c else None,
                r[1] if r else None,
                c[0] if c else None,
                r[0] if r else None,
                what,
            )
        )
    return out


def verify_site(
    kafka_conf: Mapping[str, Any],
    cg: str,
    site: str,
    *,
    site_dir: Path | None = None,
    at_checkpoint: bool = False,
    work_dir: Path | None = None,
    on_progress: ProgressFn | None = None,
) -> VerifyReport:
    ckpts = checkpoints_upto(dict(kafka_conf), cg, current_generation(kafka_conf, cg))
    ck = ckpts.get(site)
    if ck is None:
        raise RestoreError(
            f"site {site!r} has no checkpoint in lowmark.{cg}.checkpoints; sites that have: "
            f"{sorted(ckpts) or 'none'}"
        )
    w = ck.w
    low = {p: lo for p, (lo, _hi) in log_bounds(kafka_conf, cg, ck.generation).items()}
    independent = all(lo == 0 for lo in low.values())
    with tempfile.TemporaryDirectory(prefix="lowmark-verify-", dir=work_dir) as tmp:
        outcome = restore(
            kafka_conf,
            cg,
            w,
            Path(tmp) / "replayed",
            site_dir=None if independent else site_dir,
            site=site,
            on_progress=on_progress,
        )
    m = outcome.manifest
    report = VerifyReport(cg, site, w, m["base"]["kind"])
    if not independent:
        report.notes.append(
            f"the log no longer starts at offset 0: the reference was built from the site's "
            f"own snapshot at W {m['base']['w']}, so it checks only what came after it"
        )
    replayed = {v["volume_id"]: (v["size"], v["digest"]) for v in m["volumes"]}
    claimed = {v.volume_id: (v.size, v.digest) for v in ck.volumes}
    report.verdicts = compare(claimed, replayed)
    if at_checkpoint:
        report.verdicts += _snapshot_verdicts(site_dir, w, replayed, report)
    return report


def _snapshot_verdicts(
    site_dir: Path | None,
    w: int,
    replayed: Mapping[str, tuple[int, str]],
    report: VerifyReport,
) -> list[VolumeVerdict]:
    site = SiteDir(site_dir) if site_dir is not None else None
    snap = next((s for sw, s in site.snapshots() if sw == w), None) if site else None
    if snap is None:
        where = site.snapshots_dir if site else "the site (no --site-dir)"
        report.notes.append(
            f"--at-checkpoint: no snapshot at W {w} in {where} (the site takes "
            "them every [apply] snapshot_interval_s); only the checkpoint's digests were checked"
        )
        return [VolumeVerdict("(snapshot)", "NO-SNAPSHOT", None, None, None, None, "snapshot")]
    on_disk = {}
    # every image file, catalogued or not: an extra one shows as NOT-IN-LOG
    for vid, img in snap.image_files().items():
        on_disk[vid] = (img.stat().st_size, file_digest(img))
    return compare(on_disk, replayed, "snapshot")


def render(report: VerifyReport) -> str:
    lines = [
        f"verify CG {report.cg} site {report.site} at its checkpoint W {report.w} "
        f"(reference: {report.base})"
    ]
    for v in report.verdicts:
        detail = ""
        if v.status != OK:
            detail = (
                f"  site {v.site_digest or '-'} ({v.site_size}) vs replay "
                f"{v.replay_digest or '-'} ({v.replay_size})"
            )
        lines.append(f"  {v.what:<10} {v.volume_id:<20} {v.status}{detail}")
    lines.extend(f"  note: {n}" for n in report.notes)
    if report.ok:
        lines.append("OK")
    elif report.mismatched:
        lines.append("MISMATCH: the site does not hold the cut it claims")
    else:
        lines.append(
            "UNVERIFIED: the site's checkpoint carries no digests to compare (a running "
            "`lowmark apply` adds them every [apply] digest_interval_s; a clean stop always "
            "does), or --at-checkpoint found no snapshot at its W; nothing differed"
        )
    return "\n".join(lines)
