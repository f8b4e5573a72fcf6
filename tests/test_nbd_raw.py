"""Bad input from a raw socket: what no real client sends, and what a server must survive.

Every request error gets the error code the protocol document asks for, with simple and with
structured replies, and the connection stays usable afterwards; handshake mistakes get their
option errors; broken framing closes only that connection; 1000 connect/disconnect cycles
leak no file descriptor, thread or memory; a client killed mid-transfer harms nothing.
"""

from __future__ import annotations

import hashlib
import random
import struct
import subprocess
import time
from collections.abc import Iterator

import pytest

from snapship.nbd import protocol as p
from tests.nbdhelp import (
    NbdRepo,
    RawClient,
    Server,
    image_data,
    make_test_repo,
    serve,
    structured_error,
    tool_stdout_sha,
)

MiB = 1 << 20
SIZE = 2 * MiB + 12345
WORKERS = 2


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> NbdRepo:
    return make_test_repo(tmp_path_factory.mktemp("nbd-raw"),
                          [("disk", bytes(image_data(SIZE, 21))),
                           ("big", bytes(image_data(16 * MiB, 22)))])  # fmt: skip


@pytest.fixture(scope="module")
def ro(repo: NbdRepo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(repo.path, "--workers", str(WORKERS), log_dir=tmp_path_factory.mktemp("nbd-raw-ro")
               ) as s:
        yield s
        s.assert_alive()


@pytest.fixture(scope="module")
def rw(repo: NbdRepo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(repo.path, "--writable", log_dir=tmp_path_factory.mktemp("nbd-raw-rw")) as s:
        yield s
        s.assert_alive()


def connect(server: Server, structured: bool, export: str = "disk",
            contexts: tuple[str, ...] = ()) -> tuple[RawClient, int]:  # fmt: skip
    c = RawClient(server.port)
    c.greet()
    _, flags = c.go(export, structured, contexts)
    return c, flags


def answer(c: RawClient, structured: bool, cookie: int, length: int = 0,
           offset: int = 0) -> tuple[int, bytes]:  # fmt: skip
    """(error, data) of the reply to request `cookie` (a read of `length` at `offset`)."""
    if structured:
        got, chunks = c.structured_reply()
        assert got == cookie
        error = structured_error(chunks)
        buf = bytearray(length)
        covered = 0
        for _, rtype, pl in chunks:
            if rtype in (p.REPLY_TYPE_OFFSET_DATA, p.REPLY_TYPE_OFFSET_HOLE):
                (at,) = struct.unpack(">Q", pl[:8])
                n = len(pl) - 8 if rtype == p.REPLY_TYPE_OFFSET_DATA else struct.unpack(
                    ">I", pl[8:12])[0]
                assert n > 0 and offset <= at and at + n <= offset + length
                if rtype == p.REPLY_TYPE_OFFSET_DATA:
                    buf[at - offset : at - offset + n] = pl[8:]
                covered += n
        assert error or covered == length
        return error, bytes(buf) if not error else b""
    error, got = c.simple_reply()
    assert got == cookie
    return error, c.recv(length) if error == 0 else b""


def any_order_errors(c: RawClient, structured: bool, n: int) -> dict[int, int]:
    """{cookie: error} of the next `n` replies, which carry no data, in whatever order."""
    out = {}
    for _ in range(n):
        if structured:
            cookie, chunks = c.structured_reply()
            out[cookie] = structured_error(chunks)
        else:
            error, cookie = c.simple_reply()
            out[cookie] = error
    return out


def assert_still_usable(c: RawClient, structured: bool, data: bytes, cookie: int = 999) -> None:
    c.request(p.CMD_READ, 4000, 5000, cookie=cookie)
    error, got = answer(c, structured, cookie, 5000, 4000)
    assert error == 0 and got == data[4000:9000]


READ_ONLY_ERRORS = [
    # (what, command, offset, length, flags, payload, expected error)
    ("read past the end", p.CMD_READ, SIZE - 10, 20, 0, b"", p.EINVAL),
    ("read starting past the end", p.CMD_READ, SIZE + 4096, 512, 0, b"", p.EINVAL),
    ("read over 32 MiB", p.CMD_READ, 0, 33 * MiB, 0, b"", p.EINVAL),
    ("write to a read-only export", p.CMD_WRITE, 0, 4096, 0, b"w" * 4096, p.EPERM),
    ("trim on a read-only export", p.CMD_TRIM, 0, 4096, 0, b"", p.EPERM),
    ("zeroes on a read-only export", p.CMD_WRITE_ZEROES, 0, 4096, 0, b"", p.EPERM),
    ("unknown command", 42, 0, 512, 0, b"", p.EINVAL),
    ("unknown flag", p.CMD_READ, 0, 512, 1 << 9, b"", p.EINVAL),
    ("flag of another command", p.CMD_READ, 0, 512, p.CMD_FLAG_REQ_ONE, b"", p.EINVAL),
    ("fast zero on a read", p.CMD_READ, 0, 512, p.CMD_FLAG_FAST_ZERO, b"", p.EINVAL),
    ("block status without a context", p.CMD_BLOCK_STATUS, 0, 512, 0, b"", p.EINVAL),
    ("cache past the end", p.CMD_CACHE, SIZE, 1, 0, b"", p.EINVAL),
]


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_request_errors_on_a_read_only_export(repo: NbdRepo, ro: Server, structured: bool) -> None:
    data = repo.latest("disk").data
    c, flags = connect(ro, structured)
    assert flags & p.TX_READ_ONLY
    for cookie, (what, cmd, off, length, fl, payload, error) in enumerate(READ_ONLY_ERRORS, 1):
        c.request(cmd, off, length, fl, cookie=cookie, payload=payload)
        assert answer(c, structured, cookie)[0] == error, what
        assert_still_usable(c, structured, data)
    # DF is only valid with structured replies
    c.request(p.CMD_READ, 0, 512, p.CMD_FLAG_DF, cookie=77)
    error, got = answer(c, structured, 77, 512, 0)
    assert (error, got) == ((0, data[:512]) if structured else (p.EINVAL, b""))
    c.request(p.CMD_DISC)
    assert c.closed_by_server()


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_request_errors_on_a_writable_export(repo: NbdRepo, rw: Server, structured: bool) -> None:
    data = repo.latest("disk").data
    c, flags = connect(rw, structured)
    assert not flags & p.TX_READ_ONLY and flags & p.TX_CAN_MULTI_CONN
    cases = [
        ("write past the end", p.CMD_WRITE, SIZE - 100, 200, 0, b"x" * 200, p.ENOSPC),
        ("zeroes past the end", p.CMD_WRITE_ZEROES, SIZE - 100, 200, 0, b"", p.ENOSPC),
        ("trim past the end", p.CMD_TRIM, SIZE - 100, 200, 0, b"", p.EINVAL),
        ("write over 32 MiB", p.CMD_WRITE, 0, 32 * MiB + 1, 0, bytes(32 * MiB + 1), p.EINVAL),
        ("no-hole on a write", p.CMD_WRITE, 0, 10, p.CMD_FLAG_NO_HOLE, b"y" * 10, p.EINVAL),
    ]
    for cookie, (what, cmd, off, length, fl, payload, error) in enumerate(cases, 1):
        c.request(cmd, off, length, fl, cookie=cookie, payload=payload)
        assert answer(c, structured, cookie)[0] == error, what
        assert_still_usable(c, structured, data)  # the refused payload was skipped whole
    # valid writes of every kind, then read back
    c.request(p.CMD_WRITE, 4100, 3, p.CMD_FLAG_FUA, cookie=50, payload=b"abc")
    c.request(p.CMD_WRITE_ZEROES, 5000, 100, p.CMD_FLAG_FAST_ZERO | p.CMD_FLAG_NO_HOLE,
              cookie=51)
    c.request(p.CMD_TRIM, 6000, 10, cookie=52)
    c.request(p.CMD_FLUSH, cookie=53)
    assert any_order_errors(c, structured, 4) == {50: 0, 51: 0, 52: 0, 53: 0}
    expected = bytearray(data)
    expected[4100:4103] = b"abc"
    expected[5000:5100] = bytes(100)
    expected[6000:6010] = bytes(10)
    c.request(p.CMD_READ, 4000, 5000, cookie=60)
    assert answer(c, structured, 60, 5000, 4000) == (0, bytes(expected[4000:9000]))
    c.request(p.CMD_DISC)
    assert c.closed_by_server()


def test_replies_carry_their_cookies_and_may_come_out_of_order(repo: NbdRepo, ro: Server) -> None:
    big = repo.latest("big").data
    c, _ = connect(ro, True, "big")
    # 64 reads in flight at once, scattered, some repeated; cookies are arbitrary 64-bit values
    wanted = {}
    for i in range(64):
        cookie = (0xDEADBEEF00000000 + i * 7919) & (2**64 - 1)
        off = (i * 977 * 4096 + i) % (len(big) - 70000)
        wanted[cookie] = (off, 65536 + i)
        c.request(p.CMD_READ, off, 65536 + i, cookie=cookie)
    order = []
    for _ in range(64):
        cookie, chunks = c.structured_reply()
        off, n = wanted.pop(cookie)
        buf = bytearray(n)
        for _, rtype, pl in chunks:
            (at,) = struct.unpack(">Q", pl[:8])
            if rtype == p.REPLY_TYPE_OFFSET_DATA:
                buf[at - off : at - off + len(pl) - 8] = pl[8:]
            else:
                assert rtype == p.REPLY_TYPE_OFFSET_HOLE
                (hole,) = struct.unpack(">I", pl[8:12])
                assert big[at : at + hole] == bytes(hole)
        assert bytes(buf) == big[off : off + n]
        order.append(cookie)
    assert not wanted
    c.request(p.CMD_DISC)
    c.close()


def test_block_status_and_df(repo: NbdRepo, ro: Server) -> None:
    data = repo.latest("disk").data
    c, flags = connect(ro, True, contexts=("base:allocation",))
    assert flags & p.TX_SEND_DF
    c.request(p.CMD_BLOCK_STATUS, 0, SIZE, cookie=1)
    _, chunks = c.structured_reply()
    (_, rtype, payload), = chunks
    assert rtype == p.REPLY_TYPE_BLOCK_STATUS
    extents = [struct.unpack(">II", payload[i : i + 8]) for i in range(4, len(payload), 8)]
    assert sum(n for n, _ in extents) == SIZE
    pos = 0
    for n, state in extents:
        zero = data[pos : pos + n].count(0) == n
        assert state in (0, p.STATE_HOLE | p.STATE_ZERO) and (state != 0) <= zero
        pos += n
    c.request(p.CMD_BLOCK_STATUS, 100, SIZE - 100, p.CMD_FLAG_REQ_ONE, cookie=2)
    _, ((_, _, payload),) = c.structured_reply()
    assert len(payload) == 12 and struct.unpack(">I", payload[4:8])[0] <= SIZE - 100
    c.request(p.CMD_BLOCK_STATUS, 0, 0, cookie=3)
    assert structured_error(c.structured_reply()[1]) == p.EINVAL
    # DF: a single content chunk even across holes and chunks
    c.request(p.CMD_READ, 0, SIZE, p.CMD_FLAG_DF, cookie=4)
    _, chunks = c.structured_reply()
    content = [ch for ch in chunks if ch[1] in (p.REPLY_TYPE_OFFSET_DATA, p.REPLY_TYPE_OFFSET_HOLE)]
    assert len(content) == 1 and content[0][2][8:] == data
    c.request(p.CMD_DISC)
    c.close()


def option_replies(c: RawClient, option: int, data: bytes = b"") -> list[int]:
    return [rtype for rtype, _ in c.option(option, data)]


def test_handshake_errors_keep_the_negotiation_going(repo: NbdRepo, ro: Server) -> None:
    c = RawClient(ro.port)
    assert c.greet() == p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES
    assert option_replies(c, 99) == [p.REP_ERR_UNSUP]
    assert option_replies(c, p.OPT_EXTENDED_HEADERS) == [p.REP_ERR_UNSUP]
    assert option_replies(c, p.OPT_LIST, b"x") == [p.REP_ERR_INVALID]
    assert option_replies(c, p.OPT_STARTTLS) == [p.REP_ERR_POLICY]
    assert option_replies(c, p.OPT_INFO, b"\0\0\0\x09disk") == [p.REP_ERR_INVALID]
    assert option_replies(c, p.OPT_INFO, b"\xff\xff\xff\xff\0\0") == [p.REP_ERR_INVALID]
    assert option_replies(c, p.OPT_GO, b"\0\0\0\x04nope\0\0") == [p.REP_ERR_UNKNOWN]
    assert option_replies(c, p.OPT_GO, b"\0\0\0\x02\xff\xfe\0\0") == [p.REP_ERR_INVALID]
    meta = b"\0\0\0\x04disk\0\0\0\x01\0\0\0\x0fbase:allocation"
    assert option_replies(c, p.OPT_SET_META_CONTEXT, meta) == [p.REP_ERR_INVALID]  # no SR yet
    assert option_replies(c, p.OPT_STRUCTURED_REPLY, b"x") == [p.REP_ERR_INVALID]
    assert option_replies(c, p.OPT_STRUCTURED_REPLY) == [p.REP_ACK]
    assert option_replies(c, p.OPT_LIST_META_CONTEXT, meta[:-4]) == [p.REP_ERR_INVALID]
    assert option_replies(c, p.OPT_LIST_META_CONTEXT, b"\0\0\0\x04disk\0\0\0\0") == [
        p.REP_META_CONTEXT, p.REP_ACK]
    nosuch = b"\0\0\0\x04nope\0\0\0\x01\0\0\0\x0fbase:allocation"
    assert option_replies(c, p.OPT_SET_META_CONTEXT, nosuch) == [p.REP_ERR_UNKNOWN]
    other = b"\0\0\0\x04disk\0\0\0\x01\0\0\0\x0bqemu:dirty:"
    assert option_replies(c, p.OPT_SET_META_CONTEXT, other) == [p.REP_ACK]  # unknown: ignored
    assert option_replies(c, p.OPT_LIST, b"y" * (100 << 10)) == [p.REP_ERR_TOO_BIG]
    listing = c.option(p.OPT_LIST)
    assert [t for t, _ in listing].count(p.REP_SERVER) == len(repo.versions) + 2
    size, flags = c.go("disk", structured=False)
    assert size == SIZE and flags & p.TX_READ_ONLY
    assert_still_usable(c, True, repo.latest("disk").data)
    c.request(p.CMD_DISC)
    c.close()


def test_export_name_fallback(repo: NbdRepo, ro: Server) -> None:
    for no_zeroes in (True, False):
        c = RawClient(ro.port)
        c.greet(p.CLIENT_FIXED_NEWSTYLE | (p.CLIENT_NO_ZEROES if no_zeroes else 0))
        c.sock.sendall(p.encode_option(p.OPT_EXPORT_NAME, b"disk"))
        size, flags = struct.unpack(">QH", c.recv(10))
        assert size == SIZE and flags & p.TX_READ_ONLY
        if not no_zeroes:
            assert c.recv(124) == bytes(124)
        assert_still_usable(c, False, repo.latest("disk").data)
        c.request(p.CMD_DISC)
        c.close()
    c = RawClient(ro.port)
    c.greet()
    c.sock.sendall(p.encode_option(p.OPT_EXPORT_NAME, b"nope"))
    assert c.closed_by_server()  # no error reply exists for NBD_OPT_EXPORT_NAME


def test_broken_framing_closes_only_that_connection(repo: NbdRepo, ro: Server) -> None:
    data = repo.latest("disk").data
    bystander, _ = connect(ro, True)
    breakers: list[bytes] = [
        b"\xff\xff\xff\xff",  # unknown client flags
    ]
    c = RawClient(ro.port)
    c.recv(18)
    c.sock.sendall(breakers[0])
    assert c.closed_by_server()
    c = RawClient(ro.port)
    c.greet()
    c.sock.sendall(b"NOTIHAVE" + bytes(8))  # bad option magic
    assert c.closed_by_server()
    c, _ = connect(ro, False)
    c.sock.sendall(b"\x12\x34\x56\x78" + bytes(24))  # bad request magic
    assert c.closed_by_server()
    c = RawClient(ro.port)
    c.greet()
    c.sock.sendall(p.encode_option(p.OPT_GO)[:10])  # half a header, then gone
    c.close()
    assert_still_usable(bystander, True, data)
    bystander.request(p.CMD_DISC)
    bystander.close()
    ro.assert_alive()


def test_thousand_connect_disconnect_cycles_leak_nothing(repo: NbdRepo, ro: Server) -> None:
    data = repo.latest("disk").data
    def cycle(i: int) -> None:
        c = RawClient(ro.port)
        try:
            if i % 4 == 0:
                c.recv(18)  # leave right after the greeting
            elif i % 4 == 1:
                c.greet()
                c.option(p.OPT_ABORT)
            elif i % 4 == 2:
                c.greet()
                c.go("disk", structured=bool(i % 8 == 2))
                c.request(p.CMD_READ, i, 100, cookie=i)
                if i % 8 == 2:
                    c.structured_reply()
                else:
                    assert c.simple_reply() == (0, i) and c.recv(100) == data[i : i + 100]
                c.request(p.CMD_DISC)
            else:
                c.greet()
                c.go("big", structured=True)
                c.request(p.CMD_READ, 0, MiB, cookie=1)  # and leave without the reply
        finally:
            c.close()

    for i in range(40):  # warm up: pools, caches, indexes
        cycle(i)
    time.sleep(0.5)
    fds, threads, rss = ro.open_fds(), ro.threads(), ro.rss_kib()
    start = time.monotonic()
    for i in range(1000):
        cycle(i)
    elapsed = time.monotonic() - start
    deadline = time.monotonic() + 10
    while ro.open_fds() != fds and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ro.open_fds() == fds
    # Thread pools start their threads lazily, up to their size: the main thread, the
    # decoding workers and two I/O threads, whatever the number of connections.
    assert threads <= ro.threads() <= 1 + WORKERS + 2
    assert ro.rss_kib() - rss < 32 << 10, (rss, ro.rss_kib())
    ro.assert_alive()
    print(f"1000 cycles in {elapsed:.1f} s")


def test_a_reader_killed_mid_transfer_harms_nothing(repo: NbdRepo, ro: Server) -> None:
    big = repo.latest("big")
    fds = ro.open_fds()
    # nbdcopy writing to a pipe nobody reads blocks mid-transfer; then it is killed.
    proc = subprocess.Popen(["nbdcopy", ro.uri("big"), "-"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    assert proc.poll() is None
    proc.kill()
    proc.wait()
    assert proc.stdout is not None
    proc.stdout.close()
    assert tool_stdout_sha("nbdcopy", ro.uri("big"), "-")[0] == big.sha
    deadline = time.monotonic() + 10
    while ro.open_fds() != fds and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ro.open_fds() == fds
    assert hashlib.sha256(big.data).hexdigest() == big.sha
    ro.assert_alive()


def test_a_client_that_does_not_read_its_replies_does_not_grow_the_server(
    repo: NbdRepo, ro: Server
) -> None:
    big = repo.latest("big").data
    c, _ = connect(ro, False, "big")
    rss = ro.rss_kib()
    n, length = 200, 4 * MiB  # 800 MiB of replies asked for, none read for a while
    for i in range(n):
        c.request(p.CMD_READ, (i * MiB) % (len(big) - length), length, cookie=i)
    time.sleep(2)
    grown = ro.rss_kib() - rss
    assert grown < 200 << 10, f"server grew by {grown} KiB"
    for _ in range(n):
        error, cookie = c.simple_reply()
        assert error == 0
        off = (cookie * MiB) % (len(big) - length)
        assert c.recv(length) == big[off : off + length]
    c.request(p.CMD_DISC)
    c.close()


def test_garbage_never_takes_the_server_down(repo: NbdRepo, ro: Server) -> None:
    rng = random.Random(7)
    for i in range(300):
        c = RawClient(ro.port, timeout=5)
        try:
            if i % 3:
                c.greet()
            if i % 3 == 2:
                c.go("disk", structured=bool(i % 2))
            blob = rng.randbytes(rng.randrange(0, 3000))
            if i % 5 == 0:  # a valid magic first, so the garbage reaches deeper
                blob = (p.encode_option(rng.randrange(12), b"")[:8] if i % 3 == 1
                        else struct.pack(">I", p.REQUEST_MAGIC)) + blob
            c.sock.sendall(blob)
        except (ConnectionError, OSError):
            pass
        finally:
            c.close()
    ro.assert_alive()
    assert "internal error" not in ro.log() and "Traceback" not in ro.log(), ro.log()
    c, _ = connect(ro, True)
    assert_still_usable(c, True, repo.latest("disk").data)
    c.request(p.CMD_DISC)
    c.close()
