"""The NBD server against clients we did not write: qemu-io, qemu-img, nbdinfo, nbdcopy,
fio's nbd engine.

Tries to break: data written by one client and read back by another (and straight from
the image file), concurrent AIO and multi-connection copies of a 256 MiB image with
holes, FUA / zero / discard / flush reaching the export with the right arguments, every
advertised capability both on and off (read-only, multi-conn), TCP and Unix sockets,
TLS optional and required, and fio's own crc32c verification with the export answering
out of order. Each tool missing from the machine skips its tests with the package name.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from connectors.nbd import protocol as p
from connectors.nbd.file_export import FileExport
from tests.nbd_helpers import ServerThread as BaseServerThread
from tests.prereqs import require_tools

pytestmark = pytest.mark.tools

def need(*tools: str) -> None:
    require_tools(*tools)  # skips locally, fails under CI / LOWMARK_STRICT=1


def run(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        tail = f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\n{tail}")
    return proc


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def make_image(path: Path, size: int, fill: bytes | None = None) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
        if fill is not None:
            f.write(fill * (size // len(fill)))
    return path


# --- exports that watch what the server asks of them ----------------------------------------


class CallLog:
    """A FileExport that records its mutating calls; ``delay`` turns them into
    coroutines that finish in random order (so replies go out of order)."""

    def __init__(self, inner: FileExport, can_multi_conn: bool = True, delay: bool = False):
        self.inner = inner
        self.name = inner.name
        self.size = inner.size
        self.description = inner.description
        self.read_only = inner.read_only
        self.can_multi_conn = can_multi_conn
        self.calls: list[tuple[Any, ...]] = []
        self.delay = delay
        self._rng = random.Random(1)

    def _maybe_later(self, action: Callable[[], None]) -> Any:
        if not self.delay:
            action()
            return None

        async def later() -> None:
            await asyncio.sleep(self._rng.choice([0, 0, 0.0001, 0.001]))
            action()

        return later()

    def pread(self, offset: int, length: int) -> bytes:
        return self.inner.pread(offset, length)

    def write(self, offset: int, data: bytes, fua: bool) -> Any:
        self.calls.append(("write", offset, len(data), fua))
        return self._maybe_later(lambda: self.inner.write(offset, data, fua))

    def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> Any:
        self.calls.append(("write_zeroes", offset, length, fua, may_trim))
        return self._maybe_later(lambda: self.inner.write_zeroes(offset, length, fua, may_trim))

    def trim(self, offset: int, length: int, fua: bool) -> Any:
        self.calls.append(("trim", offset, length, fua))
        return self._maybe_later(lambda: self.inner.trim(offset, length, fua))

    def flush(self) -> Any:
        self.calls.append(("flush",))
        return self._maybe_later(self.inner.flush)


class ServerThread(BaseServerThread):
    """The shared server thread; here no loop-level error may happen at all."""

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        assert not self.loop_errors, self.loop_errors


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_image(tmp_path / "disk.img", 64 << 20)


@pytest.fixture
def served(tmp_path: Path, image: Path) -> Iterator[tuple[ServerThread, CallLog]]:
    """ "" = a 64 MiB read-write export recording its calls, "ro" = the same file read-only
    without multi-conn."""
    rw = CallLog(FileExport(image, ""))
    ro = CallLog(FileExport(image, "ro", read_only=True), can_multi_conn=False)
    with ServerThread({"": rw, "ro": ro}, unix_path=str(tmp_path / "nbd.sock")) as srv:
        yield srv, rw


# --- qemu-io -----------------------------------------------------------------------------


def qemu_io(
    uri: str, *commands: str, read_only: bool = False, check: bool = True, cache: str = ""
) -> str:
    args = [
        "qemu-io",
        "-f",
        "raw",
        *(["-r"] if read_only else []),
        *(["-t", cache] if cache else []),
    ]
    for command in commands:
        args += ["-c", command]
    proc = run(*args, uri, check=check)
    out = proc.stdout + proc.stderr
    if check:  # qemu-io exits 0 even when a pattern check fails; it says so instead
        assert "Pattern verification failed" not in out and "failed:" not in out, out
    return out


def test_qemu_io_patterns_and_aio(served: tuple[ServerThread, CallLog], image: Path) -> None:
    need("qemu-io")
    srv, _ = served
    qemu_io(srv.uri(), "write -P 0xab 0 1M", "read -P 0xab 0 1M")
    # Eight concurrent AIO writes, then verify each over a *Unix* socket connection.
    aio = [f"aio_write -P {0x10 + i} {1 + i}M 1M" for i in range(8)]
    qemu_io(srv.uri(), *aio, "aio_flush")
    qemu_io(srv.unix_uri(), *[f"read -P {0x10 + i} {1 + i}M 1M" for i in range(8)])
    # A pattern check can fail, and the file holds what qemu wrote.
    assert "Pattern verification failed" in qemu_io(srv.uri(), "read -P 0xcd 0 4k", check=False)
    with image.open("rb") as f:
        assert f.read(1 << 20) == b"\xab" * (1 << 20)
        f.seek(5 << 20)
        assert f.read(1 << 20) == b"\x14" * (1 << 20)


def test_qemu_io_fua_zero_discard_flush_reach_the_export(
    served: tuple[ServerThread, CallLog],
) -> None:
    need("qemu-io")
    srv, rw = served
    qemu_io(srv.uri(), "write -P 0x77 0 64k")
    rw.calls.clear()
    qemu_io(
        srv.uri(),
        "write -P 0x01 0 4k",
        "write -f -P 0x01 0 4k",  # FUA
        "write -z 4k 4k",  # zeroes, must stay allocated (NBD_CMD_FLAG_NO_HOLE)
        "write -z -u 8k 4k",  # zeroes, may unmap
        "discard 12k 4k",
        "flush",
        "read -P 0x01 0 4k",
        "read -P 0 4k 8k",
        "read -P 0x77 16k 48k",
        cache="writeback",  # FUA only where asked for
    )
    calls = [c for c in rw.calls if c != ("flush",)]  # qemu also flushes on close
    assert calls == [
        ("write", 0, 4096, False),
        ("write", 0, 4096, True),
        ("write_zeroes", 4096, 4096, False, False),
        ("write_zeroes", 8192, 4096, False, True),
        ("trim", 12288, 4096, False),
    ]
    assert ("flush",) in rw.calls
    # In writethrough mode (qemu-io's default) qemu sets FUA on every write.
    rw.calls.clear()
    qemu_io(srv.uri(), "write -P 0x02 0 4k", "write -z -u 4k 4k", cache="writethrough")
    assert [c for c in rw.calls if c != ("flush",)] == [
        ("write", 0, 4096, True),
        ("write_zeroes", 4096, 4096, True, True),
    ]


def test_read_only_export_refuses_writes(served: tuple[ServerThread, CallLog]) -> None:
    need("qemu-io")
    srv, rw = served
    qemu_io(srv.uri(), "write -P 0x5a 0 64k")
    # qemu sees the READ_ONLY flag and will not even open it for writing ...
    out = qemu_io(srv.uri("ro"), "write -P 1 0 4k", check=False)
    assert "Permission denied" in out, out
    qemu_io(srv.uri("ro"), "read -P 0x5a 0 64k", read_only=True)
    # ... and a client that ignores the flag gets EPERM from the server.
    with socket.create_connection(("127.0.0.1", srv.server.port), timeout=10) as s:
        assert s.recv(18, socket.MSG_WAITALL) == p.GREETING
        name = b"ro"
        go = struct.pack(">I", 2) + name + struct.pack(">H", 0)
        s.sendall(struct.pack(">I", 3) + p.OPTION_HEADER.pack(p.IHAVEOPT, p.OPT_GO, len(go)) + go)
        rtype = 0
        while rtype != p.REP_ACK:
            _, _, rtype, length = p.OPTION_REPLY_HEADER.unpack(s.recv(20, socket.MSG_WAITALL))
            if length:
                s.recv(length, socket.MSG_WAITALL)
        s.sendall(
            p.REQUEST_HEADER.pack(p.REQUEST_MAGIC, 0, p.CMD_WRITE, b"cookie!!", 0, 4) + b"evil"
        )
        assert p.SIMPLE_REPLY.unpack(s.recv(16, socket.MSG_WAITALL)) == (
            p.SIMPLE_REPLY_MAGIC,
            p.EPERM,
            b"cookie!!",
        )
    assert not [c for c in rw.calls if c[0] != "flush" and c[1:3] == (0, 4)]


# --- capabilities as nbdinfo sees them --------------------------------------------------


def test_nbdinfo_capabilities_on_and_off(served: tuple[ServerThread, CallLog]) -> None:
    need("nbdinfo")
    srv, _ = served
    rw = json.loads(run("nbdinfo", "--json", srv.uri()).stdout)["exports"][0]
    ro = json.loads(run("nbdinfo", "--json", srv.unix_uri("ro")).stdout)["exports"][0]
    for key in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"):
        assert rw[key] is True, key
    assert rw["is_read_only"] is False
    assert ro["is_read_only"] is True and ro["can_flush"] is True
    for key in ("can_fua", "can_trim", "can_zero", "can_multi_conn"):
        assert ro[key] is False, key
    for export in (rw, ro):
        assert export["export-size"] == 64 << 20
        assert (export["block_size_minimum"], export["block_size_preferred"]) == (1, 4096)
        assert export["block_size_maximum"] == 32 << 20


def test_nbdinfo_list_shows_exports_and_sizes(tmp_path: Path) -> None:
    need("nbdinfo")
    exports = {
        "": FileExport(make_image(tmp_path / "a.img", 1 << 20), "", description="the default"),
        "big": FileExport(make_image(tmp_path / "b.img", 3 << 30), "big"),
        "ünï": FileExport(make_image(tmp_path / "c.img", 4096), "ünï", read_only=True),
    }
    with ServerThread(exports) as srv:
        listed = json.loads(run("nbdinfo", "--list", "--json", srv.uri()).stdout)["exports"]
    got = {e["export-name"]: (e["export-size"], e.get("description")) for e in listed}
    assert got == {
        "": (1 << 20, "the default"),
        "big": (3 << 30, "raw file b.img"),
        "ünï": (4096, "raw file c.img"),
    }


def test_no_default_export_is_an_error(tmp_path: Path) -> None:
    need("qemu-img")
    exports = {"only": FileExport(make_image(tmp_path / "a.img", 1 << 20), "only")}
    with ServerThread(exports) as srv:
        proc = run("qemu-img", "info", srv.uri(), check=False)
        assert proc.returncode != 0 and "only" not in proc.stdout
        assert "1 MiB" in run("qemu-img", "info", srv.uri("only")).stdout


# --- qemu-img ------------------------------------------------------------------------------


def test_qemu_img_info_tcp_and_unix(served: tuple[ServerThread, CallLog]) -> None:
    need("qemu-img")
    srv, _ = served
    for uri in (srv.uri(), srv.unix_uri(), srv.unix_uri("ro")):
        info = json.loads(run("qemu-img", "info", "--output=json", uri).stdout)
        assert info["virtual-size"] == 64 << 20, uri


def test_qemu_img_convert_in_and_out(tmp_path: Path, served: tuple[ServerThread, CallLog]) -> None:
    need("qemu-img")
    srv, _ = served
    src = make_image(tmp_path / "src.img", 64 << 20)
    with src.open("r+b") as f:
        rng = random.Random(7)
        for _ in range(64):
            f.seek(rng.randrange(0, 63 << 20))
            f.write(rng.randbytes(rng.randrange(1, 1 << 20)))
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), srv.uri())
    out = tmp_path / "out.img"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", srv.unix_uri("ro"), str(out))
    assert sha256(out) == sha256(src)


# --- nbdcopy -----------------------------------------------------------------------------


@pytest.fixture
def ram_path(tmp_path: Path) -> Iterator[Path]:
    """A scratch directory in RAM when the machine has /dev/shm: three 256 MiB images
    on a busy disk take seconds just to write."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="lowmark-nbd-", dir=shm))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_nbdcopy_256mib_in_and_out_byte_identical(ram_path: Path) -> None:
    need("nbdcopy")
    tmp_path = ram_path
    size = 256 << 20
    src = make_image(tmp_path / "src.img", size)
    rng = random.Random(1234)
    with src.open("r+b") as f:  # random extents, holes and explicit zero runs between
        pos = 0
        while pos < size:
            length = min(rng.randrange(4096, 4 << 20), size - pos)
            kind = rng.random()
            if kind < 0.45:
                f.seek(pos)
                f.write(os.urandom(length))
            elif kind < 0.55:
                f.seek(pos)
                f.write(bytes(length))
            pos += length
    # The export starts full of 0xFF, so zero ranges must really be written as zero.
    disk = make_image(tmp_path / "disk.img", size, fill=b"\xff" * (1 << 20))
    want = sha256(src)
    with ServerThread({"": FileExport(disk, "")}) as srv:
        run("nbdcopy", str(src), srv.uri())
        assert sha256(disk) == want
        out = tmp_path / "out.img"
        run("nbdcopy", srv.uri(), str(out))
        stats = srv.server.stats.snapshot()
    assert sha256(out) == want
    # nbdcopy used several connections (the export allows multi-conn) and zeroed holes.
    assert stats["connections_total"] >= 4
    assert stats["requests"]["write_zeroes"] > 0


