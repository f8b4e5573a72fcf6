"""The durable overlay layer and its map format (formats/overlaymap.py, nbd/durable.py).

The map codec under hypothesis: what is encoded decodes, and any cut or damage of the tail
decodes to a prefix of the batches, never to something else. A layer whose map append is cut
at every byte of a flush (a crash at any point) reopens with the map of the last complete
flush or of this one; a server killed while a client writes and flushes keeps every write
acknowledged before the last acknowledged FLUSH.
"""

from __future__ import annotations

import random
import struct
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapship.formats import overlaymap
from snapship.nbd import protocol as p
from snapship.nbd.durable import TEST_BOOT_ID_ENV, DurableLayer, boot_id
from snapship.nbd.rangemap import RangeMap
from tests.nbdhelp import NbdRepo, RawClient, image_data, make_test_repo, serve

SIZE = 1 << 20
BOOT = bytes(range(16))
OTHER_BOOT = bytes(range(1, 17))
records = st.tuples(st.integers(0, SIZE), st.integers(0, SIZE), st.sampled_from([1, 2, 3])).map(
    lambda r: (min(r[0], r[1]), max(r[0], r[1]), r[2]))
batches = st.lists(st.lists(records, max_size=6), max_size=5)

# A version 2 log as a writer makes it: journal entries (records, written in this boot or
# another) and durable marks, each covering some entry before it.
Op = tuple[str, list[overlaymap.Record], bool]
ops = st.lists(st.one_of(
    st.tuples(st.just("j"), st.lists(records, min_size=1, max_size=3), st.booleans()),
    st.tuples(st.just("d"), st.just([]), st.booleans())), max_size=12)


def build(oplist: list[Op], data: st.DataObject | None = None) -> tuple[
        bytes, list[tuple[str, int, list[overlaymap.Record], bool, int]]]:  # fmt: skip
    """The log of `oplist` and its entries (kind, seq, records, this boot, covers)."""
    out = [overlaymap.encode_header(SIZE)]
    entries = []
    covers = -1
    for seq, (kind, recs, here) in enumerate(oplist):
        if kind == "j":
            out.append(overlaymap.encode_journal(seq, BOOT if here else OTHER_BOOT, recs))
            entries.append(("j", seq, recs, here, -1))
        elif seq:
            # a mark covers an entry at least as late as the last mark's (flushes in order)
            covers = max(covers, seq - 1 if data is None else data.draw(
                st.integers(max(covers, 0), seq - 1)))
            out.append(overlaymap.encode_durable(seq, covers))
            entries.append(("d", seq, [], here, covers))
        else:
            out.append(overlaymap.encode_journal(seq, BOOT, []))
            entries.append(("j", seq, [], True, -1))
    return b"".join(out), entries


def expected(entries: list[tuple[str, int, list[overlaymap.Record], bool, int]]
             ) -> list[overlaymap.Record]:  # fmt: skip
    """The spec: entries a mark covers are kept; later ones while they are of this boot."""
    durable = max([c for k, _, _, _, c in entries if k == "d"], default=-1)
    out: list[overlaymap.Record] = []
    for kind, seq, recs, here, _ in entries:
        if kind == "j" and seq > durable and not here:
            break
        out += recs
    return out


@given(batches)
def test_the_version_1_codec_is_still_read(bs: list[list[overlaymap.Record]]) -> None:
    blob = overlaymap.encode_v1(SIZE, bs)
    d = overlaymap.decode(blob, BOOT)
    assert d.size == SIZE and d.version == 1 and d.kept_length == len(blob)
    assert d.records == [r for b in bs for r in b]
    assert d.rewrite  # appended to only as version 2


@given(batches, st.data())
def test_a_cut_or_damaged_version_1_tail_decodes_to_a_prefix(
        bs: list[list[overlaymap.Record]], data: st.DataObject) -> None:  # fmt: skip
    blob = bytearray(overlaymap.encode_v1(SIZE, bs))
    cut = data.draw(st.integers(overlaymap.HEADER_SIZE, len(blob)))
    blob = blob[:cut]
    if cut > overlaymap.HEADER_SIZE and data.draw(st.booleans()):
        at = data.draw(st.integers(overlaymap.HEADER_SIZE, cut - 1))
        blob[at] ^= data.draw(st.integers(1, 255))
    d = overlaymap.decode(bytes(blob), BOOT)
    n = d.next_seq
    assert d.records == [r for b in bs[:n] for r in b]
    assert d.kept_length == len(overlaymap.encode_v1(SIZE, bs[:n])) <= len(blob)


