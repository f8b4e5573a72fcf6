"""Every magic number, version and limit of the repository format, in one place."""

from __future__ import annotations

FORMAT_VERSION = 2
"""Version of the repository layout that `init` writes; `config` carries it."""
FORMAT_VERSIONS_READ = (1, 2)
"""Layouts this snapship reads (1: one key file `keys/repokey`; 2: any number of key files
`keys/<id>`); readers reject any other."""

# Object keys are the repository layer's: repository/layout.py.

OBJECT_MAGIC = b"SNPO"
OBJECT_VERSION = 1
OBJECT_HEADER_LEN = 8
KIND_CHUNK = 1
KIND_MANIFEST = 2
KIND_REFS = 3
KIND_SUMMARY = 4
FLAG_ZSTD = 0x01
FLAG_ENCRYPTED = 0x02
KNOWN_FLAGS = FLAG_ZSTD | FLAG_ENCRYPTED
NONCE_LEN = 12
TAG_LEN = 16
CHECKSUM_LEN = 32

MANIFEST_MAGIC = b"SNPM"
MANIFEST_VERSION = 1

REFS_MAGIC = b"SNPR"
REFS_VERSION = 1

SUMMARY_VERSION = 1
"""The `summary` field of a version summary (docs/format.md, "Version summary")."""

LOCK_VERSION = 2
LOCK_VERSIONS_READ = (1, 2)
COLLECTION_VERSION = 1

KEYFILE_VERSION = 2
KEYFILE_VERSIONS_READ = (1, 2)

ENCRYPTION_AES_GCM = "aes-256-gcm"
ENCRYPTION_NONE = "none"
ENCRYPTIONS = (ENCRYPTION_AES_GCM, ENCRYPTION_NONE)

MIN_CHUNK_SIZE = 64 * 1024
MAX_CHUNK_SIZE = 16 * 1024 * 1024
DEFAULT_CHUNK_SIZE = 1024 * 1024

DEFAULT_ZSTD_LEVEL = 3
MAX_ZSTD_LEVEL = 19
MAX_MANIFEST_HEADER = 1 << 20
"""Also the cap on a reference list's header."""

MAX_JSON_DEPTH = 32
"""Nesting accepted in any JSON read from storage or the network (`formats/json_bounded.py`);
what snapship writes is at most a few levels deep."""
MAX_CONFIG_JSON = 64 << 10
"""`config` and a key file: a few hundred bytes each."""
MAX_MARKER_JSON = 64 << 20
"""A `damaged/` marker lists chunk ids, 67 bytes each: about a million of them."""

ID_LEN = 32
