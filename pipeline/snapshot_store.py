"""A site's named snapshots: point-in-time copies of every volume at one ts, kept by name.

``lowmark snapshot create NAME`` takes one at the primary (at a marker's ts, while the
interceptors hold writes) and writes a Snapshot record; every backup takes the same copy
when its applier reaches that record, after every record with ts <= its ts and before any
above. The store has the same layout at the primary and at a backup, so after a failover
the new primary holds the snapshots it took as a backup::

    named/<name>/                 a complete copy: itself a site directory
        images/<volume id>.img    the volume's bytes at ts (sparse)
        volumes.json              the catalog at ts
        snapshot.json             the manifest: name, ts, cg, where it was taken, digests
    named/.<name>.partial/        a copy under way (removed at start: a crash ends it)

A copy is written under its partial name and renamed into place after its images and
manifest are fsynced, so a complete entry is one whose directory has that name: a crash
leaves either nothing or the whole copy. Names are file names (the volume id rule).

``retention_victims`` (pure) says what a retention policy removes; every site applies the
same rule to the same snapshots in ts order, so the sites keep the same ones.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from pipeline.errors import SnapshotError, VolumeError
from pipeline.fsutil import atomic_write, fsync_path
from pipeline.site import SiteDir, check_volume_id
from schemas.ts import ts_physical_us

NAMED = "named"
MANIFEST = "snapshot.json"
PARTIAL_SUFFIX = ".partial"


def check_snapshot_name(name: object) -> str:
    """``name`` if a snapshot may have it (a plain file name), else ``SnapshotError``."""
    try:
        return check_volume_id(name)
    except VolumeError:
        raise SnapshotError(
            f"snapshot name {name!r} is invalid: 1-128 of letters, digits, '.', '-', '_', "
            "starting with a letter or digit"
        ) from None


def copy_sparse(src: Path, dst: Path) -> None:
    """Copy a file keeping holes, by reflink where the file system can (GNU cp)."""
    try:
        subprocess.run(
            ["cp", "--sparse=always", "--reflink=auto", str(src), str(dst)],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError):
        shutil.copyfile(src, dst)


@dataclass(frozen=True)
class NamedSnapshot:
    """A complete copy in a site's store, as its manifest says."""

    name: str
    ts: int
    cg: str
    taken_at: str  # "primary" or "backup"
    site: str
    created_us: int
    volumes: dict[str, dict[str, Any]]  # volume id -> {size, digest}
    path: Path

    @property
    def size(self) -> int:
        return sum(int(v["size"]) for v in self.volumes.values())

    @property
    def dir(self) -> SiteDir:
        return SiteDir(self.path)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ts": self.ts,
            "cg": self.cg,
            "taken_at": self.taken_at,
            "site": self.site,
            "created_us": self.created_us,
            "size": self.size,
            "volumes": self.volumes,
            "path": str(self.path),
        }