@given(ops, st.data())
def test_the_journal_keeps_durable_entries_and_this_boots_only(oplist: list[Op],
                                                               data: st.DataObject) -> None:
    blob, entries = build(oplist, data)
    d = overlaymap.decode(blob, BOOT)
    assert d.records == expected(entries)
    durable = max([c for k, _, _, _, c in entries if k == "d"], default=-1)
    assert d.durable_seq == durable
    # every durable entry is kept, whatever boot it was written in
    assert all(e[1] < d.next_seq for e in entries if e[0] == "j" and e[1] <= durable)
    # nothing of another boot past the durable part is kept
    assert not any(e[0] == "j" and e[1] > durable and not e[3] and e[1] < d.next_seq
                   for e in entries)
    assert d.undurable == any(e[0] == "j" and durable < e[1] < d.next_seq for e in entries)
    cut_marks = [e for e in entries if e[1] >= d.next_seq and e[0] == "d"]
    assert d.rewrite == bool(cut_marks)
    if not d.rewrite:
        # the kept part is a log of its own, and one can go on appending to it
        tail = overlaymap.encode_journal(d.next_seq, BOOT, [(0, 1, 1)])
        again = overlaymap.decode(blob[: d.kept_length] + tail, BOOT)
        assert again.records == [*d.records, (0, 1, 1)]
    # written all in this boot: everything is kept
    same, all_here = build([(k, r, True) for k, r, _ in oplist])
    assert overlaymap.decode(same, BOOT).records == [r for e in all_here for r in e[2]]


@given(ops, st.data())
def test_a_cut_or_damaged_journal_decodes_to_a_prefix(oplist: list[Op],
                                                      data: st.DataObject) -> None:
    blob, entries = build(oplist, data)
    whole = overlaymap.decode(blob, BOOT)
    damaged = bytearray(blob[: data.draw(st.integers(overlaymap.HEADER_SIZE, len(blob)))])
    if len(damaged) > overlaymap.HEADER_SIZE and data.draw(st.booleans()):
        at = data.draw(st.integers(overlaymap.HEADER_SIZE, len(damaged) - 1))
        damaged[at] ^= data.draw(st.integers(1, 255))
    d = overlaymap.decode(bytes(damaged), BOOT)
    assert d.records == whole.records[: len(d.records)]
    assert d.kept_length <= len(damaged)
    if bytes(damaged) == blob[: len(damaged)]:
        # a cut: it reads as the entries wholly before it, the torn one is ignored
        intact = overlaymap.HEADER_SIZE
        for kind, seq, recs, _, covers in entries:
            n = len(overlaymap.encode_durable(seq, covers) if kind == "d" else
                    overlaymap.encode_journal(seq, BOOT, recs))
            if intact + n > len(damaged):
                break
            intact += n
        assert d == overlaymap.decode(blob[:intact], BOOT)


def test_a_base_entry_and_unknown_versions_and_states() -> None:
    blob = (overlaymap.encode_header(SIZE) + overlaymap.encode_base(7, [(0, 10, 1)])
            + overlaymap.encode_journal(8, OTHER_BOOT, [(20, 30, 2)])
            + overlaymap.encode_durable(9, 8) + overlaymap.encode_journal(10, OTHER_BOOT,
                                                                        [(40, 50, 3)]))
    d = overlaymap.decode(blob, BOOT)
    assert d.records == [(0, 10, 1), (20, 30, 2)] and d.durable_seq == 8 and d.dropped == 1
    assert d.next_seq == 10 and not d.rewrite and not d.undurable
    other = bytearray(blob)
    struct.pack_into("<I", other, 16, 3)
    with pytest.raises(overlaymap.OverlayMapError, match="version 3 is not supported"):
        overlaymap.decode(bytes(other), BOOT)
    bad_state = overlaymap.encode_header(SIZE) + overlaymap.encode_journal(0, BOOT, [(0, 10, 7)])
    with pytest.raises(overlaymap.OverlayMapError, match="unknown state 7"):
        overlaymap.decode(bad_state, BOOT)
    with pytest.raises(overlaymap.OverlayMapError, match="outside"):
        overlaymap.decode(overlaymap.encode_header(10)
                          + overlaymap.encode_journal(0, BOOT, [(0, 11, 1)]), BOOT)
    with pytest.raises(overlaymap.OverlayMapError, match="not first"):
        overlaymap.decode(overlaymap.encode_header(SIZE) + overlaymap.encode_journal(0, BOOT, [])
                          + overlaymap.encode_base(1, []), BOOT)
    with pytest.raises(overlaymap.OverlayMapError, match="bad magic"):
        overlaymap.decode(b"x" * 64, BOOT)
    with pytest.raises(overlaymap.OverlayMapError, match="header is missing"):
        overlaymap.decode(blob[:10], BOOT)
    other = bytearray(blob)
    other[30] ^= 1
    with pytest.raises(overlaymap.OverlayMapError, match="fails its check"):
        overlaymap.decode(bytes(other), BOOT)


