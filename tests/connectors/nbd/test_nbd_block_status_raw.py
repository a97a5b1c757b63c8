"""Structured replies and BLOCK_STATUS through a raw socket, with the chunk checks of
tests/nbd_raw_client.py on every reply.

Tries to break: a hole read from the export after all (the cost sparse reads must not
have), a read whose chunks do not add up to the file's bytes, DF answered with more than
one chunk, a simple reply to a READ of a structured connection (also a refused one), a
BLOCK_STATUS answered without a selected context, for a context selected for another
export or cleared by a later SET, past the end, of length zero, with the wrong context
id, or more than one extent under REQ_ONE; an export whose extents are garbage, or whose
pread fails halfway, crashing the connection instead of an error chunk; the server
switches leaving structured replies or block status on; STARTTLS keeping what was
negotiated before it (the protocol says it must not survive). Every error case then sends one
more good request on the same connection: the server must still be serving.
"""

from __future__ import annotations

import errno
import ssl
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from connectors.nbd import protocol as p
from connectors.nbd.file_export import FileExport
from tests.connectors.nbd.test_nbd_clients import tls_dir  # noqa: F401  (a fixture)
from tests.nbd_helpers import ServerThread
from tests.nbd_raw_client import Client, collect_errors

K = 64 << 10
LAYOUT = [False, True, True, False, False, True, False, False]  # 64 KiB chunks, True = data
SIZE = len(LAYOUT) * K
H = p.STATE_HOLE | p.STATE_ZERO


class Watched:
    """A FileExport that counts what it reads and fails where a test says."""

    def __init__(self, inner: FileExport, extents: bool = True) -> None:
        self.inner = inner
        self.name, self.size, self.description = inner.name, inner.size, inner.description
        self.read_only, self.can_multi_conn = False, True
        self.preads: list[tuple[int, int]] = []
        self.fail_at: int | None = None  # a pread starting here raises EIO
        self.bad_extents: Any = None  # returned by extents instead of the truth
        if extents:
            self.extents = self._extents

    def pread(self, offset: int, length: int) -> bytes:
        self.preads.append((offset, length))
        if self.fail_at is not None and offset <= self.fail_at < offset + length:
            raise OSError(errno.EIO, "injected read error")
        return self.inner.pread(offset, length)

    def _extents(self, offset: int, length: int, limit: int) -> list[tuple[int, int]]:
        if self.bad_extents is not None:
            if isinstance(self.bad_extents, BaseException):
                raise self.bad_extents
            return list(self.bad_extents)
        return self.inner.extents(offset, length, limit)

    def write(self, offset: int, data: bytes, fua: bool) -> None:
        self.inner.write(offset, data, fua)

    def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> None:
        self.inner.write_zeroes(offset, length, fua, may_trim)

    def trim(self, offset: int, length: int, fua: bool) -> None:
        self.inner.trim(offset, length, fua)

    def flush(self) -> None:
        self.inner.flush()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "sparse.img"
    with path.open("wb") as f:
        f.truncate(SIZE)
        for i, data in enumerate(LAYOUT):
            if data:
                f.seek(i * K)
                f.write(bytes([i + 1]) * K)
    return path


@pytest.fixture
def served(image: Path) -> Iterator[tuple[ServerThread, Watched, Watched]]:
    """ "" knows its holes; "plain" is the same file through an export without extents."""
    sparse, plain = Watched(FileExport(image, "")), Watched(FileExport(image, "plain"), False)
    with ServerThread({"": sparse, "plain": plain}) as srv:
        yield srv, sparse, plain
        assert not srv.loop_errors, srv.loop_errors


def connect(srv: ServerThread, name: str = "", structured: bool = True,
            select: str | None = "") -> Client:  # fmt: skip
    """Structured replies if asked, base:allocation selected for ``select``, then GO."""
    c = Client(srv.port)
    c.greet()
    if structured:
        assert c.structured() == p.REP_ACK
    if select is not None:
        replies = c.meta(p.OPT_SET_META_CONTEXT, select, ["base:allocation"])
        assert replies[-1][0] == p.REP_ACK, replies
    c.go(name)
    return c


def still_serving(c: Client) -> None:
    reply = c.scall(p.CMD_READ, K, 16)
    assert reply.content(K, 16) == bytes([2]) * 16 and not reply.errors


