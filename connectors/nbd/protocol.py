"""NBD wire format: constants, struct layouts and pure parsing/encoding.

Follows the fixed-newstyle protocol of NetworkBlockDevice/nbd ``doc/proto.md``. No I/O
here: the server (``server.py``) feeds bytes in and writes the bytes these functions
return. Values are network byte order (big-endian) throughout.

Handshake (server first)::

    S: NBDMAGIC  IHAVEOPT  u16 handshake-flags
    C: u32 client-flags
    C: IHAVEOPT  u32 option  u32 length  <data>            (repeated)
    S: REPLY_MAGIC  u32 option  u32 reply-type  u32 length  <data>

Transmission::

    C: u32 REQUEST_MAGIC  u16 flags  u16 type  u64 cookie  u64 offset  u32 length  [payload]
    S: u32 SIMPLE_REPLY_MAGIC  u32 error  u64 cookie  [read data]
    S: u32 STRUCTURED_REPLY_MAGIC  u16 flags  u16 type  u64 cookie  u32 length  <payload>

Structured replies (chunks, ``structured.py``) are sent only to a client that negotiated
NBD_OPT_STRUCTURED_REPLY; a client that selected ``base:allocation`` with
NBD_OPT_SET_META_CONTEXT for the export it then enters may send NBD_CMD_BLOCK_STATUS.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

# --- handshake -------------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9

FLAG_FIXED_NEWSTYLE = 1 << 0  # handshake flags (server)
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0  # client flags
FLAG_C_NO_ZEROES = 1 << 1
KNOWN_CLIENT_FLAGS = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
_REP_ERR = 1 << 31
REP_ERR_UNSUP = _REP_ERR | 1
REP_ERR_POLICY = _REP_ERR | 2
REP_ERR_INVALID = _REP_ERR | 3
REP_ERR_PLATFORM = _REP_ERR | 4
REP_ERR_TLS_REQD = _REP_ERR | 5
REP_ERR_UNKNOWN = _REP_ERR | 6
REP_ERR_SHUTDOWN = _REP_ERR | 7
REP_ERR_BLOCK_SIZE_REQD = _REP_ERR | 8
REP_ERR_TOO_BIG = _REP_ERR | 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# --- transmission ----------------------------------------------------------------------

TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_ROTATIONAL = 1 << 4
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_SEND_DF = 1 << 7
TFLAG_CAN_MULTI_CONN = 1 << 8

REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

REPLY_FLAG_DONE = 1 << 0  # the last chunk of a structured reply
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

BASE_ALLOCATION = "base:allocation"  # the one metadata context we serve
STATE_HOLE = 1 << 0  # base:allocation: not allocated
STATE_ZERO = 1 << 1  # base:allocation: reads as zeroes
MAX_EXTENTS = 1 << 20  # the protocol's SHOULD-limit of descriptors in one chunk

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_RESIZE = 8
COMMAND_NAMES = {
    CMD_READ: "read",
    CMD_WRITE: "write",
    CMD_DISC: "disc",
    CMD_FLUSH: "flush",
    CMD_TRIM: "trim",
    CMD_CACHE: "cache",
    CMD_WRITE_ZEROES: "write_zeroes",
    CMD_BLOCK_STATUS: "block_status",
    CMD_RESIZE: "resize",
}

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# NBD's own errno values: the protocol fixes them, independent of the host's errno.
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108
ERROR_NAMES = {
    0: "ok",
    EPERM: "EPERM",
    EIO: "EIO",
    ENOMEM: "ENOMEM",
    EINVAL: "EINVAL",
    ENOSPC: "ENOSPC",
    EOVERFLOW: "EOVERFLOW",
    ENOTSUP: "ENOTSUP",
    ESHUTDOWN: "ESHUTDOWN",
}

# --- limits ----------------------------------------------------------------------------

MIN_BLOCK_SIZE = 1
PREFERRED_BLOCK_SIZE = 4096
MAX_PAYLOAD = 32 * 1024 * 1024  # largest READ/WRITE we serve; advertised as max block size
MAX_NAME = 4096  # the protocol's limit on export names and descriptions
MAX_OPTION_DATA = 16 * 1024  # no option we know needs more; longer ones close the connection

# --- struct layouts --------------------------------------------------------------------

GREETING = struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY_HEADER = struct.Struct(">QIII")  # magic, option, reply type, length
# The cookie stays 8 opaque bytes: the server only echoes it back.
REQUEST_HEADER = struct.Struct(">IHH8sQI")  # magic, flags, type, cookie, offset, length
REQUEST_SIZE = REQUEST_HEADER.size  # 28
SIMPLE_REPLY = struct.Struct(">II8s")  # magic, error, cookie
#: reply prefix for success: magic + error 0; the cookie follows
SIMPLE_REPLY_OK = struct.pack(">II", SIMPLE_REPLY_MAGIC, 0)
_EXPORT_NAME_REPLY = struct.Struct(">QH")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


class MalformedError(ValueError):
    """Bytes from a peer that break the protocol. Internal to connectors.nbd: the server
    turns it into NBD_REP_ERR_INVALID or a closed connection, it never escapes."""


# --- handshake helpers -----------------------------------------------------------------


def option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply_type, len(data)) + data


def option_error(option: int, reply_type: int, message: str) -> bytes:
    """An error reply; the protocol lets it carry a UTF-8 message clients may show."""
    return option_reply(option, reply_type, _utf8_prefix(message, MAX_NAME))


def transmission_flags(read_only: bool, can_multi_conn: bool, structured: bool = False) -> int:
    """Capabilities of one export. A read-only export advertises no write-side features
    (FUA, TRIM, WRITE_ZEROES), like nbdkit -r; FLUSH stays, it is harmless. DF (one
    content chunk per read) only means something with structured replies, so it is
    advertised only to a client that negotiated them, as nbdkit does."""
    flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH
    if structured:
        flags |= TFLAG_SEND_DF
    if read_only:
        flags |= TFLAG_READ_ONLY
    else:
        flags |= TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES
    if can_multi_conn:
        flags |= TFLAG_CAN_MULTI_CONN
    return flags


def export_name_reply(size: int, tflags: int, no_zeroes: bool) -> bytes:
    """Reply to NBD_OPT_EXPORT_NAME (the old way in): size, flags, 124 zeroes unless the
    client negotiated NO_ZEROES."""
    return _EXPORT_NAME_REPLY.pack(size, tflags) + (b"" if no_zeroes else bytes(124))


def info_export(size: int, tflags: int) -> bytes:
    return _INFO_EXPORT.pack(INFO_EXPORT, size, tflags)


def info_name(name: str) -> bytes:
    return _U16.pack(INFO_NAME) + name.encode()


def info_description(description: str) -> bytes:
    return _U16.pack(INFO_DESCRIPTION) + _utf8_prefix(description, MAX_NAME)


def info_block_size(
    minimum: int = MIN_BLOCK_SIZE, preferred: int = PREFERRED_BLOCK_SIZE, maximum: int = MAX_PAYLOAD
) -> bytes:
    return _INFO_BLOCK_SIZE.pack(INFO_BLOCK_SIZE, minimum, preferred, maximum)


def server_entry(name: str, description: str) -> bytes:
    """Payload of one NBD_REP_SERVER in a LIST reply: u32 name length, name, then free
    text (nbdinfo --list shows it as the description)."""
    raw = name.encode()
    return _U32.pack(len(raw)) + raw + _utf8_prefix(description, MAX_NAME)


def _utf8_prefix(text: str, limit: int) -> bytes:
    """At most ``limit`` bytes of ``text`` as UTF-8, never cutting a character in two."""
    raw = text.encode()
    if len(raw) <= limit:
        return raw
    return raw[:limit].decode("utf-8", errors="ignore").encode()


@dataclass(frozen=True, slots=True)
class InfoRequest:
    """The payload of NBD_OPT_INFO / NBD_OPT_GO."""

    name: str
    infos: tuple[int, ...]


def parse_info_request(data: bytes) -> InfoRequest:
    """Parse ``u32 namelen, name, u16 n, n * u16`` and insist the lengths add up."""
    if len(data) < 6:
        raise MalformedError(f"option payload of {len(data)} bytes is shorter than 6")
    (name_len,) = _U32.unpack_from(data, 0)
    if name_len > MAX_NAME or 4 + name_len + 2 > len(data):
        raise MalformedError(f"export name length {name_len} does not fit the option")
    (count,) = _U16.unpack_from(data, 4 + name_len)
    end = 4 + name_len + 2 + 2 * count
    if end != len(data):
        raise MalformedError(f"option payload is {len(data)} bytes, its fields say {end}")
    name = decode_name(data[4 : 4 + name_len])
    infos = struct.unpack_from(f">{count}H", data, 4 + name_len + 2)
    return InfoRequest(name, infos)


def decode_name(raw: bytes) -> str:
    if len(raw) > MAX_NAME:
        raise MalformedError(f"export name of {len(raw)} bytes exceeds {MAX_NAME}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedError("export name is not UTF-8") from None


# --- option negotiation (the handshake's decisions, without the socket) ----------------


class ExportFacts(Protocol):
    """What the handshake needs to know about an export."""

    name: str
    read_only: bool
    can_multi_conn: bool

    @property
    def description(self) -> str: ...  # may change while served (an access state)

    @property
    def size(self) -> int: ...


class Next(enum.Enum):
    """What the connection does after answering an option."""

    OPTIONS = "options"  # wait for the next option
    TRANSMISSION = "transmission"  # serve ``OptionOutcome.export``
    STARTTLS = "starttls"  # upgrade to TLS, then more options
    CLOSE = "close"  # the client asked to end (NBD_OPT_ABORT)
    DROP = "drop"  # protocol violation with no possible reply: disconnect


@dataclass(frozen=True, slots=True)
class MetaSelection:
    """What NBD_OPT_SET_META_CONTEXT selected: ``base:allocation`` of one export, under
    an id. It counts only if the client then enters that very export."""

    export: str
    context_id: int


#: ``OptionOutcome.meta`` when the option did not touch the selection
KEEP_META = MetaSelection("", 0)


@dataclass(frozen=True, slots=True)
class OptionOutcome:
    reply: bytes  # write this first (may be empty)
    next: Next
    export: ExportFacts | None = None  # with Next.TRANSMISSION
    problem: str = ""  # why an error reply or a DROP, for the log
    structured: bool = False  # this option negotiated structured replies
    # SET_META_CONTEXT replaces the selection, also when it fails (None: nothing selected)
    meta: MetaSelection | None = KEEP_META


@dataclass(frozen=True, slots=True)
class Negotiation:
    """The handshake's context: what is served, where TLS stands, what was negotiated."""

    exports: Mapping[str, ExportFacts]
    no_zeroes: bool = False  # the client set NBD_FLAG_C_NO_ZEROES
    tls_configured: bool = False
    tls_required: bool = False
    tls_active: bool = False
    structured: bool = False  # NBD_OPT_STRUCTURED_REPLY was acknowledged
    # server switches (NbdServerConfig): off, the option is answered NBD_REP_ERR_UNSUP
    structured_enabled: bool = True
    block_status_enabled: bool = True
    next_context_id: int = 1  # the id a SET_META_CONTEXT that selects gives


