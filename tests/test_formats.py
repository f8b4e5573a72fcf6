"""Object envelope, manifest and config codecs: round trips and damage detection."""

from __future__ import annotations

import contextlib
import json
import os
import struct
from array import array
from collections.abc import Callable

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from snapship import crypto
from snapship.crypto import Keys
from snapship.errors import Corrupt, FormatError, UsageError
from snapship.formats import envelope, refs
from snapship.formats import manifest as mf
from snapship.formats import summary as summary_codec
from snapship.formats.config import RepoConfig, decode_config, encode_config
from snapship.formats.constants import KIND_CHUNK, KIND_MANIFEST, KIND_REFS
from snapship.types import ZERO_ID

KEYS = Keys(bytes(range(64)))
AEADS = [None, KEYS.aead]


@pytest.mark.parametrize("aead", AEADS, ids=["plain", "aes"])
@given(payload=st.binary(max_size=5000), name=st.binary(min_size=1, max_size=40))
def test_envelope_roundtrip(aead: object, payload: bytes, name: bytes) -> None:
    blob = envelope.seal(KIND_CHUNK, name, payload, aead)  # type: ignore[arg-type]
    assert envelope.open_sealed(KIND_CHUNK, name, blob, aead, 1 << 20, "x") == payload  # type: ignore[arg-type]


@pytest.mark.parametrize("aead", AEADS, ids=["plain", "aes"])
@settings(max_examples=300)
@given(payload=st.binary(min_size=0, max_size=3000), data=st.data())
def test_envelope_any_flipped_byte_is_detected(aead: object, payload: bytes, data: st.DataObject
                                               ) -> None:
    payload = payload + b"compressible " * 20
    blob = bytearray(envelope.seal(KIND_CHUNK, b"name", payload, aead))  # type: ignore[arg-type]
    pos = data.draw(st.integers(0, len(blob) - 1))
    blob[pos] ^= data.draw(st.integers(1, 255))
    with pytest.raises(Corrupt):
        envelope.open_sealed(KIND_CHUNK, b"name", bytes(blob), aead, 1 << 20, "x")  # type: ignore[arg-type]


@pytest.mark.parametrize("aead", AEADS, ids=["plain", "aes"])
def test_envelope_rejects_wrong_name_kind_truncation_and_encryption_mismatch(aead: object) -> None:
    blob = envelope.seal(KIND_CHUNK, b"a", b"payload" * 100, aead)  # type: ignore[arg-type]
    for args in [
        (KIND_CHUNK, b"b", blob),  # moved to another name
        (KIND_MANIFEST, b"a", blob),  # another kind
        (KIND_CHUNK, b"a", blob[:-1]),
        (KIND_CHUNK, b"a", blob[:5]),
        (KIND_CHUNK, b"a", b""),
    ]:
        with pytest.raises(Corrupt):
            envelope.open_sealed(args[0], args[1], args[2], aead, 1 << 20, "x")  # type: ignore[arg-type]
    other = KEYS.aead if aead is None else None
    with pytest.raises(Corrupt, match="does not match the repository"):
        envelope.open_sealed(KIND_CHUNK, b"a", blob, other, 1 << 20, "x")


def test_envelope_keeps_zstd_only_when_it_shrinks() -> None:
    random_data = os.urandom(4096)
    assert len(envelope.seal(KIND_CHUNK, b"n", random_data, None)) == 8 + 4096 + 32
    assert len(envelope.seal(KIND_CHUNK, b"n", bytes(4096) + b"x", None)) < 200


def test_envelope_rejects_unknown_object_version() -> None:
    blob = bytearray(envelope.seal(KIND_CHUNK, b"n", b"data", None))
    blob[4] = 2
    with pytest.raises(FormatError, match="version 2"):
        envelope.open_sealed(KIND_CHUNK, b"n", bytes(blob), None, 100, "x")


