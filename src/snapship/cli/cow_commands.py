"""`snapship cow inspect`: what a dm-snapshot COW store says, for a person or a script."""

from __future__ import annotations

import argparse
import contextlib
import os
from typing import Any

from snapship.changes import cow
from snapship.cli import options
from snapship.cli.context import open_repository
from snapship.cli.output import human_bytes
from snapship.cli.reports import emit, ref
from snapship.cli.transfer_commands import parse_ref
from snapship.devices import UncachedReader
from snapship.engine.cow_export import export_cow
from snapship.errors import TargetError


def cmd_cow_inspect(args: argparse.Namespace) -> int:
    with UncachedReader(args.path) as reader:
        table = cow.parse(reader.read, reader.size, args.origin_size)
        store_size = reader.size
    ranges = table.changed_ranges(args.origin_size)
    changed = sum(r.length for r in ranges)
    info: dict[str, Any] = {
        "path": args.path,
        "store_size": store_size,
        "valid": table.header.valid,
        "header_version": table.header.version,
        "chunk_size": table.header.chunk_size,
        "areas": table.areas,
        "exceptions": len(table.exceptions),
        "changed_bytes": changed,
        "changed_ranges": [[r.start, r.end] for r in ranges],
    }
    emit("cow inspect", info, lambda r: describe_inspect(r, args.limit), json=args.json)
    return 0


def describe_inspect(r: dict[str, Any], limit: int) -> list[str]:
    ranges = r["changed_ranges"]
    lines = [f"COW store    {r['path']} ({human_bytes(r['store_size'])})",
             f"header       valid, version {r['header_version']}, "
             f"chunk {human_bytes(r['chunk_size'])}",
             f"table        {r['exceptions']} exceptions in {r['areas']} area(s)",
             f"changed      {human_bytes(r['changed_bytes'])} of the origin in {len(ranges)} "
             "range(s)"]
    lines += [f"  {start:>16} .. {end:<16} {human_bytes(end - start)}"
              for start, end in ranges[:limit]]
    if len(ranges) > limit:
        lines.append(f"  ... {len(ranges) - limit} more (--limit, or --json for all)")
    return lines


def cmd_cow_export(args: argparse.Namespace) -> int:
    chunk = args.cow_chunk_size
    repo = open_repository(args)
    new = repo.load_manifest(*repo.resolve(parse_ref(args.new)))
    old = repo.load_manifest(*repo.resolve(parse_ref(args.old)))
    tmp = f"{args.output}.partial"
    try:
        with open(tmp, "wb") as f:
            stats = export_cow(repo, new, old, f.write, chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, args.output)
    except OSError as e:
        raise TargetError(f"cannot write {args.output}: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    sectors = new.size // 512
    table = f"0 {sectors} snapshot <device holding {new.volume}@{new.version}> " \
            f"<loop device of {args.output}> P {chunk // 512}"
    emit("cow export", {
        "output": args.output,
        "new": ref(new.volume, new.version),
        "old": ref(old.volume, old.version),
        "chunk_size": chunk,
        "exceptions": stats.exceptions,
        "store_bytes": stats.store_bytes,
        "dmsetup_table": table,
    }, describe_export, json=args.json)
    return 0


def describe_export(r: dict[str, Any]) -> list[str]:
    return [f"wrote {r['output']}: {r['exceptions']} exceptions of {human_bytes(r['chunk_size'])} "
            f"({human_bytes(r['store_bytes'])}) that turn {r['new']} into {r['old']}",
            f"dmsetup table: {r['dmsetup_table']}"]


def register(sub: options.SubParsers) -> None:
    p = options.add_command(
        sub, "cow", summary="dm-snapshot COW stores: inspect one, export one",
        description="""
        Work with the exception store ("COW device") of a classic dm-snapshot: print what one
        says, or write one that shows an older version over a device holding a newer one
        (docs/cow.md).""",
        examples=["snapship cow inspect /dev/mapper/vg0-snap-cow",
                  "snapship cow export root@NEW root@OLD old.cow"])
    cow_sub = p.add_subparsers(dest="cow_command", required=True, metavar="COMMAND",
                               title="commands")
    i = options.add_command(
        cow_sub, "inspect", summary="print a COW store's header and changed ranges",
        description="""
        Read a dm-snapshot COW store (a device or a copy of one) and print its header and
        the origin ranges its exception table says were written since the snapshot was taken.
        The parse is strict: anything that is not a valid table is an error naming the
        problem, and an overflowed (invalidated) snapshot is reported as such.""",
        examples=["snapship cow inspect /dev/mapper/vg0-root--snap-cow",
                  "snapship cow inspect snap.cow --origin-size 10737418240 --json"],
        parents=options.parents())
    i.add_argument("path", help="COW device (/dev/mapper/VG-SNAP-cow) or a copy of one")
    i.add_argument("--origin-size", type=options.whole(1), metavar="BYTES",
                   help="refuse records beyond an origin of this size")
    i.add_argument("--limit", type=options.whole(0), default=20, metavar="N",
                   help="ranges to list (default: %(default)s; --json lists all)")
    i.set_defaults(func=cmd_cow_inspect)
    e = options.add_command(
        cow_sub, "export", summary="write a COW store that shows OLD over a device holding NEW",
        description="""
        Write a dm-snapshot COW store holding, as exceptions, the chunks in which version OLD
        differs from version NEW of the same volume. Attached (losetup) as the store of a
        snapshot of a device that holds NEW, it shows OLD, without restoring OLD in full.
        The dmsetup table to use is printed.""",
        examples=["snapship cow export root@20261127-0930 root@20261126-0930 old.cow",
                  "snapship cow export root@NEW root@OLD old.cow --cow-chunk-size 16K"],
        parents=options.parents(repo=True, key=True))
    for name, metavar, what in (("new", "VOLUME@NEW", "the version the device will hold"),
                                ("old", "VOLUME@OLD", "the version the snapshot should show")):
        options.completes(e.add_argument(name, metavar=metavar, help=what),
                          options.complete_version_refs)
    e.add_argument("output", help="file to write the store to (attach it with losetup)")
    e.add_argument("--cow-chunk-size", default="64K", type=options.size(1), metavar="SIZE",
                   help="exception chunk size, 4K up to the repository's (default: %(default)s)")
    e.set_defaults(func=cmd_cow_export, quiet_report=True)
