"""The sans-I/O parts of the NBD server: wire checks, the handshake state machine, the range
map behind overlays, and block status over a version with an overlay."""

from __future__ import annotations

import asyncio
import itertools
import struct
from array import array
from concurrent.futures import ThreadPoolExecutor

from hypothesis import given, settings
from hypothesis import strategies as st

from snapship.formats.manifest import Manifest
from snapship.nbd import protocol as p
from snapship.nbd.exports import ExportSession, VersionImage
from snapship.nbd.handshake import (
    BASE_ALLOCATION_ID,
    Close,
    ExportInfo,
    Handshake,
    NeedExport,
    NeedList,
    Reply,
    StartTls,
    TlsMode,
    Transmit,
)
from snapship.nbd.overlay import WRITTEN, ZERO, ZERO_ALLOCATED, Overlay
from snapship.nbd.rangemap import RangeMap

EXPORT = ExportInfo("disk@v1", 1 << 20, False, "a test export")


def replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """(option, reply type, data) of every option reply in `data`."""
    out = []
    while data:
        opt, rtype, n = p.parse_option_reply_header(data[: p.OPTION_REPLY_HEADER_SIZE])
        body = data[p.OPTION_REPLY_HEADER_SIZE : p.OPTION_REPLY_HEADER_SIZE + n]
        out.append((opt, rtype, body))
        data = data[p.OPTION_REPLY_HEADER_SIZE + n :]
    return out


def info_request(name: str, *types: int) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(types)}H", len(types), *types)


def meta_request(name: str, *queries: str) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q)) + q.encode()
    return out


def test_go_with_structured_replies_and_base_allocation() -> None:
    hs = Handshake(TlsMode.OFF)
    hs.client_flags(struct.pack(">I", p.CLIENT_FIXED_NEWSTYLE | p.CLIENT_NO_ZEROES))
    assert isinstance(hs.option(p.OPT_STRUCTURED_REPLY, b""), Reply)
    step = hs.option(p.OPT_SET_META_CONTEXT, meta_request("disk", "base:allocation", "x-y:z"))
    assert step == NeedExport("disk")
    step = hs.resolved(EXPORT)
    assert isinstance(step, Reply)
    assert [r[1] for r in replies(step.data)] == [p.REP_META_CONTEXT, p.REP_ACK]
    assert replies(step.data)[0][2] == struct.pack(">I", BASE_ALLOCATION_ID) + b"base:allocation"
    assert hs.option(p.OPT_GO, info_request("disk", p.INFO_NAME, p.INFO_DESCRIPTION)) == \
        NeedExport("disk")
    step = hs.resolved(EXPORT)
    assert isinstance(step, Transmit)
    assert step.structured and step.context_id == BASE_ALLOCATION_ID
    infos = {struct.unpack(">H", r[2][:2])[0]: r[2][2:] for r in replies(step.data)
             if r[1] == p.REP_INFO}
    assert infos[p.INFO_NAME] == b"disk@v1" and infos[p.INFO_DESCRIPTION] == b"a test export"
    size, flags = struct.unpack(">QH", infos[p.INFO_EXPORT])
    assert size == EXPORT.size and flags == step.tx_flags
    assert flags & p.TX_SEND_DF and flags & p.TX_CAN_MULTI_CONN and not flags & p.TX_READ_ONLY
    assert struct.unpack(">III", infos[p.INFO_BLOCK_SIZE]) == (1, 4096, 32 << 20)


def test_contexts_only_apply_to_the_export_they_were_set_for() -> None:
    hs = Handshake(TlsMode.OFF)
    hs.client_flags(b"\0\0\0\1")
    hs.option(p.OPT_STRUCTURED_REPLY, b"")
    hs.option(p.OPT_SET_META_CONTEXT, meta_request("disk@v1", "base:allocation"))
    hs.resolved(EXPORT)
    hs.option(p.OPT_GO, info_request("disk"))
    step = hs.resolved(EXPORT)
    assert isinstance(step, Transmit) and step.context_id is None


def test_list_and_export_name() -> None:
    hs = Handshake(TlsMode.OFF)
    hs.client_flags(b"\0\0\0\1")  # no NO_ZEROES
    assert hs.option(p.OPT_LIST, b"") == NeedList()
    step = hs.listed([("a", "first"), ("b", "")])
    assert isinstance(step, Reply)
    assert [r[1:] for r in replies(step.data)] == [
        (p.REP_SERVER, b"\0\0\0\1afirst"), (p.REP_SERVER, b"\0\0\0\1b"), (p.REP_ACK, b"")]
    assert hs.option(p.OPT_EXPORT_NAME, b"disk") == NeedExport("disk")
    step = hs.resolved(EXPORT)
    assert isinstance(step, Transmit) and not step.structured
    assert len(step.data) == 8 + 2 + 124
    assert hs.option(p.OPT_EXPORT_NAME, b"gone") == NeedExport("gone")
    assert isinstance(hs.resolved(None), Close)


