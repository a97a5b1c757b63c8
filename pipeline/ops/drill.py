"""Test failover (a drill): a writable clone of a site's images at a cut, served over NBD.

A drill answers "could we fail over to site S at cut W, and would the applications come
up?" without failing over: the CG's roles are not touched, the site's applier is neither
paused nor disturbed, and nothing written to the clone is replicated anywhere.

- The clone is built by the restore engine (``restore.restore``): the newest snapshot of
  the site at or below the cut, copied (a reflink or sparse copy, never opening the site's
  images for writing), plus the log replayed to exactly the cut. The cut is a ts at or
  below the latest published W, a marker's ts, or W itself (``latest``).
- The clone's directory has a site's layout plus ``drill.json`` (this module's manifest:
  cut, site, cg, created time, served address, pid) and ``drill.lock``, which the serving
  process holds locked (``flock``) as long as it runs: ``delete`` refuses a drill whose lock
  is held, so it never removes images under a live NBD client, and a crashed drill (lock
  released by the kernel) can be deleted without guessing from a stale pid.
- The restore manifest (``restore.json``) is marked not exact: the clone is writable, so
  ``lowmark replay`` must not take it for the cut it started as.
- Each catalogued volume is one NBD export named by the volume's name, a plain
  ``FileExport`` over the clone's image.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import shutil
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from connectors.nbd.file_export import FileExport
from connectors.nbd.server import Export, NbdServer, NbdServerConfig
from pipeline.errors import RestoreError
from pipeline.fsutil import atomic_write
from pipeline.ops import restore as rs
from pipeline.ops.replay import ProgressFn
from pipeline.ops.status import checkpoints_upto
from pipeline.site import SiteDir
from pipeline.timesource import wall_us
from pipeline.topology.store import current_generation
from schemas.records import Checkpoint, Watermark
from schemas.ts import format_ts, ts_physical_us

DRILL_MANIFEST = "drill.json"
DRILL_LOCK = "drill.lock"
MANIFEST_FORMAT = 1


class DrillError(RestoreError):
    """A drill cannot be started, listed or deleted as asked; the message says why."""


# ---------------------------------------------------------------- the cut


@dataclass(frozen=True)
class Cut:
    """The cut a drill restores: ``ts``, how it was chosen, and the W it was checked against."""

    ts: int
    how: str  # "at", "marker" or "latest"
    marker: str | None
    published_w: int
    markers_named: int = 0

    def rpo_s(self, now_us: int | None = None) -> float:
        """The data loss a failover to this cut would mean now: the time since the cut."""
        now = wall_us() if now_us is None else now_us
        return max(0.0, (now - ts_physical_us(self.ts)) / 1e6)


def choose_cut(
    kafka_conf: Mapping[str, Any],
    cg: str,
    *,
    at: int | None = None,
    marker: str | None = None,
    generation: int | None = None,
    wm: Watermark | None = None,
) -> Cut:
    """The cut for ``--at TS`` / ``--at-marker M`` / neither (the latest published W of
    the CG's ``generation``, by default the current one; ``wm``: that W, when the caller
    has just read it)."""
    if at is not None and marker is not None:
        raise DrillError("give one of --at TS or --at-marker NAME, not both")
    if generation is None:
        generation = current_generation(kafka_conf, cg)
    if wm is None:
        wm = rs.latest_watermark(kafka_conf, cg, generation)
    if marker is not None:
        found, count = rs.find_marker(kafka_conf, cg, marker, generation)
        cut = Cut(found.ts, "marker", marker, wm.w, count)
    elif at is not None:
        cut = Cut(at, "at", None, wm.w)
    else:
        cut = Cut(wm.w, "latest", None, wm.w)
    rs.check_below_w(cut.ts, wm)
    return cut


def check_site(
    kafka_conf: Mapping[str, Any], cg: str, site: str, site_dir: Path | None = None
) -> Checkpoint:
    """The site's newest checkpoint; a site that never checkpointed in this CG is refused,
    and so is a ``site_dir`` without a site's layout (a typo would silently lose the base)."""
    if site_dir is not None and not SiteDir(Path(site_dir)).is_site():
        raise DrillError(
            f"{site_dir} is not a site's data dir (no images/ in it); pass the data dir of "
            f"site {site!r} with --site-dir"
        )
    found = checkpoints_upto(dict(kafka_conf), cg, current_generation(kafka_conf, cg))
    if site not in found:
        known = ", ".join(sorted(found)) or "none has checkpointed yet"
        raise DrillError(
            f"site {site!r} has no checkpoint in consistency group {cg} (known sites: "
            f"{known}); check --site and --cg, or start that site's `lowmark apply` first"
        )
    return found[site]


