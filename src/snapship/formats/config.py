"""The repository's `config` object and its passphrase-wrapped key file (both JSON).

`config` says how the repository is laid out (format version, chunk size, encryption). In an
encrypted repository it carries a MAC made with a key derived from the master secret, so that
whoever controls the storage cannot silently change, say, the chunk size or switch encryption
off. A key file holds the master secret wrapped under a passphrase-derived key; a repository
has one per passphrase (version 2 of the layout; version 1 had exactly one, `keys/repokey`).
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass
from typing import Any

from snapship.errors import FormatError
from snapship.formats.constants import (
    DEFAULT_ZSTD_LEVEL,
    ENCRYPTION_NONE,
    ENCRYPTIONS,
    FORMAT_VERSION,
    FORMAT_VERSIONS_READ,
    KEYFILE_VERSION,
    KEYFILE_VERSIONS_READ,
    MAX_CHUNK_SIZE,
    MAX_CONFIG_JSON,
    MAX_ZSTD_LEVEL,
    MIN_CHUNK_SIZE,
)
from snapship.formats.json_bounded import load_object


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class RepoConfig:
    repo_id: str
    chunk_size: int
    encryption: str
    created: str
    format: str = "snapship"
    version: int = FORMAT_VERSION
    hash: str = "blake3"
    compression: str = "zstd"
    compression_level: int = DEFAULT_ZSTD_LEVEL

    @property
    def encrypted(self) -> bool:
        return self.encryption != ENCRYPTION_NONE

    def signed_part(self) -> bytes:
        return _canonical(asdict(self))


def encode_config(cfg: RepoConfig, mac: bytes | None) -> bytes:
    obj: dict[str, Any] = asdict(cfg)
    if mac is not None:
        obj["mac"] = mac.hex()
    return json.dumps(obj, sort_keys=True, indent=1).encode() + b"\n"


def decode_config(data: bytes) -> tuple[RepoConfig, bytes | None]:
    """Parse and check `config`; returns it with its MAC (checked later, once unlocked)."""
    obj = load_object(data, "repository config", MAX_CONFIG_JSON)
    try:
        if obj.get("format") != "snapship":
            raise FormatError("not a snapship repository (config has no snapship format tag)")
        if obj.get("version") not in FORMAT_VERSIONS_READ:
            raise FormatError(
                f"repository format version {obj.get('version')} is not supported "
                f"(this snapship reads versions "
                f"{', '.join(map(str, FORMAT_VERSIONS_READ))})"
            )
        mac_hex = obj.pop("mac", None)
        cfg = RepoConfig(**obj)
        mac = bytes.fromhex(mac_hex) if mac_hex is not None else None
    except (ValueError, TypeError, AttributeError) as e:
        raise FormatError(f"repository config is malformed: {e}") from None
    cs = cfg.chunk_size
    if not isinstance(cs, int) or cs < MIN_CHUNK_SIZE or cs > MAX_CHUNK_SIZE or cs & (cs - 1):
        raise FormatError(f"repository config has an invalid chunk size {cs!r}")
    if cfg.encryption not in ENCRYPTIONS:
        raise FormatError(f"repository uses unknown encryption {cfg.encryption!r}")
    if (cfg.hash, cfg.compression) != ("blake3", "zstd"):
        raise FormatError(f"repository uses unknown hash/compression {cfg.hash}/{cfg.compression}")
    lvl = cfg.compression_level
    if not isinstance(lvl, int) or not 0 <= lvl <= MAX_ZSTD_LEVEL:
        raise FormatError(f"repository config has an invalid compression level {lvl!r}")
    if cfg.encrypted and mac is None:
        raise FormatError("encrypted repository config has no MAC")
    return cfg, mac


@dataclass(frozen=True)
class KeyFile:
    """One passphrase's wrapping of the master secret. Version 1 (`keys/repokey`) has no
    id, label or date; version 2 (`keys/<id>`) names itself, so a key file copied under
    another name is refused, and says whose it is for `key list`."""

    kdf: str
    n: int
    r: int
    p: int
    salt: bytes
    nonce: bytes
    wrapped: bytes
    version: int = KEYFILE_VERSION
    id: str = ""
    label: str = ""
    created: str = ""


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def encode_keyfile(k: KeyFile) -> bytes:
    obj: dict[str, Any] = {"version": k.version}
    if k.version >= 2:
        obj.update({"id": k.id, "label": k.label, "created": k.created})
    obj.update({
        "kdf": {"name": k.kdf, "n": k.n, "r": k.r, "p": k.p, "salt": _b64(k.salt)},
        "cipher": "aes-256-gcm",
        "nonce": _b64(k.nonce),
        "wrapped": _b64(k.wrapped),
    })
    return json.dumps(obj, indent=1).encode() + b"\n"


def decode_keyfile(data: bytes) -> KeyFile:
    obj = load_object(data, "repository key file", MAX_CONFIG_JSON)
    try:
        version = obj["version"]
        if version not in KEYFILE_VERSIONS_READ:
            raise FormatError(f"key file version {version} is not supported")
        kdf = obj["kdf"]
        if kdf["name"] != "scrypt" or obj["cipher"] != "aes-256-gcm":
            raise FormatError(f"key file uses unknown kdf/cipher {kdf['name']}/{obj['cipher']}")
        named = {"id": "", "label": "", "created": ""}
        if version >= 2:
            named = {f: obj[f] for f in named}
            if not all(isinstance(v, str) for v in named.values()):
                raise TypeError("id, label and created must be strings")
        return KeyFile(
            kdf="scrypt",
            n=int(kdf["n"]),
            r=int(kdf["r"]),
            p=int(kdf["p"]),
            salt=base64.b64decode(kdf["salt"], validate=True),
            nonce=base64.b64decode(obj["nonce"], validate=True),
            wrapped=base64.b64decode(obj["wrapped"], validate=True),
            version=version,
            **named,
        )
    except (ValueError, KeyError, TypeError) as e:
        raise FormatError(f"repository key file is malformed: {e}") from None
