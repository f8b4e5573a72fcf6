"""Small helpers the VM scripts call inside the guest (run with the venv's python)."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
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


def unit_start(link: str) -> None:
    """Run an enabled unit instance's ExecStart= lines as systemd would (the guest has no
    systemd as PID 1): the template's lines, `%f` the instance name unescaped by the real
    `systemd-escape`, `%%` and `$$` unescaped in each word of the split line."""
    instance = os.path.basename(link).split("@", 1)[1].rsplit(".", 1)[0]
    path = subprocess.run(["systemd-escape", "--unescape", "--path", instance],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.realpath(link)) as f:
        lines = [ln.split("=", 1)[1] for ln in f.read().splitlines()
                 if ln.startswith("ExecStart=")]
    if not lines:
        raise SystemExit(f"{link}: no ExecStart=")
    for line in lines:
        argv = [w.replace("%f", path).replace("%%", "%").replace("$$", "$")
                for w in shlex.split(line)]
        subprocess.run(argv, check=True)


def main() -> None:
    cmd, arg = sys.argv[1], sys.argv[2]
    if cmd == "sha":
        print(sha256(arg))
    elif cmd == "snapdev":
        print(latest_snapshot_device(arg))
    elif cmd == "unit-start":
        unit_start(arg)
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