def test_required_tls_and_what_starttls_resets() -> None:
    hs = Handshake(TlsMode.REQUIRE)
    hs.client_flags(b"\0\0\0\3")
    step = hs.option(p.OPT_STRUCTURED_REPLY, b"")
    assert isinstance(step, Reply) and replies(step.data)[0][1] == p.REP_ERR_TLS_REQD
    assert isinstance(hs.option(p.OPT_EXPORT_NAME, b"disk"), Close)
    hs = Handshake(TlsMode.REQUIRE)
    hs.client_flags(b"\0\0\0\3")
    assert isinstance(hs.option(p.OPT_STARTTLS, b""), StartTls)
    hs.tls_started()
    step = hs.option(p.OPT_STARTTLS, b"")
    assert isinstance(step, Reply) and replies(step.data)[0][1] == p.REP_ERR_INVALID
    assert isinstance(hs.option(p.OPT_STRUCTURED_REPLY, b""), Reply)
    hs.option(p.OPT_GO, info_request("disk"))
    step = hs.resolved(EXPORT)
    assert isinstance(step, Transmit) and step.structured
    # structured replies negotiated in the clear do not survive STARTTLS
    hs = Handshake(TlsMode.ALLOW)
    hs.client_flags(b"\0\0\0\3")
    hs.option(p.OPT_STRUCTURED_REPLY, b"")
    hs.option(p.OPT_STARTTLS, b"")
    hs.tls_started()
    hs.option(p.OPT_GO, info_request("disk"))
    step = hs.resolved(EXPORT)
    assert isinstance(step, Transmit) and not step.structured


def test_unknown_client_flags_end_the_connection() -> None:
    hs = Handshake(TlsMode.OFF)
    try:
        hs.client_flags(b"\0\0\0\x04")
    except p.ProtocolViolation:
        return
    raise AssertionError("unknown client flags were accepted")


def test_request_checks() -> None:
    ro = p.TX_HAS_FLAGS | p.TX_READ_ONLY | p.TX_SEND_FLUSH | p.TX_SEND_FUA
    rw = (p.TX_HAS_FLAGS | p.TX_SEND_FLUSH | p.TX_SEND_FUA | p.TX_SEND_TRIM
          | p.TX_SEND_WRITE_ZEROES | p.TX_SEND_FAST_ZERO)

    def check(cmd: int, off: int, n: int, flags: int = 0, tx: int = rw, ctx: bool = False
              ) -> int:
        c = p.check_request(p.Request(flags, cmd, 1, off, n), 1000, tx, ctx)
        return c.error if c else 0

    assert check(p.CMD_READ, 0, 1000) == 0
    assert check(p.CMD_READ, 1, 1000) == p.EINVAL
    assert check(p.CMD_WRITE, 1, 1000) == p.ENOSPC
    assert check(p.CMD_WRITE_ZEROES, 999, 2) == p.ENOSPC
    assert check(p.CMD_TRIM, 999, 2) == p.EINVAL
    assert check(p.CMD_WRITE, 0, 10, tx=ro) == p.EPERM
    assert check(p.CMD_TRIM, 0, 10, tx=ro) == p.EPERM
    assert check(p.CMD_READ, 0, 10, p.CMD_FLAG_FUA, tx=ro) == 0  # FUA is valid everywhere
    assert check(p.CMD_READ, 0, 10, p.CMD_FLAG_FUA, tx=ro & ~p.TX_SEND_FUA) == p.EINVAL
    assert check(p.CMD_READ, 0, 10, p.CMD_FLAG_DF) == p.EINVAL  # DF not negotiated
    assert check(p.CMD_READ, 0, 10, p.CMD_FLAG_DF, tx=rw | p.TX_SEND_DF) == 0
    assert check(p.CMD_WRITE_ZEROES, 0, 10, p.CMD_FLAG_FAST_ZERO | p.CMD_FLAG_NO_HOLE) == 0
    assert check(p.CMD_WRITE_ZEROES, 0, 10, p.CMD_FLAG_FAST_ZERO,
                 tx=rw & ~p.TX_SEND_FAST_ZERO) == p.EINVAL
    assert check(p.CMD_BLOCK_STATUS, 0, 10) == p.EINVAL
    assert check(p.CMD_BLOCK_STATUS, 0, 10, ctx=True) == 0
    assert check(p.CMD_BLOCK_STATUS, 0, 0, ctx=True) == p.EINVAL
    assert check(p.CMD_FLUSH, 0, 0, tx=rw & ~p.TX_SEND_FLUSH) == p.EINVAL
    assert check(9, 0, 0) == p.EINVAL