def items(m: RangeMap) -> list[tuple[int, int, int]]:
    return list(m.items())


def replayed(recs: list[overlaymap.Record]) -> list[tuple[int, int, int]]:
    m = RangeMap()
    for r in recs:
        m.set(*r)
    return items(m)


@settings(max_examples=15, deadline=None)
@given(st.lists(st.lists(records.filter(lambda r: r[1] > r[0]), min_size=1, max_size=5),
                min_size=2, max_size=4))
def test_a_log_cut_at_any_byte_after_the_last_flush_reopens_by_its_boot(
    tmp_path_factory: pytest.TempPathFactory, bs: list[list[overlaymap.Record]]
) -> None:
    """A server killed (this boot: every intact entry is kept) or a machine crashed (another
    boot: only what the last completed flush covered) anywhere in the writes and the flush
    after the last one."""
    d = tmp_path_factory.mktemp("layer")
    layer = DurableLayer(d, 1, SIZE, create=True)
    done: list[overlaymap.Record] = []
    for b in bs[:-1]:
        for r in b:
            layer.journal(*r)
        layer.flush_blocking()
        done += b
    before_len = layer.map_length
    for r in bs[-1]:
        layer.journal(*r)
    layer.flush_blocking()
    full = layer.map_path.read_bytes()
    layer.close()
    prefixes = [replayed(done + bs[-1][:k]) for k in range(len(bs[-1]) + 1)]
    for cut in range(before_len, len(full) + 1):
        garbage = bytes(b ^ 0xA5 for b in full[cut : cut + cut % 3])
        for boot in (str(uuid.UUID(bytes=layer.boot)), str(uuid.uuid4())):
            layer.map_path.write_bytes(full[:cut] + garbage)
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv(TEST_BOOT_ID_ENV, boot)
                back = DurableLayer(d, 1, SIZE, create=False)
            got = items(back.map)
            if cut == len(full):
                assert got == prefixes[-1], cut
            elif boot == str(uuid.UUID(bytes=layer.boot)):
                assert got in prefixes, cut
            else:
                assert got == prefixes[0], cut
            assert back.map_path.stat().st_size == back.map_length  # the tail is cut off
            back.close()