@st.composite
def manifests(draw: st.DrawFn) -> mf.Manifest:
    cs = 1 << draw(st.integers(16, 24))
    count = draw(st.integers(0, 40))
    size = 0 if count == 0 else (count - 1) * cs + draw(st.integers(1, cs))
    ids = b""
    sizes = array("I")
    for _ in range(count):
        if draw(st.booleans()):
            ids += ZERO_ID
            sizes.append(0)
        else:
            ids += draw(st.binary(min_size=32, max_size=32).filter(lambda b: b != ZERO_ID))
            sizes.append(draw(st.integers(1, 2**32 - 1)))
    name = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,20}", fullmatch=True)
    return mf.Manifest(
        volume=draw(name),
        version=draw(name),
        size=size,
        chunk_size=cs,
        created="2026-11-26T00:00:00.000Z",
        source=draw(st.text(max_size=30)),
        parent=draw(st.none() | name),
        ids=ids,
        sizes=sizes,
        labels=draw(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3)),
        stats={"bytes_read": draw(st.integers(0, 2**40))},
    )


def mangled(body: bytes, data: st.DataObject) -> bytes:
    """`body` with a few bytes overwritten and/or cut short, as hypothesis picks."""
    out = bytearray(body)
    for _ in range(data.draw(st.integers(1, 4))):
        if data.draw(st.booleans()) and out:
            out[data.draw(st.integers(0, len(out) - 1))] = data.draw(st.integers(0, 255))
        else:
            del out[data.draw(st.integers(0, len(out))) :]
    return bytes(out)


@given(manifests())
def test_manifest_roundtrip(m: mf.Manifest) -> None:
    assert mf.decode(mf.encode(m), "m") == m


@settings(max_examples=300)
@given(m=manifests(), data=st.data())
def test_manifest_decode_never_crashes_on_garbage(m: mf.Manifest, data: st.DataObject) -> None:
    with contextlib.suppress(FormatError):
        mf.decode(mangled(mf.encode(m), data), "m")


def test_manifest_rejects_inconsistent_counts_and_versions() -> None:
    m = mf.Manifest("v", "1", 3 * 65536, 65536, "t", "s", None, ZERO_ID * 2, array("I", [0, 0]))
    with pytest.raises(ValueError, match="3 expected"):
        mf.encode(m)
    m.ids += ZERO_ID
    m.sizes.append(0)
    body = bytearray(mf.encode(m))
    body[4] = 9
    with pytest.raises(FormatError, match="manifest version 9"):
        mf.decode(bytes(body), "m")
    body[4] = 1
    assert mf.decode(bytes(body), "m") == m
    for at in (6, 7):  # the reserved u16: a later version's field is refused, not ignored
        body[at] = 1
        with pytest.raises(FormatError, match="reserved bits set"):
            mf.decode(bytes(body), "m")
        damaged = bytes(body)
        with pytest.raises(FormatError, match="reserved bits set"):
            mf.plaintext_size(lambda n: damaged[:n], "m")  # noqa: B023 (called at once)
        body[at] = 0


def test_volume_names_are_checked() -> None:
    for bad in ["", "../x", "a/b", "-x", "a b", "x" * 129]:
        with pytest.raises(UsageError):
            mf.check_name("volume", bad)
    assert mf.check_name("volume", "vg0-root_1.snap+x") == "vg0-root_1.snap+x"


def test_config_roundtrip_and_rejections() -> None:
    cfg = RepoConfig(repo_id="ab", chunk_size=1 << 20, encryption="aes-256-gcm", created="t")
    mac = KEYS.mac(cfg.signed_part())
    assert decode_config(encode_config(cfg, mac)) == (cfg, mac)
    for change, message in [
        ({"version": 3}, "format version 3"),
        ({"format": "other"}, "not a snapship repository"),
        ({"chunk_size": 3000}, "invalid chunk size"),
        ({"encryption": "rot13"}, "unknown encryption"),
        ({"mac": None}, "no MAC"),
    ]:
        obj = json.loads(encode_config(cfg, mac))
        obj.update(change)
        if obj.get("mac") is None:
            obj.pop("mac")
        with pytest.raises(FormatError, match=message):
            decode_config(json.dumps(obj).encode())
    with pytest.raises(FormatError):
        decode_config(b"not json")


