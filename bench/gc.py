#!/usr/bin/env python3
"""gc on a repository of ~1 M chunks: time and peak memory against listing the chunks.

Builds (once, reused) a synthetic local repository under WORKDIR/gc-<n>: n small chunk
objects, 10 versions whose reference lists each name 36% of them with overlaps (together 90%
of the chunks), so 10% are garbage. Each run puts the garbage back, then measures, each in a
fresh process:

- `list`: iterating the storage listing of `chunks/` (what any gc must do at least once);
- `gc`: `snapship gc` freeing the 10% garbage (condemn + finalize in one run, no backup running);
- `gc again`: `snapship gc` with nothing to free (the steady-state cost).

    python3 bench/gc.py [--chunks 1000000] [--workdir /var/tmp/snapship-bench]

Targets (issue 5): gc within 3x the listing time, peak RSS under 300 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from snapship.formats.refs import Refs  # noqa: E402
from snapship.repository.catalog import Catalog  # noqa: E402
from snapship.repository.repo import Repository  # noqa: E402
from snapship.storage.local import LocalStorage  # noqa: E402

VERSIONS = 10
BODY = b"x" * 100  # gc never opens a chunk: the content does not matter


def chunk_path(root: Path, cid: bytes) -> Path:
    h = cid.hex()
    return root / "chunks" / h[:2] / h


def build(root: Path, n: int) -> list[bytes]:
    """The repository and its ids (the last 10% are garbage); reused when already built."""
    ids_file = root / "ids.bin"
    if ids_file.exists():
        blob = ids_file.read_bytes()
        return [blob[i : i + 32] for i in range(0, len(blob), 32)]
    root.mkdir(parents=True, exist_ok=True)
    repo_dir = root / "repo"
    Repository.create(LocalStorage(str(repo_dir)), encryption="none", chunk_size=65536)
    rng = random.Random(5)
    ids = sorted(rng.randbytes(32) for _ in range(n))
    rng.shuffle(ids)
    for h in range(256):
        (repo_dir / "chunks" / f"{h:02x}").mkdir(parents=True, exist_ok=True)
    for cid in ids:
        chunk_path(repo_dir, cid).write_bytes(BODY)
    live = ids[: n * 9 // 10]
    step, width = len(live) // 15, len(live) * 2 // 5
    storage = LocalStorage(str(repo_dir))
    for v in range(VERSIONS):
        lo = min(v * step, len(live) - width) if v < VERSIONS - 1 else len(live) - width
        mine = sorted(live[lo : lo + width])
        version = f"20260101-00{v:02d}00.000-0000"
        refs = Refs("vol", version, "bench", b"".join(mine), array("I", [len(BODY)] * len(mine)))
        Catalog(storage).put_refs(refs)
        Catalog(storage).put_manifest_blob("vol", version, b"not read by gc")
    ids_file.write_bytes(b"".join(ids))
    return ids


def restore_garbage(repo_dir: Path, ids: list[bytes]) -> None:
    for cid in ids[len(ids) * 9 // 10 :]:
        p = chunk_path(repo_dir, cid)
        if not p.exists():
            p.write_bytes(BODY)


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB, stdout) of a command in a fresh process (GNU time's %M)."""
    with tempfile.NamedTemporaryFile("r") as rss_file:
        t = time.monotonic()
        r = subprocess.run(["/usr/bin/time", "-o", rss_file.name, "-f", "%M", *cmd],
                           capture_output=True, text=True, check=False,
                           env={**{k: v for k, v in os.environ.items()
                                   # gc needs no passphrase; with one configured, an
                                   # unencrypted repository this machine never met is refused
                                   if k != "SNAPSHIP_PASSPHRASE"},
                                "PYTHONPATH": str(ROOT / "src")})
        wall = time.monotonic() - t
        if r.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
        return wall, int(rss_file.read().split()[-1]) / 1024, r.stdout


LIST = ("import sys; from snapship.storage.local import LocalStorage; "
        "print(sum(1 for _ in LocalStorage(sys.argv[1]).list('chunks/')))")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=1_000_000)
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/snapship-bench"))
    args = ap.parse_args()
    root = args.workdir / f"gc-{args.chunks}"
    t = time.monotonic()
    ids = build(root, args.chunks)
    repo_dir = root / "repo"
    restore_garbage(repo_dir, ids)
    print(f"repository {repo_dir}: {len(ids)} chunks, {VERSIONS} versions "
          f"(set up in {time.monotonic() - t:.1f} s)")
    subprocess.run(["sync"], check=False)
    snapship = [sys.executable, "-m", "snapship.cli.main"]
    results = {}
    list_s, list_rss, out = timed([sys.executable, "-c", LIST, str(repo_dir)])
    assert int(out) == len(ids), out
    results["list"] = (list_s, list_rss)
    gc_s, gc_rss, out = timed([*snapship, "gc", "--repo", str(repo_dir), "--json"])
    report = json.loads(out)
    assert report["finished"] and report["chunks_freed"] == len(ids) - len(ids) * 9 // 10, report
    results["gc"] = (gc_s, gc_rss)
    again_s, again_rss, out = timed([*snapship, "gc", "--repo", str(repo_dir), "--json"])
    assert json.loads(out)["chunks_freed"] == 0
    results["gc again"] = (again_s, again_rss)
    print(f"{'step':10} {'seconds':>8} {'x list':>7} {'peak RSS':>10}")
    for name, (s, rss) in results.items():
        print(f"{name:10} {s:8.2f} {s / list_s:7.2f} {rss:7.0f} MB")
    print(f"gc referenced {report['referenced']} chunks, freed {report['chunks_freed']} "
          f"({report['bytes_freed']} bytes)")
    (root / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
