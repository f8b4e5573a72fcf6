"""A kernel md RAID-1 whose second leg is a live export of `snapship nbd serve --state-dir`.

In one guest (real kernel, md raid1, kernel nbd-client, XFS): a local disk and the export,
attached with nbd-client over TLS with a client certificate (`--tls-authz` grants it the
volume; another host's certificate is refused), are mirrored (`--metadata=1.0
--bitmap=internal`, the export `--write-mostly`); XFS on the array; a write workload; three
checkpoints while it runs (two inside `xfs_freeze`, with the array's checksum taken inside
the freeze, one crash-consistent under a running writer). Then the server is SIGKILLed
mid-workload: md marks the leg faulty and the writes go on; the server restarts on the same
state directory, the leg is re-added, and the bitmap resync writes only the dirty regions; a
last checkpoint equals the array. The host then restores every checkpoint and checks it
(checksums, xfs_repair -n).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.clihelp import CLI, cli_env
from tests.tlshelp import make_pki
from tests.vm.harness import run_in_vm

pytestmark = pytest.mark.slow

DISK = 320 << 20  # mkfs.xfs wants 300 MB at least

SCRIPT = r"""
set -euo pipefail
ip link set lo up
export MDADM_NO_UDEV=1 SNAPSHIP_REPO=/scratch/repo SNAPSHIP_PASSPHRASE=vm
STATE=/tmp/state
S() { $PYTHON -m snapship.cli.main "$@"; }  # each start costs seconds under TCG: few calls
PKI=/scratch/pki  # made by the host: a CA, the server's certificate, two clients'
TLS="-x -A $PKI/host/ca-cert.pem -certfile $PKI/host/client-cert.pem \
  -keyfile $PKI/host/client-key.pem"
serve() {
  $PYTHON -m snapship.cli.main nbd serve --writable --state-dir $STATE \
    --listen 127.0.0.1:10809 --tls-cert $PKI/server/server-cert.pem \
    --tls-key $PKI/server/server-key.pem --tls-client-ca $PKI/server/ca-cert.pem \
    --tls-authz $PKI/authz.json >> /scratch/serve.out 2>> /scratch/serve.err &
  SERVER=$!
  wait_for 120 nbd-client -l 127.0.0.1 10809 $TLS
}
wait_for() {  # SECONDS COMMAND...: poll until COMMAND succeeds
  local n=$(( $1 * 5 )); shift
  for _ in $(seq $n); do "$@" > /dev/null 2>&1 && return 0; sleep 0.2; done
  echo "timed out waiting for: $*"; cat /proc/mdstat; tail -20 /scratch/serve.err; exit 1
}
workload() {  # NAME COUNT: COUNT files of 1 MiB, each fsynced
  for i in $(seq $2); do
    dd if=/dev/urandom of=/tmp/mnt/$1-$i bs=64k count=16 conv=fsync status=none
  done
}
frozen_checkpoint() {  # NAME: the array's checksum and a checkpoint, inside one freeze
  xfs_freeze -f /tmp/mnt
  # O_DIRECT: the block device's page cache keeps what an earlier read saw, and XFS writes
  # around it
  dd if=/dev/md0 bs=1M iflag=direct status=none | sha256sum | cut -d' ' -f1 > /scratch/$1.md.sha
  # (a frozen file system skips atime updates: reading its files inside the freeze is safe)
  (cd /tmp/mnt && sha256sum -- *) > /scratch/$1.files.sha
  S nbd checkpoint leg --state-dir $STATE --json > /scratch/$1.json
  xfs_freeze -u /tmp/mnt
}
mkdir -p /tmp/mnt
S init --encryption none > /dev/null
S backup /dev/vda --volume leg --json > /scratch/base.json   # all zeroes, as the local leg
serve
nbd-client -t 30 -N leg 127.0.0.1 10809 /dev/nbd0 $TLS > /scratch/attach.out 2>&1
# Another host's certificate: the leg is neither listed to it nor attachable.
O=$PKI/other
nbd-client -l 127.0.0.1 10809 -x -A $O/ca-cert.pem -certfile $O/client-cert.pem \
  -keyfile $O/client-key.pem > /scratch/other-list.out 2>&1 || true
if nbd-client -t 30 -N leg 127.0.0.1 10809 /dev/nbd1 -x -A $O/ca-cert.pem \
    -certfile $O/client-cert.pem -keyfile $O/client-key.pem > /scratch/other-attach.out 2>&1