@given(manifests(), st.text(min_size=1, max_size=20))
def test_refs_roundtrip_lists_each_distinct_chunk_once(m: mf.Manifest, writer: str) -> None:
    r = refs.from_manifest(m, writer)
    assert refs.decode(refs.encode(r), "r") == r
    assert dict(zip((r.ids[i : i + 32] for i in range(0, len(r.ids), 32)), r.sizes,
                    strict=True)) == m.unique_chunks()
    assert list(refs.short_keys(r.ids)) == [refs.short_key(r.ids[i : i + 32])
                                           for i in range(0, len(r.ids), 32)]


@settings(max_examples=300)
@given(m=manifests(), data=st.data())
def test_refs_decode_never_crashes_on_garbage(m: mf.Manifest, data: st.DataObject) -> None:
    with contextlib.suppress(FormatError):
        refs.decode(mangled(refs.encode(refs.from_manifest(m, "w")), data), "r")


def test_refs_reject_unsorted_repeated_and_zero_ids_and_other_versions() -> None:
    a, b = b"\x01" * 32, b"\x02" * 32
    for ids in (b + a, a + a, ZERO_ID + a):
        body = refs.encode(refs.Refs("v", "1", "w", ids, array("I", [5, 5])))
        with pytest.raises(FormatError, match="inconsistent"):
            refs.decode(body, "r")
    framed = bytearray(refs.encode(refs.Refs("v", "1", "w", a + b, array("I", [5, 5]))))
    framed[4] = 2
    with pytest.raises(FormatError, match="reference list version 2"):
        refs.decode(bytes(framed), "r")


# -- decompressed sizes (issue 10, item 7) ------------------------------------------------------


def _sealed_frame(frame: bytes, name: bytes = b"n", kind: int = KIND_CHUNK) -> bytes:
    header = struct.pack("<4sBBBB", b"SNPO", 1, kind, 0x01, 0)
    return b"".join((header, frame, crypto.checksum(header, name, frame)))


def test_envelope_refuses_a_frame_that_does_not_declare_its_size() -> None:
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(1000))
    with pytest.raises(Corrupt, match="does not declare its size"):
        envelope.open_sealed(KIND_CHUNK, b"n", _sealed_frame(frame), None, 1 << 20, "x")


def test_envelope_refuses_a_declared_size_beyond_the_bound_before_decompressing() -> None:
    frame = zstandard.ZstdCompressor().compress(bytes((1 << 20) + 1))
    with pytest.raises(Corrupt, match=r"declares 1048577 bytes, more than the 1048576"):
        envelope.open_sealed(KIND_CHUNK, b"n", _sealed_frame(frame), None, 1 << 20, "x")
    assert len(envelope.open_sealed(KIND_CHUNK, b"n", _sealed_frame(frame), None,
                                    (1 << 20) + 1, "x")) == (1 << 20) + 1


def test_envelope_refuses_bytes_after_the_frame() -> None:
    frame = zstandard.ZstdCompressor().compress(b"a" * 100)
    with pytest.raises(Corrupt, match="damaged"):
        envelope.open_sealed(KIND_CHUNK, b"n", _sealed_frame(frame + frame), None, 1000, "x")


def test_envelope_exact_rule_reads_only_a_prefix_and_must_match() -> None:
    payload = b"head" + bytes(1 << 20)
    blob = envelope.seal(KIND_CHUNK, b"n", payload, None)
    asked: list[int] = []

    def rule(size: int) -> Callable[[envelope.Peek], int]:
        def exact(peek: envelope.Peek) -> int:
            asked.append(len(peek(4)))
            assert peek(4) == b"head"
            return size
        return exact

    assert envelope.open_sealed(KIND_CHUNK, b"n", blob, None, 1 << 21, "x",
                                rule(len(payload))) == payload
    with pytest.raises(Corrupt, match=f"declares {len(payload)} bytes, its header implies 7"):
        envelope.open_sealed(KIND_CHUNK, b"n", blob, None, 1 << 21, "x", rule(7))
    assert asked == [4, 4]


