"""The kernel's NBD client against `snapship nbd serve`, in a VM with a real kernel.

An XFS file system is backed up twice; the server runs in the guest on 127.0.0.1. The kernel
attaches the first version read-only (`nbd-client`, /dev/nbd0), mounts it with
`ro,norecovery` and reads a file and a directory tree back. Then, on a writable server with
--commit, it attaches the second version, mounts it read-write, writes a file and detaches:
the overlay becomes a third version, which, attached in turn, holds that file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.vm.harness import run_in_vm

pytestmark = pytest.mark.slow

SCRIPT = r"""
set -euo pipefail
ip link set lo up
export SNAPSHIP_REPO=/tmp/repo SNAPSHIP_PASSPHRASE=vm
S() { $PYTHON -m snapship.cli.main "$@"; }  # each start costs seconds under TCG: few calls
serve() {  # serve ARGS...: start the server, wait until it answers a listing
  $PYTHON -m snapship.cli.main nbd serve --listen 127.0.0.1:10809 "$@" \
    > /scratch/serve.out 2>> /scratch/serve.err &
  SERVER=$!  # python itself (not a subshell): killing it stops the server
  for _ in $(seq 300); do nbd-client -l 127.0.0.1 10809 > /scratch/list.txt 2>&1 && return; \
    sleep 0.2; done
  echo "server did not come up"; cat /scratch/serve.err; exit 1
}
mkdir -p /tmp/repo /tmp/fs /tmp/mnt
mkfs.xfs -q /dev/vda
mount /dev/vda /tmp/fs
dd if=/dev/urandom of=/tmp/fs/file bs=1M count=6 status=none
cp -r /usr/share/doc/bash /tmp/fs/doc
sha256sum < /tmp/fs/file > /scratch/v1.sha
umount /tmp/fs
S init --encryption none > /dev/null
S backup /dev/vda --volume xfs --json > /scratch/v1.json
mount /dev/vda /tmp/fs
dd if=/dev/urandom of=/tmp/fs/file bs=1M count=6 status=none conv=notrunc
sha256sum < /tmp/fs/file > /scratch/v2.sha
umount /tmp/fs
S backup /dev/vda --volume xfs --json > /scratch/v2.json
V1=$(sed -n 's/^  "version_id": "\(.*\)",*$/\1/p' /scratch/v1.json)

serve
nbd-client -N "xfs@${V1:0:19}" 127.0.0.1 10809 /dev/nbd0 > /scratch/attach1.out 2>&1
blockdev --getro /dev/nbd0 > /scratch/ro
blockdev --getsize64 /dev/nbd0 > /scratch/size
mount -o ro,norecovery /dev/nbd0 /tmp/mnt
sha256sum < /tmp/mnt/file > /scratch/nbd-v1.sha
diff -r /tmp/mnt/doc /usr/share/doc/bash > /scratch/doc.diff
umount /tmp/mnt
nbd-client -d /dev/nbd0 > /dev/null 2>&1
kill $SERVER; wait $SERVER || true

serve --writable --commit --label via=kernel
# another device: the 6.1 kernel keeps nbd0 read-only after a read-only export was attached
nbd-client -N xfs 127.0.0.1 10809 /dev/nbd1 > /scratch/attach2.out 2>&1
blockdev --getro /dev/nbd1 > /scratch/ro2
mount /dev/nbd1 /tmp/mnt
sha256sum < /tmp/mnt/file > /scratch/nbd-v2.sha
dd if=/dev/urandom of=/tmp/mnt/new bs=1M count=3 status=none
sha256sum < /tmp/mnt/new > /scratch/new.sha
umount /tmp/mnt
nbd-client -d /dev/nbd1 > /dev/null 2>&1
for _ in $(seq 600); do grep -q "committed" /scratch/serve.err && break; sleep 0.2; done
NEW=$(sed -n 's/.*committed \(xfs@[^ ]*\) .*/\1/p' /scratch/serve.err)
nbd-client -N "$NEW" 127.0.0.1 10809 /dev/nbd2 > /scratch/attach3.out 2>&1
mount -o ro,norecovery /dev/nbd2 /tmp/mnt
sha256sum < /tmp/mnt/new > /scratch/committed-new.sha
sha256sum < /tmp/mnt/file > /scratch/committed-file.sha
umount /tmp/mnt
nbd-client -d /dev/nbd2 > /dev/null 2>&1
kill $SERVER; wait $SERVER || true
"""


def test_kernel_nbd_client_mounts_versions_and_commits_writes(tmp_path: Path) -> None:
    # The label is checked by the host-side tests of --commit; here the kernel is the point.
    res = run_in_vm(SCRIPT, disks={"xfs": 320 << 20}, timeout=900, workdir=tmp_path).check()
    s = res.scratch

    def read(name: str) -> str:
        return (s / name).read_text().strip()

    v1 = json.loads(read("v1.json"))["version_id"]
    v2 = json.loads(read("v2.json"))["version_id"]
    listing = read("list.txt")
    assert f"xfs@{v1}" in listing and f"xfs@{v2}" in listing, listing
    assert read("ro") == "1" and int(read("size")) == 320 << 20
    assert read("nbd-v1.sha") == read("v1.sha") != read("v2.sha")
    assert read("doc.diff") == ""
    assert read("ro2") == "0" and read("nbd-v2.sha") == read("v2.sha")
    log = read("serve.err")
    committed = re.findall(rf"committed xfs@(\S+) \(parent xfs@{v2}, .*\)", log)
    assert len(committed) == 1, log
    assert committed[0] > v2
    # the new version, attached in turn, holds what the kernel wrote
    assert read("committed-new.sha") == read("new.sha")
    assert read("committed-file.sha") == read("v2.sha")
    print(f"VM run {res.seconds:.1f}s")
