#!/usr/bin/env python3
"""Benchmark incremental backups at scale: the same 40 MiB of change, given with
--changed-ranges, on a 4 GiB, a 256 GiB and a 4 TiB sparse file (issue 16, item 6).

    .venv/bin/python bench/incremental_scale.py [--sizes 4G,256G,4T] [--workdir /var/tmp]

For each size: a sparse file of zeros, a base version of it made through the repository API
(a manifest of zero chunks, as a full backup of the empty file would store, sealed with the
key: a full backup reading terabytes of holes would take hours today), then 40 MiB written
in 40 extents of 1 MiB spread over the file and `snapship backup --changed-ranges` of them,
timed as a whole process (wall and CPU time, peak RSS: GNU time), median of interleaved
rounds. The 4 TiB run should be within 1.5x of the 4 GiB run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from tests.test_catalog_scale import zstd_frame_of  # noqa: E402

from snapship import crypto  # noqa: E402
from snapship.formats.constants import (  # noqa: E402
    FLAG_ENCRYPTED,
    FLAG_ZSTD,
    KIND_MANIFEST,
    MANIFEST_MAGIC,
    MANIFEST_VERSION,
    OBJECT_MAGIC,
    OBJECT_VERSION,
)
from snapship.formats.refs import Refs  # noqa: E402
from snapship.repository.repo import Repository, new_version_id, now_iso  # noqa: E402
from snapship.storage.local import LocalStorage  # noqa: E402
from snapship.units import parse_size  # noqa: E402

PASSPHRASE = "bench-passphrase-not-secret"
CHUNK = 1 << 20
CHANGE = 40


def base_version(repo: Repository, volume: str, size: int, source: str) -> None:
    count = -(-size // CHUNK)
    version = new_version_id()
    header = {"volume": volume, "version": version, "size": size, "chunk_size": CHUNK,
              "created": now_iso(), "source": source, "parent": None, "labels": {},
              "stats": {"mode": "full", "bytes_new_stored": 0}}
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    prefix = (struct.pack("<4sHHI", MANIFEST_MAGIC, MANIFEST_VERSION, 0, len(head)) + head
              + struct.pack("<Q", count))
    env = struct.pack("<4sBBBB", OBJECT_MAGIC, OBJECT_VERSION, KIND_MANIFEST,
                      FLAG_ZSTD | FLAG_ENCRYPTED, 0)
    name = repo.catalog.manifest_name(volume, version)
    assert repo.keys is not None
    blob = crypto.encrypt_after(env, repo.keys.aead, zstd_frame_of(prefix, 36 * count),
                                env + name)
    repo.catalog.put_refs(Refs(volume, version, "synthetic", b"", array("I")))
    repo.catalog.put_manifest_blob(volume, version, blob)
    repo.catalog.flush()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--sizes", default="4G,256G,4T")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    args = ap.parse_args()
    exe = str(ROOT / ".venv" / "bin" / "snapship")
    sizes = args.sizes.split(",")
    runs: dict[str, list[tuple[float, float, int]]] = {t: [] for t in sizes}
    read: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="snapship-incr-scale-", dir=args.workdir) as tmp:
        repo_path = Path(tmp) / "repo"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPSHIP_")}
        env.update(SNAPSHIP_STATE_DIR=tmp, SNAPSHIP_PASSPHRASE=PASSPHRASE)
        subprocess.run([exe, "init", "--repo", str(repo_path)], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        repo = Repository.open(LocalStorage(str(repo_path)), PASSPHRASE.encode)
        print(f"load average before: {os.getloadavg()[0]:.2f}")
        images = {}
        for text in sizes:
            size = parse_size(text)
            volume = f"sparse-{text}"
            image = images[text] = Path(tmp) / f"{volume}.img"
            with open(image, "wb") as f:
                f.truncate(size)
            base_version(repo, volume, size, str(image))
            step = size // CHANGE // CHUNK * CHUNK
            ranges = []
            with open(image, "r+b") as f:
                for i in range(CHANGE):
                    f.seek(i * step)
                    f.write(os.urandom(CHUNK))
                    ranges.append(f"{i * step} {CHUNK}")
            (Path(tmp) / f"ranges-{text}").write_text("\n".join(ranges) + "\n")
        # Rounds interleave the sizes, so a swing of the machine's load hits every size.
        for _ in range(args.rounds):
            for text in sizes:
                argv = ["/usr/bin/time", "-f", "%U %S %M", exe, "backup", "--repo",
                        str(repo_path), str(images[text]), "--volume", f"sparse-{text}",
                        "--changed-ranges", str(Path(tmp) / f"ranges-{text}"), "--json"]
                start = time.monotonic()
                r = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
                wall = time.monotonic() - start
                if r.returncode != 0:
                    raise SystemExit(f"backup of {text} failed:\n{r.stderr}")
                user, system, rss_kib = r.stderr.strip().splitlines()[-1].split()
                runs[text].append((wall, float(user) + float(system), int(rss_kib) // 1024))
                read[text] = json.loads(r.stdout).get("stats", {}).get("bytes_read")
        print(f"load average after: {os.getloadavg()[0]:.2f}\n")
    print(f"{CHANGE} MiB of change in {CHANGE} extents, `backup --changed-ranges`, median of "
          f"{args.rounds} interleaved rounds (min-max):\n")
    print("| volume | wall s | vs first | CPU s | vs first | peak RSS MB | bytes read |")
    print("|---|---|---|---|---|---|---|")
    first = sizes[0]
    w0 = statistics.median(r[0] for r in runs[first])
    c0 = statistics.median(r[1] for r in runs[first])
    for text in sizes:
        walls = [r[0] for r in runs[text]]
        cpus = [r[1] for r in runs[text]]
        w, c = statistics.median(walls), statistics.median(cpus)
        print(f"| {text} | {w:.2f} ({min(walls):.2f}-{max(walls):.2f}) | {w / w0:.2f}x "
              f"| {c:.2f} ({min(cpus):.2f}-{max(cpus):.2f}) | {c / c0:.2f}x "
              f"| {max(r[2] for r in runs[text])} | {read[text]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