# ---------------------------------------------------------------- the clone


def manifest_path(drill_dir: Path) -> Path:
    return Path(drill_dir) / DRILL_MANIFEST


def lock_path(drill_dir: Path) -> Path:
    return Path(drill_dir) / DRILL_LOCK


def build(
    kafka_conf: Mapping[str, Any],
    cg: str,
    site: str,
    cut: Cut,
    to_dir: Path,
    *,
    site_dir: Path | None,
    on_progress: ProgressFn | None = None,
) -> rs.Outcome:
    """Restore the CG at ``cut`` into ``to_dir`` (new or empty), based on ``site``'s snapshots.

    Read-only on the site: ``restore`` copies a snapshot (retrying one the site's applier
    prunes meanwhile) and replays the log into ``to_dir`` only.
    """
    out = rs.restore(
        kafka_conf,
        cg,
        cut.ts,
        Path(to_dir),
        site_dir=site_dir,
        site=site,
        marker=cut.marker,
        on_progress=on_progress,
    )
    # the clone is writable: a later `lowmark replay` must not take it for the exact cut
    m = dict(out.manifest)
    m.update(exact=False, drill=True)
    atomic_write(
        SiteDir(Path(to_dir)).restore_manifest_path, orjson.dumps(m, option=orjson.OPT_INDENT_2)
    )
    return out


def open_exports(
    drill_dir: Path, read_only: bool = False, what: str = "lowmark drill clone"
) -> dict[str, FileExport]:
    """One export per catalogued volume of a site directory (a drill's clone, writable; a
    named snapshot, read only), named by the volume's name."""
    site = SiteDir(Path(drill_dir))
    out: dict[str, FileExport] = {}
    try:
        for e in site.read_catalog():
            name = e.get("name") or e["volume_id"]
            out[name] = FileExport(
                site.image_path(e["volume_id"]),
                name,
                read_only=read_only,
                description=f"{what} of volume {e['volume_id']}",
            )
    except BaseException:
        for ex in out.values():
            ex.close()
        raise
    return out


def uris(config: NbdServerConfig, port: int | None, names: list[str]) -> dict[str, str]:
    """The NBD URI of each export, TCP when served over TCP, else the Unix socket."""
    if config.host is not None and port is not None:
        return {n: f"nbd://{config.host}:{port}/{n}" for n in names}
    return {n: f"nbd+unix:///{n}?socket={config.unix_path}" for n in names}


def write_manifest(drill_dir: Path, doc: Mapping[str, Any]) -> None:
    atomic_write(manifest_path(drill_dir), orjson.dumps(dict(doc), option=orjson.OPT_INDENT_2))


def manifest_doc(
    cg: str,
    site: str,
    cut: Cut,
    restored: Mapping[str, Any],
    site_checkpoint_w: int,
    address: Mapping[str, Any],
    exports: Mapping[str, str],
) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "kind": "lowmark-drill",
        "cg": cg,
        "site": site,
        "cut": {
            "w": cut.ts,
            "w_time": format_ts(cut.ts),
            "how": cut.how,
            "marker": cut.marker,
            "published_w": cut.published_w,
            "rpo_s": round(cut.rpo_s(), 3),
        },
        "site_checkpoint_w": site_checkpoint_w,
        "base": restored["base"],
        "volumes": restored["volumes"],
        "address": dict(address),
        "exports": dict(exports),
        "pid": os.getpid(),
        "created_us": wall_us(),
    }


def read_drill(drill_dir: Path) -> dict[str, Any] | None:
    """The drill's manifest, None when ``drill_dir`` holds none."""
    path = manifest_path(drill_dir)
    try:
        doc = orjson.loads(path.read_bytes())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except orjson.JSONDecodeError as exc:
        raise DrillError(f"{path} is unreadable ({exc}); is this a drill directory?") from None
    if not isinstance(doc, dict) or doc.get("kind") != "lowmark-drill":
        raise DrillError(f"{path} is not a lowmark drill manifest; leave that directory alone")
    return doc