def answer_option(option: int, data: bytes, ctx: Negotiation) -> OptionOutcome:
    """Decide the reply to one option. Pure: the server writes ``reply`` and follows
    ``next``."""
    if option == OPT_ABORT:
        return OptionOutcome(option_reply(option, REP_ACK), Next.CLOSE)
    if ctx.tls_required and not ctx.tls_active and option != OPT_STARTTLS:
        if option == OPT_EXPORT_NAME:  # it has no error reply
            return OptionOutcome(b"", Next.DROP, problem="NBD_OPT_EXPORT_NAME before TLS")
        return _refuse(option, REP_ERR_TLS_REQD, "this server requires TLS: send STARTTLS")
    if option == OPT_EXPORT_NAME:
        return _export_name(data, ctx)
    if option in (OPT_GO, OPT_INFO):
        return _info(option, data, ctx)
    if option == OPT_LIST:
        if data:
            return _refuse(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
        replies = [
            option_reply(option, REP_SERVER, server_entry(name, export.description))
            for name, export in ctx.exports.items()
        ]
        replies.append(option_reply(option, REP_ACK))
        return OptionOutcome(b"".join(replies), Next.OPTIONS)
    if option == OPT_STARTTLS:
        if not ctx.tls_configured:
            return _refuse(option, REP_ERR_UNSUP, "TLS is not configured on this server")
        if ctx.tls_active:
            return _refuse(option, REP_ERR_INVALID, "TLS is already active")
        if data:
            return _refuse(option, REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
        return OptionOutcome(option_reply(option, REP_ACK), Next.STARTTLS)
    if option == OPT_STRUCTURED_REPLY:
        if not ctx.structured_enabled:
            return _refuse(option, REP_ERR_UNSUP, "structured replies are off on this server")
        if data:
            return _refuse(option, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
        # A repeat is acknowledged again: the state asked for is the state we are in.
        return OptionOutcome(option_reply(option, REP_ACK), Next.OPTIONS, structured=True)
    if option in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
        return _meta_context(option, data, ctx)
    return _refuse(option, REP_ERR_UNSUP, f"option {option} is not supported")


def _refuse(option: int, reply_type: int, problem: str) -> OptionOutcome:
    return OptionOutcome(option_error(option, reply_type, problem), Next.OPTIONS, problem=problem)


def _export_name(data: bytes, ctx: Negotiation) -> OptionOutcome:
    try:
        name = decode_name(data)
    except MalformedError as exc:
        return OptionOutcome(b"", Next.DROP, problem=f"NBD_OPT_EXPORT_NAME: {exc}")
    export = ctx.exports.get(name)
    if export is None:
        # The old way in has no error reply: the protocol says disconnect.
        return OptionOutcome(
            b"", Next.DROP, problem=f"NBD_OPT_EXPORT_NAME {name!r}: no such export"
        )
    tflags = transmission_flags(export.read_only, export.can_multi_conn, ctx.structured)
    reply = export_name_reply(export.size, tflags, ctx.no_zeroes)
    return OptionOutcome(reply, Next.TRANSMISSION, export)


def _info(option: int, data: bytes, ctx: Negotiation) -> OptionOutcome:
    try:
        request = parse_info_request(data)
    except MalformedError as exc:
        return _refuse(option, REP_ERR_INVALID, str(exc))
    export = ctx.exports.get(request.name)
    if export is None:
        return _refuse(option, REP_ERR_UNKNOWN, f"no export named {request.name!r}")
    tflags = transmission_flags(export.read_only, export.can_multi_conn, ctx.structured)
    replies = [option_reply(option, REP_INFO, info_export(export.size, tflags))]
    # Only what was asked for, once each: NBD_INFO_EXPORT is always sent.
    for info in dict.fromkeys(request.infos):
        if info == INFO_NAME:
            replies.append(option_reply(option, REP_INFO, info_name(export.name)))
        elif info == INFO_DESCRIPTION and export.description:
            replies.append(option_reply(option, REP_INFO, info_description(export.description)))
        elif info == INFO_BLOCK_SIZE:
            replies.append(option_reply(option, REP_INFO, info_block_size()))
    replies.append(option_reply(option, REP_ACK))
    if option == OPT_GO:
        return OptionOutcome(b"".join(replies), Next.TRANSMISSION, export)
    return OptionOutcome(b"".join(replies), Next.OPTIONS)


# --- metadata contexts -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MetaRequest:
    """The payload of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT."""

    name: str
    queries: tuple[str, ...]


def parse_meta_request(data: bytes) -> MetaRequest:
    """Parse ``u32 namelen, name, u32 n, n * (u32 len, query)``; every length must fit
    and they must add up to the payload exactly."""
    if len(data) < 8:
        raise MalformedError(f"meta context payload of {len(data)} bytes is shorter than 8")
    (name_len,) = _U32.unpack_from(data, 0)
    if name_len > MAX_NAME or 4 + name_len + 4 > len(data):
        raise MalformedError(f"export name length {name_len} does not fit the option")
    name = decode_name(data[4 : 4 + name_len])
    pos = 4 + name_len
    (count,) = _U32.unpack_from(data, pos)
    pos += 4
    if count > (len(data) - pos) // 4:  # each query needs at least its length field
        raise MalformedError(f"{count} queries cannot fit in {len(data) - pos} bytes")
    queries = []
    for i in range(count):
        if pos + 4 > len(data):
            raise MalformedError(f"query {i} has no length field")
        (qlen,) = _U32.unpack_from(data, pos)
        pos += 4
        if qlen > MAX_NAME or pos + qlen > len(data):
            raise MalformedError(f"query {i} of {qlen} bytes does not fit the option")
        try:
            queries.append(data[pos : pos + qlen].decode("utf-8"))
        except UnicodeDecodeError:
            raise MalformedError(f"query {i} is not UTF-8") from None
        pos += qlen
    if pos != len(data):
        raise MalformedError(f"option payload is {len(data)} bytes, its fields say {pos}")
    return MetaRequest(name, tuple(queries))


def meta_context_reply(option: int, context_id: int, name: str) -> bytes:
    return option_reply(option, REP_META_CONTEXT, _U32.pack(context_id) + name.encode())


def _meta_context(option: int, data: bytes, ctx: Negotiation) -> OptionOutcome:
    """LIST answers which contexts a query matches (ids 0); SET replaces the selection,
    also when it fails, and selects ``base:allocation`` only by its full name ("base:"
    is a LIST wildcard, SET must ignore it; unknown namespaces and leaves are ignored)."""
    is_set = option == OPT_SET_META_CONTEXT
    cleared = None if is_set else KEEP_META

    def refuse(reply_type: int, problem: str) -> OptionOutcome:
        return OptionOutcome(
            option_error(option, reply_type, problem), Next.OPTIONS, problem=problem, meta=cleared
        )

    if not (ctx.structured_enabled and ctx.block_status_enabled):
        return refuse(REP_ERR_UNSUP, "metadata contexts (block status) are off on this server")
    if not ctx.structured:
        return refuse(REP_ERR_INVALID, "negotiate NBD_OPT_STRUCTURED_REPLY first")
    try:
        request = parse_meta_request(data)
    except MalformedError as exc:
        return refuse(REP_ERR_INVALID, str(exc))
    if request.name not in ctx.exports:
        return refuse(REP_ERR_UNKNOWN, f"no export named {request.name!r}")
    for query in request.queries:
        if ":" not in query:
            return refuse(REP_ERR_INVALID, f"query {query[:80]!r} has no namespace (ns:leaf)")
    if is_set:
        if BASE_ALLOCATION not in request.queries:
            return OptionOutcome(option_reply(option, REP_ACK), Next.OPTIONS, meta=None)
        selection = MetaSelection(request.name, ctx.next_context_id)
        reply = meta_context_reply(option, selection.context_id, BASE_ALLOCATION)
        return OptionOutcome(reply + option_reply(option, REP_ACK), Next.OPTIONS, meta=selection)
    listed = not request.queries or any(q in ("base:", BASE_ALLOCATION) for q in request.queries)
    reply = meta_context_reply(option, 0, BASE_ALLOCATION) if listed else b""
    return OptionOutcome(reply + option_reply(option, REP_ACK), Next.OPTIONS)


# --- transmission helpers --------------------------------------------------------------

_FLAGS_ALLOWED = {
    CMD_READ: CMD_FLAG_FUA | CMD_FLAG_DF,  # FUA: meaningless but harmless, ignored
    CMD_BLOCK_STATUS: CMD_FLAG_REQ_ONE,
    CMD_WRITE: CMD_FLAG_FUA,
    CMD_FLUSH: CMD_FLAG_FUA,
    CMD_TRIM: CMD_FLAG_FUA,
    CMD_WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
    CMD_DISC: CMD_FLAG_FUA,
}
_RANGE_COMMANDS = (CMD_READ, CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES)
_WRITING_COMMANDS = (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES)


def check_request(
    cmd: int,
    flags: int,
    offset: int,
    length: int,
    size: int,
    read_only: bool,
    structured: bool = False,
    block_status: bool = False,
) -> int:
    """The NBD error a request earns before the export sees it; 0 when it is valid.

    Codes follow nbdkit, the reference server clients are tested against: unknown
    command or flag, FLUSH with an offset or length, READ/WRITE over MAX_PAYLOAD ->
    EINVAL; a write-side command on a read-only export -> EPERM; a range past the end
    (or empty) -> ENOSPC for the commands that write data (the protocol's SHOULD) and
    EINVAL for the others. DF needs ``structured`` replies (only then is it advertised),
    BLOCK_STATUS a selected metadata context (``block_status``), else EINVAL.
    """
    allowed = _FLAGS_ALLOWED.get(cmd)
    if allowed is None:
        return EINVAL
    if flags & ~allowed:
        return EINVAL
    if flags & CMD_FLAG_DF and not structured:
        return EINVAL
    if cmd == CMD_BLOCK_STATUS:
        if not block_status:
            return EINVAL
        return EINVAL if length == 0 or offset + length > size else 0
    if cmd == CMD_FLUSH:
        return EINVAL if offset or length else 0
    if cmd == CMD_DISC:
        return 0
    if cmd in (CMD_READ, CMD_WRITE) and length > MAX_PAYLOAD:
        return EINVAL
    if read_only and cmd in _WRITING_COMMANDS:
        return EPERM
    # A zero length counts as out of range, as in nbdkit.
    if length == 0 or offset + length > size:
        return ENOSPC if cmd in (CMD_WRITE, CMD_WRITE_ZEROES) else EINVAL
    return 0


def simple_reply(error: int, cookie: bytes) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)
