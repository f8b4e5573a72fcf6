"""Declared jobs with a real LVM volume (issue 15, item 1), in one VM boot.

A jobs file with three volumes (two image files and an LVM logical volume) and a fourth whose
source is missing, into two repositories: `snapship run` backs everything up, prunes and gcs,
and fails only the missing one (exit 1). Then the LV is written and only its job runs: an
incremental backup through the tracking snapshot's COW table, the first version pruned, its
chunks collected, and the newest version restores to what the LV holds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.vm.harness import run_in_vm

pytestmark = pytest.mark.slow
MiB = 1 << 20

JOBS = """\
version = 1

[repositories.one]
location = "/tmp/j/one"

[repositories.two]
location = "/tmp/j/two"

[volumes.a]
source = "/tmp/j/a.img"

[volumes.b]
source = "/tmp/j/b.img"

[volumes.gone]
source = "/tmp/j/gone.img"

[volumes.root]
source = "lvm:vg/lv"
snapshot-size = "16M"
snapshot-pv = ["/dev/vdb"]
retention = { keep-last = 1 }

[jobs.files]
volumes = ["a", "b", "gone"]
repositories = ["one", "two"]

[jobs.lvm]
volumes = ["root"]
repositories = ["one"]
gc = true
"""

SCRIPT = f"""
set -euo pipefail
export SNAPSHIP_STATE_DIR=/tmp/state
S() {{ $PYTHON -m snapship.cli.main "$@"; }}
pvcreate -q /dev/vda /dev/vdb
vgcreate -q vg /dev/vda /dev/vdb
lvcreate -q -y -L 64M -n lv vg /dev/vda
dd if=/dev/urandom of=/dev/mapper/vg-lv bs=1M count=64 oflag=direct status=none
mkdir -p /tmp/j
dd if=/dev/urandom of=/tmp/j/a.img bs=1M count=3 status=none
dd if=/dev/urandom of=/tmp/j/b.img bs=1M count=2 status=none
S init --repo /tmp/j/one --encryption none > /dev/null
S init --repo /tmp/j/two --encryption none > /dev/null
cat > /tmp/j/snapship.toml <<'EOF'
{JOBS}EOF
S config check --config /tmp/j/snapship.toml > /scratch/check.out
set +e
S run --config /tmp/j/snapship.toml --json > /scratch/run1.json 2> /scratch/run1.err
echo $? > /scratch/run1.rc
dd if=/dev/urandom of=/dev/mapper/vg-lv bs=1M seek=10 count=2 oflag=direct conv=notrunc \\
    status=none
S run lvm --config /tmp/j/snapship.toml --json > /scratch/run2.json 2> /scratch/run2.err
echo $? > /scratch/run2.rc
set -e
S restore --repo /tmp/j/one root /tmp/j/root.img > /dev/null
sha256sum < /dev/mapper/vg-lv > /scratch/lv.sha
sha256sum < /tmp/j/root.img > /scratch/restored.sha
lvs --noheadings -o lv_name vg > /scratch/lvs
lvs --noheadings -o lv_name,devices vg > /scratch/lvs-devices
"""


def test_run_with_an_lvm_volume_two_files_and_a_missing_source(tmp_path: Path) -> None:
    res = run_in_vm(SCRIPT, disks={"pv": 256 * MiB, "snap": 64 * MiB}, timeout=900,
                    workdir=tmp_path).check()
    s = res.scratch
    assert (s / "check.out").read_text().endswith(": ok: 2 job(s): files, lvm\n")

    assert (s / "run1.rc").read_text().strip() == "1", res.describe()
    run1 = json.loads((s / "run1.json").read_text())
    outcome = {(x["job"], x["step"], x["repository"], x["volume"]): x["outcome"]
               for x in run1["steps"]}
    expected: dict[tuple[str, str, str, str | None], str] = {
        ("lvm", "backup", "one", "root"): "ok", ("lvm", "prune", "one", "root"): "ok",
        ("lvm", "gc", "one", None): "ok"}
    for r in ("one", "two"):
        expected.update({("files", "backup", r, "a"): "ok", ("files", "backup", r, "b"): "ok",
                         ("files", "backup", r, "gone"): "failed"})
    assert outcome == expected, run1
    err = (s / "run1.err").read_text()
    assert err.count("FAILED (source)") == 2 and "gone.img" in err, err
    first = next(x for x in run1["steps"] if x["volume"] == "root")["result"]
    assert first["size"] == 64 * MiB and first["stats"]["bytes_read"] == 64 * MiB, first

    assert (s / "run2.rc").read_text().strip() == "0", (s / "run2.err").read_text()
    run2 = json.loads((s / "run2.json").read_text())
    assert [(x["step"], x["outcome"]) for x in run2["steps"]] == \
        [("backup", "ok"), ("prune", "ok"), ("gc", "ok")], run2
    backup, prune, gc = (x["result"] for x in run2["steps"])
    stats = backup["stats"]
    assert (stats["mode"], stats["change_source"]) == ("incremental", "COW table"), stats
    assert stats["bytes_read"] == 2 * MiB and backup["parent"] == first["version_id"], stats
    assert prune["forgotten"] == [first["ref"]], prune
    assert gc["chunks_freed"] == 2 and gc["finished"], gc  # the two chunks only it used
    assert (s / "restored.sha").read_text() == (s / "lv.sha").read_text()
    snapshots = [n for n in (s / "lvs").read_text().split() if n != "lv"]
    assert len(snapshots) == 1 and snapshots[0].startswith("lv-snapship-"), snapshots
    # The job's snapshot-pv put the tracking snapshot on the second PV, the origin stays put.
    devices = {name: where.partition("(")[0] for name, where in
               (line.split() for line in (s / "lvs-devices").read_text().splitlines())}
    assert devices == {"lv": "/dev/vda", snapshots[0]: "/dev/vdb"}, devices
