"""Pure parsers of filesystem allocation metadata: which byte ranges a filesystem leaves free.

No I/O of their own: each takes a read function over the device (docs/free-space.md).
"""
