"""XFS free space from the superblock, each AG's AGF and its by-block free-space B+tree (bnobt),
and whether the internal log is clean (its newest record is an unmount record).

docs/free-space.md, "XFS", lists the fields used. Version 5 (CRC) filesystems have the CRC of
every structure read checked; version 4 ones only their magic numbers and bounds. Not clean,
so never used: a log whose newest record is not an unmount record (mounted, frozen, crashed,
or a snapshot of a live filesystem), an external log (not on this device: nothing to check),
log-incompatible features set, `needsrepair`, unknown incompatible features, and any log
whose layout this parser cannot read with certainty.
"""

from __future__ import annotations

import struct

import crc32c

from snapship.filesystems.freemap import FreeMap, FreeSpaceError, Read
from snapship.types import ByteRange

SB_MAGIC = b"XFSB"
AGF_MAGIC = b"XAGF"
BNOBT_MAGIC_V5 = b"AB3B"
BNOBT_MAGIC_V4 = b"ABTB"
SB_CRC_OFFSET = 224
AGF_CRC_OFFSET = 216
BTREE_CRC_OFFSET = 52
BTREE_HEADER_V5 = 56
BTREE_HEADER_V4 = 16

INCOMPAT_NEEDSREPAIR = 0x10
INCOMPAT_KNOWN = 0x1 | 0x2 | 0x4 | 0x8 | 0x10 | 0x20  # ftype spinodes meta_uuid bigtime
#                                                        needsrepair nrext64

LOG_MAGIC = 0xFEEDBABE
BBSIZE = 512
LOG_HEADER_CYCLE_SIZE = 32 * 1024
UNMOUNT_TRANS = 0x20
MAX_BTREE_BLOCKS = 1 << 22
VERIFY_WINDOW = 2 << 20
"""Bytes of log checked on each side of the head: the kernel's XLOG_TOTAL_REC_SHIFT (8 log
buffers of at most 256 KiB may be in flight, so stray older cycles lie within this)."""


def _crc_ok(block: bytes, at: int) -> bool:
    stored: int = struct.unpack_from("<I", block, at)[0]
    return bool(crc32c.crc32c(block[:at] + bytes(4) + block[at + 4 :]) == stored)


class _Super:
    block_size: int
    dblocks: int
    logstart: int
    agblocks: int
    agcount: int
    logblocks: int
    agblklog: int

    def __init__(self, sb: bytes) -> None:
        if sb[:4] != SB_MAGIC:
            raise FreeSpaceError("no XFS superblock (magic XFSB at byte 0)")
        self.block_size, self.dblocks = struct.unpack_from(">IQ", sb, 4)
        self.logstart = struct.unpack_from(">Q", sb, 48)[0]
        self.agblocks, self.agcount, _rbm, self.logblocks = struct.unpack_from(">4I", sb, 84)
        self.versionnum, self.sectsize = struct.unpack_from(">HH", sb, 100)
        self.agblklog = sb[124]
        self.inprogress = sb[126]
        (self.compat, self.ro_compat, self.incompat,
         self.log_incompat) = struct.unpack_from(">4I", sb, 208)
        self.v5 = self.versionnum & 0xF == 5
        if self.versionnum & 0xF not in (4, 5):
            raise FreeSpaceError(f"XFS version {self.versionnum & 0xF} is not supported")
        bs, ss = self.block_size, self.sectsize
        if bs < 512 or bs > 65536 or bs & (bs - 1) or ss < 512 or ss > bs or ss & (ss - 1):
            raise FreeSpaceError(f"XFS block size {bs} or sector size {ss} is invalid")
        if not self.agblocks or not self.agcount or self.agblocks > 1 << self.agblklog:
            raise FreeSpaceError("XFS AG geometry is invalid")
        if self.dblocks > self.agblocks * self.agcount:
            raise FreeSpaceError("XFS says it has more blocks than its AGs hold")

    def fsb_to_byte(self, fsb: int) -> int:
        """A filesystem block number (AG number above agblklog bits) as a device offset."""
        ag, agbno = fsb >> self.agblklog, fsb & ((1 << self.agblklog) - 1)
        return (ag * self.agblocks + agbno) * self.block_size


