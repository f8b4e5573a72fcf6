"""Free-space parsers against the real tools: ext4 and XFS images made by mkfs, filled and
partly deleted at random through a loop mount; every range the parser calls free must be
free per dumpe2fs / xfs_db, and a mounted (dirty) filesystem must not be called clean."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from snapship.filesystems import ext4, xfs
from snapship.filesystems.freemap import FreeSpaceError, Read, runs_from_bitmap
from snapship.filesystems.probe import probe
from tests.fsimages import (
    blocks_of,
    ext4_free_blocks,
    fill,
    make_image,
    mounted,
    xfs_free_blocks,
)

EXT4_GEOMETRIES = {
    "4k-groups": (["mkfs.ext4", "-q", "-F", "-b", "4096", "-g", "4096"], 64),
    "1k": (["mkfs.ext4", "-q", "-F", "-b", "1024"], 64),
    "no-flex_bg": (["mkfs.ext4", "-q", "-F", "-b", "1024", "-O", "^flex_bg"], 48),
    "64bit-meta_bg": (["mkfs.ext4", "-q", "-F", "-b", "4096", "-g", "2048", "-O",
                       "64bit,meta_bg,^resize_inode"], 64),
    "1k-meta_bg": (["mkfs.ext4", "-q", "-F", "-b", "1024", "-O", "meta_bg,^resize_inode"], 40),
    "no-sparse_super": (["mkfs.ext4", "-q", "-F", "-b", "1024", "-O",
                         "^sparse_super,^resize_inode,^has_journal"], 32),
}


def reader(path: Path) -> tuple[Read, int]:
    f = open(path, "rb")  # noqa: SIM115 - closed with the closure that holds it
    return (lambda off, n: os.pread(f.fileno(), n, off)), os.fstat(f.fileno()).st_size


def test_bitmap_runs() -> None:
    assert runs_from_bitmap(bytes([0b00001111, 0xFF, 0]), 20) == [(4, 4), (16, 4)]
    assert runs_from_bitmap(bytes(2), 16) == [(0, 16)]
    assert runs_from_bitmap(b"\xff\xff", 16) == []
    assert runs_from_bitmap(bytes([0b10100000]), 8) == [(0, 5), (6, 1)]


@pytest.mark.parametrize("name", sorted(EXT4_GEOMETRIES))
def test_ext4_free_space_matches_dumpe2fs(tmp_path: Path, name: str) -> None:
    mkfs, size = EXT4_GEOMETRIES[name]
    image = make_image(tmp_path / "fs.img", size, mkfs)
    seed = sorted(EXT4_GEOMETRIES).index(name)
    with mounted(image, tmp_path / "mnt") as root:
        fill(root, seed, 40, size * 1024 // 40, 0.5)
        dirty = probe(*reader(image))
        assert dirty.filesystem == "ext4" and not dirty.clean and not dirty.free
        assert "needs recovery" in dirty.reason or "not marked clean" in dirty.reason
    read, n = reader(image)
    fm = ext4.free_space(read, n)
    bs, want = ext4_free_blocks(image)
    got = blocks_of(fm.free, bs)
    assert fm.clean, fm.reason
    assert got <= want, sorted(got - want)[:20]
    assert got == want  # BLOCK_UNINIT groups too: computed as the kernel and libext2fs do
    assert len(got) < n // bs  # something is in use: the assertion above could fail


def test_ext4_bigalloc_is_refused(tmp_path: Path) -> None:
    image = make_image(tmp_path / "fs.img", 64, ["mkfs.ext4", "-q", "-F", "-b", "4096", "-O",
                                                  "bigalloc", "-C", "16384"])
    fm = probe(*reader(image))
    assert (fm.filesystem, fm.clean) == ("ext4", False)
    assert "bigalloc" in fm.reason


def test_xfs_free_space_matches_xfs_db(tmp_path: Path) -> None:
    for seed, mkfs in enumerate([["mkfs.xfs", "-q", "-f"],
                                 ["mkfs.xfs", "-q", "-f", "-d", "agcount=4", "-m",
                                  "reflink=1,rmapbt=1", "-b", "size=1024"]]):
        image = make_image(tmp_path / f"fs{seed}.img", 320, mkfs)
        with mounted(image, tmp_path / "mnt") as root:
            fill(root, seed, 120, 1500, 0.5)
            # A reflinked copy: its blocks are shared, not free.
            subprocess.run(["cp", "--reflink=always", str(next(root.rglob("f*"))),
                            str(root / "copy")], check=True)
            os.sync()  # the log now holds records newer than its unmount record
            dirty = probe(*reader(image))
            assert dirty.filesystem == "xfs" and not dirty.clean, dirty.reason
            assert "not cleanly unmounted" in dirty.reason or "uncertain" in dirty.reason
        read, n = reader(image)
        fm = xfs.free_space(read, n)
        assert fm.clean, fm.reason
        bs, want, agfl = xfs_free_blocks(image)
        got = blocks_of(fm.free, bs)
        assert got <= want, sorted(got - want)[:20]
        assert len(want - got) <= agfl  # only the AG free lists, which freesp counts too
        assert len(got) < n // bs


def test_xfs_crc_mismatch_is_an_error(tmp_path: Path) -> None:
    image = make_image(tmp_path / "fs.img", 320, ["mkfs.xfs", "-q", "-f"])
    with open(image, "r+b") as f:
        f.seek(512 + 52)  # AG 0's AGF: agf_freeblks
        byte = f.read(1)
        f.seek(512 + 52)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(FreeSpaceError, match="AGF CRC"):
        xfs.free_space(*reader(image))


def test_probe_names_what_it_is_not(tmp_path: Path) -> None:
    luks = b"LUKS\xba\xbe" + bytes(1 << 16)
    assert "LUKS" in probe(lambda off, n: luks[off : off + n], len(luks)).reason
    mbr = bytearray(1 << 16)
    mbr[510:512] = b"\x55\xaa"
    fm = probe(lambda off, n: bytes(mbr[off : off + n]), len(mbr))
    assert (fm.filesystem, fm.clean) == (None, False) and "partition table" in fm.reason
    zero = bytes(1 << 16)
    assert not probe(lambda off, n: zero[off : off + n], len(zero)).clean


def test_xfs_log_that_is_not_clean_or_not_certain(tmp_path: Path) -> None:
    """The log check on a real log with one thing changed: the unmount record's flag cleared
    (not clean), a sector past the head given the head's cycle (uncertain)."""
    image = make_image(tmp_path / "fs.img", 320, ["mkfs.xfs", "-q", "-f"])
    with mounted(image, tmp_path / "mnt") as root:
        fill(root, 9, 10, 200, 0.3)
    read, n = reader(image)
    assert xfs.free_space(read, n).clean
    s = xfs._Super(read(0, 512))
    start = s.fsb_to_byte(s.logstart)
    log = read(start, s.logblocks * s.block_size)
    words = [int.from_bytes(log[i : i + 4], "big") for i in range(0, len(log), 512)]
    cycles = [int.from_bytes(log[i * 512 + 4 : i * 512 + 8], "big")
              if w == xfs.LOG_MAGIC else w for i, w in enumerate(words)]
    head = next((i for i, c in enumerate(cycles) if c != cycles[0]), len(cycles))
    rec = max(i for i in range(head) if words[i] == xfs.LOG_MAGIC)

    def patched(at: int, value: bytes) -> str:
        copy = tmp_path / "patched.img"
        subprocess.run(["cp", "--sparse=always", str(image), str(copy)], check=True)
        with open(copy, "r+b") as f:
            f.seek(at)
            f.write(value)
        fm = probe(*reader(copy))
        assert fm.filesystem == "xfs" and not fm.clean and not fm.free
        return fm.reason

    op_flags = start + (rec + 1) * 512 + 9  # the unmount record's op header flags (1 hdr sector)
    assert "not cleanly unmounted" in patched(op_flags, b"\x00")
    assert head < len(cycles)  # a young log: the head is inside it, cycle 0 sectors after it
    assert "uncertain" in patched(start + (head + 1) * 512, cycles[0].to_bytes(4, "big"))


def test_ext4_checksums_are_checked(tmp_path: Path) -> None:
    """metadata_csum (mke2fs's default): a bit flipped in a block bitmap, which would call a
    used block free, is caught by the bitmap's checksum; the backup then reads everything."""
    image = make_image(tmp_path / "fs.img", 32, ["mkfs.ext4", "-q", "-F", "-b", "4096"])
    out = subprocess.run(["dumpe2fs", str(image)], capture_output=True, text=True,
                         check=True).stdout
    assert "metadata_csum" in out
    bitmap = int(out.split("Block bitmap at ")[1].split()[0])
    with open(image, "r+b") as f:
        f.seek(bitmap * 4096)
        byte = f.read(1)
        f.seek(bitmap * 4096)
        f.write(bytes([byte[0] ^ 0x01]))  # block 0: in use, now "free"
    with pytest.raises(FreeSpaceError, match="block bitmap checksum"):
        ext4.free_space(*reader(image))
    fm = probe(*reader(image))
    assert (fm.filesystem, fm.clean) == ("ext4", False) and "checksum" in fm.reason