then echo attached > /scratch/other-attach.rc; nbd-client -d /dev/nbd1
else echo refused > /scratch/other-attach.rc
fi
# Both legs hold zeroes: --assume-clean skips the initial copy.
mdadm --create /dev/md0 --run --level=1 --raid-devices=2 --metadata=1.0 \
  --bitmap=internal --bitmap-chunk=1M --assume-clean /dev/vda --write-mostly /dev/nbd0 \
  > /scratch/mdadm-create.out 2>&1
blockdev --getsize64 /dev/md0 > /scratch/md.size
cat /sys/block/md0/md/dev-nbd0/state > /scratch/leg-state-0
mkfs.xfs -q /dev/md0
mount /dev/md0 /tmp/mnt

workload a 4
frozen_checkpoint cp1

# Crash-consistent: no freeze, a writer running; what was fsynced before must be in it.
dd if=/dev/urandom of=/tmp/mnt/synced bs=64k count=8 conv=fsync status=none
sha256sum < /tmp/mnt/synced | cut -d' ' -f1 > /scratch/synced.sha
workload b 6 &
WL=$!
S nbd checkpoint leg --state-dir $STATE --json > /scratch/cp2.json
wait $WL

workload c 3
frozen_checkpoint cp3

# The backup end dies mid-workload: md fails the leg, the host goes on writing.
workload d 8 &
WL=$!
wait_for 60 test -e /tmp/mnt/d-2
kill -9 $SERVER
wait $SERVER || true
wait_for 120 grep -q faulty /sys/block/md0/md/dev-nbd0/state
wait $WL
cat /proc/mdstat > /scratch/mdstat-degraded
cat /sys/block/md0/md/degraded > /scratch/degraded
workload e 2

# Back: same state directory, the leg re-added, only dirty regions resynced.
serve
wait_for 60 mdadm /dev/md0 --remove /dev/nbd0
nbd-client -d /dev/nbd0 > /dev/null 2>&1 || true
wait_for 60 nbd-client -t 30 -N leg 127.0.0.1 10809 /dev/nbd0 $TLS
awk '{print $7}' /sys/block/nbd0/stat > /scratch/nbd-written-before
mdadm /dev/md0 --re-add /dev/nbd0 > /scratch/mdadm-readd.out 2>&1
cat /proc/mdstat > /scratch/mdstat-readd
mdadm --wait /dev/md0 || true
wait_for 300 grep -q in_sync /sys/block/md0/md/dev-nbd0/state
awk '{print $7}' /sys/block/nbd0/stat > /scratch/nbd-written-after
cat /proc/mdstat > /scratch/mdstat-resynced
cat /sys/block/md0/md/degraded > /scratch/degraded-after
frozen_checkpoint cp4
umount /tmp/mnt
mdadm --stop /dev/md0 > /dev/null 2>&1
nbd-client -d /dev/nbd0 > /dev/null 2>&1 || true
kill $SERVER; wait $SERVER || true
"""


def restore(repo: Path, ref: str, out: Path) -> None:
    r = subprocess.run([*CLI, "restore", "--repo", str(repo), ref, str(out)],
                       env=cli_env(None), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr


def sha_of_prefix(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = size
        while left:
            block = f.read(min(left, 1 << 20))
            assert block, "image shorter than the array"
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def xfs_repair(image: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["xfs_repair", "-n", "-f", str(image)], capture_output=True,
                          text=True, timeout=300)


def parse_sha256sum(text: str) -> dict[str, str]:
    """`sha256sum` output: file name -> checksum."""
    return {name: sha for sha, name in (line.split(maxsplit=1) for line in text.splitlines())}


def file_shas(mnt: Path) -> dict[str, str]:
    """The checksum of every file in a mounted file system's top directory."""
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in mnt.iterdir()}


