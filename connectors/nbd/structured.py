"""Structured reply chunks and the block-status rules, pure (no I/O).

A chunk is ``u32 magic, u16 flags, u16 type, u64 cookie, u32 length, payload``; the last
chunk of a reply carries NBD_REPLY_FLAG_DONE. What the transmission phase sends with
them (``transmission.py``):

- READ: one content chunk per run of the export's allocation, OFFSET_HOLE for a hole
  (nothing is read or sent for it: what makes sparse reads cost nothing), OFFSET_DATA for
  data; one OFFSET_DATA for the whole range under NBD_CMD_FLAG_DF or from an export that
  cannot tell holes. A failed read after earlier runs sent them as content chunks and
  ends with ERROR_OFFSET at the failing run; an error before any byte is one ERROR chunk.
- BLOCK_STATUS: one BLOCK_STATUS chunk for ``base:allocation``, the export's extents
  checked and clipped by ``status_extents``.
- every other error of a structured connection: an ERROR chunk with the message; other
  successes stay simple replies (the protocol allows it; it is the write path's cost).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

from connectors.nbd import protocol as p

CHUNK_HEADER = struct.Struct(">IHH8sI")  # magic, flags, type, cookie, payload length
_DATA_HEAD = struct.Struct(">IHH8sIQ")  # the same, then OFFSET_DATA's offset: one pack per read
_OFFSET = struct.Struct(">Q")
_HOLE = struct.Struct(">QI")
_ERROR = struct.Struct(">IH")
_DESCRIPTOR = struct.Struct(">II")
_U32 = struct.Struct(">I")
STATUS_FLAGS = p.STATE_HOLE | p.STATE_ZERO  # base:allocation defines no others
MAX_MESSAGE = 4096  # the protocol's string limit, for error messages


class ExtentsError(ValueError):
    """An export answered ``extents`` with something that is not a prefix of the range
    (empty, a zero or negative length): a bug in the export, answered EIO."""


def chunk(flags: int, rtype: int, cookie: bytes, payload: bytes = b"") -> bytes:
    return CHUNK_HEADER.pack(p.STRUCTURED_REPLY_MAGIC, flags, rtype, cookie, len(payload)) + payload


def data_header(done: bool, cookie: bytes, offset: int, length: int) -> bytes:
    """OFFSET_DATA up to its data: the caller appends ``length`` bytes (no copy here)."""
    flags = p.REPLY_FLAG_DONE if done else 0
    return _DATA_HEAD.pack(
        p.STRUCTURED_REPLY_MAGIC, flags, p.REPLY_TYPE_OFFSET_DATA, cookie, 8 + length, offset
    )


def hole(done: bool, cookie: bytes, offset: int, length: int) -> bytes:
    flags = p.REPLY_FLAG_DONE if done else 0
    return chunk(flags, p.REPLY_TYPE_OFFSET_HOLE, cookie, _HOLE.pack(offset, length))


def none(cookie: bytes) -> bytes:
    return chunk(p.REPLY_FLAG_DONE, p.REPLY_TYPE_NONE, cookie)


def error(cookie: bytes, code: int, message: str) -> bytes:
    """The last chunk of a failed reply: the error and a message a client can show."""
    text = _message(message)
    return chunk(p.REPLY_FLAG_DONE, p.REPLY_TYPE_ERROR, cookie, _ERROR.pack(code, len(text)) + text)


def error_offset(cookie: bytes, code: int, message: str, offset: int) -> bytes:
    """The last chunk of a read that failed at ``offset`` after earlier content."""
    text = _message(message)
    payload = _ERROR.pack(code, len(text)) + text + _OFFSET.pack(offset)
    return chunk(p.REPLY_FLAG_DONE, p.REPLY_TYPE_ERROR_OFFSET, cookie, payload)


def block_status(cookie: bytes, context_id: int, extents: Sequence[tuple[int, int]]) -> bytes:
    payload = _U32.pack(context_id) + b"".join(_DESCRIPTOR.pack(n, f) for n, f in extents)
    return chunk(p.REPLY_FLAG_DONE, p.REPLY_TYPE_BLOCK_STATUS, cookie, payload)


def _message(message: str) -> bytes:
    raw = message.encode()
    if len(raw) <= MAX_MESSAGE:
        return raw
    return raw[:MAX_MESSAGE].decode("utf-8", errors="ignore").encode()


def status_extents(
    extents: Iterable[tuple[int, int]], length: int, req_one: bool
) -> list[tuple[int, int]]:
    """What a BLOCK_STATUS chunk may say of ``extents`` an export gave for a range of
    ``length`` bytes: a nonempty prefix of the range and never past it (so never past
    the export's end, which the range was checked against), flags reduced to HOLE|ZERO,
    neighbours with equal flags merged, one extent under REQ_ONE, at most MAX_EXTENTS.
    Raises ``ExtentsError`` when the export's answer is not a prefix of the range."""
    out: list[tuple[int, int]] = []
    covered = 0
    for n, flags in extents:
        if covered >= length:
            break
        if n <= 0:
            raise ExtentsError(f"extent of length {n} at +{covered}")
        n = min(n, length - covered)
        flags &= STATUS_FLAGS
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + n, flags)
        elif (req_one and out) or len(out) == p.MAX_EXTENTS:
            break
        else:
            out.append((n, flags))
        covered += n
    if not out:
        raise ExtentsError("no extent at all")
    return out


def read_runs(
    extents: Sequence[tuple[int, int]], offset: int, length: int
) -> list[tuple[int, int, bool]]:
    """``(offset, length, is_hole)`` content chunks covering exactly the read's range:
    the export's extents (holes are those flagged ZERO: they read as zeroes) merged and
    clipped, and data for whatever they leave uncovered at the end."""
    if extents and extents[0][0] >= length:  # the usual answer: one run covers the read
        return [(offset, length, bool(extents[0][1] & p.STATE_ZERO))]
    out: list[tuple[int, int, bool]] = []
    pos, end = offset, offset + length
    for n, flags in extents:
        if n <= 0:
            raise ExtentsError(f"extent of length {n} at {pos}")
        if pos >= end:
            break
        n = min(n, end - pos)
        zero = bool(flags & p.STATE_ZERO)
        if out and out[-1][2] == zero:
            start, m, _ = out[-1]
            out[-1] = (start, m + n, zero)
        else:
            out.append((pos, n, zero))
        pos += n
    if pos < end:
        if out and not out[-1][2]:
            start, m, _ = out[-1]
            out[-1] = (start, m + end - pos, False)
        else:
            out.append((pos, end - pos, False))
    return out
