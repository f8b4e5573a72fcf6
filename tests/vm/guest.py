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


def expected_restore(ref: str, other: str | None, extra: list[int], verifies: list[str]
                     ) -> dict[str, int]:
    """What restoring `ref` in place should write, worked out independently of the restore:
    the chunks `verify --against` found differing (each file in `verifies`), `extra`, and
    the chunks where `ref` and `other` differ (their manifests). Counts and the stored bytes
    (the version's own chunk sizes) of the non-zero ones."""
    import os

    from snapship.formats.manifest import Manifest
    from snapship.repository.repo import Repository
    from snapship.storage.local import LocalStorage
    from snapship.types import ZERO_ID, VersionRef

    repo = Repository.open(LocalStorage(os.environ["SNAPSHIP_REPO"]),
                           lambda: os.environ["SNAPSHIP_PASSPHRASE"].encode())

    def manifest(text: str) -> Manifest:
        volume, _, version = text.partition("@")
        return repo.load_manifest(*repo.resolve(VersionRef(volume, version or None)))

    m = manifest(ref)
    todo = set(extra)
    for path in verifies:
        with open(path) as f:
            for run in json.load(f)["differing"]:
                todo.update(range(run["first"], run["first"] + run["count"]))
    if other is not None:
        o = manifest(other)
        todo.update(i for i in range(m.count) if m.chunk(i) != o.chunk(i))
    data = [i for i in todo if m.chunk(i) != ZERO_ID]
    return {"chunks": len(todo), "data_chunks": len(data),
            "bytes": sum(m.sizes[i] for i in data)}


def main() -> None:
    cmd, arg = sys.argv[1], sys.argv[2]
    if cmd == "sha":
        print(sha256(arg))
    elif cmd == "snapdev":
        print(latest_snapshot_device(arg))
    elif cmd == "unit-start":
        unit_start(arg)


    elif cmd == "expect":  # expect REF OTHER|- EXTRA,... VERIFY.json...
        extra = [int(i) for i in sys.argv[4].split(",") if i]
        other = None if sys.argv[3] == "-" else sys.argv[3]
        print(json.dumps(expected_restore(arg, other, extra, sys.argv[5:])))
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
