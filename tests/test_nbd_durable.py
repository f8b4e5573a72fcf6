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
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapship.formats import overlaymap
from snapship.nbd import protocol as p
from snapship.nbd.durable import DurableLayer
from snapship.nbd.rangemap import RangeMap
from tests.nbdhelp import NbdRepo, RawClient, image_data, make_test_repo, serve

SIZE = 1 << 20
records = st.tuples(st.integers(0, SIZE), st.integers(0, SIZE), st.sampled_from([1, 2, 3])).map(
    lambda r: (min(r[0], r[1]), max(r[0], r[1]), r[2]))
batches = st.lists(st.lists(records, max_size=6), max_size=5)


@given(batches)
def test_the_map_codec_round_trips(bs: list[list[overlaymap.Record]]) -> None:
    blob = overlaymap.encode(SIZE, bs)
    d = overlaymap.decode(blob)
    assert d.size == SIZE and d.batches == len(bs) and d.valid_length == len(blob)
    assert d.records == [r for b in bs for r in b]


@given(batches, st.data())
def test_a_cut_or_damaged_tail_decodes_to_a_prefix(bs: list[list[overlaymap.Record]],
                                                   data: st.DataObject) -> None:  # fmt: skip
    blob = bytearray(overlaymap.encode(SIZE, bs))
    cut = data.draw(st.integers(overlaymap.HEADER_SIZE, len(blob)))
    blob = blob[:cut]
    if cut > overlaymap.HEADER_SIZE and data.draw(st.booleans()):
        at = data.draw(st.integers(overlaymap.HEADER_SIZE, cut - 1))
        blob[at] ^= data.draw(st.integers(1, 255))
    d = overlaymap.decode(bytes(blob))
    assert d.records == [r for b in bs[: d.batches] for r in b]
    assert d.valid_length == len(overlaymap.encode(SIZE, bs[: d.batches]))
    # nothing of a batch past the damage is taken
    first_bad = overlaymap.HEADER_SIZE
    for b in bs[: d.batches]:
        first_bad += len(overlaymap.encode_batch(0, b))
    assert d.valid_length == first_bad <= len(blob)


def test_unknown_versions_and_states_are_refused() -> None:
    blob = bytearray(overlaymap.encode(SIZE, [[(0, 10, 1)]]))
    other = bytearray(blob)
    struct.pack_into("<I", other, 16, 2)
    with pytest.raises(overlaymap.OverlayMapError, match="version 2 is not supported"):
        overlaymap.decode(bytes(other))
    bad_state = overlaymap.encode_header(SIZE) + overlaymap.encode_batch(0, [(0, 10, 7)])
    with pytest.raises(overlaymap.OverlayMapError, match="unknown state 7"):
        overlaymap.decode(bad_state)
    with pytest.raises(overlaymap.OverlayMapError, match="outside"):
        overlaymap.decode(overlaymap.encode_header(10) + overlaymap.encode_batch(0, [(0, 11, 1)]))
    with pytest.raises(overlaymap.OverlayMapError, match="bad magic"):
        overlaymap.decode(b"x" * 64)
    with pytest.raises(overlaymap.OverlayMapError, match="header is missing"):
        overlaymap.decode(bytes(blob[:10]))
    blob[30] ^= 1
    with pytest.raises(overlaymap.OverlayMapError, match="fails its check"):
        overlaymap.decode(bytes(blob))


def flushed(layer: DurableLayer) -> None:
    recs, dirty, whole = layer.take()
    layer.write_durable(recs, dirty, whole)


def items(m: RangeMap) -> list[tuple[int, int, int]]:
    return list(m.items())


@settings(max_examples=15, deadline=None)
@given(st.lists(st.lists(records.filter(lambda r: r[1] > r[0]), min_size=1, max_size=5),
                min_size=2, max_size=4))
def test_a_flush_cut_at_any_byte_reopens_as_before_or_after_it(
    tmp_path_factory: pytest.TempPathFactory, bs: list[list[overlaymap.Record]]
) -> None:
    d = tmp_path_factory.mktemp("layer")
    layer = DurableLayer(d, 1, SIZE, create=True)
    for b in bs[:-1]:
        for r in b:
            layer.mark(*r)
        flushed(layer)
    before = items(layer.map)
    before_len = layer.map_length
    for r in bs[-1]:
        layer.mark(*r)
    after = items(layer.map)
    flushed(layer)
    full = layer.map_path.read_bytes()
    layer.close()
    for cut in range(before_len, len(full) + 1):
        # a torn append: cut there, maybe followed by bytes that were never what was meant
        garbage = bytes(b ^ 0xA5 for b in full[cut : cut + cut % 3])
        layer.map_path.write_bytes(full[:cut] + garbage)
        back = DurableLayer(d, 1, SIZE, create=False)
        got = items(back.map)
        assert got == (after if cut == len(full) else before), cut
        assert back.map_path.stat().st_size == back.map_length  # the torn tail is cut off
        back.close()


def test_the_map_log_is_rewritten_when_it_grows(tmp_path: Path) -> None:
    layer = DurableLayer(tmp_path, 1, SIZE, create=True)
    rng = random.Random(3)
    for _ in range(60):
        for _ in range(2000):  # overwrites of the same few ranges: a long log, a small map
            start = rng.randrange(0, 8) * 4096
            layer.mark(start, start + 4096, rng.choice([1, 2]))
        flushed(layer)
    assert layer.map_length < 2 << 20, layer.map_length
    expected = items(layer.map)
    layer.close()
    back = DurableLayer(tmp_path, 1, SIZE, create=False)
    assert items(back.map) == expected
    assert not list(tmp_path.glob("*.new"))


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
