"""The dm-snapshot persistent exception store ("COW device"): parse and write it, no I/O.

Layout (Linux `drivers/md/dm-snap-persistent.c`; see docs/cow.md): little-endian; chunk 0 is
the header `magic u32 = 0x70416e53, valid u32, version u32 = 1, chunk_size u32 (sectors)`;
then areas, each one metadata chunk of `C/16` records `old_chunk u64, new_chunk u64` followed
by the data chunks those records use. Area `i` starts at chunk `1 + i * (C/16 + 1)`. The table
ends at the first record whose `new_chunk` is 0.

The set of `old_chunk` values is exactly the set of origin chunks written since the snapshot
was taken. The parser is strict: anything it cannot vouch for is an error naming what is wrong,
and an invalidated (overflowed) store is `CowInvalid`, never an empty change set.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from snapship.changes.ranges import coalesce
from snapship.errors import FormatError
from snapship.types import ByteRange

SNAP_MAGIC = 0x70416E53
SNAP_VERSION = 1
SECTOR = 512
RECORD = struct.Struct("<QQ")
HEADER = struct.Struct("<IIII")
PROBE = 4096
"""Bytes read to tell a never-initialised store (all zero) from something else."""

ReadAt = Callable[[int, int], bytes]
"""read(offset, length) -> bytes: exactly `length` bytes unless the store ends first."""


class CowError(FormatError):
    """The store is not a dm-snapshot exception store this reader can trust."""


class CowInvalid(CowError):
    """The kernel invalidated the snapshot (overflow): its change list is incomplete."""


class CowUninitialised(CowError):
    """A brand-new store the kernel has not written a header to yet."""


@dataclass(frozen=True)
class CowHeader:
    valid: bool
    version: int
    chunk_sectors: int

    @property
    def chunk_size(self) -> int:
        return self.chunk_sectors * SECTOR

    @property
    def records_per_area(self) -> int:
        return self.chunk_size // RECORD.size


@dataclass(frozen=True)
class CowTable:
    header: CowHeader
    exceptions: tuple[tuple[int, int], ...]
    """(old_chunk, new_chunk) in table order."""
    areas: int

    @property
    def changed_chunks(self) -> list[int]:
        return sorted({old for old, _ in self.exceptions})

    def changed_ranges(self, origin_size: int | None = None) -> list[ByteRange]:
        """Changed origin bytes, coalesced; clipped to `origin_size` (its last chunk may be
        partial)."""
        c = self.header.chunk_size
        ranges = (ByteRange(old * c, (old + 1) * c) for old in self.changed_chunks)
        if origin_size is not None:
            ranges = (ByteRange(r.start, min(r.end, origin_size)) for r in ranges)
        return coalesce(ranges)


def parse_header(data: bytes) -> CowHeader:
    """The header at the start of `data`: the store's first `PROBE` bytes (or all of it, if
    shorter). A store that was never initialised is zero there (LVM zeroes the start of a new
    COW volume; the kernel writes the header when it first activates the snapshot), so a zero
    magic followed by anything but zeroes is no COW store at all (a disk image's boot
    sector, say), not a new one."""
    if len(data) < HEADER.size:
        raise CowError(f"COW store is truncated: {len(data)} bytes, no complete header")
    magic, valid, version, chunk_sectors = HEADER.unpack_from(data)
    if magic == 0 and not any(data[:PROBE]):
        raise CowUninitialised(f"COW store was never initialised (its first "
                               f"{min(len(data), PROBE)} bytes are zero)")
    if magic != SNAP_MAGIC:
        raise CowError(f"not a dm-snapshot COW store (magic {magic:#010x}, expected 0x70416e53)")
    if version != SNAP_VERSION:
        raise CowError(f"COW store version {version} is not supported (only version 1 exists)")
    if chunk_sectors == 0 or chunk_sectors & (chunk_sectors - 1):
        raise CowError(f"COW chunk size {chunk_sectors} sectors is not a power of two")
    if valid not in (0, 1):
        raise CowError(f"COW header has valid = {valid}, expected 0 or 1")
    return CowHeader(bool(valid), version, chunk_sectors)


def area_start(area: int, header: CowHeader) -> int:
    """Chunk index of area `area`'s metadata chunk."""
    return 1 + area * (header.records_per_area + 1)


