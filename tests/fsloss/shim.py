"""An in-process power cut below lowmark's file layer: what was never fsynced is lost.

``FsLoss(root, seed)`` patches the ``os`` calls lowmark's durable files go through
(``open`` with ``O_CREAT``/``O_TRUNC``, ``write``, ``pwrite``, ``ftruncate``, ``fsync``,
``fdatasync``, ``replace``, ``rename``, ``unlink``, ``close``) and the images' ``fallocate``
(``connectors.image.image``), for paths under ``root`` only. It keeps, per inode, every
change since that inode's last fsync/fdatasync (with the bytes it overwrote), and per
directory every create/rename/unlink since that directory's last fsync (a replaced or
unlinked file is hard-linked aside first, so it can come back).

``crash()`` is the power cut: from its call every tracked file descriptor refuses I/O
(``EIO``: the abandoned service objects of the dead "process" can touch nothing), the
namespace changes no directory fsync covered are undone newest first, then every file is
rolled back to its last fsync and a seeded random subset of its unsynced changes is
replayed in order (``keep_share``), one of them possibly torn into 512-byte sectors of
which only some land (``tear``). The same seed and operation sequence replay the same
loss. ``crash_at=N`` makes the N-th tracked mutating operation raise ``EIO`` and cut the
power itself (the in-process crash point): the operation does not happen.

What it does not model (recorded in ``uncovered``): files written through ``open()``
builtins, ``shutil.copyfile`` or sqlite (the applier's pause stage), ``mkdir`` (treated as
durable at once), calls with ``dir_fd`` (passed through, durable at once).
"""

from __future__ import annotations

import errno
import os
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import connectors.image.image as image_mod

SECTOR = 512


@dataclass
class _Change:
    kind: str  # "write" | "trunc"
    offset: int  # write: where; trunc: the new size
    old: bytes  # write: the bytes it overwrote (short at EOF); trunc: the tail it cut
    new: bytes  # write: the bytes written
    old_size: int


@dataclass
class _Name:
    kind: str  # "create" | "rename" | "unlink"
    dirs: tuple[str, ...]  # the directories whose fsync makes it durable
    src: str
    dst: str = ""
    saved: str = ""  # a hard link to what the op removed from the namespace


@dataclass
class CrashReport:
    dropped: int = 0
    kept: int = 0
    torn: int = 0
    names_undone: int = 0
    files: int = 0
    undone: list[str] = field(default_factory=list)


