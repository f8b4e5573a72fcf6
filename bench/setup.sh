#!/usr/bin/env bash
# Install what the benchmark needs besides snapship: restic 0.14 and borg 1.2 (Debian 12),
# GNU time (peak RSS), e2fsprogs (mkfs.ext4) and tar. Idempotent; needs root.
set -euo pipefail
need=()
command -v restic >/dev/null || need+=(restic)
command -v borg >/dev/null || need+=(borgbackup)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v tar >/dev/null || need+=(tar)
[[ -x /usr/bin/time ]] || need+=(time)
if ((${#need[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
restic version
borg --version
