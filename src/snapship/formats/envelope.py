"""The object envelope: how a chunk or manifest is compressed, encrypted and checked.

Layout (docs/format.md, "Objects"): an 8-byte header `magic "SNPO" | version u8 | kind u8 |
flags u8 | reserved u8`, then either `nonce(12) | AES-256-GCM ciphertext+tag` (encrypted) or
`payload | BLAKE3(header | name | payload)` (unencrypted). The header and the object's name are
authenticated, so an object cannot be altered, truncated, or moved to another name unnoticed.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Sequence

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from snapship import crypto
from snapship.errors import Corrupt, FormatError
from snapship.formats.constants import (
    CHECKSUM_LEN,
    DEFAULT_ZSTD_LEVEL,
    FLAG_ENCRYPTED,
    FLAG_ZSTD,
    KNOWN_FLAGS,
    NONCE_LEN,
    OBJECT_HEADER_LEN,
    OBJECT_MAGIC,
    OBJECT_VERSION,
    TAG_LEN,
)

_HEADER = struct.Struct("<4sBBBB")
_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # zstd contexts are not thread-safe; one per thread and level avoids re-allocating them.
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(level=level)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d: zstandard.ZstdDecompressor | None = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


def seal(
    kind: int,
    name: bytes,
    payload: bytes | memoryview,
    aead: AESGCM | None,
    level: int = DEFAULT_ZSTD_LEVEL,
    nonce_key: bytes | None = None,
) -> bytes | bytearray:
    """Encode `payload` as a stored object called `name`; zstd is kept only if it shrinks it.
    With `nonce_key` the nonce is derived from the content (`crypto.synthetic_nonce`), so
    the same payload always seals to the same bytes."""
    if level:
        packed = _compressor(level).compress(payload)
        if len(packed) < len(payload):
            return _seal_body(kind, name, packed, FLAG_ZSTD, aead, nonce_key)
    return _seal_body(kind, name, payload, 0, aead, nonce_key)


def seal_parts(kind: int, name: bytes, parts: Sequence[bytes | bytearray | memoryview],
               aead: AESGCM | None, level: int = DEFAULT_ZSTD_LEVEL) -> bytes | bytearray:
    """`seal` of the parts joined, without joining them when they compress: a 4 TiB volume's
    manifest (128 MiB of chunk ids, mostly zero) is then never held twice. The same object
    format: one zstd frame that declares its content size."""
    total = sum(len(p) for p in parts)
    if level:
        cobj = _compressor(level).compressobj(size=total)
        packed = b"".join([*(cobj.compress(p) for p in parts), cobj.flush()])
        if len(packed) < total:
            return _seal_body(kind, name, packed, FLAG_ZSTD, aead, None)
    return _seal_body(kind, name, b"".join(parts), 0, aead, None)


def _seal_body(kind: int, name: bytes, body: bytes | memoryview, flags: int,
               aead: AESGCM | None, nonce_key: bytes | None) -> bytes | bytearray:
    if aead is not None:
        flags |= FLAG_ENCRYPTED
    header = _HEADER.pack(OBJECT_MAGIC, OBJECT_VERSION, kind, flags, 0)
    if aead is not None:
        aad = header + name
        nonce = crypto.synthetic_nonce(nonce_key, aad, body) if nonce_key else None
        return crypto.encrypt_after(header, aead, body, aad, nonce)
    return b"".join((header, body, crypto.checksum(header, name, body)))


def inspect(blob: bytes | bytearray, kind: int, encrypted: bool) -> str | None:
    """What is wrong with an object's envelope as far as it shows without the key (for a
    server or a keyless verify); None if nothing is."""
    if len(blob) < OBJECT_HEADER_LEN:
        return f"truncated to {len(blob)} bytes"
    magic, version, got_kind, flags, reserved = _HEADER.unpack_from(blob)
    if magic != OBJECT_MAGIC:
        return f"bad magic {magic!r}"
    if version != OBJECT_VERSION or got_kind != kind or flags & ~KNOWN_FLAGS or reserved:
        return f"unexpected header (version {version}, kind {got_kind}, flags {flags:#x})"
    if bool(flags & FLAG_ENCRYPTED) != encrypted:
        return "its encryption flag does not match the repository"
    trailer = NONCE_LEN + TAG_LEN if encrypted else CHECKSUM_LEN
    if len(blob) < OBJECT_HEADER_LEN + trailer:
        return f"truncated to {len(blob)} bytes"
    return None


Peek = Callable[[int], bytes]
"""The first `n` bytes of an object's plaintext (fewer only where it ends), decompressed no
further than that: what an `exact` size rule reads to tell how large the whole must be."""


def open_sealed(
    kind: int,
    name: bytes,
    blob: bytes | bytearray,
    aead: AESGCM | None,
    max_size: int,
    what: str,
    exact: Callable[[Peek], int] | None = None,
) -> bytes:
    """Check and decode a stored object; `what` names it in errors (e.g. "chunk 3fa9...").

    A compressed payload is only decompressed once its zstd frame has declared its content
    size and that size is at most `max_size` and, with `exact`, equal to what `exact` derives
    from the start of the plaintext (read by streaming only that far). Nothing is allocated
    for a size the format does not allow, so a small object cannot expand into a huge one.
    """
    flags, body = _open(kind, name, blob, aead, what)
    if flags & FLAG_ZSTD:
        return _decompress(body, max_size, exact, what)
    return body


def open_sealed_parts(
    kind: int,
    name: bytes,
    blob: bytes | bytearray,
    aead: AESGCM | None,
    max_size: int,
    what: str,
    cut: Callable[[Peek], list[int]],
) -> list[bytes]:
    """`open_sealed` of an object whose plaintext the format cuts into parts, whose lengths
    `cut` derives from its start (they must add up to the whole): each part is decompressed
    straight into its own object, so the whole is never held a second time."""
    flags, body = _open(kind, name, blob, aead, what)
    if not flags & FLAG_ZSTD:
        lengths = cut(lambda n: body[:n])
        if sum(lengths) != len(body):
            raise Corrupt(f"{what} is damaged: it holds {len(body)} bytes, its header implies "
                          f"{sum(lengths)}")
        mv, out, pos = memoryview(body), [], 0
        for n in lengths:
            out.append(bytes(mv[pos : pos + n]))
            pos += n
        return out
    declared = _declared(body, max_size, what)
    try:
        # Across frames, so that anything after the one frame shows as more output (or
        # fails to decode) instead of going unread.
        with _decompressor().stream_reader(body, read_across_frames=True) as reader:
            prefix = _Prefix(reader)
            lengths = cut(prefix)
            if sum(lengths) != declared:
                raise Corrupt(f"{what} is damaged: its zstd frame declares {declared} bytes, "
                              f"its header implies {sum(lengths)}")
            pending, parts = prefix.taken(), []
            for n in lengths:
                head, pending = pending[:n], pending[n:]
                part = head + reader.read(n - len(head)) if len(head) < n else head
                if len(part) != n:
                    raise Corrupt(f"{what} is damaged: its zstd frame ends early")
                parts.append(part)
            if pending or reader.read(1):
                raise Corrupt(f"{what} is damaged: data follows its end")
    except zstandard.ZstdError as e:
        raise Corrupt(f"{what} is damaged: {e}") from None
    return parts


def _open(kind: int, name: bytes, blob: bytes | bytearray, aead: AESGCM | None, what: str
          ) -> tuple[int, bytes]:
    """The envelope's flags and its checked (decrypted) body."""
    if len(blob) < OBJECT_HEADER_LEN:
        raise Corrupt(f"{what} is damaged: truncated to {len(blob)} bytes")
    magic, version, got_kind, flags, _ = _HEADER.unpack_from(blob)
    if magic != OBJECT_MAGIC:
        raise Corrupt(f"{what} is damaged: bad magic {magic!r}")
    if version != OBJECT_VERSION:
        raise FormatError(f"{what} has object format version {version}; this snapship reads 1")
    if got_kind != kind:
        raise Corrupt(f"{what} is damaged: object kind {got_kind}, expected {kind}")
    if flags & ~KNOWN_FLAGS:
        raise FormatError(f"{what} uses unknown flags {flags:#x}")
    encrypted = bool(flags & FLAG_ENCRYPTED)
    if encrypted != (aead is not None):
        state = "encrypted" if encrypted else "unencrypted"
        raise Corrupt(f"{what} is {state}, which does not match the repository")
    header = bytes(blob[:OBJECT_HEADER_LEN])
    mv = memoryview(blob)[OBJECT_HEADER_LEN:]
    if aead is not None:
        if len(mv) < NONCE_LEN + TAG_LEN:
            raise Corrupt(f"{what} is damaged: truncated to {len(blob)} bytes")
        try:
            return flags, crypto.decrypt(aead, mv, header + name)
        except InvalidTag:
            raise Corrupt(f"{what} is damaged or tampered with (authentication failed)") from None
    if len(mv) < CHECKSUM_LEN:
        raise Corrupt(f"{what} is damaged: truncated to {len(blob)} bytes")
    body_mv = mv[:-CHECKSUM_LEN]
    if crypto.checksum(header, name, body_mv) != mv[-CHECKSUM_LEN:]:
        raise Corrupt(f"{what} is damaged (checksum mismatch)")
    return flags, bytes(body_mv)