# --- fio ---------------------------------------------------------------------------------


@pytest.mark.parametrize("delay", [False, True], ids=["sync-export", "async-out-of-order"])
def test_fio_randwrite_verify(tmp_path: Path, image: Path, delay: bool) -> None:
    need("fio")
    export = CallLog(FileExport(image, ""), delay=delay)
    with ServerThread({"": export}) as srv:
        out = tmp_path / "fio.json"
        run(
            "fio",
            "--name=verify",
            "--ioengine=nbd",
            f"--uri={srv.uri()}",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=16M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--output-format=json",
            f"--output={out}",
            timeout=120,
        )
        stats = srv.server.stats.snapshot()
    job = json.loads(out.read_text())["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 16 << 20  # every block written once ...
    assert job["read"]["io_bytes"] == 16 << 20  # ... and read back for verification
    assert stats["errors"] == {}
    if delay:
        assert stats["async_completions"] > 0


# --- TLS -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need("openssl")
    d = tmp_path_factory.mktemp("tls")

    def ssl(*args: str) -> None:
        run("openssl", *args)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
        "-keyout", str(d / "ca-key.pem"), "-out", str(d / "ca-cert.pem"))  # fmt: skip
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
        "-keyout", str(d / "server-key.pem"), "-out", str(d / "server.csr"))  # fmt: skip
    (d / "ext.cnf").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
        "keyUsage=digitalSignature,keyEncipherment\nbasicConstraints=CA:FALSE\n"
    )
    ssl("x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca-cert.pem"),
        "-CAkey", str(d / "ca-key.pem"), "-CAcreateserial", "-days", "2",
        "-extfile", str(d / "ext.cnf"), "-out", str(d / "server-cert.pem"))  # fmt: skip
    return d