class FsLoss:
    """Journal of unsynced changes under ``root``; ``crash()`` loses them (see module doc)."""

    def __init__(
        self,
        root: Path,
        seed: int,
        *,
        keep_share: float = 0.0,
        tear: bool = False,
        crash_at: int | None = None,
    ) -> None:
        self.root = os.path.abspath(root)
        self.side = self.root.rstrip("/") + ".fsloss"
        os.makedirs(self.side, exist_ok=True)
        self.rng = random.Random(seed)
        self.keep_share = keep_share
        self.tear = tear
        self.crash_at = crash_at
        #: mutating operations seen under root (the crash point counts these)
        self.ops = 0
        self.crashed = False
        self.crash_reports: list[CrashReport] = []
        self._lock = threading.RLock()
        self._fds: dict[int, tuple[int, str, bool]] = {}  # fd -> (ino, path, is_dir)
        self._dead: set[int] = set()  # fds of a crashed life
        self._changes: dict[int, list[_Change]] = {}
        self._names: list[_Name] = []
        self._saved = 0
        self._orig: dict[str, Any] = {}
        #: set when the power is cut (by the crash point: the test then abandons the services)
        self.cut = threading.Event()

    # -- installing ---------------------------------------------------------------------

    def install(self) -> FsLoss:
        o = self._orig
        for name in (
            "open", "write", "pwrite", "ftruncate", "fsync", "fdatasync",
            "replace", "rename", "unlink", "remove", "close",
        ):  # fmt: skip
            o[name] = getattr(os, name)
        o["fallocate"] = image_mod.fallocate
        os.open = self._open  # type: ignore[assignment]
        os.write = self._write  # type: ignore[assignment]
        os.pwrite = self._pwrite  # type: ignore[assignment]
        os.ftruncate = self._ftruncate  # type: ignore[assignment]
        os.fsync = self._fsync  # type: ignore[assignment]
        os.fdatasync = self._fsync  # type: ignore[assignment]
        os.replace = self._replace  # type: ignore[assignment]
        os.rename = self._replace  # type: ignore[assignment]
        os.unlink = self._unlink  # type: ignore[assignment]
        os.remove = self._unlink  # type: ignore[assignment]
        os.close = self._close  # type: ignore[assignment]
        image_mod.fallocate = self._fallocate  # type: ignore[assignment]
        return self

    def uninstall(self) -> None:
        for name, fn in self._orig.items():
            if name == "fallocate":
                image_mod.fallocate = fn
            else:
                setattr(os, name, fn)
        self._orig.clear()

    def __enter__(self) -> FsLoss:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    # -- helpers ------------------------------------------------------------------------

    def _mine(self, path: Any) -> str | None:
        if isinstance(path, int):
            return None
        p = os.path.abspath(os.fsdecode(path))
        return p if p == self.root or p.startswith(self.root + "/") else None

    def _eio(self, what: str) -> OSError:
        return OSError(errno.EIO, f"fsloss: power cut ({what})")

    def _tick(self, what: str) -> None:
        """Count one mutating operation; at the crash point cut the power and refuse it."""
        if self.crashed:
            raise self._eio(what)
        self.ops += 1
        if self.crash_at is not None and self.ops >= self.crash_at:
            self.crash_at = None
            self._cut()
            raise self._eio(what)

    def _tracked(self, fd: int, what: str) -> tuple[int, str, bool] | None:
        if fd in self._dead:
            raise self._eio(what)
        return self._fds.get(fd)

    def _pread(self, fd: int, n: int, off: int) -> bytes:
        rfd = self._orig["open"](f"/proc/self/fd/{fd}", os.O_RDONLY)
        try:
            return os.pread(rfd, n, off)
        finally:
            self._orig["close"](rfd)

    def _save(self, path: str) -> str:
        self._saved += 1
        link = os.path.join(self.side, f"{self._saved}")
        os.link(path, link)
        return link

    # -- the patched calls --------------------------------------------------------------

    def _open(self, path: Any, flags: int, mode: int = 0o777, *, dir_fd: Any = None) -> int:
        mine = self._mine(path) if dir_fd is None else None
        if mine is None:
            return int(self._orig["open"](path, flags, mode, dir_fd=dir_fd))
        with self._lock:
            writes = flags & (os.O_CREAT | os.O_TRUNC)
            existed = os.path.exists(mine)
            if writes and (not existed or flags & os.O_TRUNC):
                self._tick(f"open {mine}")
            elif self.crashed:
                raise self._eio(f"open {mine}")
            old = b""
            if existed and flags & os.O_TRUNC and not os.path.isdir(mine):
                with open(mine, "rb") as f:
                    old = f.read()
            fd = int(self._orig["open"](mine, flags, mode))
            st = os.fstat(fd)
            is_dir = os.path.isdir(mine)
            self._fds[fd] = (st.st_ino, mine, is_dir)
            if not existed:
                self._changes.pop(st.st_ino, None)  # a reused inode number has no history
                d, _ = os.path.split(mine)
                self._names.append(_Name("create", (d,), mine))
            elif old:
                self._changes.setdefault(st.st_ino, []).append(
                    _Change("trunc", 0, old, b"", len(old))
                )
            return fd

    def _record_write(self, fd: int, ino: int, data: Any, off: int) -> None:
        new = bytes(data)
        size = os.fstat(fd).st_size
        old = self._pread(fd, len(new), off) if off < size else b""
        self._changes.setdefault(ino, []).append(_Change("write", off, old, new, size))

    def _write(self, fd: int, data: Any) -> int:
        with self._lock:
            t = self._tracked(fd, "write")
            if t is None:
                return int(self._orig["write"](fd, data))
            self._tick(f"write {t[1]}")
            off = os.lseek(fd, 0, os.SEEK_CUR)
            n = int(self._orig["write"](fd, data))
            self._record_write(fd, t[0], memoryview(data)[:n], off)
            return n

    def _pwrite(self, fd: int, data: Any, off: int) -> int:
        with self._lock:
            t = self._tracked(fd, "pwrite")
            if t is None:
                return int(self._orig["pwrite"](fd, data, off))
            self._tick(f"pwrite {t[1]}")
            view = memoryview(data)
            self._record_write(fd, t[0], view, off)
            n = int(self._orig["pwrite"](fd, view, off))
            if n < len(view):  # the rest is the caller's next call
                ch = self._changes[t[0]][-1]
                ch.new, ch.old = ch.new[:n], ch.old[:n]
            return n

    def _fallocate(self, fd: int, mode: int, offset: int, length: int) -> bool:
        with self._lock:
            t = self._tracked(fd, "fallocate")
            if t is None:
                return bool(self._orig["fallocate"](fd, mode, offset, length))
            self._tick(f"fallocate {t[1]}")
            size = os.fstat(fd).st_size
            end = min(offset + length, size)  # KEEP_SIZE: never past EOF
            if end > offset:
                old = self._pread(fd, end - offset, offset)
                self._changes.setdefault(t[0], []).append(
                    _Change("write", offset, old, bytes(end - offset), size)
                )
            return bool(self._orig["fallocate"](fd, mode, offset, length))

    def _ftruncate(self, fd: int, length: int) -> None:
        with self._lock:
            t = self._tracked(fd, "ftruncate")
            if t is None:
                return self._orig["ftruncate"](fd, length)  # type: ignore[no-any-return]
            self._tick(f"ftruncate {t[1]}")
            size = os.fstat(fd).st_size
            tail = self._pread(fd, size - length, length) if length < size else b""
            self._changes.setdefault(t[0], []).append(_Change("trunc", length, tail, b"", size))
            self._orig["ftruncate"](fd, length)

    def _fsync(self, fd: int) -> None:
        with self._lock:
            t = self._tracked(fd, "fsync")
            if t is None:
                return self._orig["fsync"](fd)  # type: ignore[no-any-return]
            self._tick(f"fsync {t[1]}")
            self._orig["fsync"](fd)
            ino, path, is_dir = t
            self._changes.pop(ino, None)
            if is_dir:
                self._names = [n for n in self._names if path not in n.dirs]

    def _replace(self, src: Any, dst: Any, **kw: Any) -> None:
        s, d = self._mine(src), self._mine(dst)
        if kw or s is None or d is None:
            return self._orig["replace"](src, dst, **kw)  # type: ignore[no-any-return]
        with self._lock:
            self._tick(f"rename {s} -> {d}")
            saved = self._save(d) if os.path.isfile(d) else ""
            self._orig["replace"](s, d)
            dirs = tuple({os.path.dirname(s), os.path.dirname(d)})
            self._names.append(_Name("rename", dirs, s, d, saved))

    def _unlink(self, path: Any, *, dir_fd: Any = None) -> None:
        p = self._mine(path) if dir_fd is None else None
        if p is None or not os.path.isfile(p):
            return self._orig["unlink"](path, dir_fd=dir_fd)  # type: ignore[no-any-return]
        with self._lock:
            self._tick(f"unlink {p}")
            saved = self._save(p)
            self._orig["unlink"](p)
            self._names.append(_Name("unlink", (os.path.dirname(p),), p, "", saved))

    def _close(self, fd: int) -> None:
        with self._lock:
            self._fds.pop(fd, None)
            self._dead.discard(fd)
            self._orig["close"](fd)

    # -- the power cut ------------------------------------------------------------------

    def _cut(self) -> None:
        """From now on the tracked descriptors are dead and nothing under root changes."""
        self.crashed = True
        self.cut.set()
        self._dead |= set(self._fds)
        self._fds.clear()

    def crash(self) -> CrashReport:
        """Cut the power (unless the crash point did) and roll the disk back to what was
        synced plus a seeded subset of the rest; then the next life may start."""
        with self._lock:
            if not self.crashed:
                self._cut()
            report = CrashReport()
            self._undo_names(report)
            self._roll_back_files(report)
            self._changes.clear()
            self._names.clear()
            for f in os.listdir(self.side):  # their inodes may be reused from here on
                self._real("unlink")(os.path.join(self.side, f))
            self.crashed = False
            self.cut.clear()
            self.crash_reports.append(report)
            return report

    def _undo_names(self, report: CrashReport) -> None:
        for n in reversed(self._names):
            if self.keep_share and self.rng.random() < self.keep_share:
                continue  # this entry reached the disk after all
            report.names_undone += 1
            report.undone.append(f"{n.kind} {n.src} {n.dst}".strip())
            if n.kind == "create":
                if os.path.lexists(n.src) and not os.path.isdir(n.src):
                    self._real("unlink")(n.src)
            elif n.kind == "rename":
                if os.path.lexists(n.dst):
                    self._real("replace")(n.dst, n.src)
                if n.saved:
                    os.link(n.saved, n.dst)
            elif n.kind == "unlink" and not os.path.lexists(n.src):
                os.link(n.saved, n.src)

    def _roll_back_files(self, report: CrashReport) -> None:
        if not self._changes:
            return
        paths: dict[int, str] = {}
        for top in (self.root, self.side):
            for dirpath, _dirs, files in os.walk(top):
                for f in files:
                    p = os.path.join(dirpath, f)
                    paths.setdefault(os.lstat(p).st_ino, p)
        for ino, changes in self._changes.items():
            path = paths.get(ino)
            if path is None:
                continue  # its name never reached the disk: the data went with it
            report.files += 1
            self._roll_back_file(path, changes, report)

    def _roll_back_file(self, path: str, changes: list[_Change], report: CrashReport) -> None:
        fd = self._real("open")(path, os.O_RDWR)
        try:
            for ch in reversed(changes):  # back to the last fsync
                if ch.kind == "write":
                    if ch.old:
                        self._raw_pwrite(fd, ch.old, ch.offset)
                else:
                    self._raw_truncate(fd, ch.old_size)
                    if ch.old:
                        self._raw_pwrite(fd, ch.old, ch.offset)
                if os.fstat(fd).st_size != ch.old_size:
                    self._raw_truncate(fd, ch.old_size)
            kept = [ch for ch in changes if self.rng.random() < self.keep_share]
            report.kept += len(kept)
            report.dropped += len(changes) - len(kept)
            torn = None
            writes = [ch for ch in kept if ch.kind == "write" and len(ch.new) > SECTOR]
            if self.tear and writes:
                torn = self.rng.choice(writes)
            for ch in kept:  # in their order, as the page cache would have written them
                if ch.kind == "trunc":
                    self._raw_truncate(fd, ch.offset)
                elif ch is torn:
                    report.torn += 1
                    self._tear(fd, ch)
                else:
                    self._raw_pwrite(fd, ch.new, ch.offset)
        finally:
            self._real("close")(fd)

    def _tear(self, fd: int, ch: _Change) -> None:
        """Some of the write's sectors land, the others keep what the disk held."""
        n = len(ch.new)
        sectors = range(0, n, SECTOR)
        landed = [s for s in sectors if self.rng.random() < 0.5]
        if len(landed) in (0, len(sectors)):  # a tear that tears: never all or nothing
            landed = [s for s in sectors if s < n // 2]
        if ch.offset + n > os.fstat(fd).st_size:
            self._raw_truncate(fd, ch.offset + n)
        for s in landed:
            self._raw_pwrite(fd, ch.new[s : s + SECTOR], ch.offset + s)

    def _raw_pwrite(self, fd: int, data: bytes, off: int) -> None:
        fn = self._real("pwrite")
        view = memoryview(data)
        while view:
            n = fn(fd, view, off)
            view, off = view[n:], off + n

    def _raw_truncate(self, fd: int, size: int) -> None:
        self._real("ftruncate")(fd, size)

    def _real(self, name: str) -> Any:
        return self._orig.get(name) or getattr(os, name)
