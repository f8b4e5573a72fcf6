"""The NBD wire format: every magic number and layout, parsing and encoding, no I/O.

Values follow the protocol document of the NetworkBlockDevice project (doc/proto.md); all
integers are big-endian. The handshake's state lives in `handshake.py`; this module only turns
bytes into values and values into bytes, and decides which error a transmission request earns.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

# -- magics --------------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# -- handshake flags (server) and client flags ---------------------------------------------
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
CLIENT_FIXED_NEWSTYLE = 1 << 0
CLIENT_NO_ZEROES = 1 << 1
KNOWN_CLIENT_FLAGS = CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES

# -- options ------------------------------------------------------------------------------
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

# -- option reply types -------------------------------------------------------------------
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
_REP_ERR = 1 << 31
REP_ERR_UNSUP = _REP_ERR + 1
REP_ERR_POLICY = _REP_ERR + 2
REP_ERR_INVALID = _REP_ERR + 3
REP_ERR_PLATFORM = _REP_ERR + 4
REP_ERR_TLS_REQD = _REP_ERR + 5
REP_ERR_UNKNOWN = _REP_ERR + 6
REP_ERR_SHUTDOWN = _REP_ERR + 7
REP_ERR_BLOCK_SIZE_REQD = _REP_ERR + 8
REP_ERR_TOO_BIG = _REP_ERR + 9

# -- information types (NBD_OPT_INFO / NBD_OPT_GO) -----------------------------------------
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# -- transmission flags --------------------------------------------------------------------
TX_HAS_FLAGS = 1 << 0
TX_READ_ONLY = 1 << 1
TX_SEND_FLUSH = 1 << 2
TX_SEND_FUA = 1 << 3
TX_ROTATIONAL = 1 << 4
TX_SEND_TRIM = 1 << 5
TX_SEND_WRITE_ZEROES = 1 << 6
TX_SEND_DF = 1 << 7
TX_CAN_MULTI_CONN = 1 << 8
TX_SEND_CACHE = 1 << 10
TX_SEND_FAST_ZERO = 1 << 11

# -- commands and command flags ------------------------------------------------------------
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# -- structured replies --------------------------------------------------------------------
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# -- base:allocation ----------------------------------------------------------------------
META_BASE_ALLOCATION = "base:allocation"
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

# -- errors -------------------------------------------------------------------------------
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

# -- limits -------------------------------------------------------------------------------
MAX_STRING = 4096
"""Longest export name, query or message the protocol allows."""
MAX_PAYLOAD = 32 << 20
"""The maximum this server advertises (the protocol's portable limit) and enforces for the
commands that move data: READ, WRITE and CACHE (which fetches its range like a READ).
TRIM, WRITE_ZEROES and BLOCK_STATUS carry no payload and may be longer (docs/nbd.md)."""
MIN_BLOCK = 1
PREFERRED_BLOCK = 4096
MAX_OPTION_DATA = 64 << 10
"""Option payloads beyond this are skipped and answered NBD_REP_ERR_TOO_BIG."""

REQUEST_SIZE = 28
OPTION_HEADER_SIZE = 16
CLIENT_FLAGS_SIZE = 4

_REQUEST = struct.Struct(">IHHQQI")
_OPTION_HEADER = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_STRUCTURED = struct.Struct(">IHHQI")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")

COMMAND_NAMES = {
    CMD_READ: "READ", CMD_WRITE: "WRITE", CMD_DISC: "DISC", CMD_FLUSH: "FLUSH",
    CMD_TRIM: "TRIM", CMD_CACHE: "CACHE", CMD_WRITE_ZEROES: "WRITE_ZEROES",
    CMD_BLOCK_STATUS: "BLOCK_STATUS",
}  # fmt: skip


class ProtocolViolation(Exception):
    """The peer broke a rule that leaves no way to continue: the connection must end."""


class OptionInvalid(Exception):
    """An option's data is malformed: answered with NBD_REP_ERR_INVALID, haggling goes on."""


# -- handshake -------------------------------------------------------------------------------


def greeting() -> bytes:
    """What the server sends first: NBDMAGIC, IHAVEOPT, handshake flags."""
    flags = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
    return _U64.pack(NBDMAGIC) + _U64.pack(IHAVEOPT) + _U16.pack(flags)


def parse_client_flags(data: bytes) -> int:
    (flags,) = _U32.unpack(data)
    if flags & ~KNOWN_CLIENT_FLAGS:
        raise ProtocolViolation(f"client sent unknown flags {flags:#x}")
    return int(flags)


def parse_option_header(data: bytes) -> tuple[int, int]:
    """(option, data length) of an option request header."""
    magic, option, length = _OPTION_HEADER.unpack(data)
    if magic != IHAVEOPT:
        raise ProtocolViolation(f"option request without IHAVEOPT magic ({magic:#x})")
    return int(option), int(length)


def option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    return _OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply_type, len(data)) + data


def option_error(option: int, reply_type: int, message: str) -> bytes:
    return option_reply(option, reply_type, message.encode()[:MAX_STRING])


