#!/usr/bin/env bash
# The main job on the embedded default: back up a small ext4 disk image into a local
# repository, change the image, back it up again, restore both versions and check them
# (byte for byte, or file for file where free space held deleted data that is not backed up).
set -euo pipefail

WORK="${DEMO_WORK:-demo-work}"
export SNAPSHIP_PASSPHRASE="${SNAPSHIP_PASSPHRASE:-demo passphrase}"
export SNAPSHIP_REPO="$WORK/repo"
# The demo's repository is thrown away with $WORK: so is the client's record of it.
export SNAPSHIP_STATE_DIR="${SNAPSHIP_STATE_DIR:-$WORK/state}"
rm -rf "$WORK"
mkdir -p "$WORK/tree"

say() { printf '\n== %s\n' "$*"; }
sha() { python3 -c 'import hashlib,sys; h=hashlib.sha256()
with open(sys.argv[1],"rb") as f:
    while b:=f.read(1<<20): h.update(b)
print(h.hexdigest())' "$1"; }
# A restored image equals the original byte for byte, or, where the original's free space held
# deleted files' data (which snapship does not back up), file for file with a clean e2fsck.
same() {
  if [ "$(sha "$1")" = "$(sha "$2")" ]; then echo "$3: byte-identical"; return 0; fi
  e2fsck -fn "$2" >/dev/null 2>&1 || { echo "$3: e2fsck of the restored image fails"; return 1; }
  rm -rf "$WORK/files-a" "$WORK/files-b"; mkdir -p "$WORK/files-a" "$WORK/files-b"
  debugfs -R "rdump / $WORK/files-a" "$1" >/dev/null 2>&1
  debugfs -R "rdump / $WORK/files-b" "$2" >/dev/null 2>&1
  if diff -r --no-dereference "$WORK/files-a" "$WORK/files-b" >/dev/null; then
    echo "$3: every file identical, e2fsck clean (free space, holding deleted data, restored as zeroes)"
  else echo "$3: MISMATCH"; return 1; fi
}

say "building a 384 MiB ext4 image with documentation, libraries, random data and duplicates"
cp -r /usr/share/doc "$WORK/tree/doc" 2>/dev/null || true
cp -r /usr/lib/python3 "$WORK/tree/python3" 2>/dev/null || true
cp -r "$WORK/tree/python3" "$WORK/tree/python3-copy" 2>/dev/null || true
head -c 24M /dev/urandom > "$WORK/tree/random.bin"
mkfs.ext4 -q -F -d "$WORK/tree" -L demo "$WORK/disk.img" 384M
cp --sparse=always "$WORK/disk.img" "$WORK/day1.img"
du -h --apparent-size "$WORK/disk.img" | cut -f1 | sed 's/^/image size: /'
du -h "$WORK/disk.img" | cut -f1 | sed 's/^/allocated:  /'

say "snapship init (AES-256-GCM, passphrase from SNAPSHIP_PASSPHRASE)"
snapship init

say "day 1: full backup"
snapship backup "$WORK/disk.img" --volume demo --label day=1

say "changing the image: a new 4 MiB file, one file removed, one overwritten"
head -c 4M /dev/urandom > "$WORK/new.bin"
head -c 64K /dev/urandom > "$WORK/patch.bin"
debugfs -w "$WORK/disk.img" -f - >/dev/null 2>&1 <<CMDS
write $WORK/new.bin new.bin
rm random.bin
write $WORK/patch.bin random2.bin
CMDS
cp --sparse=always "$WORK/disk.img" "$WORK/day2.img"

say "day 2: backup (unchanged chunks are deduplicated)"
snapship backup "$WORK/disk.img" --volume demo --label day=2

say "versions"
snapship versions
snapship show demo@latest

say "restoring both versions and comparing checksums"
v1=$(snapship versions --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["versions"][0]["version_id"])')
snapship restore "demo@$v1" "$WORK/restored-day1.img"
snapship restore demo "$WORK/restored-day2.img"
ok=1
for day in 1 2; do
  same "$WORK/day$day.img" "$WORK/restored-day$day.img" "day $day" || ok=0
done

say "deep verify"
snapship verify --deep

say "retention: keep only the newest version, then gc gives the space back"
du -sh "$SNAPSHIP_REPO" | cut -f1 | sed 's/^/repository before: /'
snapship prune --keep-last 1
snapship gc
snapship restore demo "$WORK/restored-after-gc.img"
same "$WORK/day2.img" "$WORK/restored-after-gc.img" "day 2 after prune and gc" || ok=0
snapship verify --deep

say "summary"
du -sh "$SNAPSHIP_REPO" | cut -f1 | sed 's/^/repository size: /'
du -h "$WORK/restored-day2.img" | cut -f1 | sed 's/^/restored image allocated (sparse): /'
if [ "$ok" = 1 ]; then echo "demo OK: both versions restored"; else exit 1; fi