def free_space(read: Read, device_size: int) -> FreeMap:
    """The free byte ranges of the XFS filesystem at the start of the device."""
    head = read(0, 512)
    if head[:4] != SB_MAGIC:
        raise FreeSpaceError("no XFS superblock (magic XFSB at byte 0)")
    ss = struct.unpack_from(">H", head, 102)[0]
    if ss < 512 or ss > 32768 or ss & (ss - 1):
        raise FreeSpaceError(f"XFS sector size {ss} is invalid")
    sb = read(0, ss)
    s = _Super(sb)
    if s.v5 and not _crc_ok(sb, SB_CRC_OFFSET):
        raise FreeSpaceError("XFS superblock CRC mismatch")
    if s.dblocks * s.block_size > device_size:
        raise FreeSpaceError(f"XFS says it has {s.dblocks} blocks of {s.block_size}, more than "
                             f"the device's {device_size} bytes")
    why = _verdict(read, s)
    if why is not None:
        return FreeMap("xfs", False, why)
    free: list[ByteRange] = []
    for ag in range(s.agcount):
        free += _ag_free(read, s, ag)
    free.sort()
    merged: list[ByteRange] = []
    for r in free:
        if merged and merged[-1].end == r.start:
            merged[-1] = ByteRange(merged[-1].start, r.end)
        else:
            merged.append(r)
    total = sum(r.length for r in merged) // s.block_size
    return FreeMap("xfs", True, f"xfs v{s.versionnum & 0xF}, clean log: {total} of {s.dblocks} "
                   f"blocks of {s.block_size} bytes free in {s.agcount} AGs", merged)


def _verdict(read: Read, s: _Super) -> str | None:
    unknown = s.incompat & ~INCOMPAT_KNOWN
    if unknown:
        return f"unknown incompatible features 0x{unknown:x}"
    if s.incompat & INCOMPAT_NEEDSREPAIR:
        return "it is marked needsrepair (run xfs_repair)"
    if s.inprogress:
        return "mkfs did not finish (sb_inprogress)"
    if s.log_incompat:
        return "log-incompatible features are set: the log is in use"
    if s.logstart == 0:
        return "its log is external: its state cannot be checked from this device"
    return _log_verdict(read, s)


