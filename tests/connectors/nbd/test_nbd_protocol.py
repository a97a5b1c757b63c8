"""Pure NBD wire logic: tries to break the parsers and the handshake's decisions.

Wrong lengths in GO/INFO payloads, names that are not UTF-8, oversized names, every
request validation rule (flags, ranges, read-only, zero and maximal lengths, offsets
near 2**64), TLS-required refusals, and that the encoded replies decode back to what
the protocol document lays out, byte for byte.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connectors.nbd import protocol as p


@dataclass
class Facts:
    name: str
    size: int
    description: str = ""
    read_only: bool = False
    can_multi_conn: bool = False


EXPORTS = {"": Facts("", 1 << 20, "default"), "ro": Facts("ro", 4096, read_only=True)}


def info_payload(name: bytes, infos: list[int]) -> bytes:
    return struct.pack(">I", len(name)) + name + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def split_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Decode a run of option replies into (option, type, payload)."""
    out = []
    pos = 0
    while pos < len(data):
        magic, option, rtype, length = p.OPTION_REPLY_HEADER.unpack_from(data, pos)
        assert magic == p.OPTION_REPLY_MAGIC
        pos += p.OPTION_REPLY_HEADER.size
        out.append((option, rtype, data[pos : pos + length]))
        pos += length
    assert pos == len(data), "reply lengths do not add up"
    return out


# --- encoding ---------------------------------------------------------------------------


def test_greeting_is_fixed_newstyle_with_no_zeroes() -> None:
    magic, opt, flags = struct.unpack(">QQH", p.GREETING)
    assert p.GREETING[:8] == b"NBDMAGIC" and p.GREETING[8:16] == b"IHAVEOPT"
    assert (magic, opt) == (p.NBDMAGIC, p.IHAVEOPT)
    assert flags == p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES


def test_request_header_layout() -> None:
    raw = struct.pack(">IHHQQI", p.REQUEST_MAGIC, 1, p.CMD_WRITE, 0xDEADBEEF, 4096, 512)
    assert p.REQUEST_SIZE == 28
    magic, flags, cmd, cookie, offset, length = p.REQUEST_HEADER.unpack(raw)
    assert (magic, flags, cmd, offset, length) == (p.REQUEST_MAGIC, 1, 1, 4096, 512)
    assert cookie == struct.pack(">Q", 0xDEADBEEF)  # echoed back as opaque bytes


def test_simple_reply_echoes_cookie() -> None:
    cookie = b"\x01\x02\x03\x04\x05\x06\x07\x08"
    assert p.simple_reply(p.EIO, cookie) == struct.pack(">II", 0x67446698, 5) + cookie
    assert p.SIMPLE_REPLY_OK + cookie == p.simple_reply(0, cookie)


def test_export_name_reply_zeroes_depend_on_client_flag() -> None:
    assert len(p.export_name_reply(10, 1, no_zeroes=False)) == 8 + 2 + 124
    assert p.export_name_reply(10, 1, no_zeroes=True) == struct.pack(">QH", 10, 1)


def test_transmission_flags_on_and_off() -> None:
    rw = p.transmission_flags(read_only=False, can_multi_conn=True)
    for flag in (
        p.TFLAG_HAS_FLAGS,
        p.TFLAG_SEND_FLUSH,
        p.TFLAG_SEND_FUA,
        p.TFLAG_SEND_TRIM,
        p.TFLAG_SEND_WRITE_ZEROES,
        p.TFLAG_CAN_MULTI_CONN,
    ):
        assert rw & flag
    assert not rw & p.TFLAG_READ_ONLY
    ro = p.transmission_flags(read_only=True, can_multi_conn=False)
    assert ro & p.TFLAG_READ_ONLY and ro & p.TFLAG_SEND_FLUSH
    for flag in (p.TFLAG_SEND_FUA, p.TFLAG_SEND_TRIM, p.TFLAG_SEND_WRITE_ZEROES):
        assert not ro & flag
    assert not ro & p.TFLAG_CAN_MULTI_CONN


