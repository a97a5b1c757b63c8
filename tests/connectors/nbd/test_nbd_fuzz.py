"""Seeded fuzz of the NBD server over raw sockets: tries to crash it, desynchronise it,
or make it pass a partial write to the export.

Fuzz threads open thousands of connections, each a random chain of handshake and
request scenarios: bad magics, unknown client flags, options and commands, malformed
GO payloads, oversized lengths, out-of-range offsets (up to 2**64 - 1), zero lengths,
pipelined batches answered out of order, truncated packets and disconnects in the middle
of a WRITE payload. Every scenario with a defined answer checks it exactly (error code
and cookie); every read is checked against a model of the export. Meanwhile a
well-behaved pipelining client works on another export and its data must stay correct.
Every WRITE payload is self-describing, and the export wrapper records any write whose
bytes do not match what a client sent whole. At the end: no violation, no unexpected
server error, files equal to the models, and no connection left open.

``LOWMARK_FUZZ_SEED`` replays a seed; the torture variant runs much longer. Targeted
raw-socket cases (error mapping, back-pressure, shutdown) are in ``test_nbd_raw_cases.py``.
"""

from __future__ import annotations

import asyncio
import os
import random
import struct
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from connectors.nbd import protocol as p
from connectors.nbd.file_export import FileExport
from tests.nbd_helpers import ServerThread
from tests.nbd_raw_client import Client, Closed, collect_errors, wait_for

EXPORT_SIZE = 4 << 20
BLOCK = 4096
TAG = b"FZ"
_HEAD = struct.Struct(">2sIQ")  # tag, declared length, nonce


# --- payloads that describe themselves ---------------------------------------------------


def make_payload(length: int, nonce: int) -> bytes:
    """A WRITE payload that says how long it is and which bytes follow."""
    assert length >= _HEAD.size
    return _HEAD.pack(TAG, length, nonce) + random.Random(nonce).randbytes(length - _HEAD.size)


def payload_problem(data: bytes) -> str | None:
    if len(data) < _HEAD.size or data[:2] != TAG:
        return f"write of {len(data)} bytes without the fuzz tag"
    _, declared, nonce = _HEAD.unpack_from(data)
    if declared != len(data):
        return f"write of {len(data)} bytes whose client sent {declared}"
    if data != make_payload(declared, nonce):
        return f"write of {len(data)} bytes with corrupted content (nonce {nonce})"
    return None


class RecordingExport:
    """Wraps a FileExport; records every write that is not a whole client payload.
    ``trim`` zeroes (so the model knows what a trimmed range reads back as).

    ``asynchronous`` makes the mutating calls coroutines that sometimes finish at once,
    sometimes yield or sleep a millisecond: the server's eager path, its task path and
    out-of-order replies all get exercised.
    """

    def __init__(self, inner: FileExport, check_payloads: bool, asynchronous: bool = False) -> None:
        self.inner = inner
        self.name = inner.name
        self.size = inner.size
        self.description = inner.description
        self.read_only = inner.read_only
        self.can_multi_conn = True
        self.check_payloads = check_payloads
        self.violations: list[str] = []
        self.writes = 0
        self.asynchronous = asynchronous
        self._rng = random.Random(len(inner.name))

    def _done(self, action: Callable[[], None]) -> Any:
        if not self.asynchronous:
            action()
            return None

        async def later() -> None:
            roll = self._rng.random()
            if roll < 0.3:
                await asyncio.sleep(0)
            elif roll < 0.4:
                await asyncio.sleep(0.001)
            action()

        return later()

    def pread(self, offset: int, length: int) -> bytes:
        return self.inner.pread(offset, length)

    def write(self, offset: int, data: bytes, fua: bool) -> Any:
        self.writes += 1
        if self.check_payloads:
            problem = payload_problem(data)
            if problem:
                self.violations.append(f"{problem} at offset {offset}")
        if offset + len(data) > self.size:
            self.violations.append(f"write past the end: {offset}+{len(data)}")
        return self._done(lambda: self.inner.write(offset, data, fua))

    def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> Any:
        return self._done(lambda: self.inner.write_zeroes(offset, length, fua, may_trim))

    def trim(self, offset: int, length: int, fua: bool) -> Any:
        return self._done(lambda: self.inner.write_zeroes(offset, length, fua, may_trim=True))

    def flush(self) -> Any:
        return self._done(self.inner.flush)