def qemu_tls_opts(srv: ServerThread, tls_dir: Path) -> list[str]:
    return [
        "--object",
        f"tls-creds-x509,id=tls0,endpoint=client,dir={tls_dir}",
        "--image-opts",
        f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={srv.server.port},"
        "tls-creds=tls0",
    ]


@pytest.mark.parametrize("required", [True, False], ids=["tls-required", "tls-optional"])
def test_tls(tmp_path: Path, image: Path, tls_dir: Path, required: bool) -> None:
    need("qemu-io", "qemu-img", "nbdinfo")
    export = FileExport(image, "")
    config = {
        "tls_cert": str(tls_dir / "server-cert.pem"),
        "tls_key": str(tls_dir / "server-key.pem"),
        "tls_required": required,
    }
    with ServerThread({"": export}, **config) as srv:
        run("qemu-io", *qemu_tls_opts(srv, tls_dir), "-c", "write -P 0x3c 0 1M")
        out = run("qemu-io", *qemu_tls_opts(srv, tls_dir), "-c", "read -P 0x3c 0 1M").stdout
        assert "Pattern verification failed" not in out
        listed = run(
            "nbdinfo", "--json", f"nbds://127.0.0.1:{srv.server.port}/?tls-certificates={tls_dir}"
        )
        assert json.loads(listed.stdout)["TLS"] is True
        plain = run("qemu-img", "info", srv.uri(), check=False)
        if required:
            assert plain.returncode != 0
            assert "TLS" in plain.stderr, plain.stderr
            assert run("nbdinfo", "--list", srv.uri(), check=False).returncode != 0
        else:
            assert plain.returncode == 0 and "64 MiB" in plain.stdout
        # A client that speaks garbage instead of TLS is dropped, the server goes on.
        with socket.create_connection(("127.0.0.1", srv.server.port), timeout=10) as s:
            s.recv(18, socket.MSG_WAITALL)
            s.sendall(struct.pack(">I", 3) + p.OPTION_HEADER.pack(p.IHAVEOPT, p.OPT_STARTTLS, 0))
            assert p.OPTION_REPLY_HEADER.unpack(s.recv(20, socket.MSG_WAITALL))[2] == p.REP_ACK
            s.sendall(b"this is not a TLS client hello" * 10)
            assert_closed(s)  # perhaps after a TLS alert
        assert "64 MiB" in run("qemu-img", "info", *qemu_tls_opts(srv, tls_dir)).stdout


def assert_closed(s: socket.socket) -> None:
    try:
        for _ in range(100):
            if not s.recv(4096):
                return
    except ConnectionResetError:
        return
    raise AssertionError("the server kept talking instead of closing")
