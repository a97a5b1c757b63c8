"""The layout of a site directory: the only code that knows where a site keeps what.

A primary's data dir, a backup site's data dir, a restore result and a snapshot inside a
site's store all share one layout (so any of them can seed another)::

    images/<volume id>.img       the volume's bytes (a sparse raw image)
    images/<volume id>.deleted   a backup's copy of a deleted volume, kept for the operator
    volumes.json                 the catalog: {"volumes": [{volume_id, name, size, ...}]}
    checkpoint.avro              a backup site's local checkpoint (the Checkpoint record)
    snapshots/<W, 20 digits>/    the snapshot store: each entry is itself a site directory
                                 (images/, volumes.json, checkpoint.avro) at exactly W
    state/                       a primary's interceptor state (its clock reservation)
    state/regions/<id>.dirty     a primary volume's dirty-region log (pipeline.primary.region_log)
    state/resync/                an unfinished failback resync (``pipeline.ops.resync``): while
                                 it exists the site is not a backup (apply refuses)
    state/site.lock              held (flock) by the one process that may change the images:
                                 a backup's applier, or ``lowmark failover`` (``SiteLock``)
    restore.json                 a restore result's manifest (``lowmark restore``)

What is a volume: the catalog says so, nothing else. An image file the catalog does not
name (a crash between creating an image and saving the catalog leaves one; so does an
operator's copy) is never taken for a volume: not opened, not snapshotted, not restored.
``strays`` lists such files. A catalog that names a volume whose image is missing, that
is not JSON, or that is not a lowmark catalog (someone else's ``volumes.json``) is
refused with an error that says what to do; so is a volume id that is not a plain file
name (``../x`` would reach outside ``images/``).

Writes of the catalog are atomic (``atomic_write``): a crash leaves the old or the new one.
"""

from __future__ import annotations

import fcntl
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NotRequired, TypedDict

import orjson

from pipeline.errors import ConfigError, SiteBusyError, VolumeError
from pipeline.fsutil import atomic_write

IMAGES = "images"
CATALOG = "volumes.json"
CHECKPOINT = "checkpoint.avro"
SNAPSHOTS = "snapshots"
STATE = "state"
SITE_LOCK = "site.lock"
REGIONS = "regions"
REGION_LOG_SUFFIX = ".dirty"
#: the activity log beside it: the extents a write waits for (``pipeline.primary.regions``)
ACTIVITY_LOG_SUFFIX = ".active"
RESYNC = "resync"
RESTORE_MANIFEST = "restore.json"
IMAGE_SUFFIX = ".img"
DELETED_SUFFIX = ".deleted"

#: a volume id is a file name under images/: no separators, no leading dot (no "..")
_VOLUME_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_SNAPSHOT_NAME = re.compile(r"^[0-9]{1,20}$")
_MODES = ("async", "sync")


class CatalogEntry(TypedDict):
    """One volume of the catalog, as it is stored (the primary adds ``mode``)."""

    volume_id: str
    name: str
    size: int
    metadata: NotRequired[dict[str, str]]
    mode: NotRequired[str]


def check_volume_id(volume_id: object) -> str:
    """``volume_id`` if it is a plain file name a site may store, else ``VolumeError``."""
    if not isinstance(volume_id, str) or not _VOLUME_ID.match(volume_id):
        raise VolumeError(
            f"volume id {volume_id!r} is invalid: 1-128 of letters, digits, '.', '-', '_', "
            "starting with a letter or digit (it names a file under images/)"
        )
    return volume_id


