"""The clients of the NBD fuzz (``test_nbd_fuzz.py``): the fuzzer and a well-behaved one.

A :class:`Fuzzer` thread opens connection after connection, each a random chain of
handshake and request scenarios: bad magics, unknown client flags, options and commands,
malformed GO payloads, oversized lengths, out-of-range offsets (up to 2**64 - 1), zero
lengths, pipelined batches answered out of order, truncated packets and disconnects in the
middle of a WRITE payload. A third of the connections negotiate structured replies (and
some of those base:allocation): their reads come as chunks, holes among them, and their
BLOCK_STATUS answers are checked against the model (a hole must read as zeroes). Every
scenario with a defined answer checks it exactly (error code and cookie); every read is
checked against a model of its export. :func:`good_client`
pipelines correct requests on another export meanwhile, checked against its own model.
"""

from __future__ import annotations

import os
import random
import struct
import threading
import time
from collections.abc import Mapping
from typing import Any

from connectors.nbd import protocol as p
from tests.connectors.nbd.fuzz_export import BLOCK, EXPORT_SIZE, PAYLOAD_HEAD, make_payload
from tests.nbd_raw_client import Client, Closed


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
        self.structured = False  # this connection negotiated structured replies
        self.meta = False  # ... and selected base:allocation for the export it entered

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
        self.structured = self.meta = False
        if rng.random() < 0.35:
            self.step("STRUCTURED_REPLY")
            assert c.structured() == p.REP_ACK
            self.structured = True
            if rng.random() < 0.6:
                self.step(f"SET_META_CONTEXT {target}")
                replies = c.meta(p.OPT_SET_META_CONTEXT, target, ["base:allocation"])
                assert [t for t, _ in replies] == [p.REP_META_CONTEXT, p.REP_ACK]
                self.meta = True
        self.step(f"GO {target}")
        size, tflags = c.go(target)
        assert size == EXPORT_SIZE
        assert bool(tflags & p.TFLAG_READ_ONLY) == (target == "ro")
        assert bool(tflags & p.TFLAG_SEND_DF) == self.structured
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
            if option in (p.OPT_STRUCTURED_REPLY, p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT):
                # known, but refused here: STRUCTURED_REPLY takes no data, the meta
                # context options need it first (the connection stays simple replies)
                self.step(f"option {option} with data, no structured replies")
                c.option(option, os.urandom(rng.randrange(1, 200)))
                assert c.option_reply()[:2] == (option, p.REP_ERR_INVALID)
                return False
            self.step(f"unknown option {option}")
            c.option(option, os.urandom(rng.randrange(0, 200)))
            assert c.option_reply()[:2] == (option, p.REP_ERR_UNSUP)
        elif kind == 1:
            option = rng.choice([p.OPT_GO, p.OPT_INFO])
            good = struct.pack(">I", 2) + b"ro" + struct.pack(">HH", 1, 1)
            cut = rng.randrange(len(good))
            bad = good[:cut] if rng.random() < 0.5 else good + os.urandom(rng.randrange(1, 9))
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
        length = self.rng.randrange(PAYLOAD_HEAD.size, max_len)
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

    def block_status(self, c: Client, target: str) -> None:
        rng = self.rng
        req_one = rng.random() < 0.3
        if rng.random() < 0.2:
            offset, length = self.bad_range()
            self.step(f"block status out of range {offset}+{length}")
            assert c.call(p.CMD_BLOCK_STATUS, offset, length)[0] == p.EINVAL
            return
        offset, length = self.rand_range(1 << 20)
        self.step(f"block status {offset}+{length} req_one={req_one}")
        reply = c.scall(p.CMD_BLOCK_STATUS, offset, length, p.CMD_FLAG_REQ_ONE if req_one else 0)
        ((_, extents),) = reply.status
        assert not reply.errors
        assert 0 < sum(n for n, _ in extents) <= length and (len(extents) == 1 or not req_one)
        pos = offset
        for n, flags in extents:
            if flags & p.STATE_ZERO and target != "ro":
                assert not any(self.model[pos : pos + n]), f"non-zero bytes in a hole at {pos}"
            pos += n

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
        elif kind == 5 and self.meta and rng.random() < 0.7:
            self.block_status(c, target)
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
            if self.structured and cmd == p.CMD_READ and flags == p.CMD_FLAG_DF:
                cmd = p.CMD_WRITE  # DF is a valid read flag here
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
                c.offsets[cookie] = offset
                payload = b""
            elif kind == 2:
                req = (0, p.CMD_READ, cookie, EXPORT_SIZE + offset, BLOCK)
                expect[cookie] = (p.EINVAL, None)
                c.pending[cookie] = (p.CMD_READ, BLOCK)
                c.offsets[cookie] = EXPORT_SIZE + offset
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