def truth(offset: int, length: int) -> list[tuple[int, int]]:
    """The layout's extents over a range, merged."""
    out: list[tuple[int, int]] = []
    for at in range(offset, offset + length):
        flags = 0 if LAYOUT[at // K] else H
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + 1, flags)
        else:
            out.append((1, flags))
    return out


def test_sparse_read_sends_holes_and_never_reads_them(served: Any, image: Path) -> None:
    srv, sparse, _ = served
    c = connect(srv)
    want = image.read_bytes()
    for offset, length in ((0, SIZE), (100, 3 * K), (3 * K + 5, K), (7 * K, K)):
        sparse.preads.clear()
        reply = c.scall(p.CMD_READ, offset, length)
        assert reply.content(offset, length) == want[offset : offset + length]
        assert not reply.errors
        for at, n in sparse.preads:  # only data was read
            assert all(LAYOUT[b // K] for b in range(at, at + n, 4096))
        assert reply.chunks[-1][0] & p.REPLY_FLAG_DONE
        assert all(not f & p.REPLY_FLAG_DONE for f, _, _ in reply.chunks[:-1])
    whole = c.scall(p.CMD_READ, 0, SIZE)
    assert sorted(whole.holes.items()) == [(0, K), (3 * K, 2 * K), (6 * K, 2 * K)]
    assert srv.server.stats.bytes_read_holes >= 4 * K


def test_df_is_one_data_chunk_with_the_zeroes(served: Any, image: Path) -> None:
    srv, _, _ = served
    c = connect(srv)
    reply = c.scall(p.CMD_READ, 0, 4 * K, flags=p.CMD_FLAG_DF)
    assert [t for _, t, _ in reply.chunks] == [p.REPLY_TYPE_OFFSET_DATA]
    assert reply.content(0, 4 * K) == image.read_bytes()[: 4 * K]
    simple = connect(srv, structured=False, select=None)
    assert simple.call(p.CMD_READ, 0, 4096, flags=p.CMD_FLAG_DF) == (p.EINVAL, b"")
    assert simple.call(p.CMD_READ, 0, 8) == (0, bytes(8))


def test_simple_client_is_served_as_before(served: Any, image: Path) -> None:
    srv, _, _ = served
    c = Client(srv.port)
    c.greet()
    _, tflags = c.go("")
    assert not tflags & p.TFLAG_SEND_DF
    assert c.call(p.CMD_READ, 0, SIZE) == (0, image.read_bytes())
    assert c.call(p.CMD_BLOCK_STATUS, 0, K) == (p.EINVAL, b"")
    assert c.call(p.CMD_READ, K, 4) == (0, bytes([2]) * 4)


def test_block_status_reports_the_layout(served: Any) -> None:
    srv, _, _ = served
    c = Client(srv.port)
    c.greet()
    assert c.structured() == p.REP_ACK
    first = c.meta(p.OPT_SET_META_CONTEXT, "", ["base:allocation"])
    second = c.meta(p.OPT_SET_META_CONTEXT, "", ["base:", "base:allocation", "qemu:x"])
    ids = [struct.unpack_from(">I", r[0][1])[0] for r in (first, second)]
    assert ids[0] != ids[1] and second[0][1][4:] == b"base:allocation"
    _, tflags = c.go("")
    assert tflags & p.TFLAG_SEND_DF
    for offset, length in ((0, SIZE), (1, SIZE - 1), (K + 7, 2 * K), (3 * K, 2 * K), (SIZE - 1, 1)):
        reply = c.scall(p.CMD_BLOCK_STATUS, offset, length)
        ((ctx, extents),) = reply.status
        assert ctx == ids[1]  # the latest selection's id
        assert extents == truth(offset, length)
        one = c.scall(p.CMD_BLOCK_STATUS, offset, length, flags=p.CMD_FLAG_REQ_ONE)
        assert one.status[0][1] == truth(offset, length)[:1]


def test_export_without_extents_is_all_data(served: Any, image: Path) -> None:
    srv, _, plain = served
    c = connect(srv, "plain", select="plain")
    assert c.scall(p.CMD_BLOCK_STATUS, K, 5 * K).status == [(1, [(5 * K, 0)])]
    reply = c.scall(p.CMD_READ, 0, SIZE)
    assert not reply.holes and reply.content(0, SIZE) == image.read_bytes()
    assert plain.preads == [(0, SIZE)]


@pytest.mark.parametrize(
    "how", ["never", "other_export", "cleared", "set_before_structured", "unknown_leaf"]
)
def test_block_status_without_a_selected_context_is_einval(served: Any, how: str) -> None:
    srv, _, _ = served
    c = Client(srv.port)
    c.greet()
    if how == "set_before_structured":
        replies = c.meta(p.OPT_SET_META_CONTEXT, "", ["base:allocation"])
        assert [t for t, _ in replies] == [p.REP_ERR_INVALID]
    assert c.structured() == p.REP_ACK
    if how == "other_export":
        c.meta(p.OPT_SET_META_CONTEXT, "plain", ["base:allocation"])
    elif how == "cleared":
        c.meta(p.OPT_SET_META_CONTEXT, "", ["base:allocation"])
        assert c.meta(p.OPT_SET_META_CONTEXT, "nope", ["base:allocation"])[0][0] == (
            p.REP_ERR_UNKNOWN
        )
    elif how == "unknown_leaf":
        assert c.meta(p.OPT_SET_META_CONTEXT, "", ["base:dirty"]) == [(p.REP_ACK, b"")]
    c.go("")
    reply = c.scall(p.CMD_BLOCK_STATUS, 0, K)
    ((code, message, at),) = reply.errors
    assert code == p.EINVAL and at is None and "SET_META_CONTEXT" in message
    assert not reply.status
    still_serving(c)


@pytest.mark.parametrize(
    ("offset", "length", "flags"),
    [(0, 0, 0), (SIZE, 1, 0), (SIZE - 1, 2, 0), (1 << 63, 1, 0), (0, 1 << 31, 0),
     (0, K, p.CMD_FLAG_DF), (0, K, 1 << 9)],
)  # fmt: skip
def test_bad_block_status_requests_are_einval(
    served: Any, offset: int, length: int, flags: int
) -> None:
    srv, _, _ = served
    c = connect(srv)
    reply = c.scall(p.CMD_BLOCK_STATUS, offset, length, flags=flags)
    assert [e[0] for e in reply.errors] == [p.EINVAL] and not reply.status
    still_serving(c)


@pytest.mark.parametrize(("offset", "length"), [(0, 0), (SIZE, 1), (0, p.MAX_PAYLOAD + 1)])
def test_refused_structured_read_is_an_error_chunk(served: Any, offset: int, length: int) -> None:
    srv, sparse, _ = served
    c = connect(srv)
    reply = c.scall(p.CMD_READ, offset, length)
    assert [e[0] for e in reply.errors] == [p.EINVAL] and not reply.data and not reply.holes
    assert sparse.preads == []
    still_serving(c)


@pytest.mark.parametrize("bad", [[], [(0, 0)], [(-5, H)], ValueError("bug")])
def test_garbage_extents_are_eio_and_logged(served: Any, bad: Any) -> None:
    srv, sparse, _ = served
    c = connect(srv)
    sparse.bad_extents = bad
    with collect_errors("connectors.nbd.server") as logged:
        status = c.scall(p.CMD_BLOCK_STATUS, 0, K)
        read = c.scall(p.CMD_READ, 0, K)
    assert [e[0] for e in status.errors] == [p.EIO] and not status.status
    if bad == []:  # nothing said of the range: a read reads it all, as data
        assert read.content(0, K) == bytes(K) and not read.errors
    else:
        assert [e[0] for e in read.errors] == [p.EIO] and not read.data
    if isinstance(bad, BaseException):
        assert len(logged) == 2  # a bug in the export: logged with its traceback
    sparse.bad_extents = None
    still_serving(c)


def test_extents_past_the_range_are_clipped(served: Any) -> None:
    srv, sparse, _ = served
    c = connect(srv)
    sparse.bad_extents = [(K, 0), (K, H), (K, 0)]  # ignores the limit of 1
    one = c.scall(p.CMD_BLOCK_STATUS, 0, 3 * K, flags=p.CMD_FLAG_REQ_ONE)
    assert one.status[0][1] == [(K, 0)]
    sparse.bad_extents = [(10 * SIZE, 0)]
    assert c.scall(p.CMD_BLOCK_STATUS, SIZE - 100, 100).status[0][1] == [(100, 0)]
    reply = c.scall(p.CMD_READ, SIZE - 100, 100)
    assert reply.content(SIZE - 100, 100) == bytes(100)


def test_read_failing_halfway_sends_what_it_read_then_error_offset(
    served: Any, image: Path
) -> None:
    srv, sparse, _ = served
    c = connect(srv)
    sparse.fail_at = 5 * K  # the second data run
    reply = c.scall(p.CMD_READ, 0, SIZE)
    ((code, message, at),) = reply.errors
    assert code == p.EIO and at == 5 * K and "injected read error" in message
    assert reply.chunks[-1][1] == p.REPLY_TYPE_ERROR_OFFSET
    assert reply.data == {K: image.read_bytes()[K : 3 * K]}
    sparse.fail_at = K  # after the hole before it: that hole, then the error's offset
    after_hole = c.scall(p.CMD_READ, 0, SIZE)
    assert [(e[0], e[2]) for e in after_hole.errors] == [(p.EIO, K)]
    assert after_hole.holes == {0: K} and not after_hole.data
    first = c.scall(p.CMD_READ, K, 2 * K)  # nothing before it: one ERROR chunk
    assert [(e[0], e[2]) for e in first.errors] == [(p.EIO, None)] and not first.data
    assert [t for _, t, _ in first.chunks] == [p.REPLY_TYPE_ERROR]
    sparse.fail_at = None
    still_serving(c)


def test_write_error_of_a_structured_connection_is_an_error_chunk(served: Any) -> None:
    srv, _, _ = served
    c = connect(srv)
    reply = c.scall(p.CMD_WRITE, SIZE - 1, 2, payload=b"xy")
    ((code, message, _),) = reply.errors
    assert code == p.ENOSPC and "write" in message
    still_serving(c)


def test_switches_turn_it_off(image: Path) -> None:
    exports = {"": Watched(FileExport(image, ""))}
    with ServerThread(exports, structured_replies=False) as srv:
        c = Client(srv.port)
        c.greet()
        assert c.structured() == p.REP_ERR_UNSUP
        assert c.meta(p.OPT_SET_META_CONTEXT, "", ["base:allocation"])[0][0] == p.REP_ERR_UNSUP
        c.go("")
        assert c.call(p.CMD_READ, 0, 8) == (0, bytes(8))  # a simple reply
    with ServerThread(exports, block_status=False) as srv:
        c = Client(srv.port)
        c.greet()
        assert c.structured() == p.REP_ACK
        for option in (p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT):
            assert c.meta(option, "", ["base:allocation"])[0][0] == p.REP_ERR_UNSUP
        c.go("")
        assert [e[0] for e in c.scall(p.CMD_BLOCK_STATUS, 0, K).errors] == [p.EINVAL]
        assert c.scall(p.CMD_READ, 0, K).holes == {0: K}  # structured reads keep holes


def test_starttls_forgets_structured_replies_and_contexts(image: Path, tls_dir: Path) -> None:  # noqa: F811
    config = {
        "tls_cert": str(tls_dir / "server-cert.pem"),
        "tls_key": str(tls_dir / "server-key.pem"),
    }
    with ServerThread({"": Watched(FileExport(image, ""))}, **config) as srv:
        c = Client(srv.port)
        c.greet()
        assert c.structured() == p.REP_ACK
        assert c.meta(p.OPT_SET_META_CONTEXT, "", ["base:allocation"])[0][0] == p.REP_META_CONTEXT
        c.option(p.OPT_STARTTLS)
        assert c.option_replies(p.OPT_STARTTLS) == [(p.REP_ACK, b"")]
        ctx = ssl.create_default_context(cafile=str(tls_dir / "ca-cert.pem"))
        c.sock = ctx.wrap_socket(c.sock, server_hostname="localhost")
        c.structured_on = False  # what the client must assume too
        _, tflags = c.go("")
        assert not tflags & p.TFLAG_SEND_DF
        assert c.call(p.CMD_READ, K, 4) == (0, bytes([2]) * 4)  # a simple reply
        assert c.call(p.CMD_BLOCK_STATUS, 0, K) == (p.EINVAL, b"")
        # negotiated again under TLS, both work
        d = Client(srv.port)
        d.greet()
        d.option(p.OPT_STARTTLS)
        assert d.option_replies(p.OPT_STARTTLS) == [(p.REP_ACK, b"")]
        d.sock = ctx.wrap_socket(d.sock, server_hostname="localhost")
        assert d.structured() == p.REP_ACK
        d.meta(p.OPT_SET_META_CONTEXT, "", ["base:allocation"])
        d.go("")
        assert d.scall(p.CMD_BLOCK_STATUS, 0, 2 * K).status[0][1] == [(K, H), (K, 0)]
