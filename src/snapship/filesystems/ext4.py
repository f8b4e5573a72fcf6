"""ext2/3/4 free space from the superblock, the group descriptors and the block bitmaps.

docs/free-space.md, "ext4", lists the fields used. Handled: 1-64 KiB blocks, 64bit descriptors,
flex_bg (bitmaps and inode tables of one group stored in another), meta_bg (descriptor blocks
spread over the groups), sparse_super and sparse_super2 backups, and BLOCK_UNINIT groups, whose
bitmap is not on disk and is computed as the kernel does (ext4_init_block_bitmap). Refused, as
not clean: bigalloc, an external-journal device, an unknown incompatible feature, a journal
that needs recovery, a filesystem marked with errors or not cleanly unmounted (ext2).
"""

from __future__ import annotations

import struct

import crc32c

from snapship.filesystems.freemap import FreeMap, FreeSpaceError, Read, runs_from_bitmap
from snapship.types import ByteRange

SUPERBLOCK_OFFSET = 1024
MAGIC = 0xEF53

STATE_VALID = 0x1
STATE_ERROR = 0x2

COMPAT_HAS_JOURNAL = 0x4
COMPAT_SPARSE_SUPER2 = 0x200

INCOMPAT_COMPRESSION = 0x1
INCOMPAT_RECOVER = 0x4
INCOMPAT_JOURNAL_DEV = 0x8
INCOMPAT_META_BG = 0x10
INCOMPAT_64BIT = 0x80
INCOMPAT_MMP = 0x100
# Features that change nothing about where blocks are or how their bitmaps read:
# filetype, extents, flex_bg, ea_inode, dirdata, csum_seed, largedir, inline_data, encrypt,
# casefold (and the four above that are handled or refused by name).
INCOMPAT_KNOWN = (0x1 | 0x2 | 0x4 | 0x8 | 0x10 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x1000
                  | 0x2000 | 0x4000 | 0x8000 | 0x10000 | 0x20000)

RO_COMPAT_SPARSE_SUPER = 0x1
RO_COMPAT_BIGALLOC = 0x200
RO_COMPAT_METADATA_CSUM = 0x400
INCOMPAT_CSUM_SEED = 0x2000

BG_BLOCK_UNINIT = 0x2