def server_entry(name: str, description: str) -> bytes:
    """The data of an NBD_REP_SERVER reply (one export in an NBD_OPT_LIST answer)."""
    raw = name.encode()
    return _U32.pack(len(raw)) + raw + description.encode()[:MAX_STRING]


def info_export(size: int, tx_flags: int) -> bytes:
    return _U16.pack(INFO_EXPORT) + _U64.pack(size) + _U16.pack(tx_flags)


def info_string(info_type: int, text: str) -> bytes:
    return _U16.pack(info_type) + text.encode()[:MAX_STRING]


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return _U16.pack(INFO_BLOCK_SIZE) + struct.pack(">III", minimum, preferred, maximum)


def meta_context_entry(context_id: int, name: str) -> bytes:
    return _U32.pack(context_id) + name.encode()


def export_name_reply(size: int, tx_flags: int, no_zeroes: bool) -> bytes:
    """The answer to NBD_OPT_EXPORT_NAME: size, flags and (unless NO_ZEROES) 124 zero bytes."""
    return _U64.pack(size) + _U16.pack(tx_flags) + (b"" if no_zeroes else bytes(124))


def _string(data: bytes, what: str) -> str:
    if len(data) > MAX_STRING:
        raise OptionInvalid(f"{what} is longer than {MAX_STRING} bytes")
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise OptionInvalid(f"{what} is not UTF-8") from None
    if "\0" in text:
        raise OptionInvalid(f"{what} contains a NUL character")
    return text


def parse_export_name(data: bytes) -> str:
    return _string(data, "export name")


@dataclass(frozen=True)
class InfoRequest:
    """The data of NBD_OPT_INFO and NBD_OPT_GO."""

    name: str
    info_types: tuple[int, ...]


def parse_info_request(data: bytes) -> InfoRequest:
    if len(data) < 6:
        raise OptionInvalid("option data is shorter than 6 bytes")
    (name_len,) = _U32.unpack_from(data, 0)
    if name_len > len(data) - 6:
        raise OptionInvalid("export name length runs past the option data")
    name = _string(data[4 : 4 + name_len], "export name")
    (count,) = _U16.unpack_from(data, 4 + name_len)
    rest = data[6 + name_len :]
    if len(rest) != 2 * count:
        raise OptionInvalid(f"{count} information requests announced, {len(rest)} bytes follow")
    types = struct.unpack(f">{count}H", rest)
    return InfoRequest(name, tuple(int(t) for t in types))


@dataclass(frozen=True)
class MetaContextRequest:
    """The data of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT."""

    name: str
    queries: tuple[str, ...]


def parse_meta_context_request(data: bytes) -> MetaContextRequest:
    if len(data) < 8:
        raise OptionInvalid("option data is shorter than 8 bytes")
    (name_len,) = _U32.unpack_from(data, 0)
    if name_len > len(data) - 8:
        raise OptionInvalid("export name length runs past the option data")
    name = _string(data[4 : 4 + name_len], "export name")
    pos = 4 + name_len
    (count,) = _U32.unpack_from(data, pos)
    pos += 4
    queries: list[str] = []
    for _ in range(count):
        if pos + 4 > len(data):
            raise OptionInvalid(f"{count} queries announced, fewer follow")
        (qlen,) = _U32.unpack_from(data, pos)
        pos += 4
        if pos + qlen > len(data):
            raise OptionInvalid("query length runs past the option data")
        query = _string(data[pos : pos + qlen], "query")
        if ":" not in query:
            raise OptionInvalid(f"query {query!r} has no namespace")
        queries.append(query)
        pos += qlen
    if pos != len(data):
        raise OptionInvalid("trailing bytes after the last query")
    return MetaContextRequest(name, tuple(queries))


# -- transmission ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    flags: int
    command: int
    cookie: int
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length

    def describe(self) -> str:
        name = COMMAND_NAMES.get(self.command, f"command {self.command}")
        return f"{name} offset={self.offset} length={self.length} flags={self.flags:#x}"


def parse_request(data: bytes) -> Request:
    magic, flags, command, cookie, offset, length = _REQUEST.unpack(data)
    if magic != REQUEST_MAGIC:
        # Without a valid header there is no telling where the next request starts.
        raise ProtocolViolation(f"request with bad magic {magic:#x}")
    return Request(int(flags), int(command), int(cookie), int(offset), int(length))


def encode_request(req: Request) -> bytes:
    """A request as a client sends it (for tests and tools)."""
    return _REQUEST.pack(REQUEST_MAGIC, req.flags, req.command, req.cookie, req.offset, req.length)


_ALLOWED_FLAGS = {
    CMD_READ: CMD_FLAG_DF,
    CMD_WRITE: 0,
    CMD_DISC: 0,
    CMD_FLUSH: 0,
    CMD_TRIM: 0,
    CMD_CACHE: 0,
    CMD_WRITE_ZEROES: CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
    CMD_BLOCK_STATUS: CMD_FLAG_REQ_ONE,
}
_WRITES = (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES)
_LIMITED = (CMD_READ, CMD_WRITE, CMD_CACHE)
"""Commands whose length is data to move, held to MAX_PAYLOAD."""
_TX_FOR_COMMAND = {
    CMD_FLUSH: TX_SEND_FLUSH,
    CMD_TRIM: TX_SEND_TRIM,
    CMD_WRITE_ZEROES: TX_SEND_WRITE_ZEROES,
    CMD_CACHE: TX_SEND_CACHE,
}


