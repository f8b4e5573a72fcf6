"""Which filesystem a device holds, and its free-space map if the parser for it is sure.

Never raises for what it finds: an unknown, dirty or unreadable filesystem is a `FreeMap`
that is not clean, with the reason (the backup then reads everything and says why).
"""

from __future__ import annotations

from snapship.filesystems import ext4, xfs
from snapship.filesystems.freemap import FreeMap, FreeSpaceError, Read


def probe(read: Read, size: int) -> FreeMap:
    if size < 64 * 1024:
        return FreeMap(None, False, "too small to hold a supported filesystem")
    name = None
    try:
        head = read(0, 4096)
        if head[:6] == b"LUKS\xba\xbe" or head[:6] == b"SKUL\xba\xbe":
            return FreeMap(None, False, "LUKS-encrypted: its free space cannot be seen")
        if head[:4] == xfs.SB_MAGIC:
            name = "xfs"
            return xfs.free_space(read, size)
        if head[1080:1082] == ext4.MAGIC.to_bytes(2, "little"):
            name = "ext4"
            return ext4.free_space(read, size)
        if head[512:520] == b"EFI PART":
            return FreeMap(None, False, "a GPT partition table, not a filesystem")
        if head[510:512] == b"\x55\xaa":
            return FreeMap(None, False, "an MBR partition table or boot sector, not a "
                           "filesystem")
    except FreeSpaceError as e:
        return FreeMap(name, False, f"metadata not understood: {e}")
    return FreeMap(None, False, "no ext4 or XFS filesystem recognised")
