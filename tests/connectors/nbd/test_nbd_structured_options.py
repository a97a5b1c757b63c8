"""The pure side of structured replies and block status: option decisions
(connectors/nbd/protocol.py) and what a chunk may say (connectors/nbd/structured.py).

Tries to break: SET_META_CONTEXT accepted before structured replies or on an unknown
export, a payload whose lengths do not add up parsed anyway (or raising something other
than MalformedError), "base:" or an unknown namespace selecting a context in SET, a failed
SET that keeps the old selection, LIST without queries not listing base:allocation, DF
advertised without structured replies, and block-status extents from an export that run
past the range, are empty, have zero lengths, or break REQ_ONE; read runs that do not
cover the read exactly.
"""

from __future__ import annotations

import itertools
import random
import struct

import pytest

from connectors.nbd import protocol as p
from connectors.nbd import structured as sr
from tests.connectors.nbd.test_nbd_protocol import EXPORTS, split_replies
from tests.nbd_raw_client import meta_payload

ON = p.Negotiation(EXPORTS, structured=True, next_context_id=7)
LIST, SET = p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT


def test_structured_reply_acked_refused_with_data_and_when_off() -> None:
    ok = p.answer_option(p.OPT_STRUCTURED_REPLY, b"", p.Negotiation(EXPORTS))
    assert ok.structured and split_replies(ok.reply) == [(8, p.REP_ACK, b"")]
    junk = p.answer_option(p.OPT_STRUCTURED_REPLY, b"x", p.Negotiation(EXPORTS))
    assert not junk.structured and split_replies(junk.reply)[0][1] == p.REP_ERR_INVALID
    off = p.Negotiation(EXPORTS, structured_enabled=False)
    refused = p.answer_option(p.OPT_STRUCTURED_REPLY, b"", off)
    assert not refused.structured and split_replies(refused.reply)[0][1] == p.REP_ERR_UNSUP


def test_df_is_advertised_only_with_structured_replies() -> None:
    for read_only, multi in itertools.product((False, True), repeat=2):
        plain = p.transmission_flags(read_only, multi)
        assert not plain & p.TFLAG_SEND_DF
        assert p.transmission_flags(read_only, multi, True) == plain | p.TFLAG_SEND_DF
    go = p.answer_option(p.OPT_GO, struct.pack(">IH", 0, 0), ON)
    (_, _, info), _ack = split_replies(go.reply)
    assert struct.unpack(">HQH", info)[2] & p.TFLAG_SEND_DF


def test_set_selects_base_allocation_with_the_next_id() -> None:
    out = p.answer_option(SET, meta_payload("ro", ["base:allocation"]), ON)
    assert out.meta == p.MetaSelection("ro", 7)
    (opt, rtype, data), ack = split_replies(out.reply)
    assert (opt, rtype) == (SET, p.REP_META_CONTEXT)
    assert data == struct.pack(">I", 7) + b"base:allocation"
    assert ack[1] == p.REP_ACK


@pytest.mark.parametrize(
    "queries", [[], ["base:"], ["base:dirty"], ["qemu:dirty-bitmap:x"], ["x-foo:allocation"]]
)
def test_set_without_base_allocation_selects_nothing_and_says_so(queries: list[str]) -> None:
    out = p.answer_option(SET, meta_payload("", queries), ON)
    assert out.meta is None  # replaced by nothing
    assert split_replies(out.reply) == [(SET, p.REP_ACK, b"")]


@pytest.mark.parametrize(
    ("ctx", "payload", "code"),
    [
        (p.Negotiation(EXPORTS), meta_payload("", ["base:allocation"]), p.REP_ERR_INVALID),
        (ON, meta_payload("nope", ["base:allocation"]), p.REP_ERR_UNKNOWN),
        (ON, meta_payload("", ["allocation"]), p.REP_ERR_INVALID),  # no namespace
        (ON, b"\x00\x00", p.REP_ERR_INVALID),
        (ON, meta_payload("", ["base:allocation"]) + b"x", p.REP_ERR_INVALID),
        (ON, meta_payload("", ["base:allocation"])[:-1], p.REP_ERR_INVALID),
        (ON, struct.pack(">II", 0, 1 << 30), p.REP_ERR_INVALID),  # a billion queries
        (ON, meta_payload("", [b"base:\xff"]), p.REP_ERR_INVALID),  # not UTF-8
        (p.Negotiation(EXPORTS, structured=True, block_status_enabled=False),
         meta_payload("", ["base:allocation"]), p.REP_ERR_UNSUP),
    ],
)  # fmt: skip
def test_bad_meta_options_are_refused_and_a_failed_set_clears(
    ctx: p.Negotiation, payload: bytes, code: int
) -> None:
    for option in (LIST, SET):
        out = p.answer_option(option, payload, ctx)
        assert out.next is p.Next.OPTIONS
        ((opt, rtype, message),) = split_replies(out.reply)
        assert (opt, rtype) == (option, code) and message, out
        # SET replaces the selection even when it fails; LIST never touches it
        assert out.meta is (None if option == SET else p.KEEP_META)