class SnapshotStore:
    """The named snapshots under one site directory."""

    def __init__(self, site: SiteDir | Path) -> None:
        self.site = site if isinstance(site, SiteDir) else SiteDir(site)
        self.root = self.site.root / NAMED

    def path(self, name: str) -> Path:
        return self.root / check_snapshot_name(name)

    def partial_path(self, name: str) -> Path:
        return self.root / f".{check_snapshot_name(name)}{PARTIAL_SUFFIX}"

    def get(self, name: str) -> NamedSnapshot | None:
        path = self.path(name)
        try:
            doc = orjson.loads((path / MANIFEST).read_bytes())
        except FileNotFoundError:
            return None
        except orjson.JSONDecodeError as exc:
            raise SnapshotError(
                f"snapshot {name!r} at {path}: its manifest is not JSON ({exc}); it was "
                "changed by hand. Delete the snapshot (`lowmark snapshot delete`)"
            ) from None
        return NamedSnapshot(doc["name"], int(doc["ts"]), doc["cg"], doc["taken_at"],
                             doc["site"], int(doc["created_us"]), dict(doc["volumes"]),
                             path)  # fmt: skip

    def entries(self) -> list[NamedSnapshot]:
        """Every complete snapshot, oldest ts first."""
        if not self.root.is_dir():
            return []
        out = []
        for entry in self.root.iterdir():
            if entry.name.startswith(".") or not (entry / MANIFEST).is_file():
                continue
            snap = self.get(entry.name)
            if snap is not None:
                out.append(snap)
        return sorted(out, key=lambda s: (s.ts, s.name))

    def begin(self, name: str) -> SiteDir:
        """A fresh partial directory for a copy of ``name`` (an older partial is removed)."""
        partial = self.partial_path(name)
        shutil.rmtree(partial, ignore_errors=True)
        return SiteDir(partial).create()

    def commit(
        self,
        name: str,
        ts: int,
        *,
        cg: str,
        taken_at: str,
        site: str,
        created_us: int,
        catalog: Iterable[Mapping[str, Any]],
        digests: Mapping[str, str],
    ) -> NamedSnapshot:
        """Seal the partial copy of ``name``: its images are fsynced, then the catalog and
        manifest written, then the directory renamed into place (the commit point)."""
        partial = SiteDir(self.partial_path(name))
        entries = list(catalog)
        volumes = {}
        for e in entries:
            vid = e["volume_id"]
            fsync_path(partial.image_path(vid))
            volumes[vid] = {"size": int(e["size"]), "digest": digests.get(vid, "")}
        partial.write_catalog(entries)
        manifest = {"name": name, "ts": ts, "cg": cg, "taken_at": taken_at, "site": site,
                    "created_us": created_us, "volumes": volumes}  # fmt: skip
        atomic_write(partial.root / MANIFEST, orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
        final = self.path(name)
        if final.exists():
            shutil.rmtree(partial.root, ignore_errors=True)
            raise SnapshotError(f"snapshot {name!r} already exists at {final}")
        os.replace(partial.root, final)
        fsync_path(self.root)
        got = self.get(name)
        assert got is not None
        return got

    def abort(self, name: str) -> None:
        shutil.rmtree(self.partial_path(name), ignore_errors=True)

    def discard_partials(self) -> list[str]:
        """Remove copies a crash left unfinished; their names."""
        if not self.root.is_dir():
            return []
        gone = []
        for entry in self.root.iterdir():
            if entry.name.startswith(".") and entry.name.endswith(PARTIAL_SUFFIX):
                shutil.rmtree(entry, ignore_errors=True)
                gone.append(entry.name[1 : -len(PARTIAL_SUFFIX)])
        return gone

    def delete(self, name: str) -> bool:
        """Remove a complete snapshot; whether it was here. Renamed aside first, so a crash
        mid-removal leaves a partial (removed at the next start), never half a snapshot."""
        path = self.path(name)
        if not path.exists():
            return False
        doomed = self.partial_path(name)
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        return True

    def copy_images(
        self,
        name: str,
        ts: int,
        source: SiteDir,
        catalog: Iterable[Mapping[str, Any]],
        digest: Any,
        **meta: Any,
    ) -> NamedSnapshot:
        """A whole copy of ``source``'s catalogued images, taken now (a backup's images
        are at ts while its applier waits): sparse, by reflink where possible."""
        entries = list(catalog)
        partial = self.begin(name)
        try:
            for e in entries:
                copy_sparse(source.image_path(e["volume_id"]), partial.image_path(e["volume_id"]))
            digests = {e["volume_id"]: digest(partial.image_path(e["volume_id"])) for e in entries}
            return self.commit(name, ts, catalog=entries, digests=digests, **meta)
        except BaseException:
            self.abort(name)
            raise


def retention_victims(
    snapshots: Iterable[NamedSnapshot],
    *,
    keep_last: int = 0,
    max_age_s: float = 0.0,
    now_us: int,
) -> list[str]:
    """Names a retention policy removes: beyond the newest ``keep_last`` (0: no count
    limit), or taken more than ``max_age_s`` ago by their ts's clock (0: no age limit).
    The newest snapshot is always kept: a policy never empties the store by itself."""
    snaps = sorted(snapshots, key=lambda s: (s.ts, s.name))
    if not snaps:
        return []
    doomed: set[str] = set()
    if keep_last > 0:
        doomed.update(s.name for s in snaps[:-keep_last])
    if max_age_s > 0:
        horizon = now_us - int(max_age_s * 1e6)
        doomed.update(s.name for s in snaps if ts_physical_us(s.ts) < horizon)
    doomed.discard(snaps[-1].name)
    return [s.name for s in snaps if s.name in doomed]


__all__ = [
    "NamedSnapshot",
    "SnapshotStore",
    "check_snapshot_name",
    "copy_sparse",
    "retention_victims",
]
