"""Small helpers the VM scripts call inside the guest (run with the venv's python)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

from snapship.changes.lvm import mapper_name


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def latest_snapshot_device(volume: str) -> str:
    """The device of the tracking snapshot the newest version of `volume` was read from."""
    out = subprocess.run(
        [sys.executable, "-m", "snapship.cli.main", "show", volume, "--json"],
        capture_output=True, text=True, check=True,
    ).stdout
    vg, lv = json.loads(out)["labels"]["snapship.snapshot"].split("/")
    return f"/dev/mapper/{mapper_name(vg, lv)}"


def main() -> None:
    cmd, arg = sys.argv[1], sys.argv[2]
    if cmd == "sha":
        print(sha256(arg))
    elif cmd == "snapdev":
        print(latest_snapshot_device(arg))
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