def test_zero_lengths_and_lengths_beyond_the_maximum() -> None:
    size = 1 << 40
    ro = p.TX_HAS_FLAGS | p.TX_READ_ONLY | p.TX_SEND_FLUSH | p.TX_SEND_FUA | p.TX_SEND_CACHE
    rw = (p.TX_HAS_FLAGS | p.TX_SEND_FLUSH | p.TX_SEND_FUA | p.TX_SEND_TRIM | p.TX_SEND_CACHE
          | p.TX_SEND_WRITE_ZEROES | p.TX_SEND_FAST_ZERO)

    def check(cmd: int, off: int, n: int, flags: int = 0, tx: int = rw) -> int:
        c = p.check_request(p.Request(flags, cmd, 1, off, n), size, tx, True)
        return c.error if c else 0

    for off in (0, 100, size - 1, size):  # zero lengths: valid, except block status
        for cmd in (p.CMD_READ, p.CMD_WRITE, p.CMD_TRIM, p.CMD_CACHE, p.CMD_WRITE_ZEROES):
            assert check(cmd, off, 0) == 0, (cmd, off)
        assert check(p.CMD_BLOCK_STATUS, off, 0) == p.EINVAL
        for cmd in (p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES):
            assert check(cmd, off, 0, tx=ro) == p.EPERM
        assert check(p.CMD_READ, off, 0, tx=ro) == check(p.CMD_CACHE, off, 0, tx=ro) == 0
    assert check(p.CMD_READ, size + 1, 0) == p.EINVAL
    assert check(p.CMD_WRITE_ZEROES, size + 1, 0) == p.ENOSPC
    # beyond the advertised maximum: refused where the length is data to move ...
    for n in (p.MAX_PAYLOAD + 1, 2**32 - 1):
        for cmd in (p.CMD_READ, p.CMD_WRITE, p.CMD_CACHE):
            assert check(cmd, 0, n) == p.EINVAL, (cmd, n)
        assert check(p.CMD_CACHE, 0, n, tx=ro) == p.EINVAL
        # ... honoured where it is a range to mark or describe
        for cmd in (p.CMD_TRIM, p.CMD_WRITE_ZEROES, p.CMD_BLOCK_STATUS):
            assert check(cmd, 0, n) == 0, (cmd, n)
        assert check(p.CMD_WRITE_ZEROES, 0, n, p.CMD_FLAG_FAST_ZERO | p.CMD_FLAG_NO_HOLE) == 0
        assert check(p.CMD_BLOCK_STATUS, 0, n, tx=ro) == 0
    for cmd in (p.CMD_READ, p.CMD_WRITE, p.CMD_CACHE):
        assert check(cmd, size - p.MAX_PAYLOAD, p.MAX_PAYLOAD) == 0


class _Chunks:
    """Stands in for the chunk cache: every chunk's data at once."""

    max_bytes = 1 << 30

    def __init__(self, chunks: dict[bytes, bytes]) -> None:
        self.chunks = chunks

    def request(self, cid: bytes) -> None:
        pass

    def prefetch(self, cid: bytes) -> bool:
        return False

    async def get(self, cid: bytes) -> bytes:
        return self.chunks[cid]


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_reads_are_pieces_of_at_least_one_byte_covering_the_request(data: st.DataObject) -> None:
    chunk = 64
    pattern = data.draw(st.text("01", min_size=1, max_size=6), "zero/data chunks")
    size = len(pattern) * chunk - data.draw(st.integers(0, chunk - 1), "short last chunk")
    image = VersionImage(_manifest(pattern, chunk, size))
    model = bytearray(size)
    chunks = {}
    for i, z in enumerate(pattern):
        cid = image.chunk_id(i)
        if z == "1":
            assert cid is not None
            content = bytes([i + 1]) * min(chunk, size - i * chunk)
            chunks[cid] = content
            model[i * chunk : i * chunk + len(content)] = content
    writable = data.draw(st.booleans(), "writable")
    overlay = Overlay(size) if writable else None
    try:
        for start, n, state in data.draw(st.lists(st.tuples(
                st.integers(0, size), st.integers(0, 100), st.sampled_from([WRITTEN, ZERO])),
                max_size=4 if writable else 0), "overlay marks"):  # fmt: skip
            assert overlay is not None
            n = min(n, size - start)
            fill = b"\xee" * n if state == WRITTEN else bytes(n)
            overlay.pwrite(start, fill)
            overlay.mark(start, start + n, state)
            model[start : start + n] = fill
        offset = data.draw(st.integers(0, size), "offset")
        length = data.draw(st.integers(0, size - offset), "length")
        with ThreadPoolExecutor(1) as io:
            session = ExportSession(image, _Chunks(chunks), io, overlay)  # type: ignore[arg-type]
            pieces = asyncio.run(session.read(offset, length))
        pos = offset
        for at, n, piece in pieces:
            assert n > 0, pieces  # an empty piece would become an empty reply chunk
            assert at == pos and (piece is None or len(piece) == n), pieces
            assert (bytes(piece) if piece is not None else bytes(n)) == model[at : at + n]
            pos += n
        assert pos == offset + length
    finally:
        if overlay is not None:
            overlay.close()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 120), st.integers(0, 40), st.integers(1, 3)),
                max_size=40))
