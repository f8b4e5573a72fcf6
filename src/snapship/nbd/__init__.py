"""The NBD server: every version of every volume as a network block device.

`protocol` (wire constants, parsing and encoding, request checks) and `handshake` (option
haggling) are sans-I/O; `rangemap`, `overlay`, `chunkcache`, `exports` and `commit` hold the data
path; `server` is the only module with sockets. docs/nbd.md says what is supported.
"""
