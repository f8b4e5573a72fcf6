"""Snapshot space: loop devices over sparse files, added to a VG as PVs of snapship's own, so
classic tracking snapshots have room in a full VG (docs/snapspace.md).

`space` holds the workflow (`snapspace add`, `status`, `remove`) over the lvm2 and loop
edges (changes/lvm.py, changes/loop.py); `unit` the systemd unit that re-attaches a file at
boot (shipped beside it as `snapship-snapspace@.service`) and its installation.
"""