@dataclass(frozen=True)
class SiteDir:
    """One site directory (see the module docstring). Cheap: holds a path, opens nothing."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # ---------------------------------------------------------------- where things are

    @property
    def images_dir(self) -> Path:
        return self.root / IMAGES

    @property
    def catalog_path(self) -> Path:
        return self.root / CATALOG

    @property
    def checkpoint_path(self) -> Path:
        return self.root / CHECKPOINT

    @property
    def snapshots_dir(self) -> Path:
        return self.root / SNAPSHOTS

    @property
    def state_dir(self) -> Path:
        return self.root / STATE

    @property
    def lock_path(self) -> Path:
        """The site's lock file (``SiteLock``)."""
        return self.state_dir / SITE_LOCK

    @property
    def regions_dir(self) -> Path:
        """Where the dirty-region logs of a primary's volumes live."""
        return self.state_dir / REGIONS

    @property
    def resync_dir(self) -> Path:
        """A failback's resync state and stage (``pipeline.ops.resync``)."""
        return self.state_dir / RESYNC

    def region_log_path(self, volume_id: str) -> Path:
        """A primary volume's dirty-region log (``pipeline.primary.region_log``)."""
        return self.state_dir / REGIONS / f"{check_volume_id(volume_id)}{REGION_LOG_SUFFIX}"

    def activity_log_path(self, volume_id: str) -> Path:
        """The activity log of a primary volume's dirty-region log (its coarse level)."""
        return self.state_dir / REGIONS / f"{check_volume_id(volume_id)}{ACTIVITY_LOG_SUFFIX}"

    @property
    def restore_manifest_path(self) -> Path:
        return self.root / RESTORE_MANIFEST

    def image_path(self, volume_id: str) -> Path:
        return self.images_dir / f"{check_volume_id(volume_id)}{IMAGE_SUFFIX}"

    def deleted_path(self, volume_id: str) -> Path:
        return self.images_dir / f"{check_volume_id(volume_id)}{DELETED_SUFFIX}"

    def snapshot(self, w: int) -> SiteDir:
        """The snapshot store's entry at ``w`` (it may not exist)."""
        if w < 0:
            raise ValueError(f"snapshot W {w} is negative")
        return SiteDir(self.snapshots_dir / f"{w:020d}")

    # ---------------------------------------------------------------- creating, listing

    def create(self) -> SiteDir:
        """Make the directory (and images/) if missing; an existing site is left as it is."""
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"site directory {self.root} is a file; give a directory")
        self.images_dir.mkdir(parents=True, exist_ok=True)
        return self

    def is_site(self) -> bool:
        """Whether the directory has the layout (an images/ directory)."""
        return self.images_dir.is_dir()

    def image_files(self) -> dict[str, Path]:
        """volume id -> path of every ``<id>.img`` file in images/, catalogued or not."""
        if not self.images_dir.is_dir():
            return {}
        out = {}
        for p in sorted(self.images_dir.iterdir()):
            vid = p.name[: -len(IMAGE_SUFFIX)]
            if p.name.endswith(IMAGE_SUFFIX) and _VOLUME_ID.match(vid) and p.is_file():
                out[vid] = p
        return out

    def strays(self) -> list[Path]:
        """What lies in images/ without being a catalogued volume's image or a deleted copy."""
        if not self.images_dir.is_dir():
            return []
        known = {
            self.image_path(e["volume_id"]).name for e in self.read_catalog(require_images=False)
        }
        out = []
        for p in sorted(self.images_dir.iterdir()):
            vid = p.name[: -len(DELETED_SUFFIX)]
            deleted = p.name.endswith(DELETED_SUFFIX) and _VOLUME_ID.match(vid) and p.is_file()
            if p.name not in known and not deleted:
                out.append(p)
        return out

    def snapshots(self) -> list[tuple[int, SiteDir]]:
        """(W, entry) of every complete snapshot, oldest first.

        An entry is renamed into place only once complete (``snapshots.save``), and its
        checkpoint is written last: one without it is not a snapshot.
        """
        if not self.snapshots_dir.is_dir():
            return []
        out = []
        for p in self.snapshots_dir.iterdir():
            if _SNAPSHOT_NAME.match(p.name) and (p / CHECKPOINT).is_file():
                out.append((int(p.name), SiteDir(p)))
        return sorted(out, key=lambda x: x[0])

    # ---------------------------------------------------------------- the catalog

    def read_catalog(
        self, *, require_images: bool = True, missing_ok: bool = True,
        with_tombstones: bool = False,
    ) -> list[CatalogEntry]:  # fmt: skip
        """The catalogued volumes, checked; [] when there is no catalog (a new site).

        ``require_images``: every catalogued volume's image must exist (``VolumeError``
        otherwise). ``missing_ok=False``: no catalog raises ``FileNotFoundError`` (a
        snapshot being read while it is pruned). Any other damage is a ``ConfigError``
        naming the file. ``with_tombstones``: also the volumes migrated away from a
        primary (``moved_away``: no image); only the primary itself needs them.
        """
        path = self.catalog_path
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            if not missing_ok:
                raise
            return []
        except IsADirectoryError:
            raise ConfigError(f"volume catalog {path} is a directory; move it away") from None
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ConfigError(
                f"volume catalog {path} is not valid JSON ({exc}); the site directory is "
                "damaged: restore it from a snapshot (snapshots/<W>/volumes.json) or rebuild "
                "the site (`lowmark restore`)"
            ) from None
        entries = _check_catalog(doc, path)
        if not with_tombstones:
            entries = [e for e in entries if not moved_away(e)]
        if require_images:
            for e in entries:
                if moved_away(e):
                    continue  # a migrated volume's tombstone: its image went with it
                img = self.image_path(e["volume_id"])
                if not img.is_file():
                    raise VolumeError(
                        f"volume catalog {path} names volume {e['volume_id']!r}, but its image "
                        f"{img} is missing (deleted by hand, or a copy of the site left it "
                        "out); restore the site directory from a snapshot or rebuild it "
                        "(`lowmark restore`), or remove the entry if the volume is gone"
                    )
        return entries

    def write_catalog(self, entries: Iterable[Mapping[str, Any]]) -> None:
        """Replace the catalog atomically (entries are checked as ``read_catalog`` would)."""
        body = {"volumes": [dict(e) for e in entries]}
        _check_catalog(body, self.catalog_path)
        atomic_write(self.catalog_path, orjson.dumps(body, option=orjson.OPT_INDENT_2))


