#!/usr/bin/env python3
"""Rollback and differential restore vs a full restore of the same volume: time and bytes
fetched, as ratios from one run.

On the host (default): makes a random image (`--size`, default 256 MiB) with some zero
regions, backs it up (v1), changes `--changed` percent of its 1 MiB chunks and backs it up
again (v2). Then restores v2 twice: in full to a new file, and with `--differential` onto a
copy holding v1. Prints the seconds, bytes fetched (from `--json`) and the ratios
differential / full.

With `--vm` (root; the VM assets of tests/vm/harness.py): rollback needs LVM and a kernel
with device-mapper, so all three run in one boot of the test VM (qemu TCG, a real 6.1 kernel
and lvm2) on one LV of `--size` (default 128 MiB): v1 and v2 backed up through the tracking
snapshot as above, then `--changed` percent of the chunks written again (the drift since v2,
the same bytes on the origin and on a copy LV restored from v2). Timed: the rollback of the
origin to v2, the differential restore of v2 onto the copy (which reads and hashes all of
it), and a full restore of v2 into a new LV. The ratios rollback / full and
differential / full are what to read: absolute times depend on the machine's load (and are
those of an emulated CPU in the VM).

    .venv/bin/python bench/restore_modes.py [--workdir DIR] [--size 256M] [--changed 2]
    .venv/bin/python bench/restore_modes.py --vm [--size 128M] [--changed 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def snapship(*args: str | Path, env: dict[str, str]) -> dict[str, Any]:
    p = subprocess.run([sys.executable, "-m", "snapship.cli.main", *map(str, args), "--json"],
                       env=env, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise SystemExit(f"snapship {' '.join(map(str, args))} failed: {p.stderr.strip()}")
    out: dict[str, Any] = json.loads(p.stdout)
    return out


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(MiB):
            h.update(block)
    return h.hexdigest()


def timed(fn: Any) -> tuple[float, Any]:
    t0 = time.monotonic()
    out = fn()
    return time.monotonic() - t0, out


VM_SCRIPT = r"""
set -euo pipefail
export SNAPSHIP_REPO=/tmp/repo/r SNAPSHIP_PASSPHRASE=bench SNAPSHIP_STATE_DIR=/tmp/state
S() { $PYTHON -m snapship.cli.main "$@"; }
now() { date +%s.%N; }
# timed NAME CMD...: the command's --json in /scratch/NAME.json, its seconds in NAME.time;
# each from the same start: caches dropped (the repository is read cold), then the
# interpreter's files read once (they are not what is measured)
timed() {
  local name=$1; shift
  sync; echo 3 > /proc/sys/vm/drop_caches; S --version > /dev/null
  local a; a=$(now); "$@" --json > /scratch/$name.json; echo "$a $(now)" > /scratch/$name.time
}
vid() { $PYTHON -c 'import json,sys; print(json.load(open(sys.argv[1]))["version_id"])' "$1"; }
pvcreate -q /dev/vda > /dev/null
vgcreate -q vg /dev/vda > /dev/null
lvcreate -q -y -L {repo}b -n repo vg > /dev/null  # room for v1 and v2
mkfs.ext4 -q -m 0 /dev/mapper/vg-repo
mkdir -p /tmp/repo
mount /dev/mapper/vg-repo /tmp/repo
S init --encryption none > /dev/null
lvcreate -q -y -L {size}b -n src vg > /dev/null
$PYTHON /scratch/drift.py fill /dev/mapper/vg-src
S backup lvm:vg/src --volume vol --json > /scratch/b1.json
$PYTHON /scratch/drift.py 2 /dev/mapper/vg-src
S backup lvm:vg/src --volume vol --json > /scratch/b2.json
V2=$(vid /scratch/b2.json)
S restore vol@$V2 lvm:vg/copy > /dev/null
$PYTHON /scratch/drift.py 3 /dev/mapper/vg-src /dev/mapper/vg-copy  # drift since v2
timed rollback S restore --rollback vol@$V2 lvm:vg/src
timed differential S restore --differential vol@$V2 /dev/mapper/vg-copy
timed full S restore vol@$V2 lvm:vg/full
S verify vol@$V2 --against /dev/mapper/vg-src > /dev/null
S verify vol@$V2 --against /dev/mapper/vg-copy > /dev/null
S verify vol@$V2 --against /dev/mapper/vg-full > /dev/null
"""

DRIFT = """
import random, sys
MiB = 1 << 20
size, percent = {size}, {percent}
what, devices = sys.argv[1], sys.argv[2:]
if what == "fill":  # random data, every fifth chunk zero
    rng = random.Random(1)
    with open(devices[0], "r+b") as f:
        for i in range(size // MiB):
            f.write(bytes(MiB) if i % 5 == 4 else rng.randbytes(MiB))
    sys.exit(0)
rng = random.Random(int(what))
chunks = size // MiB
picked = rng.sample(range(chunks), max(1, round(chunks * percent / 100)))
blocks = [(i * MiB + rng.randrange(MiB // 4096) * 4096, rng.randbytes(4096)) for i in picked]
for dev in devices:  # the same bytes on each
    with open(dev, "r+b") as f:
        for off, data in blocks:
            f.seek(off)
            f.write(data)
"""


def run_vm(size: int, percent: float) -> None:
    sys.path.insert(0, str(ROOT))
    from tests.vm.harness import run_in_vm

    work = Path(tempfile.mkdtemp(prefix="snapship-restore-bench-vm."))
    (work / "scratch").mkdir()
    (work / "scratch" / "drift.py").write_text(DRIFT.format(size=size, percent=percent))
    script = VM_SCRIPT.replace("{size}", str(size)).replace("{repo}", str(size + 64 * MiB))
    res = run_in_vm(script, disks={"pv": 4 * size + 512 * MiB},
                    timeout=3000, memory_mb=1024, workdir=work).check()
    s = res.scratch
    rows = []
    for name in ("full", "differential", "rollback"):
        a, b = map(float, (s / f"{name}.time").read_text().split())
        rows.append((name, b - a, json.loads((s / f"{name}.json").read_text())))
    print(f"VM (qemu TCG, 6.1 kernel, lvm2): LV {size // MiB} MiB of 1 MiB chunks, every "
          f"fifth zero; {percent:g}% of the chunks written since the version restored; "
          f"host load average {os.getloadavg()[0]:.1f}; VM run {res.seconds:.0f} s")
    report(rows)
    shutil.rmtree(work)  # kept when the run fails: its logs and disks


def report(rows: list[tuple[str, float, dict[str, Any]]]) -> None:
    """`seconds`: the whole command (interpreter start, repository open and lvm2 calls
    included: a fixed cost, large under emulation); `restore s`: the restore itself (its
    --json `duration`: choosing the chunks, fetching and writing them)."""
    print(f"{'mode':<14}{'seconds':>9}{'restore s':>11}{'fetched MiB':>13}"
          f"{'chunks fetched':>16}{'chunks written':>16}{'chunks read':>13}")
    for name, t, r in rows:
        print(f"{name:<14}{t:>9.2f}{r['duration']:>11.2f}{r['bytes_fetched'] / MiB:>13.2f}"
              f"{r['chunks_fetched']:>16}{r['chunks_written'] + r['chunks_zero']:>16}"
              f"{r['chunks_compared']:>13}")
    t_full, full = rows[0][1], rows[0][2]
    for name, t, r in rows[1:]:
        print(f"{name} / full: time {t / t_full:.3f} (restore itself "
              f"{r['duration'] / max(1e-9, full['duration']):.3f}), bytes fetched "
              f"{r['bytes_fetched'] / max(1, full['bytes_fetched']):.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--size", default=None, help="image size, e.g. 256M or 1G (default "
                    "256M; 128M with --vm)")
    ap.add_argument("--changed", type=float, default=2.0, help="percent of chunks changed")
    ap.add_argument("--vm", action="store_true", help="in the test VM: rollback too")
    a = ap.parse_args()
    text = a.size or ("128M" if a.vm else "256M")
    size = int(text[:-1]) * {"M": MiB, "G": 1024 * MiB}[text[-1].upper()]
    if a.vm:
        run_vm(size, a.changed)
        return
    work = a.workdir or Path(tempfile.mkdtemp(prefix="snapship-restore-bench."))
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPSHIP_")}
    env.update(SNAPSHIP_PASSPHRASE="bench", SNAPSHIP_STATE_DIR=str(work / "state"),
               PYTHONPATH=str(ROOT / "src"))
    repo = work / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    snapship("init", "--repo", repo, env=env)

    rng = random.Random(1)
    chunks = size // MiB
    image = work / "v1.img"
    with open(image, "wb") as f:
        for i in range(chunks):
            f.write(bytes(MiB) if i % 5 == 4 else rng.randbytes(MiB))
    v1 = snapship("backup", "--repo", repo, image, "--volume", "vol", env=env)["version_id"]
    copy = work / "copy.img"
    shutil.copyfile(image, copy)  # what the target holds: v1
    changed = rng.sample(range(chunks), max(1, round(chunks * a.changed / 100)))
    with open(image, "r+b") as f:
        for i in changed:
            f.seek(i * MiB + rng.randrange(MiB - 4096))
            f.write(rng.randbytes(4096))
    v2 = snapship("backup", "--repo", repo, image, "--volume", "vol", env=env)["version_id"]
    want = sha(image)

    full_target = work / "full.img"
    t_full, full = timed(lambda: snapship("restore", "--repo", repo, f"vol@{v2}", full_target,
                                          env=env))
    t_diff, diff = timed(lambda: snapship("restore", "--repo", repo, "--differential",
                                          f"vol@{v2}", copy, env=env))
    assert sha(full_target) == want and sha(copy) == want, "a restore is not byte-identical"
    rows = [("full", t_full, full), ("differential", t_diff, diff)]
    print(f"image {size // MiB} MiB, {len(changed)} of {chunks} chunks changed "
          f"({a.changed:g}%), v1 {v1}, v2 {v2}; load average {os.getloadavg()[0]:.1f}")
    report(rows)
    if a.workdir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
