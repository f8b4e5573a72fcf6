"""`snapship cow inspect`: what a dm-snapshot COW store says, for a person or a script."""

from __future__ import annotations

import argparse
import contextlib
import os
from typing import Any

from snapship.changes import cow
from snapship.cli.context import open_repository
from snapship.cli.output import human_bytes, parse_size, print_json
from snapship.cli.transfer_commands import parse_ref
from snapship.devices import UncachedReader
from snapship.engine.cow_export import export_cow
from snapship.errors import TargetError, UsageError


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
        "version": table.header.version,
        "chunk_size": table.header.chunk_size,
        "areas": table.areas,
        "exceptions": len(table.exceptions),
        "changed_bytes": changed,
        "changed_ranges": [[r.start, r.end] for r in ranges],
    }
    if args.json:
        print_json(info)
        return 0
    print(f"COW store    {args.path} ({human_bytes(store_size)})")
    print(f"header       valid, version {table.header.version}, "
          f"chunk {human_bytes(table.header.chunk_size)}")
    print(f"table        {len(table.exceptions)} exceptions in {table.areas} area(s)")
    print(f"changed      {human_bytes(changed)} of the origin in {len(ranges)} range(s)")
    for r in ranges[: args.limit]:
        print(f"  {r.start:>16} .. {r.end:<16} {human_bytes(r.length)}")
    if len(ranges) > args.limit:
        print(f"  ... {len(ranges) - args.limit} more (--limit, or --json for all)")
    return 0


def cmd_cow_export(args: argparse.Namespace) -> int:
    try:
        chunk = parse_size(args.cow_chunk_size)
    except ValueError as e:
        raise UsageError(str(e)) from None
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
    info = {
        "output": args.output,
        "new": f"{new.volume}@{new.version}",
        "old": f"{old.volume}@{old.version}",
        "chunk_size": chunk,
        "exceptions": stats.exceptions,
        "store_bytes": stats.store_bytes,
        "dmsetup_table": table,
    }
    if args.json:
        print_json(info)
    else:
        print(f"wrote {args.output}: {stats.exceptions} exceptions of {human_bytes(chunk)} "
              f"({human_bytes(stats.store_bytes)}) that turn {info['new']} into {info['old']}")
        print(f"dmsetup table: {table}")
    return 0


def register(sub: argparse._SubParsersAction[Any], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("cow", help="dm-snapshot COW stores")
    cow_sub = p.add_subparsers(dest="cow_command", required=True, metavar="COMMAND")
    i = cow_sub.add_parser("inspect", parents=[common],
                           help="print a COW store's header and changed ranges")
    i.add_argument("path", help="COW device (/dev/mapper/VG-SNAP-cow) or a copy of one")
    i.add_argument("--origin-size", type=int, metavar="BYTES",
                   help="refuse records beyond an origin of this size")
    i.add_argument("--limit", type=int, default=20, help="ranges to list (default: %(default)s)")
    i.set_defaults(func=cmd_cow_inspect)
    e = cow_sub.add_parser("export", parents=[common],
                           help="write a COW store that shows OLD over a device holding NEW")
    e.add_argument("new", metavar="VOLUME@NEW", help="the version the device will hold")
    e.add_argument("old", metavar="VOLUME@OLD", help="the version the snapshot should show")
    e.add_argument("output", help="file to write the store to (attach it with losetup)")
    e.add_argument("--cow-chunk-size", default="64K",
                   help="exception chunk size, 4K up to the repository's (default: %(default)s)")
    e.set_defaults(func=cmd_cow_export)