def test_descriptions_are_cut_on_a_character_boundary() -> None:
    text = "é" * p.MAX_NAME  # 2 bytes each
    raw = p.info_description(text)[2:]
    assert len(raw) <= p.MAX_NAME
    raw.decode("utf-8")  # must not raise


# --- GO / INFO payloads ---------------------------------------------------------------


def test_parse_info_request_roundtrip() -> None:
    req = p.parse_info_request(info_payload("disk-ä".encode(), [3, 1, 2]))
    assert req == p.InfoRequest("disk-ä", (3, 1, 2))


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x00\x00\x00",
        struct.pack(">I", 10) + b"abc" + b"\x00\x00",  # name longer than payload
        info_payload(b"x", [1])[:-1],  # one byte short
        info_payload(b"x", [1]) + b"\x00",  # one byte too many
        struct.pack(">I", 0) + struct.pack(">H", 5),  # says 5 infos, has none
        info_payload(b"\xff\xfe", []),  # not UTF-8
        info_payload(b"a" * (p.MAX_NAME + 1), []),
    ],
)
def test_parse_info_request_rejects(payload: bytes) -> None:
    with pytest.raises(p.MalformedError):
        p.parse_info_request(payload)


@given(st.binary(max_size=64))
def test_parse_info_request_never_raises_anything_else(data: bytes) -> None:
    try:
        req = p.parse_info_request(data)
    except p.MalformedError:
        return
    # Whatever parses must re-encode to exactly the input.
    assert info_payload(req.name.encode(), list(req.infos)) == data


# --- option decisions -----------------------------------------------------------------


def test_go_default_export_sends_export_info_and_requested_items() -> None:
    ctx = p.Negotiation(EXPORTS)
    out = p.answer_option(
        p.OPT_GO, info_payload(b"", [p.INFO_BLOCK_SIZE, p.INFO_NAME, p.INFO_NAME]), ctx
    )
    assert out.next is p.Next.TRANSMISSION and out.export is EXPORTS[""]
    replies = split_replies(out.reply)
    assert [r[1] for r in replies] == [p.REP_INFO, p.REP_INFO, p.REP_INFO, p.REP_ACK]
    assert all(r[0] == p.OPT_GO for r in replies)
    info_type, size, tflags = struct.unpack(">HQH", replies[0][2])
    assert (info_type, size) == (p.INFO_EXPORT, 1 << 20)
    assert tflags == p.transmission_flags(False, False)
    assert struct.unpack(">HIII", replies[1][2]) == (p.INFO_BLOCK_SIZE, 1, 4096, 32 << 20)
    assert replies[2][2] == struct.pack(">H", p.INFO_NAME)  # name "" (sent once)


def test_info_does_not_enter_transmission_and_skips_unrequested_items() -> None:
    out = p.answer_option(
        p.OPT_INFO, info_payload(b"ro", [p.INFO_DESCRIPTION, 999]), p.Negotiation(EXPORTS)
    )
    assert out.next is p.Next.OPTIONS
    replies = split_replies(out.reply)
    # "ro" has no description: only the mandatory NBD_INFO_EXPORT, then ACK.
    assert [r[1] for r in replies] == [p.REP_INFO, p.REP_ACK]


@pytest.mark.parametrize("option", [p.OPT_GO, p.OPT_INFO])
def test_unknown_export_and_bad_payload(option: int) -> None:
    ctx = p.Negotiation({"only": Facts("only", 512)})
    unknown = p.answer_option(option, info_payload(b"", []), ctx)  # no default export
    assert split_replies(unknown.reply)[0][1] == p.REP_ERR_UNKNOWN
    assert unknown.next is p.Next.OPTIONS
    bad = p.answer_option(option, b"\x00\x00\x00\x09abc", ctx)
    assert split_replies(bad.reply)[0][1] == p.REP_ERR_INVALID
    assert bad.next is p.Next.OPTIONS