def test_range_map_matches_a_byte_model(ops: list[tuple[int, int, int]]) -> None:
    rm = RangeMap()
    model = [0] * 200
    for start, n, state in ops:
        rm.set(start, start + n, state)
        model[start : start + n] = [state] * n
    items = list(rm.items())
    for (s1, e1, v1), (s2, _, v2) in itertools.pairwise(items):
        assert s1 < e1 <= s2 and not (e1 == s2 and v1 == v2)  # disjoint, merged
    got = [0] * 200
    for s, e, v in rm.segments(0, 200):
        got[s:e] = [v or 0] * (e - s)
    assert got == model
    pieces = list(rm.segments(37, 151))
    assert pieces[0][0] == 37 and pieces[-1][1] == 151
    assert all(a[1] == b[0] for a, b in itertools.pairwise(pieces))


def _manifest(zero_pattern: str, chunk: int, size: int) -> Manifest:
    ids = b"".join(bytes(32) if z == "0" else bytes([i + 1]) * 32
                   for i, z in enumerate(zero_pattern))
    sizes = array("I", [0 if z == "0" else 100 for z in zero_pattern])
    return Manifest("v", "1", size, chunk, "", "", None, ids, sizes)


def test_block_status_merges_the_version_and_the_overlay() -> None:
    chunk = 1 << 16
    image = VersionImage(_manifest("1100111", chunk, 7 * chunk - 5))
    assert list(image.runs(0, image.size)) == [
        (0, 2 * chunk, False), (2 * chunk, 4 * chunk, True), (4 * chunk, image.size, False)]
    overlay = Overlay(image.size)
    try:
        session = ExportSession(image, None, None, overlay)  # type: ignore[arg-type]
        overlay.mark(2 * chunk + 10, 2 * chunk + 20, WRITTEN)
        overlay.mark(5 * chunk, 6 * chunk, ZERO)
        overlay.mark(100, 200, ZERO_ALLOCATED)
        hz = p.STATE_HOLE | p.STATE_ZERO
        assert session.block_status(0, image.size, False) == [
            (100, 0), (100, p.STATE_ZERO), (2 * chunk - 200, 0), (10, hz), (10, 0),
            (2 * chunk - 20, hz), (chunk, 0), (chunk, hz), (chunk - 5, 0)]
        assert session.block_status(5, 50, True) == [(50, 0)]
        assert session.block_status(image.size - 10, 10, False) == [(10, 0)]
    finally:
        overlay.close()


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(
    st.integers(0, 12) | st.integers(0, 2**32 - 1),
    st.binary(max_size=80) | st.sampled_from([
        b"", b"disk", info_request("disk", p.INFO_NAME), info_request("nope"),
        meta_request("disk", "base:allocation"), meta_request("disk"), meta_request("x", "base:")]),
), max_size=8), st.sampled_from(list(TlsMode)))
def test_any_option_sequence_gets_an_answer(options: list[tuple[int, bytes]],
                                            tls: TlsMode) -> None:  # fmt: skip
    hs = Handshake(tls)
    hs.client_flags(b"\0\0\0\3")
    for option, data in options:
        step = hs.option(option, data)
        while isinstance(step, NeedExport | NeedList):
            step = hs.listed([("a", "")]) if isinstance(step, NeedList) else hs.resolved(
                EXPORT if step.name == "disk" else None)
        assert isinstance(step, Reply | StartTls | Close | Transmit)
        if isinstance(step, StartTls):
            hs.tls_started()
        if isinstance(step, Reply):
            assert all(opt == option for opt, _, _ in replies(step.data))
        if isinstance(step, Close | Transmit):
            return