@dataclass(frozen=True)
class Check:
    """Why a request is refused: an NBD error and a message for people."""

    error: int
    message: str


def check_request(req: Request, size: int, tx_flags: int, has_contexts: bool) -> Check | None:
    """The error a request must be answered with before it is carried out, or None if valid.

    Checked in this order: unknown command, flags not valid for it, a command or flag the
    export did not advertise, a write to a read-only export, a length over the limit, a range
    past the end of the export. A length of 0 is valid (the request does nothing), except for
    BLOCK_STATUS: its reply must describe at least one byte, and with REQ_ONE no more than
    the request's length.
    """
    c = req.command
    allowed = _ALLOWED_FLAGS.get(c)
    if allowed is None:
        return Check(EINVAL, f"unknown command {c}")
    if tx_flags & TX_SEND_FUA:
        allowed |= CMD_FLAG_FUA  # valid on every command once advertised
    if req.flags & ~allowed:
        return Check(EINVAL, f"flags {req.flags & ~allowed:#x} are not valid for {req.describe()}")
    if (req.flags & CMD_FLAG_DF and not tx_flags & TX_SEND_DF) or (
        req.flags & CMD_FLAG_FAST_ZERO and not tx_flags & TX_SEND_FAST_ZERO
    ):
        return Check(EINVAL, f"flags of {req.describe()} were not negotiated")
    if c in _WRITES and tx_flags & TX_READ_ONLY:
        return Check(EPERM, "the export is read-only")
    if c in _TX_FOR_COMMAND and not tx_flags & _TX_FOR_COMMAND[c]:
        return Check(EINVAL, f"{req.describe()} was not negotiated")
    if c == CMD_BLOCK_STATUS:
        if not has_contexts:
            return Check(EINVAL, "block status without a negotiated metadata context")
        if req.length == 0:
            return Check(EINVAL, "block status of length 0")
    if c in _LIMITED and req.length > MAX_PAYLOAD:
        return Check(EINVAL, f"length {req.length} exceeds the maximum of {MAX_PAYLOAD}")
    if c in (CMD_READ, CMD_WRITE, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS) and (
        req.end > size
    ):
        error = ENOSPC if c in (CMD_WRITE, CMD_WRITE_ZEROES) else EINVAL
        return Check(error, f"range [{req.offset}, {req.end}) ends past the export ({size} bytes)")
    return None


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def structured_header(cookie: int, reply_type: int, length: int, done: bool) -> bytes:
    flags = REPLY_FLAG_DONE if done else 0
    return _STRUCTURED.pack(STRUCTURED_REPLY_MAGIC, flags, reply_type, cookie, length)


def structured_done(cookie: int) -> bytes:
    return structured_header(cookie, REPLY_TYPE_NONE, 0, True)


def offset_data_header(cookie: int, offset: int, data_len: int, done: bool) -> bytes:
    """Header of an OFFSET_DATA chunk; `data_len` bytes of data follow it."""
    return structured_header(cookie, REPLY_TYPE_OFFSET_DATA, 8 + data_len, done) + _U64.pack(
        offset
    )


def offset_hole(cookie: int, offset: int, length: int, done: bool) -> bytes:
    return structured_header(cookie, REPLY_TYPE_OFFSET_HOLE, 12, done) + struct.pack(
        ">QI", offset, length
    )


def error_chunk(cookie: int, error: int, message: str) -> bytes:
    raw = message.encode()[:MAX_STRING]
    payload = _U32.pack(error) + _U16.pack(len(raw)) + raw
    return structured_header(cookie, REPLY_TYPE_ERROR, len(payload), True) + payload


def block_status_chunk(
    cookie: int, context_id: int, extents: Sequence[tuple[int, int]], done: bool
) -> bytes:
    """One BLOCK_STATUS chunk: (length, flags) descriptors from the request's offset on."""
    payload = _U32.pack(context_id) + b"".join(struct.pack(">II", n, f) for n, f in extents)
    return structured_header(cookie, REPLY_TYPE_BLOCK_STATUS, len(payload), done) + payload


# -- parsing replies (for tests and tools; the server never reads these) -------------------


def parse_option_reply_header(data: bytes) -> tuple[int, int, int]:
    """(option, reply type, length) of an option reply header (20 bytes)."""
    magic, option, reply_type, length = _OPTION_REPLY.unpack(data)
    if magic != OPTION_REPLY_MAGIC:
        raise ProtocolViolation(f"option reply with bad magic {magic:#x}")
    return int(option), int(reply_type), int(length)


OPTION_REPLY_HEADER_SIZE = _OPTION_REPLY.size
SIMPLE_REPLY_SIZE = _SIMPLE_REPLY.size
STRUCTURED_HEADER_SIZE = _STRUCTURED.size


def encode_option(option: int, data: bytes = b"") -> bytes:
    """An option request as a client sends it (for tests and tools)."""
    return _OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data