def test_export_name_known_unknown_and_malformed() -> None:
    ctx = p.Negotiation(EXPORTS, no_zeroes=True)
    out = p.answer_option(p.OPT_EXPORT_NAME, b"ro", ctx)
    assert out.next is p.Next.TRANSMISSION
    assert out.reply == struct.pack(">QH", 4096, p.transmission_flags(True, False))
    assert p.answer_option(p.OPT_EXPORT_NAME, b"nope", ctx).next is p.Next.DROP
    assert p.answer_option(p.OPT_EXPORT_NAME, b"\xff", ctx).next is p.Next.DROP


def test_list_names_every_export_and_refuses_data() -> None:
    out = p.answer_option(p.OPT_LIST, b"", p.Negotiation(EXPORTS))
    replies = split_replies(out.reply)
    assert [r[1] for r in replies] == [p.REP_SERVER, p.REP_SERVER, p.REP_ACK]
    entries = []
    for _, _, payload in replies[:2]:
        (n,) = struct.unpack_from(">I", payload)
        entries.append((payload[4 : 4 + n].decode(), payload[4 + n :].decode()))
    assert entries == [("", "default"), ("ro", "")]
    refused = p.answer_option(p.OPT_LIST, b"x", p.Negotiation(EXPORTS))
    assert split_replies(refused.reply)[0][1] == p.REP_ERR_INVALID


def test_unknown_options_are_unsupported_not_fatal() -> None:
    for option in (0, 4, 11, 0xFFFFFFFF):  # 8-10: test_nbd_structured_options.py
        out = p.answer_option(option, b"junk", p.Negotiation(EXPORTS))
        assert out.next is p.Next.OPTIONS
        assert split_replies(out.reply) == [
            (option, p.REP_ERR_UNSUP, f"option {option} is not supported".encode())
        ]


def test_abort_acks_then_closes() -> None:
    out = p.answer_option(p.OPT_ABORT, b"", p.Negotiation(EXPORTS, tls_required=True))
    assert out.next is p.Next.CLOSE
    assert split_replies(out.reply) == [(p.OPT_ABORT, p.REP_ACK, b"")]


def test_starttls_decisions() -> None:
    def kind(ctx: p.Negotiation, data: bytes = b"") -> tuple[p.Next, int]:
        out = p.answer_option(p.OPT_STARTTLS, data, ctx)
        return out.next, split_replies(out.reply)[0][1]

    assert kind(p.Negotiation(EXPORTS)) == (p.Next.OPTIONS, p.REP_ERR_UNSUP)
    tls = p.Negotiation(EXPORTS, tls_configured=True)
    assert kind(tls) == (p.Next.STARTTLS, p.REP_ACK)
    assert kind(tls, b"x") == (p.Next.OPTIONS, p.REP_ERR_INVALID)
    active = p.Negotiation(EXPORTS, tls_configured=True, tls_active=True)
    assert kind(active) == (p.Next.OPTIONS, p.REP_ERR_INVALID)


def test_tls_required_refuses_everything_before_tls() -> None:
    before = p.Negotiation(EXPORTS, tls_configured=True, tls_required=True)
    for option in (p.OPT_LIST, p.OPT_GO, p.OPT_INFO, p.OPT_STRUCTURED_REPLY, 77):
        out = p.answer_option(option, info_payload(b"", []), before)
        assert out.next is p.Next.OPTIONS
        assert split_replies(out.reply)[0][:2] == (option, p.REP_ERR_TLS_REQD)
    assert p.answer_option(p.OPT_EXPORT_NAME, b"", before).next is p.Next.DROP
    after = p.Negotiation(EXPORTS, tls_configured=True, tls_required=True, tls_active=True)
    assert p.answer_option(p.OPT_GO, info_payload(b"", []), after).next is p.Next.TRANSMISSION


# --- request validation ---------------------------------------------------------------

SIZE = 1 << 20


