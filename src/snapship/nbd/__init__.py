"""The NBD server: every version of every volume as a network block device.

`protocol` (wire constants, parsing and encoding, request checks) and `handshake` (option
haggling) are sans-I/O; `names` (export names to versions), `exports` (reads, writes and block
status of one export), `chunkcache`, `overlay` and `rangemap`, `registry` (overlays shared per
export) and `commit` (an overlay as a new version) hold the data path; `server` is the only
module with sockets. docs/nbd.md says what is supported.
"""