@given(manifests())
def test_manifest_plaintext_size_is_its_length_and_opens_sealed(m: mf.Manifest) -> None:
    body = mf.encode(m)
    assert mf.plaintext_size(lambda n: body[:n], "m") == len(body)
    blob = envelope.seal(KIND_MANIFEST, b"k", body, None)

    def rule(peek: envelope.Peek) -> int:
        return mf.plaintext_size(peek, "m")

    assert envelope.open_sealed(KIND_MANIFEST, b"k", blob, None, 1 << 30, "m", rule) == body


@settings(max_examples=300)
@given(m=manifests(), data=st.data())
def test_manifest_plaintext_size_never_crashes_on_garbage(m: mf.Manifest, data: st.DataObject
                                                          ) -> None:
    body = mangled(mf.encode(m), data)
    with contextlib.suppress(FormatError):
        assert mf.plaintext_size(lambda n: body[:n], "m") >= 20


def test_manifest_plaintext_size_needs_the_count_its_header_implies() -> None:
    m = mf.Manifest("v", "1", 3 * 65536, 65536, "t", "s", None, ZERO_ID * 3, array("I", [0] * 3))
    body = bytearray(mf.encode(m))
    count_at = 12 + struct.unpack_from("<I", body, 8)[0]
    struct.pack_into("<Q", body, count_at, 1 << 40)
    with pytest.raises(FormatError, match="1099511627776 chunks listed, 3 expected"):
        mf.plaintext_size(lambda n: bytes(body[:n]), "m")


@given(manifests(), st.text(min_size=1, max_size=20))
def test_refs_plaintext_size_is_its_length(m: mf.Manifest, writer: str) -> None:
    body = refs.encode(refs.from_manifest(m, writer))
    assert refs.plaintext_size(lambda n: body[:n], "r") == len(body)
    assert len(body) <= refs.max_plaintext(len(body))


def test_real_reference_lists_compress_far_less_than_their_bound_allows() -> None:
    """Sorted random ids with identical stored sizes, at the strongest level: what the ratio
    bound must never refuse."""
    ids = sorted(os.urandom(32) for _ in range(50_000))
    r = refs.Refs("v", "1", "w", b"".join(ids), array("I", [1 << 20] * len(ids)))
    body = refs.encode(r)
    blob = envelope.seal(KIND_REFS, b"k", body, None, 19)
    assert len(body) / len(blob) < 1.25
    assert len(body) <= refs.max_plaintext(len(blob))


def _with_header(body: bytes, header: bytes) -> bytes:
    old = struct.unpack_from("<I", body, 8)[0]
    return body[:8] + struct.pack("<I", len(header)) + header + body[12 + old :]