class _Super:
    first_data_block: int
    blocks_per_group: int
    inodes_per_group: int
    inodes_count: int
    compat: int
    incompat: int
    ro_compat: int
    first_meta_bg: int
    backup_bgs: tuple[int, ...]
    reserved_gdt_blocks: int
    blocks_count: int

    def __init__(self, sb: bytes) -> None:
        if len(sb) < 1024 or struct.unpack_from("<H", sb, 56)[0] != MAGIC:
            raise FreeSpaceError("no ext2/3/4 superblock (magic 0xEF53 at byte 1080)")
        (self.inodes_count, blocks_lo, _r, _free, _fi, self.first_data_block, log_block,
         _log_cluster, self.blocks_per_group, _cpg, self.inodes_per_group) = struct.unpack_from(
            "<11I", sb, 0)
        self.state = struct.unpack_from("<H", sb, 58)[0]
        self.rev_level = struct.unpack_from("<I", sb, 76)[0]
        self.compat, self.incompat, self.ro_compat = struct.unpack_from("<3I", sb, 92)
        self.inode_size = struct.unpack_from("<H", sb, 88)[0] if self.rev_level else 128
        self.reserved_gdt_blocks = struct.unpack_from("<H", sb, 206)[0]
        desc_size = struct.unpack_from("<H", sb, 254)[0]
        self.first_meta_bg = struct.unpack_from("<I", sb, 260)[0]
        blocks_hi = struct.unpack_from("<I", sb, 336)[0]
        self.backup_bgs = struct.unpack_from("<2I", sb, 588)
        self.metadata_csum = bool(self.ro_compat & RO_COMPAT_METADATA_CSUM)
        if self.metadata_csum and struct.unpack_from("<I", sb, 1020)[0] != _crc(0xFFFFFFFF,
                                                                               sb[:1020]):
            raise FreeSpaceError("ext4 superblock checksum mismatch")
        self.csum_seed = (struct.unpack_from("<I", sb, 624)[0]
                          if self.incompat & INCOMPAT_CSUM_SEED else _crc(0xFFFFFFFF, sb[104:120]))
        if log_block > 6:
            raise FreeSpaceError(f"ext4 block size 2^{10 + log_block} is out of range")
        self.block_size = 1024 << log_block
        self.is_64bit = bool(self.incompat & INCOMPAT_64BIT)
        self.blocks_count = blocks_lo | (blocks_hi << 32 if self.is_64bit else 0)
        self.desc_size = desc_size if self.is_64bit else 32
        if self.is_64bit and (desc_size < 64 or desc_size > 1024 or desc_size & (desc_size - 1)):
            raise FreeSpaceError(f"ext4 descriptor size {desc_size} is invalid")
        if self.blocks_per_group == 0 or self.blocks_per_group > 8 * self.block_size:
            raise FreeSpaceError(f"ext4 blocks per group {self.blocks_per_group} is invalid")
        if self.inodes_per_group == 0 or not 128 <= self.inode_size <= self.block_size:
            raise FreeSpaceError("ext4 inode geometry is invalid")
        if self.first_data_block >= self.blocks_count:
            raise FreeSpaceError("ext4 first data block lies past the end")
        self.groups = -(-(self.blocks_count - self.first_data_block) // self.blocks_per_group)
        self.desc_per_block = self.block_size // self.desc_size
        self.itable_blocks = -(-self.inodes_per_group * self.inode_size // self.block_size)

    def group_first(self, g: int) -> int:
        return self.first_data_block + g * self.blocks_per_group

    def group_blocks(self, g: int) -> int:
        return min(self.blocks_per_group, self.blocks_count - self.group_first(g))

    def has_super(self, g: int) -> bool:
        if g == 0:
            return True
        if self.compat & COMPAT_SPARSE_SUPER2:
            return g in self.backup_bgs
        if g <= 1 or not self.ro_compat & RO_COMPAT_SPARSE_SUPER:
            return True
        if not g & 1:
            return False
        return any(_is_power(g, p) for p in (3, 5, 7))

    def desc_block(self, n: int) -> int:
        """Block number of descriptor block `n` (ext4's descriptor_loc)."""
        if not self.incompat & INCOMPAT_META_BG or n < self.first_meta_bg:
            return self.first_data_block + 1 + n
        g = self.desc_per_block * n
        extra = 1 if self.has_super(g) else 0
        if self.block_size == 1024 and n == 0 and self.first_data_block == 0:
            extra += 1
        return self.group_first(g) + extra

    def super_and_gdt_blocks(self, g: int) -> int:
        """Blocks at the start of group g taken by a superblock copy and descriptor blocks
        (ext4_num_base_meta_clusters)."""
        n = 1 if self.has_super(g) else 0
        desc_blocks = -(-self.groups // self.desc_per_block)
        if not self.incompat & INCOMPAT_META_BG or g // self.desc_per_block < self.first_meta_bg:
            if n:
                n += desc_blocks + self.reserved_gdt_blocks
        else:
            first = g - g % self.desc_per_block
            if g in (first, first + 1, first + self.desc_per_block - 1):
                n += 1
        return n


def _crc(seed: int, data: bytes) -> int:
    """The kernel's crc32c(seed, data): CRC32C without the final inversion (ext4_chksum)."""
    return ~crc32c.crc32c(data, ~seed & 0xFFFFFFFF) & 0xFFFFFFFF


def _is_power(n: int, base: int) -> bool:
    while n % base == 0:
        n //= base
    return n == 1


def _verdict(s: _Super) -> str | None:
    """Why the bitmaps must not be trusted, or None."""
    if s.incompat & INCOMPAT_JOURNAL_DEV:
        return "this is an external journal device, not a filesystem"
    if s.incompat & INCOMPAT_COMPRESSION:
        return "the compression feature is not supported"
    unknown = s.incompat & ~INCOMPAT_KNOWN
    if unknown:
        return f"unknown incompatible features 0x{unknown:x}"
    if s.incompat & INCOMPAT_RECOVER:
        return "its journal needs recovery (needs_recovery: mounted, or not cleanly unmounted)"
    if s.state & STATE_ERROR:
        return "it is marked as having errors (run e2fsck)"
    if not s.state & STATE_VALID:
        return "it is not marked clean (mounted, or not cleanly unmounted)"
    return None


def free_space(read: Read, device_size: int) -> FreeMap:
    """The free byte ranges of the ext2/3/4 filesystem at the start of the device."""
    raw = read(SUPERBLOCK_OFFSET, 1024)
    if len(raw) == 1024 and struct.unpack_from("<I", raw, 100)[0] & RO_COMPAT_BIGALLOC:
        # Checked first: its bitmaps count clusters, so the geometry checks below do not apply.
        return FreeMap("ext4", False, "bigalloc (clustered allocation) is not supported")
    s = _Super(raw)
    bs = s.block_size
    if s.blocks_count * bs > device_size:
        raise FreeSpaceError(f"ext4 says it has {s.blocks_count} blocks of {bs}, more than the "
                             f"device's {device_size} bytes")
    why = _verdict(s)
    if why is not None:
        return FreeMap("ext4", False, why)
    descs = _descriptors(read, s)
    # Where every group's bitmaps and inode table lie, for BLOCK_UNINIT groups (with
    # flex_bg they may lie in another group).
    meta: list[tuple[int, int]] = []
    for bitmap, inode_bitmap, itable, _flags, _csum in descs:
        meta += [(bitmap, 1), (inode_bitmap, 1), (itable, s.itable_blocks)]
    meta.sort()
    free: list[ByteRange] = []
    for g, (bitmap_block, _ib, _it, flags, csum) in enumerate(descs):
        first, count = s.group_first(g), s.group_blocks(g)
        if flags & BG_BLOCK_UNINIT:
            bits = _uninit_bitmap(s, g, first, count, meta)
        else:
            if not s.first_data_block <= bitmap_block < s.blocks_count:
                raise FreeSpaceError(f"ext4 group {g}: block bitmap at {bitmap_block} is "
                                     "outside the filesystem")
            bits = read(bitmap_block * bs, bs)
            if csum is not None:
                got = _crc(s.csum_seed, bits[: s.blocks_per_group // 8])
                if got & (0xFFFFFFFF if s.desc_size >= 64 else 0xFFFF) != csum:
                    raise FreeSpaceError(f"ext4 group {g}: block bitmap checksum mismatch")
        for start, n in runs_from_bitmap(bits, count):
            lo = (first + start) * bs
            hi = (first + start + n) * bs
            if free and free[-1].end == lo:
                free[-1] = ByteRange(free[-1].start, hi)
            else:
                free.append(ByteRange(lo, hi))
    total = sum(r.length for r in free) // bs
    return FreeMap("ext4", True, f"ext4, clean: {total} of {s.blocks_count} blocks of {bs} "
                   f"bytes free in {s.groups} groups", free)


def _descriptors(read: Read, s: _Super) -> list[tuple[int, int, int, int, int | None]]:
    """(block bitmap, inode bitmap, inode table, flags, block bitmap checksum or None) of
    every group; with metadata_csum each descriptor's own checksum is checked."""
    bs = s.block_size
    out = []
    nblocks = -(-s.groups // s.desc_per_block)
    for n in range(nblocks):
        where = s.desc_block(n)
        if where >= s.blocks_count:
            raise FreeSpaceError(f"ext4 descriptor block {n} at {where} is past the end")
        block = read(where * bs, bs)
        for i in range(min(s.desc_per_block, s.groups - n * s.desc_per_block)):
            d = block[i * s.desc_size : (i + 1) * s.desc_size]
            g = n * s.desc_per_block + i
            bb, ib, it = struct.unpack_from("<3I", d, 0)
            flags = struct.unpack_from("<H", d, 18)[0]
            csum: int | None = None
            if s.is_64bit:
                bbh, ibh, ith = struct.unpack_from("<3I", d, 32)
                bb, ib, it = bb | bbh << 32, ib | ibh << 32, it | ith << 32
            if s.metadata_csum:
                want = _crc(s.csum_seed, g.to_bytes(4, "little") + d[:30] + b"\0\0"
                            + d[32:]) & 0xFFFF
                if struct.unpack_from("<H", d, 30)[0] != want:
                    raise FreeSpaceError(f"ext4 group {g}: descriptor checksum mismatch")
                csum = struct.unpack_from("<H", d, 24)[0]
                if s.desc_size >= 64:
                    csum |= struct.unpack_from("<H", d, 56)[0] << 16
            out.append((bb, ib, it, flags, csum))
    return out


def _uninit_bitmap(s: _Super, g: int, first: int, count: int,
                   meta: list[tuple[int, int]]) -> bytes:
    """The bitmap the kernel builds for a BLOCK_UNINIT group: its superblock and descriptor
    copies, and any group's bitmaps and inode table that lie in it, are in use."""
    bits = bytearray((s.blocks_per_group + 7) // 8)

    def mark(lo: int, n: int) -> None:
        for b in range(max(lo, 0), min(lo + n, count)):
            bits[b >> 3] |= 1 << (b & 7)

    mark(0, s.super_and_gdt_blocks(g))
    for block, n in meta:
        if block + n > first and block < first + count:
            mark(block - first, n)
    return bytes(bits)
