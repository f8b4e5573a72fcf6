"""`snapship cow inspect`: what a dm-snapshot COW store says, for a person or a script."""

from __future__ import annotations

import argparse
from typing import Any

from snapship.changes import cow
from snapship.cli.output import human_bytes, print_json
from snapship.devices import UncachedReader


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