def _log_verdict(read: Read, s: _Super) -> str | None:
    """None if the newest record of the internal log is an unmount record (a clean unmount:
    nothing to replay), else why the log may hold changes the metadata lacks.

    As the kernel's xlog_find_head/xlog_find_tail: every 512-byte sector of the log carries the
    cycle number of the pass that wrote it; the head is where the cycle first drops, found by
    bisection, and the last record before it decides. The sectors within VERIFY_WINDOW on both
    sides of the head are checked as well (the kernel checks the window before it: in-flight
    log buffers can leave older cycles there); anything that does not fit is "uncertain"."""
    start = s.fsb_to_byte(s.logstart)
    length = s.logblocks * s.block_size
    if not s.logblocks or length % BBSIZE:
        return "its log geometry is invalid"
    nsect = length // BBSIZE
    cache: dict[int, bytes] = {}

    def sector(i: int) -> bytes:
        if i not in cache:
            cache[i] = read(start + i * BBSIZE, BBSIZE)
        return cache[i]

    def load(lo: int, hi: int) -> None:
        lo, hi = max(lo, 0), min(hi, nsect)
        if hi > lo:
            data = read(start + lo * BBSIZE, (hi - lo) * BBSIZE)
            for i in range(lo, hi):
                cache[i] = data[(i - lo) * BBSIZE : (i - lo + 1) * BBSIZE]

    def cycle(i: int) -> int:
        first_word, second = struct.unpack_from(">II", sector(i), 0)
        c: int = second if first_word == LOG_MAGIC else first_word
        return c

    first = cycle(0)
    if cycle(nsect - 1) == first:
        head = nsect  # written to the end in this cycle (or never wrapped): head at the end
    else:
        lo, hi = 0, nsect - 1  # cycle(lo) == first, cycle(hi) != first
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if cycle(mid) == first:
                lo = mid
            else:
                hi = mid
        head = hi
    window = VERIFY_WINDOW // BBSIZE
    load(head - window, head + window)
    for i in range(max(0, head - window), min(nsect, head + window)):
        want = first if i < head else first - 1
        if cycle(i) != want:
            return "its log is uncertain (cycle numbers out of order: torn or in-flight writes)"
    rec = next((i for i in range(head - 1, max(-1, head - window - 1), -1)
                if struct.unpack_from(">I", sector(i), 0)[0] == LOG_MAGIC), None)
    if rec is None:
        return "its log is uncertain (no record header near the head)"
    h = sector(rec)
    _magic, h_cycle, version, h_len = struct.unpack_from(">4I", h, 0)
    num_logops = struct.unpack_from(">I", h, 40)[0]
    h_size = struct.unpack_from(">I", h, 300 + 4 + 16)[0] if version & 2 else 0
    hblks = max(1, -(-h_size // LOG_HEADER_CYCLE_SIZE)) if version & 2 else 1
    if h_cycle != first:
        return "its log is uncertain (the last record's cycle differs from the head's)"
    end = rec + hblks + -(-h_len // BBSIZE)
    if end != head:
        return (f"its log is uncertain (the last record ends at sector {end}, the head is at "
                f"{head})")
    if num_logops != 1 or h_len < 12 or rec + hblks >= nsect:
        return "its log was not cleanly unmounted (its newest record is not an unmount record)"
    if not sector(rec + hblks)[9] & UNMOUNT_TRANS:
        return "its log was not cleanly unmounted (its newest record is not an unmount record)"
    return None


def _ag_free(read: Read, s: _Super, ag: int) -> list[ByteRange]:
    bs = s.block_size
    ag_start = ag * s.agblocks * bs
    agf = read(ag_start + s.sectsize, s.sectsize)
    if agf[:4] != AGF_MAGIC:
        raise FreeSpaceError(f"XFS AG {ag}: no AGF (magic XAGF)")
    if s.v5 and not _crc_ok(agf, AGF_CRC_OFFSET):
        raise FreeSpaceError(f"XFS AG {ag}: AGF CRC mismatch")
    _v, seqno, length, bno_root = struct.unpack_from(">4I", agf, 4)
    bno_level = struct.unpack_from(">I", agf, 28)[0]
    freeblks = struct.unpack_from(">I", agf, 52)[0]
    if seqno != ag or not 0 < length <= s.agblocks or not 0 < bno_level <= 16:
        raise FreeSpaceError(f"XFS AG {ag}: AGF is inconsistent")
    magic = BNOBT_MAGIC_V5 if s.v5 else BNOBT_MAGIC_V4
    hdr = BTREE_HEADER_V5 if s.v5 else BTREE_HEADER_V4
    out: list[ByteRange] = []
    total = 0
    todo = [(bno_root, bno_level - 1)]
    seen: set[int] = set()
    while todo:
        agbno, level = todo.pop()
        if agbno >= length or agbno in seen or len(seen) > MAX_BTREE_BLOCKS:
            raise FreeSpaceError(f"XFS AG {ag}: free-space btree points at block {agbno}")
        seen.add(agbno)
        block = read(ag_start + agbno * bs, bs)
        if block[:4] != magic:
            raise FreeSpaceError(f"XFS AG {ag}: block {agbno} is not a free-space btree block")
        if s.v5 and not _crc_ok(block, BTREE_CRC_OFFSET):
            raise FreeSpaceError(f"XFS AG {ag}: free-space btree block {agbno} CRC mismatch")
        got_level, numrecs = struct.unpack_from(">HH", block, 4)
        if got_level != level:
            raise FreeSpaceError(f"XFS AG {ag}: btree block {agbno} has level {got_level}, "
                                 f"expected {level}")
        if level == 0:
            if hdr + numrecs * 8 > bs:
                raise FreeSpaceError(f"XFS AG {ag}: btree leaf {agbno} overflows")
            for i in range(numrecs):
                start, count = struct.unpack_from(">II", block, hdr + 8 * i)
                if count == 0 or start + count > length:
                    raise FreeSpaceError(f"XFS AG {ag}: free extent {start}+{count} lies "
                                         "outside the AG")
                total += count
                base = (ag * s.agblocks + start) * bs
                out.append(ByteRange(base, base + count * bs))
        else:
            maxrecs = (bs - hdr) // 12
            if numrecs > maxrecs:
                raise FreeSpaceError(f"XFS AG {ag}: btree node {agbno} overflows")
            ptrs = struct.unpack_from(f">{numrecs}I", block, hdr + maxrecs * 8)
            todo += [(p, level - 1) for p in ptrs]
    if total > freeblks:
        raise FreeSpaceError(f"XFS AG {ag}: the free-space btree lists {total} free blocks, the "
                             f"AGF {freeblks}")
    return out