def replay_log(image: Path, mnt: Path) -> dict[str, str]:
    """Mount (XFS recovers its log), note the files' checksums, unmount; nouuid: the array's
    file system shares the UUID."""
    mnt.mkdir(exist_ok=True)
    subprocess.run(["mount", "-o", "loop,nouuid", str(image), str(mnt)], check=True)
    try:
        return file_shas(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


LOG_TO_REPLAY = "metadata changes in a log"  # what xfs_repair -n says of a dirty log


def checked_frozen(image: Path, mnt: Path, files_sha: str) -> bool:
    """A checkpoint taken inside xfs_freeze: `xfs_repair -n` as stored is clean, or fails only
    because the log wants replaying (a freeze leaves the log dirty, so that a snapshot's mount
    processes unlinked inodes: shared/notes/restore-and-live.md); then it mounts, every file
    matches its checksum taken inside the freeze, and `xfs_repair -n` exits 0. Returns whether
    it was clean as stored."""
    first = xfs_repair(image)
    out = first.stdout + first.stderr
    assert first.returncode == 0 or LOG_TO_REPLAY in out, out
    assert replay_log(image, mnt) == parse_sha256sum(files_sha)
    r = xfs_repair(image)
    assert r.returncode == 0, (out, r.stdout, r.stderr)
    return first.returncode == 0


def test_md_raid1_mirror_leg_on_a_live_export(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "scratch" / "pki", {"host": ("protected-host", ()),
                                                  "other": ("other-host", ())})
    (pki / "authz.json").write_text(json.dumps({
        "format": "snapship nbd tls authz", "version": 1,
        "clients": [{"client": "protected-host", "volumes": ["leg"]},
                    {"client": "other-host", "volumes": ["elsewhere"]}]}))
    res = run_in_vm(SCRIPT, disks={"local": DISK}, timeout=1800, workdir=tmp_path,
                    memory_mb=1536).check()
    s = res.scratch

    def read(name: str) -> str:
        return (s / name).read_text().strip()

    repo = s / "repo"
    md_size = int(read("md.size"))
    assert "write_mostly" in read("leg-state-0")
    # Over TLS with client certificates: the other host's sees no export and attaches none.
    assert "leg" not in read("other-list.out"), read("other-list.out")
    assert read("other-attach.rc") == "refused", read("other-attach.out")
    cps = {n: json.loads(read(f"{n}.json")) for n in ("cp1", "cp2", "cp3", "cp4")}
    for cp in cps.values():
        assert cp["changed"] is True, cp
    # Frozen checkpoints: the array's content inside the freeze, and a clean file system.
    clean_as_stored: dict[str, bool] = {}
    for name in ("cp1", "cp3", "cp4"):
        img = tmp_path / f"{name}.img"
        restore(repo, cps[name]["ref"], img)
        assert sha_of_prefix(img, md_size) == read(f"{name}.md.sha"), name
        with open(img, "r+b") as f:
            f.truncate(md_size)  # the md superblock at the end is not the file system's
        clean_as_stored[name] = checked_frozen(img, tmp_path / "mnt",
                                               (s / f"{name}.files.sha").read_text())
        img.unlink()
    # Crash-consistent: after log recovery (a mount) the file system is clean and holds
    # what was fsynced before the checkpoint.
    img = tmp_path / "cp2.img"
    restore(repo, cps["cp2"]["ref"], img)
    with open(img, "r+b") as f:
        f.truncate(md_size)
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    subprocess.run(["mount", "-o", "loop,nouuid", str(img), str(mnt)], check=True)
    try:
        synced = hashlib.sha256((mnt / "synced").read_bytes()).hexdigest()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert synced == read("synced.sha")
    r = xfs_repair(img)
    assert r.returncode == 0, (r.stdout, r.stderr)
    img.unlink()
    # The leg failed and came back with a resync of the dirty regions only.
    assert read("degraded") == "1" and "(F)" in read("mdstat-degraded"), read("mdstat-degraded")
    assert read("degraded-after") == "0", read("mdstat-resynced")
    resync = (int(read("nbd-written-after")) - int(read("nbd-written-before"))) * 512
    # The writes while degraded were 16 MiB of files plus metadata: that, not the volume.
    assert 0 < resync < DISK // 4, (resync, read("mdstat-readd"))
    assert cps["cp4"]["dirty_bytes"] < DISK // 4, cps["cp4"]
    # Frozen the same way, the three must agree on whether the log is dirty as stored.
    assert len(set(clean_as_stored.values())) == 1, clean_as_stored
    print(f"frozen checkpoints: xfs_repair -n clean as stored: {clean_as_stored} (else clean "
          f"after log replay, every file equal to its checksum inside the freeze)")
    print(f"VM run {res.seconds:.1f}s; resync wrote {resync} bytes of a {DISK}-byte leg; "
          f"checkpoints: " + ", ".join(f"{n} {c['dirty_bytes']} B in {c['seconds']} s"
                                       for n, c in cps.items()))
    shutil.rmtree(repo)