def _declared(body: bytes, max_size: int, what: str) -> int:
    """The content size a zstd frame declares, refused above `max_size` or when missing."""
    try:
        declared = zstandard.frame_content_size(body)
    except zstandard.ZstdError as e:
        raise Corrupt(f"{what} is damaged: {e}") from None
    if declared < 0:  # snapship always writes the size; without it nothing bounds the output
        raise Corrupt(f"{what} is damaged: its zstd frame does not declare its size")
    if declared > max_size:
        raise Corrupt(f"{what} is damaged: its zstd frame declares {declared} bytes, more than "
                      f"the {max_size} it can have")
    return declared


def _decompress(body: bytes, max_size: int, exact: Callable[[Peek], int] | None, what: str
                ) -> bytes:
    declared = _declared(body, max_size, what)
    if exact is not None:
        try:
            with _decompressor().stream_reader(body) as reader:
                expected = exact(_Prefix(reader))
        except zstandard.ZstdError as e:
            raise Corrupt(f"{what} is damaged: {e}") from None
        if declared != expected:
            raise Corrupt(f"{what} is damaged: its zstd frame declares {declared} bytes, its "
                          f"header implies {expected}")
    try:
        # Exactly `declared` bytes are allocated; a frame that yields another amount, or is
        # followed by anything, is refused.
        return _decompressor().decompress(body, max_output_size=declared,
                                          allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise Corrupt(f"{what} is damaged: {e}") from None


class _Prefix:
    """`Peek` over a zstd stream: decompresses only as far as the longest prefix asked for."""

    def __init__(self, reader: zstandard.ZstdDecompressionReader) -> None:
        self._reader = reader
        self._buf = bytearray()

    def __call__(self, n: int) -> bytes:
        while len(self._buf) < n:
            more = self._reader.read(n - len(self._buf))
            if not more:
                break
            self._buf += more
        return bytes(self._buf[:n])

    def taken(self) -> bytes:
        """What was decompressed so far: the stream continues after it."""
        return bytes(self._buf)