@pytest.mark.parametrize(
    ("queries", "listed"),
    [([], True), (["base:"], True), (["base:allocation"], True), (["base:other"], False),
     (["qemu:"], False), (["qemu:", "base:"], True)],
)  # fmt: skip
def test_list(queries: list[str], listed: bool) -> None:
    out = p.answer_option(LIST, meta_payload("ro", queries), ON)
    replies = split_replies(out.reply)
    assert out.meta is p.KEEP_META
    assert replies[-1][1] == p.REP_ACK
    expect = [(LIST, p.REP_META_CONTEXT, struct.pack(">I", 0) + b"base:allocation")]
    assert replies[:-1] == (expect if listed else [])


def test_parse_meta_request_never_raises_anything_else() -> None:
    rng = random.Random(17)
    good = meta_payload("abc", ["base:allocation", "qemu:x"])
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        data = data[: rng.randint(0, len(data))]
        try:
            req = p.parse_meta_request(bytes(data))
        except p.MalformedError:
            continue
        assert meta_payload(req.name, list(req.queries)) == bytes(data)


# --- what a BLOCK_STATUS chunk may say ------------------------------------------------------

H = p.STATE_HOLE | p.STATE_ZERO


def test_status_extents_clip_merge_and_mask() -> None:
    assert sr.status_extents([(10, H), (10, H | 0x100), (5, 0)], 22, False) == [(20, H), (2, 0)]
    assert sr.status_extents([(100, 0)], 30, False) == [(30, 0)]  # never past the range
    assert sr.status_extents([(10, 0), (10, H)], 30, False) == [(10, 0), (10, H)]  # a prefix
    assert sr.status_extents([(10, H), (10, H), (5, 0)], 30, True) == [(20, H)]
    assert sr.status_extents([(100, H), (5, 0)], 30, True) == [(30, H)]  # REQ_ONE clipped
    assert sr.status_extents([(5, 0), (100, 0)], 30, False) == [(30, 0)]
    for bad in ([], [(0, 0)], [(-1, 0)], [(5, 0), (0, H)]):
        with pytest.raises(sr.ExtentsError):
            sr.status_extents(bad, 30, False)


def test_status_extents_random_answers_stay_inside() -> None:
    rng = random.Random(5)
    for _ in range(2000):
        length = rng.randint(1, 100)
        raw = [(rng.randint(1, 40), rng.choice((0, H, p.STATE_HOLE, 0xFF)))
               for _ in range(rng.randint(1, 8))]  # fmt: skip
        req_one = rng.random() < 0.3
        out = sr.status_extents(raw, length, req_one)
        assert 0 < sum(n for n, _ in out) <= length
        assert all(n > 0 and not f & ~H for n, f in out)
        assert all(a[1] != b[1] for a, b in itertools.pairwise(out))
        assert len(out) == 1 or not req_one
        # what it says of each byte is what the export said of it
        said = [f & H for n, f in raw for _ in range(n)]
        told = [f for n, f in out for _ in range(n)]
        assert told == said[: len(told)]


def test_read_runs_cover_the_read_exactly() -> None:
    rng = random.Random(9)
    for _ in range(2000):
        offset, length = rng.randint(0, 50), rng.randint(1, 100)
        raw = [(rng.randint(1, 40), rng.choice((0, H, p.STATE_HOLE, p.STATE_ZERO)))
               for _ in range(rng.randint(1, 6))]  # fmt: skip
        runs = sr.read_runs(raw, offset, length)
        pos = offset
        for at, n, _zero in runs:
            assert at == pos and n > 0
            pos += n
        assert pos == offset + length
        assert all(a[2] != b[2] for a, b in itertools.pairwise(runs))
        # a hole only where the export promised zeroes; HOLE without ZERO is read
        zero = [bool(f & p.STATE_ZERO) for n, f in raw for _ in range(n)]
        zero += [False] * length
        told = [z for _, n, z in runs for _ in range(n)]
        assert told == zero[:length]
    with pytest.raises(sr.ExtentsError):
        sr.read_runs([(0, H)], 0, 10)


def test_error_chunks_carry_the_message_within_the_limit() -> None:
    cookie = b"c" * 8
    chunk = sr.error(cookie, p.EINVAL, "é" * 3000)  # 6000 bytes of UTF-8
    magic, flags, rtype, got, n = sr.CHUNK_HEADER.unpack_from(chunk)
    assert (magic, flags, rtype, got) == (p.STRUCTURED_REPLY_MAGIC, 1, p.REPLY_TYPE_ERROR, cookie)
    code, mlen = struct.unpack_from(">IH", chunk, sr.CHUNK_HEADER.size)
    assert code == p.EINVAL and mlen <= sr.MAX_MESSAGE and n == 6 + mlen
    chunk[sr.CHUNK_HEADER.size + 6 :].decode()  # cut on a character boundary