@pytest.mark.parametrize(
    ("cmd", "flags", "offset", "length", "read_only", "expected"),
    [
        (p.CMD_READ, 0, 0, 4096, False, 0),
        (p.CMD_READ, p.CMD_FLAG_FUA, 0, 4096, False, 0),  # FUA on read: ignored
        (p.CMD_READ, 0, SIZE - 1, 1, True, 0),
        (p.CMD_READ, 0, SIZE - 1, 2, False, p.EINVAL),  # straddles the end
        (p.CMD_READ, 0, SIZE, 1, False, p.EINVAL),
        (p.CMD_READ, 0, 2**64 - 1, 512, False, p.EINVAL),
        (p.CMD_READ, 0, 0, 0, False, p.EINVAL),
        (p.CMD_READ, 0, 0, p.MAX_PAYLOAD + 1, False, p.EINVAL),
        (p.CMD_READ, p.CMD_FLAG_NO_HOLE, 0, 1, False, p.EINVAL),
        (p.CMD_READ, p.CMD_FLAG_DF, 0, 1, False, p.EINVAL),  # no structured replies
        (p.CMD_READ, 1 << 15, 0, 1, False, p.EINVAL),
        (p.CMD_WRITE, p.CMD_FLAG_FUA, 0, 512, False, 0),
        (p.CMD_WRITE, 0, SIZE, 512, False, p.ENOSPC),
        (p.CMD_WRITE, 0, 0, 0, False, p.ENOSPC),
        (p.CMD_WRITE, 0, 0, 512, True, p.EPERM),
        (p.CMD_WRITE, 0, SIZE, 512, True, p.EPERM),  # read-only wins over range
        (p.CMD_WRITE, 0, 0, p.MAX_PAYLOAD + 1, False, p.EINVAL),
        (p.CMD_WRITE_ZEROES, p.CMD_FLAG_NO_HOLE | p.CMD_FLAG_FUA, 0, SIZE, False, 0),
        (p.CMD_WRITE_ZEROES, 0, 1, SIZE, False, p.ENOSPC),
        (p.CMD_WRITE_ZEROES, p.CMD_FLAG_FAST_ZERO, 0, 1, False, p.EINVAL),  # not offered
        (p.CMD_WRITE_ZEROES, 0, 0, 1, True, p.EPERM),
        (p.CMD_TRIM, 0, 0, SIZE, False, 0),
        (p.CMD_TRIM, 0, 0, SIZE + 1, False, p.EINVAL),
        (p.CMD_TRIM, p.CMD_FLAG_NO_HOLE, 0, 1, False, p.EINVAL),
        (p.CMD_TRIM, 0, 0, 1, True, p.EPERM),
        (p.CMD_FLUSH, 0, 0, 0, True, 0),
        (p.CMD_FLUSH, p.CMD_FLAG_FUA, 0, 0, False, 0),
        (p.CMD_FLUSH, 0, 1, 0, False, p.EINVAL),
        (p.CMD_FLUSH, 0, 0, 1, False, p.EINVAL),
        (p.CMD_CACHE, 0, 0, 1, False, p.EINVAL),  # not advertised
        (p.CMD_BLOCK_STATUS, 0, 0, 1, False, p.EINVAL),
        (99, 0, 0, 1, False, p.EINVAL),
        (p.CMD_DISC, 0, 0, 0, False, 0),
    ],
)
def test_check_request(
    cmd: int, flags: int, offset: int, length: int, read_only: bool, expected: int
) -> None:
    assert p.check_request(cmd, flags, offset, length, SIZE, read_only) == expected


@given(
    cmd=st.sampled_from([p.CMD_READ, p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES]),
    offset=st.integers(0, 2**64 - 1),
    length=st.integers(0, 2**32 - 1),
    size=st.integers(0, 2**63),
)
def test_check_request_accepts_exactly_the_ranges_inside(
    cmd: int, offset: int, length: int, size: int
) -> None:
    err = p.check_request(cmd, 0, offset, length, size, read_only=False)
    fits = length > 0 and offset + length <= size
    if cmd in (p.CMD_READ, p.CMD_WRITE):
        fits = fits and length <= p.MAX_PAYLOAD
    assert (err == 0) == fits