def test_the_map_log_is_rewritten_when_it_grows(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    layer = DurableLayer(tmp_path, 1, SIZE, create=True)
    rng = random.Random(3)
    rewritten = False
    for i in range(40):
        for _ in range(1000):  # overwrites of the same few ranges: a long log, a small map
            start = rng.randrange(0, 8) * 4096
            layer.journal(start, start + 4096, rng.choice([1, 2]))
        # the rewrite takes along the entries appended while the flush ran
        ticket = layer.begin_flush()
        layer.sync_data(ticket)
        durable = items(layer.map)
        layer.journal(SIZE - 4096 * (i + 1), SIZE - 4096 * i, 3)
        layer.seal(ticket)
        layer.sync_map(ticket)
        layer.end_flush(ticket, True)
        if ticket.switched:  # the new log holds the entry appended during the flush too
            now = overlaymap.decode(layer.map_path.read_bytes(), layer.boot)
            assert replayed(now.records) == items(layer.map) != durable
            rewritten = True
    assert rewritten and layer.map_length < 2 << 20, layer.map_length
    expected_map = items(layer.map)
    layer.close()
    back = DurableLayer(tmp_path, 1, SIZE, create=False)
    assert items(back.map) == expected_map
    back.close()
    assert not list(tmp_path.glob("*.new"))
    # after a reboot the last entry (after the last flush began) is gone, the rest is there
    monkeypatch.setenv(TEST_BOOT_ID_ENV, str(uuid.uuid4()))
    back = DurableLayer(tmp_path, 1, SIZE, create=False)
    assert items(back.map) == durable and back.dropped == 1
    back.close()


def test_a_version_1_map_opens_and_is_rewritten_as_version_2(tmp_path: Path) -> None:
    layer = DurableLayer(tmp_path, 1, SIZE, create=True)
    layer.close()
    layer.map_path.write_bytes(overlaymap.encode_v1(SIZE, [[(0, 4096, 1)], [(100, 200, 2)]]))
    back = DurableLayer(tmp_path, 1, SIZE, create=False)
    assert items(back.map) == [(0, 100, 1), (100, 200, 2), (200, 4096, 1)]
    back.journal(8192, 9000, 3)
    back.flush_blocking()
    back.close()
    blob = back.map_path.read_bytes()
    assert struct.unpack_from("<I", blob, 16) == (2,)
    d = overlaymap.decode(blob, OTHER_BOOT)  # all durable: another boot reads it all
    assert replayed(d.records) == [(0, 100, 1), (100, 200, 2), (200, 4096, 1), (8192, 9000, 3)]


def test_the_boot_id_is_the_kernels_unless_a_test_sets_it(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:  # fmt: skip
    monkeypatch.delenv(TEST_BOOT_ID_ENV, raising=False)
    with open("/proc/sys/kernel/random/boot_id") as f:
        assert boot_id() == uuid.UUID(f.read().strip()).bytes
    fake = uuid.uuid4()
    monkeypatch.setenv(TEST_BOOT_ID_ENV, str(fake))
    assert boot_id() == fake.bytes


# -- a real server killed while a client writes and flushes --------------------------------


@pytest.fixture
def repo(tmp_path: Path) -> NbdRepo:
    return make_test_repo(tmp_path, [("disk", bytes(image_data(2 << 20, 4)))])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_during_a_flush_keeps_what_it_covered(repo: NbdRepo, tmp_path: Path,
                                                      seed: int) -> None:  # fmt: skip
    """Like a file system's journal: writes, their acknowledgements, then a FLUSH sent
    together with the next writes; the server is killed right after one such send, somewhere
    in the middle of that flush."""
    rng = random.Random(seed)
    size = 2 << 20
    state = tmp_path / "state"
    groups: list[list[tuple[int, bytes]]] = []
    for _ in range(12):
        # Writes in flight together never overlap (their order would be undefined, as on a
        # disk); each group is acknowledged before the FLUSH that covers it is sent.
        group: list[tuple[int, bytes]] = []
        for _ in range(rng.randrange(1, 8)):
            n = rng.randrange(1, 40_000)
            off = rng.randrange(0, size - n)
            if all(off + n <= o or o + len(d) <= off for o, d in group):
                group.append((off, rng.randbytes(n)))
        groups.append(group)
    kill_at = rng.randrange(2, len(groups))
    covered = 0  # groups[:covered] were acknowledged before an acknowledged FLUSH
    with serve(repo.path, "--writable", "--state-dir", str(state), log_dir=tmp_path) as server:
        c = RawClient(server.port)
        c.greet()
        c.go("disk", structured=False)
        cookie = 0
        for g, group in enumerate(groups):
            expected = set()
            if g:
                c.request(p.CMD_FLUSH, cookie=(flush_cookie := 10_000 + g))
                expected.add(flush_cookie)
            for off, data in group:
                cookie += 1
                c.request(p.CMD_WRITE, off, len(data), cookie=cookie, payload=data)
                expected.add(cookie)
            if g == kill_at:
                server.proc.kill()
                break
            while expected:
                error, got = c.simple_reply()
                assert error == 0
                expected.remove(got)
            if g:
                covered = g
        server.proc.wait()
        c.close()
    model = bytearray(repo.latest("disk").data)
    for group in groups[:covered]:
        for off, data in group:
            model[off : off + len(data)] = data
    later = RangeMap()  # possibly there, possibly not: not compared
    for group in groups[covered:]:
        for off, data in group:
            later.set(off, off + len(data), 1)
    with serve(repo.path, "--writable", "--state-dir", str(state), log_dir=tmp_path) as server:
        c = RawClient(server.port)
        c.greet()
        c.go("disk", structured=False)
        c.request(p.CMD_READ, 0, size, cookie=1)
        assert c.simple_reply() == (0, 1)
        back = c.recv(size)
        c.close()
    assert covered >= 1
    for s, e, state_ in later.segments(0, size):
        if state_ is None:
            assert back[s:e] == model[s:e], (s, e)