def parse(read: ReadAt, store_size: int, origin_size: int | None = None) -> CowTable:
    """Read the whole exception table through `read`.

    `store_size` is the COW device's size in bytes; `origin_size`, if known, the origin's, so
    records naming chunks beyond it are refused.
    """
    header = parse_header(read(0, min(PROBE, store_size)))
    if not header.valid:
        raise CowInvalid("COW store is marked invalid: the snapshot overflowed or failed")
    c = header.chunk_size
    if store_size < c:
        raise CowError(f"COW store is truncated: {store_size} bytes, smaller than one chunk ({c})")
    store_chunks = store_size // c
    origin_chunks = None if origin_size is None else -(-origin_size // c)
    exceptions: list[tuple[int, int]] = []
    seen_new: set[int] = set()
    area = 0
    while True:
        meta = area_start(area, header)
        if meta >= store_chunks:
            raise CowError(
                f"COW table is truncated: area {area} would start at byte {meta * c}, "
                f"beyond the end of the store ({store_size} bytes), and no terminator was found"
            )
        data = read(meta * c, c)
        if len(data) != c:
            raise CowError(f"COW table is truncated: area {area} at byte {meta * c} is short")
        for i, (old, new) in enumerate(RECORD.iter_unpack(data)):
            if new == 0:
                return CowTable(header, tuple(exceptions), area + 1)
            where = f"record {i} of area {area}"
            if new >= store_chunks:
                raise CowError(
                    f"COW {where} points to chunk {new}, past the end of the store "
                    f"({store_chunks} chunks)"
                )
            # Commits may land out of allocation order, so a record's data chunk need not lie
            # in its own area; it must never be the header or a metadata chunk, though.
            if (new - 1) % (header.records_per_area + 1) == 0:
                raise CowError(f"COW {where} points to chunk {new}, a metadata chunk")
            if new in seen_new:
                raise CowError(f"COW {where} reuses data chunk {new}")
            if origin_chunks is not None and old >= origin_chunks:
                raise CowError(
                    f"COW {where} names origin chunk {old}, beyond the origin "
                    f"({origin_chunks} chunks)"
                )
            seen_new.add(new)
            exceptions.append((old, new))
        area += 1


def parse_bytes(store: bytes, origin_size: int | None = None) -> CowTable:
    return parse(lambda off, n: store[off : off + n], len(store), origin_size)


def iter_store(
    chunk_sectors: int, chunks: Iterable[tuple[int, bytes]], valid: bool = True
) -> Iterator[bytes]:
    """The pieces of a complete store whose exceptions map each origin chunk to the given
    content, in order; memory stays at one area however many chunks there are.

    Used by `cow export` (the content is the *old* data a snapshot target shows) and by tests.
    The kernel's own layout is followed: records fill areas in order, each record's data chunk
    is the next free chunk after its area's metadata chunk, and a zeroed metadata chunk (or
    record) ends the table.
    """
    header = CowHeader(valid, SNAP_VERSION, chunk_sectors)
    c = header.chunk_size
    per_area = header.records_per_area
    first = bytearray(c)
    HEADER.pack_into(first, 0, SNAP_MAGIC, int(valid), SNAP_VERSION, chunk_sectors)
    yield bytes(first)
    it = iter(chunks)
    area = 0
    while True:
        batch = list(itertools.islice(it, per_area))
        meta = area_start(area, header)
        table = bytearray(c)
        for i, (old, data) in enumerate(batch):
            if len(data) > c:
                raise ValueError(f"chunk {old} has {len(data)} bytes, more than {c}")
            RECORD.pack_into(table, i * RECORD.size, old, meta + 1 + i)
        yield bytes(table)
        for _, data in batch:
            yield data.ljust(c, b"\0")
        if len(batch) < per_area:
            return
        area += 1


def build_store(
    chunk_sectors: int, chunks: Mapping[int, bytes] | Iterable[tuple[int, bytes]],
    valid: bool = True,
) -> bytes:
    items = chunks.items() if isinstance(chunks, Mapping) else chunks
    return b"".join(iter_store(chunk_sectors, items, valid))