# --- fuzz scenarios ----------------------------------------------------------------------


class Fuzzer:
    """One thread's fuzz: owns export ``name`` (and its model); ``ro`` is shared."""

    def __init__(self, port: int, name: str, seed: int, exports: Mapping[str, Any]) -> None:
        self.port = port
        self.name = name
        self.rng = random.Random(seed)
        self.model = bytearray(EXPORT_SIZE)
        self.exports = exports
        self.big_writes = 0
        self.log: list[str] = []

    def run(self, connections: int) -> None:
        for i in range(connections):
            self.log = []
            client = Client(self.port)
            try:
                self.connection(client)
            except (AssertionError, Closed, OSError) as exc:
                where = f"{self.name} connection {i}: {' > '.join(self.log)}"
                raise AssertionError(f"{where}: {exc!r}") from exc
            finally:
                client.close()

    def step(self, what: str) -> None:
        self.log.append(what)

    def connection(self, c: Client) -> None:
        rng = self.rng
        if rng.random() < 0.05:
            self.step("garbage client flags")
            c.recvn(18)
            c.send(struct.pack(">I", rng.randrange(4, 2**32)))
            return c.expect_closed()
        if rng.random() < 0.03:
            self.step("truncated greeting reply")
            c.recvn(18)
            return c.send(os.urandom(rng.randrange(0, 4)))
        c.greet(flags=rng.choice([1, 3, 0, 2]))
        for _ in range(rng.randrange(0, 5)):
            if self.option_scenario(c):
                return
        if rng.random() < 0.08:
            return self.terminal_option(c)
        target = "ro" if rng.random() < 0.15 else self.name
        self.step(f"GO {target}")
        size, tflags = c.go(target)
        assert size == EXPORT_SIZE
        assert bool(tflags & p.TFLAG_READ_ONLY) == (target == "ro")
        for _ in range(rng.randrange(1, 12)):
            if self.request_scenario(c, target):
                return
        self.terminal_request(c)

    # handshake

    def option_scenario(self, c: Client) -> bool:
        """One option that leaves the connection in option haggling; True if it ended."""
        rng = self.rng
        kind = rng.randrange(6)
        if kind == 0:
            option = rng.choice([0, 4, 8, 9, 10, 11, 12, rng.randrange(13, 2**32)])
            self.step(f"unknown option {option}")
            c.option(option, os.urandom(rng.randrange(0, 200)))
            assert c.option_reply()[:2] == (option, p.REP_ERR_UNSUP)
        elif kind == 1:
            option = rng.choice([p.OPT_GO, p.OPT_INFO])
            good = struct.pack(">I", 2) + b"ro" + struct.pack(">HH", 1, 1)
            bad = bytearray(good)
            cut = rng.randrange(len(bad))
            bad = bytes(bad[:cut]) if rng.random() < 0.5 else good + os.urandom(rng.randrange(1, 9))
            self.step(f"malformed option {option} {bad.hex()}")
            c.option(option, bad)
            assert c.option_reply()[:2] == (option, p.REP_ERR_INVALID)
        elif kind == 2:
            name = "nope-" + rng.randbytes(4).hex()
            option = rng.choice([p.OPT_GO, p.OPT_INFO])
            self.step(f"option {option} for unknown export")
            raw = name.encode()
            c.option(option, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))
            assert c.option_reply()[:2] == (option, p.REP_ERR_UNKNOWN)
        elif kind == 3:
            self.step("LIST")
            with_data = rng.random() < 0.3
            c.option(p.OPT_LIST, b"x" if with_data else b"")
            if with_data:
                assert c.option_reply()[:2] == (p.OPT_LIST, p.REP_ERR_INVALID)
            else:
                names = []
                while True:
                    _, rtype, data = c.option_reply()
                    if rtype == p.REP_ACK:
                        break
                    assert rtype == p.REP_SERVER
                    (n,) = struct.unpack_from(">I", data)
                    names.append(data[4 : 4 + n].decode())
                assert sorted(names) == sorted(self.exports)
        elif kind == 4:
            self.step("STARTTLS without TLS")
            c.option(p.OPT_STARTTLS)
            assert c.option_reply()[:2] == (p.OPT_STARTTLS, p.REP_ERR_UNSUP)
        else:
            self.step("INFO")
            size, _ = c.go(self.name, option=p.OPT_INFO)
            assert size == EXPORT_SIZE
        return False

    def terminal_option(self, c: Client) -> None:
        rng = self.rng
        kind = rng.randrange(5)
        if kind == 0:
            self.step("bad option magic")
            c.send(bytes([rng.choice(b"ABCDEFGH")]) + b"HAVEOPT" + os.urandom(8))
            c.expect_closed()
        elif kind == 1:
            self.step("huge option")
            c.send(
                p.OPTION_HEADER.pack(
                    p.IHAVEOPT, p.OPT_GO, rng.randrange(p.MAX_OPTION_DATA + 1, 2**32)
                )
            )
            c.expect_closed()
        elif kind == 2:
            self.step("EXPORT_NAME unknown")
            c.option(p.OPT_EXPORT_NAME, b"no-such-export")
            c.expect_closed()
        elif kind == 3:
            self.step("ABORT")
            c.option(p.OPT_ABORT)
            assert c.option_reply()[:2] == (p.OPT_ABORT, p.REP_ACK)
            c.expect_closed()
        else:
            raw = p.OPTION_HEADER.pack(p.IHAVEOPT, p.OPT_GO, 40) + os.urandom(40)
            cut = rng.randrange(1, len(raw))
            self.step(f"truncated option at {cut}")
            c.send(raw[:cut])

    # transmission

    def rand_range(self, max_len: int = 64 << 10) -> tuple[int, int]:
        length = self.rng.randrange(_HEAD.size, max_len)
        return self.rng.randrange(0, EXPORT_SIZE - length), length

    def bad_range(self) -> tuple[int, int]:
        rng = self.rng
        return rng.choice(
            [
                (EXPORT_SIZE, 512),
                (EXPORT_SIZE - 100, 101 + rng.randrange(1000)),
                (2**64 - 1, 512),
                (2**64 - 512, 512),
                (rng.randrange(EXPORT_SIZE), 0),
                (rng.randrange(2**63, 2**64), rng.randrange(1, 1 << 16)),
            ]
        )

    def write_ok(self, c: Client, target: str) -> tuple[int, int, bytes]:
        offset, length = self.rand_range()
        payload = make_payload(length, self.rng.getrandbits(64))
        if target == "ro":
            self.step("write to read-only")
            assert c.call(p.CMD_WRITE, offset, length, payload=payload)[0] == p.EPERM
        else:
            self.step(f"write {offset}+{length}")
            flags = p.CMD_FLAG_FUA if self.rng.random() < 0.1 else 0
            assert c.call(p.CMD_WRITE, offset, length, flags, payload) == (0, b"")
            self.model[offset : offset + length] = payload
        return offset, length, payload

    def read_ok(self, c: Client, target: str) -> None:
        offset, length = self.rand_range(256 << 10)
        self.step(f"read {offset}+{length}")
        err, data = c.call(p.CMD_READ, offset, length)
        assert err == 0
        if target != "ro":
            assert data == self.model[offset : offset + length], "read does not match the model"

    def request_scenario(self, c: Client, target: str) -> bool:
        rng = self.rng
        kind = rng.randrange(12)
        if kind <= 1:
            self.write_ok(c, target)
        elif kind == 2:
            self.read_ok(c, target)
        elif kind == 3:
            offset, length = self.bad_range()
            self.step(f"read out of range {offset}+{length}")
            assert c.call(p.CMD_READ, offset, length)[0] == p.EINVAL
        elif kind == 4:
            offset, length = self.bad_range()
            length = min(length, 1 << 16)
            self.step(f"write out of range {offset}+{length}")
            err, _ = c.call(p.CMD_WRITE, offset, length, payload=os.urandom(length))
            assert err == (p.EPERM if target == "ro" else p.ENOSPC)
        elif kind == 5:
            cmd = rng.choice(
                [p.CMD_CACHE, p.CMD_BLOCK_STATUS, p.CMD_RESIZE, rng.randrange(9, 2**16)]
            )
            self.step(f"unknown command {cmd}")
            assert c.call(cmd, rng.randrange(2**64), rng.randrange(2**32))[0] == p.EINVAL
        elif kind == 6:
            flags = rng.choice(
                [p.CMD_FLAG_NO_HOLE, p.CMD_FLAG_DF, p.CMD_FLAG_FAST_ZERO, 1 << rng.randrange(5, 16)]
            )
            cmd = rng.choice([p.CMD_READ, p.CMD_WRITE])
            self.step(f"command {cmd} with bad flags {flags:#x}")
            payload = os.urandom(512) if cmd == p.CMD_WRITE else b""
            assert c.call(cmd, 0, 512, flags, payload)[0] == p.EINVAL
        elif kind == 7:
            bad = rng.random() < 0.5
            self.step(f"flush bad={bad}")
            offset, length = (rng.randrange(1, 2**64), rng.randrange(2**32)) if bad else (0, 0)
            assert c.call(p.CMD_FLUSH, offset, length)[0] == (p.EINVAL if bad else 0)
        elif kind == 8:
            offset, length = self.rand_range(1 << 20)
            cmd = rng.choice([p.CMD_TRIM, p.CMD_WRITE_ZEROES])
            flags = p.CMD_FLAG_NO_HOLE if cmd == p.CMD_WRITE_ZEROES and rng.random() < 0.5 else 0
            self.step(f"{p.COMMAND_NAMES[cmd]} {offset}+{length}")
            err = c.call(cmd, offset, length, flags)[0]
            if target == "ro":
                assert err == p.EPERM
            else:
                assert err == 0
                self.model[offset : offset + length] = bytes(length)
        elif kind == 9:
            self.pipelined(c, target)
        elif kind == 10 and self.big_writes < 1 and target != "ro":
            self.big_writes += 1
            length = p.MAX_PAYLOAD + rng.randrange(1, p.MAX_PAYLOAD)
            self.step(f"oversized write {length}")
            assert c.call(p.CMD_WRITE, 0, length, payload=bytes(length))[0] == p.EINVAL
        else:
            self.read_ok(c, target)
        return False

    def pipelined(self, c: Client, target: str) -> None:
        """Several requests in one send on disjoint blocks; replies in any order."""
        rng = self.rng
        n = rng.randrange(2, 17)
        blocks = rng.sample(range(EXPORT_SIZE // BLOCK), n)
        self.step(f"pipelined {n}")
        expect: dict[bytes, tuple[int, bytes | None]] = {}
        wire = []
        for block in blocks:
            offset = block * BLOCK
            kind = rng.randrange(4)
            cookie = os.urandom(8)
            if kind == 0 and target != "ro":
                payload = make_payload(BLOCK, rng.getrandbits(64))
                self.model[offset : offset + BLOCK] = payload
                req = (0, p.CMD_WRITE, cookie, offset, BLOCK)
                expect[cookie] = (0, None)
                c.pending[cookie] = (p.CMD_WRITE, BLOCK)
            elif kind == 1:
                req = (0, p.CMD_READ, cookie, offset, BLOCK)
                expect[cookie] = (
                    0,
                    None if target == "ro" else bytes(self.model[offset : offset + BLOCK]),
                )
                c.pending[cookie] = (p.CMD_READ, BLOCK)
                payload = b""
            elif kind == 2:
                req = (0, p.CMD_READ, cookie, EXPORT_SIZE + offset, BLOCK)
                expect[cookie] = (p.EINVAL, None)
                c.pending[cookie] = (p.CMD_READ, BLOCK)
                payload = b""
            else:
                req = (0, 77, cookie, offset, 0)
                expect[cookie] = (p.EINVAL, None)
                c.pending[cookie] = (77, 0)
                payload = b""
            wire.append(struct.pack(">IHH8sQI", p.REQUEST_MAGIC, *req) + payload)
        data = b"".join(wire)
        if rng.random() < 0.3:
            # Dribble it in pieces, so headers and payloads split at arbitrary bytes.
            self.step("in pieces")
            pos = 0
            while pos < len(data):
                piece = rng.choice([1, 7, 27, 28, 29, 100, 4095, 4124, 9000])
                c.send(data[pos : pos + piece])
                pos += piece
                time.sleep(0.0002)
        else:
            c.send(data)
        while expect:
            cookie, err, data = c.reply()
            want_err, want_data = expect.pop(cookie)
            assert err == want_err
            if want_data is not None:
                assert data == want_data, "pipelined read does not match the model"

    def terminal_request(self, c: Client) -> None:
        rng = self.rng
        kind = rng.randrange(6)
        if kind == 0:
            self.step("bad request magic")
            c.send(bytes([rng.randrange(0x26, 0x100)]) + os.urandom(27))  # magic starts 0x25
            c.expect_closed()
        elif kind == 1:
            cut = rng.randrange(1, p.REQUEST_SIZE)
            self.step(f"truncated header at {cut}")
            c.send(struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.CMD_READ, 1, 0, 512)[:cut])
        elif kind == 2:
            offset, length = self.rand_range()
            payload = make_payload(length, rng.getrandbits(64))
            cut = rng.randrange(0, length)
            self.step(f"write {offset}+{length} cut after {cut} payload bytes")
            c.send(
                struct.pack(
                    ">IHH8sQI", p.REQUEST_MAGIC, 0, p.CMD_WRITE, b"cut-off!", offset, length
                )
                + payload[:cut]
            )
        elif kind == 3:
            self.step("DISC")
            tail = os.urandom(rng.randrange(0, 64))  # requests after DISC are ignored
            c.send(
                struct.pack(">IHH8sQI", p.REQUEST_MAGIC, 0, p.CMD_DISC, b"bye-bye!", 0, 0) + tail
            )
            c.expect_closed()
        elif kind == 4:
            length = rng.randrange(2 * p.MAX_PAYLOAD + 1, 2**32)
            self.step(f"write announcing {length} bytes")
            c.send(
                struct.pack(">IHH8sQI", p.REQUEST_MAGIC, 0, p.CMD_WRITE, b"too-big!", 0, length)
                + b"x" * 100
            )
            c.expect_closed()
        else:
            self.step("plain close")


# --- the well-behaved client ---------------------------------------------------------------


def good_client(
    port: int, seed: int, stop: threading.Event, model: bytearray, errors: list[str]
) -> None:
    """Pipelined random 4 KiB writes/reads/flushes on disjoint blocks, checked against
    ``model``, until ``stop``; reconnects now and then."""
    rng = random.Random(seed)
    rounds = 0
    try:
        while not stop.is_set() or rounds < 20:
            c = Client(port)
            try:
                c.greet()
                c.go("good")
                for _ in range(rng.randrange(10, 50)):
                    rounds += 1
                    stop.wait(0.001)  # share the GIL with the fuzzers
                    depth = rng.randrange(1, 17)
                    blocks = rng.sample(range(EXPORT_SIZE // BLOCK), depth)
                    reads: dict[bytes, bytes] = {}
                    for block in blocks:
                        offset = block * BLOCK
                        if rng.random() < 0.5:
                            data = rng.randbytes(BLOCK)
                            c.request(p.CMD_WRITE, offset, BLOCK, payload=data)
                            model[offset : offset + BLOCK] = data
                        else:
                            cookie = c.request(p.CMD_READ, offset, BLOCK)
                            reads[cookie] = bytes(model[offset : offset + BLOCK])
                    if rng.random() < 0.1:
                        c.request(p.CMD_FLUSH, 0, 0)
                    while c.pending:
                        cookie, err, data = c.reply()
                        if err:
                            errors.append(f"good client: error {err}")
                        if cookie in reads and data != reads[cookie]:
                            errors.append(
                                f"good client: read of a block returned other data (round {rounds})"
                            )
                c.request(p.CMD_DISC, 0, 0)
                c.expect_closed()
            finally:
                c.close()
    except Exception as exc:  # reported by the test, not lost in the thread
        errors.append(f"good client crashed: {exc!r}")


# --- the test ---------------------------------------------------------------------------


def run_fuzz(tmp_path: Path, seed: int, connections: int, threads: int = 2) -> dict[str, Any]:
    names = [f"fuzz{i}" for i in range(threads)]
    exports: dict[str, Any] = {}
    for name in [*names, "good", "ro"]:
        path = tmp_path / f"{name}.img"
        with path.open("wb") as f:
            f.truncate(EXPORT_SIZE)
        inner = FileExport(path, name, read_only=name == "ro")
        # fuzz1, fuzz3, ... and the good client's export complete asynchronously
        asynchronous = name == "good" or name[-1] in "13579"
        exports[name] = RecordingExport(inner, name != "good", asynchronous)
    good_model = bytearray(EXPORT_SIZE)
    good_errors: list[str] = []
    stop = threading.Event()
    failures: list[BaseException] = []
    with (
        collect_errors("connectors.nbd") as server_errors,
        ServerThread(
            exports,
            max_inflight_per_conn=4,  # small, so pipelines hit the pause/resume path
        ) as srv,
    ):
        good = threading.Thread(
            target=good_client, args=(srv.port, seed, stop, good_model, good_errors)
        )
        good.start()
        fuzzers = [Fuzzer(srv.port, name, seed * 1000 + i, exports) for i, name in enumerate(names)]

        def fuzz(f: Fuzzer) -> None:
            try:
                f.run(connections // threads)
            except BaseException as exc:
                failures.append(exc)

        workers = [threading.Thread(target=fuzz, args=(f,)) for f in fuzzers]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        stop.set()
        good.join(60)
        assert not good.is_alive(), "the well-behaved client hung"
        if failures:
            raise AssertionError(f"seed {seed}: {failures[0]}") from failures[0]
        # Connections the fuzzers dropped must all be gone from the server.
        wait_for(
            lambda: srv.call(lambda: srv.server.stats.connections_open) == 0,
            10,
            "the server to close every connection the fuzzers dropped",
        )
        stats = srv.call(srv.server.stats.snapshot)
        loop_errors = list(srv.loop_errors)
    assert not good_errors, good_errors[:5]
    assert not loop_errors, loop_errors[:5]
    assert not [r.getMessage() for r in server_errors], "the server logged internal errors"
    for name, export in exports.items():
        assert not export.violations, (name, export.violations[:5])
    # What the files hold is exactly what the models say.
    assert (tmp_path / "good.img").read_bytes() == good_model
    for f in fuzzers:
        assert (tmp_path / f"{f.name}.img").read_bytes() == f.model, (
            f"{f.name} differs from its model"
        )
    assert stats["connections_open"] == 0, stats
    assert stats["connections_total"] >= connections
    return stats


def fuzz_seed() -> int:
    return int(os.environ.get("LOWMARK_FUZZ_SEED", "0")) or random.randrange(1, 2**31)


def test_fuzz_bounded(tmp_path: Path) -> None:
    seed = fuzz_seed()
    print(f"replay with LOWMARK_FUZZ_SEED={seed}")
    stats = run_fuzz(tmp_path, seed, connections=1000)
    # The fuzz reached every layer: handshake failures, protocol errors, served requests.
    assert stats["handshakes_failed"] > 0
    assert stats["protocol_errors"] > 0
    assert stats["requests"]["write"] > 500 and stats["errors"]["write"] > 0
    assert stats["async_completions"] > 100  # the task path ran, not just the eager one
    assert stats["read_pauses"] > 10  # and the in-flight limit paused reading


@pytest.mark.torture
def test_fuzz_torture(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if "torture" not in (request.config.getoption("-m") or ""):
        pytest.skip("40k fuzz connections (~4 min): run with -m torture")
    seed = fuzz_seed()
    print(f"replay with LOWMARK_FUZZ_SEED={seed}")
    run_fuzz(
        tmp_path,
        seed,
        connections=int(os.environ.get("LOWMARK_FUZZ_CONNECTIONS", "40000")),
        threads=4,
    )