class SiteLock:
    """An exclusive ``flock`` on a site directory's ``state/site.lock``.

    One process at a time may change a site's images: its applier while it runs, or
    ``lowmark failover`` (which takes it before it touches the images). The holder writes
    its pid into the file, so a refusal names it. The kernel drops the lock when the holder
    dies (kill -9 included): a stale file never blocks anyone. A flock is per open file,
    so a second holder in the same process is refused as well::

        with SiteLock(site_dir):
            ...            # or lock = SiteLock(site_dir).acquire(); ...; lock.release()
    """

    def __init__(self, site_dir: Path | SiteDir, what: str = "") -> None:
        self.site = site_dir if isinstance(site_dir, SiteDir) else SiteDir(site_dir)
        #: who holds it, for the log and the file ("applier of site dr1", ...)
        self.what = what
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder_pid(self) -> int | None:
        """The pid the lock file names (the holder's, when it is held), or None."""
        try:
            text = self.site.lock_path.read_text().split()
        except OSError:
            return None
        return int(text[0]) if text and text[0].isdigit() else None

    def acquire(self) -> SiteLock:
        """Take the lock or raise ``SiteBusyError`` naming the holder's pid. Never waits."""
        if self._fd is not None:
            return self
        path = self.site.lock_path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = self.holder_pid()
            who = f"process {pid}" if pid is not None else "another process"
            raise SiteBusyError(
                f"site directory {self.site.root} is in use by {who} (it holds {path}): a "
                "site's images have one writer at a time. Stop that process (its applier, "
                "or a failover in progress) and try again"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            # the pid, for the next one refused; truncating after the lock is taken is safe
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {self.what}\n".encode(), 0)
        except BaseException:
            os.close(fd)  # else the open file keeps the lock: this process blocks itself
            raise
        self._fd = fd
        return self

    def in_use(self) -> bool:
        """Whether another holder has the lock now (a probe: it writes no pid)."""
        try:
            fd = os.open(self.site.lock_path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops a lock this probe took
        return False

    def release(self) -> None:
        """Drop the lock (the file stays; its pid is stale but nobody trusts it unheld)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> SiteLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def moved_away(entry: Mapping[str, Any]) -> bool:
    """A primary's catalog keeps a volume migrated to another interceptor as a tombstone
    (``pipeline.primary.access``): so a restart does not create it again from the config."""
    m = entry.get("migration")
    return isinstance(m, dict) and m.get("role") == "moved"


def _check_catalog(doc: object, path: Path) -> list[CatalogEntry]:
    def foreign(why: str) -> ConfigError:
        return ConfigError(
            f"{path} is not a lowmark volume catalog ({why}); is this directory some other "
            "program's? Point lowmark at its own site directory, or restore the catalog "
            "from a snapshot (snapshots/<W>/volumes.json)"
        )

    if not isinstance(doc, dict) or not isinstance(doc.get("volumes"), list):
        raise foreign('no "volumes" list')
    out: list[CatalogEntry] = []
    seen: set[str] = set()
    for i, e in enumerate(doc["volumes"]):
        if not isinstance(e, dict):
            raise foreign(f"entry {i} is not an object")
        vid, name, size = e.get("volume_id"), e.get("name"), e.get("size")
        try:
            check_volume_id(vid)
        except VolumeError as exc:
            raise foreign(f"entry {i}: {exc}") from None
        if not isinstance(name, str) or not name:
            raise foreign(f"volume {vid!r} has no name")
        if type(size) is not int or size < 0:
            raise foreign(f"volume {vid!r} has size {size!r}")
        meta = e.get("metadata")
        if meta is not None and not (
            isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())
        ):
            raise foreign(f"volume {vid!r} has metadata {meta!r}")
        if "mode" in e and e["mode"] not in _MODES:
            raise foreign(f"volume {vid!r} has mode {e['mode']!r}")
        if vid in seen:
            raise foreign(f"volume {vid!r} is listed twice")
        seen.add(str(vid))
        out.append(e)  # type: ignore[arg-type]  # checked field by field above
    return out