def canonical(header: dict[str, object]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def test_a_header_spelled_otherwise_is_refused() -> None:
    """The same JSON spelled as no writer spells it (hypothesis found `"\\u0072"` for `"r"`,
    made by damage) is refused, so what decodes always encodes back to the bytes stored."""
    m = mf.Manifest("v", "1", 65536, 65536, "t", "r", None, ZERO_ID, array("I", [0]),
                    labels={"k": "\u00e9"})
    for decode, body in [(mf.decode, mf.encode(m)),
                         (refs.decode, refs.encode(refs.from_manifest(m, "w\u00e9")))]:
        header = json.loads(body[12 : 12 + struct.unpack_from("<I", body, 8)[0]])
        assert decode(_with_header(body, canonical(header)), "m")
        for other in [canonical(header).replace(b'"v"', b'"\\u0076"', 1),
                      json.dumps(header).encode(),
                      json.dumps(dict(reversed(header.items())), separators=(",", ":")).encode(),
                      json.dumps(header, sort_keys=True, separators=(",", ":"),
                                 ensure_ascii=False).encode(),
                      canonical(header)[:-1] + b',"volume":"v"}']:
            assert json.loads(other) == header
            with pytest.raises(FormatError, match="the header of m is not in the form snapship "
                                                  "writes"):
                decode(_with_header(body, other), "m")


def test_manifest_and_refs_headers_nested_deeply_are_refused() -> None:
    m = mf.Manifest("v", "1", 65536, 65536, "t", "s", None, ZERO_ID, array("I", [0]))
    deep = ('{"x":' + "[" * 100_000 + "]" * 100_000 + "}").encode()
    for decode, body in [(mf.decode, mf.encode(m)),
                         (refs.decode, refs.encode(refs.from_manifest(m, "w")))]:
        with pytest.raises(FormatError, match="the header of m is nested more than 32 levels"):
            decode(_with_header(body, deep), "m")


# -- manifest statistics (issue 10, item 9) -----------------------------------------------------


@pytest.mark.parametrize(("change", "field"), [
    ({"bytes_read": None}, "bytes_read"), ({"chunks_new": -1}, "chunks_new"),
    ({"bytes_new_stored": "5"}, "bytes_new_stored"), ({"workers": True}, "workers"),
    ({"duration": [1]}, "duration"), ({"duration": float("inf")}, "duration"),
    ({"mode": 3}, "mode"), ({"bytes_new": 1.5}, "bytes_new")])
def test_manifest_decode_refuses_mistyped_stats(change: dict[str, object], field: str) -> None:
    m = mf.Manifest("v", "1", 65536, 65536, "t", "s", None, ZERO_ID, array("I", [0]),
                    stats={"bytes_read": 1, "duration": 0.5, "mode": "full"})
    body = mf.encode(m)
    header = json.loads(body[12 : 12 + struct.unpack_from("<I", body, 8)[0]])
    header["stats"].update(change)
    with pytest.raises(FormatError, match=f"m is malformed: stats field '{field}'"):
        mf.decode(_with_header(body, canonical(header)), "m")
    m.stats.update(change)
    with pytest.raises(ValueError, match=field):
        mf.encode(m)


def test_manifest_stats_may_leave_fields_out_and_keep_unknown_ones() -> None:
    m = mf.Manifest("v", "1", 0, 65536, "t", "s", None, b"", array("I"),
                    stats={"future": [1, {"a": None}], "duration": 2})
    assert mf.decode(mf.encode(m), "m") == m


# -- version summaries ---------------------------------------------------------------------


def _summary_manifest() -> mf.Manifest:
    cs = 64 * 1024
    ids = b"".join([b"\x01" * 32, ZERO_ID, b"\x02" * 32, b"\x01" * 32])
    return mf.Manifest("disk", "20261201-000000.000-abcd", 3 * cs + 100, cs,
                       "2026-12-01T00:00:00.000Z", "/dev/x", None, ids,
                       array("I", [500, 0, 600, 500]), {"k": "v"}, {"bytes_new_stored": 3})


def test_a_summary_counts_what_show_reports_and_round_trips() -> None:
    m = _summary_manifest()
    s = summary_codec.from_manifest(m, manifest_bytes=777)
    assert (s.chunks, s.zero_chunks, s.unique_chunks, s.stored_bytes, s.data_bytes,
            s.manifest_bytes) == (4, 1, 2, 1100, 2 * 64 * 1024 + 100, 777)
    assert summary_codec.from_manifest(m, (2, 1100), 777) == s
    assert summary_codec.decode(summary_codec.encode(s), "it") == s


@pytest.mark.parametrize("change", [
    {"summary": 2}, {"summary": None}, {"size": -1}, {"size": "1"}, {"chunks": 5},
    {"zero_chunks": 5}, {"unique_chunks": 4}, {"data_bytes": 1 << 40}, {"labels": {"k": 1}},
    {"stats": {"duration": -1}}, {"volume": "../x"}, {"parent": 7}, {"chunk_size": 1000},
    {"stored_bytes": 0},
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_a_summary_that_is_not_exactly_version_1_is_refused(change: dict[str, object]) -> None:
    d = json.loads(summary_codec.encode(summary_codec.from_manifest(_summary_manifest())))
    d.update(change)
    with pytest.raises(FormatError, match=r"^it "):
        summary_codec.decode(json.dumps(d).encode(), "it")


@pytest.mark.parametrize("aead", AEADS, ids=["plain", "aes"])
@given(m=manifests(), level=st.sampled_from([0, 3]))
def test_a_manifest_sealed_in_parts_opens_in_parts_and_as_a_whole(
        aead: object, m: mf.Manifest, level: int) -> None:
    """The parts path (no joined copy of the ids) writes the same format the whole-object
    reader reads, and reads what it writes; both ways agree on every manifest."""
    parts = mf.encode_parts(m)
    assert b"".join(parts) == mf.encode(m)
    blob = envelope.seal_parts(KIND_MANIFEST, b"k", parts, aead, level)  # type: ignore[arg-type]
    whole = envelope.open_sealed(KIND_MANIFEST, b"k", blob, aead, 1 << 30, "m",  # type: ignore[arg-type]
                                 lambda peek: mf.plaintext_size(peek, "m"))
    assert mf.decode(whole, "m") == m
    cut = envelope.open_sealed_parts(KIND_MANIFEST, b"k", blob, aead, 1 << 30, "m",  # type: ignore[arg-type]
                                     lambda peek: mf.cut(peek, "m"))
    assert mf.decode_parts(cut, "m") == m
    old = envelope.seal(KIND_MANIFEST, b"k", mf.encode(m), aead)  # type: ignore[arg-type]
    assert mf.decode_parts(envelope.open_sealed_parts(
        KIND_MANIFEST, b"k", old, aead, 1 << 30, "m",  # type: ignore[arg-type]
        lambda peek: mf.cut(peek, "m")), "m") == m


@settings(max_examples=300)
@given(m=manifests(), data=st.data())
def test_opening_a_damaged_manifest_in_parts_fails_cleanly(m: mf.Manifest, data: st.DataObject
                                                           ) -> None:
    """A damaged plaintext (recompressed, so it passes the checksum) is refused with a
    FormatError or Corrupt, never a crash or a wrong manifest."""
    body = mangled(mf.encode(m), data)
    frame = zstandard.ZstdCompressor().compress(body)
    try:
        sealed = _sealed_frame(frame, kind=KIND_MANIFEST)
        parts = envelope.open_sealed_parts(KIND_MANIFEST, b"n", sealed, None, 1 << 30, "m",
                                           lambda peek: mf.cut(peek, "m"))
        got = mf.decode_parts(parts, "m")
    except (FormatError, Corrupt):
        return
    assert b"".join(parts) == body and mf.encode(got) == body


def test_opening_in_parts_refuses_bytes_after_the_frame() -> None:
    m = mf.Manifest("v", "1", 2 * 65536, 65536, "t", "s", None, ZERO_ID * 2, array("I", [0, 0]))
    frame = zstandard.ZstdCompressor().compress(mf.encode(m))
    for tail in (frame, b"junk"):
        with pytest.raises(Corrupt, match="damaged"):
            envelope.open_sealed_parts(KIND_MANIFEST, b"n",
                                       _sealed_frame(frame + tail, kind=KIND_MANIFEST), None,
                                       1 << 20, "m", lambda peek: mf.cut(peek, "m"))


def test_zero_markers_are_checked_in_blocks_and_one_by_one() -> None:
    """A stored size beside a zero id (or a zero size beside a data id) is found wherever it
    is: inside a block of zero ids, and inside a block holding data."""
    n = 3 * 8192 + 5
    for bad, data_at in ((7000, None), (9000, 9001), (n - 1, None), (20000, 20000)):
        ids = bytearray(ZERO_ID * n)
        sizes = array("I", bytes(4 * n))
        if data_at is not None:
            ids[data_at * 32 : data_at * 32 + 32] = b"\x01" * 32
            sizes[data_at] = 10
        sizes[bad] = 0 if bad == data_at else 5
        m = mf.Manifest("v", "1", n * 65536, 65536, "t", "s", None, bytes(ids), sizes)
        with pytest.raises(ValueError, match=f"chunk {bad}: zero marker"):
            mf.validate(m)
        sizes[bad] = 10 if bad == data_at else 0
        mf.validate(m)
        assert list(m.nonzero_indices()) == ([] if data_at is None else [data_at])
        assert m.zero_chunks() == n - (data_at is not None)