# ---------------------------------------------------------------- the lock


class DrillLock:
    """An exclusive ``flock`` on ``drill.lock``, held while a drill is served.

    The kernel drops it when the process dies, so a held lock means a live server.
    """

    def __init__(self, drill_dir: Path) -> None:
        self.path = lock_path(drill_dir)
        self._fd = -1

    def acquire(self) -> DrillLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise DrillError(
                    f"{self.path.parent} is already served by another drill (pid "
                    f"{_lock_pid(self.path) or '?'}); stop it first"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = -1

    def __enter__(self) -> DrillLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _lock_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def running_pid(drill_dir: Path) -> int | None:
    """The pid serving the drill, None when no process holds its lock."""
    path = lock_path(drill_dir)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return _lock_pid(path) or -1
        raise
    finally:
        os.close(fd)  # also drops a shared lock we got
    return None


# ---------------------------------------------------------------- list, delete


def list_drills(root: Path) -> list[dict[str, Any]]:
    """The drills at ``root`` (a drill directory itself) or directly below it, by path."""
    root = Path(root)
    candidates = [root] if manifest_path(root).is_file() else []
    if not candidates and root.is_dir():
        candidates = sorted(p for p in root.iterdir() if manifest_path(p).is_file())
    out = []
    for d in candidates:
        try:
            doc = read_drill(d)
        except DrillError:
            continue  # someone else's drill.json: not ours to list
        if doc is None:
            continue
        pid = running_pid(d)
        out.append({**doc, "dir": str(d), "running": pid is not None, "running_pid": pid})
    return out


def delete(drill_dir: Path) -> dict[str, Any]:
    """Remove a stopped drill's directory; its manifest as it was."""
    drill_dir = Path(drill_dir)
    doc = read_drill(drill_dir)
    if doc is None:
        raise DrillError(
            f"{drill_dir} holds no {DRILL_MANIFEST}: it is not a drill, so it is not deleted "
            "(remove it by hand if it really is one)"
        )
    pid = running_pid(drill_dir)
    if pid is not None:
        raise DrillError(
            f"the drill in {drill_dir} is still served (pid {pid}); stop it (Ctrl-C or "
            f"kill -TERM {pid}) and delete it then"
        )
    shutil.rmtree(drill_dir)
    return doc


# ---------------------------------------------------------------- serving


@dataclass
class Served:
    """What a running drill server reports: its bound port and its server (for counters)."""

    server: NbdServer
    port: int | None
    exports: dict[str, str]


def serve(
    drill_dir: Path,
    config: NbdServerConfig,
    stop: threading.Event,
    on_ready: Callable[[Served], None] | None = None,
    on_tick: Callable[[], None] | None = None,
    *,
    read_only: bool = False,
    what: str = "lowmark drill clone",
) -> None:
    """Serve the clone's volumes until ``stop`` is set; the caller holds the ``DrillLock``
    (or serves a named snapshot, ``read_only``).

    ``on_ready`` gets the bound address once listening; ``on_tick`` is called about every
    0.1 s while serving (status lines).
    """
    exports = open_exports(drill_dir, read_only, what)
    try:
        asyncio.run(_serve_async(exports, config, stop, on_ready, on_tick))
    finally:
        for ex in exports.values():
            with contextlib.suppress(OSError):
                if not read_only:
                    ex.flush()
            ex.close()


async def _serve_async(
    exports: Mapping[str, FileExport],
    config: NbdServerConfig,
    stop: threading.Event,
    on_ready: Callable[[Served], None] | None,
    on_tick: Callable[[], None] | None,
) -> None:
    as_exports: dict[str, Export] = dict(exports)
    server = NbdServer(as_exports, config)
    await server.start()
    try:
        served = Served(server, server.port, uris(config, server.port, sorted(exports)))
        if on_ready is not None:
            on_ready(served)
        while not stop.is_set():
            await asyncio.sleep(0.1)
            if on_tick is not None:
                on_tick()
    finally:
        await server.close()
