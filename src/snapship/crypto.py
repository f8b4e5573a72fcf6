"""Keys and primitives: passphrase KDF, master-key wrapping, AEAD, chunk ids.

A repository has one random 64-byte master secret. From it, BLAKE3's key-derivation mode gives
independent 32-byte keys for chunk encryption, chunk ids and the config MAC, so no key is used
for two purposes. The master secret is stored only wrapped (AES-256-GCM) under a key derived
from the passphrase with scrypt, a memory-hard KDF.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from snapship.errors import AuthFailed
from snapship.formats.constants import NONCE_LEN, TAG_LEN

MASTER_LEN = 64


@dataclass(frozen=True)
class ScryptParams:
    """scrypt cost parameters; stored with the wrapped key so they can grow over time."""

    n: int = 1 << 17
    r: int = 8
    p: int = 1
    salt: bytes = b""

    def with_new_salt(self) -> ScryptParams:
        return ScryptParams(self.n, self.r, self.p, os.urandom(32))


def derive_kek(passphrase: bytes, params: ScryptParams) -> bytes:
    """The key-encryption key for a passphrase (about 128 MiB and 0.3 s at the default cost)."""
    kdf = Scrypt(salt=params.salt, length=32, n=params.n, r=params.r, p=params.p)
    return kdf.derive(passphrase)


def wrap(kek: bytes, secret: bytes, aad: bytes) -> tuple[bytes, bytes]:
    """Encrypt `secret` under `kek`; returns (nonce, ciphertext-with-tag)."""
    nonce = os.urandom(NONCE_LEN)
    return nonce, AESGCM(kek).encrypt(nonce, secret, aad)


def unwrap(kek: bytes, nonce: bytes, wrapped: bytes, aad: bytes) -> bytes:
    try:
        return AESGCM(kek).decrypt(nonce, wrapped, aad)
    except InvalidTag:
        raise AuthFailed("wrong passphrase (the repository key could not be unlocked)") from None


class Keys:
    """The working keys of an unlocked repository."""

    def __init__(self, master: bytes) -> None:
        if len(master) != MASTER_LEN:
            raise ValueError("master secret must be 64 bytes")
        self.master = master
        enc_key = blake3.blake3(master, derive_key_context="snapship v1 object encryption").digest()
        self.id_key = blake3.blake3(master, derive_key_context="snapship v1 chunk id").digest()
        self.mac_key = blake3.blake3(master, derive_key_context="snapship v1 config mac").digest()
        self.nonce_key = blake3.blake3(master,
                                       derive_key_context="snapship v1 chunk nonce").digest()
        self.aead = AESGCM(enc_key)

    @classmethod
    def generate(cls) -> Keys:
        return cls(os.urandom(MASTER_LEN))

    def mac(self, data: bytes) -> bytes:
        return blake3.blake3(data, key=self.mac_key).digest()


def chunk_id(data: bytes | memoryview, key: bytes | None) -> bytes:
    """The content address of a chunk: keyed BLAKE3 when encrypted, plain BLAKE3 otherwise.

    Keyed, so that whoever holds only the storage cannot confirm a guessed plaintext.
    """
    if key is None:
        return blake3.blake3(data).digest()
    return blake3.blake3(data, key=key).digest()


def checksum(*parts: bytes | memoryview) -> bytes:
    """Plain BLAKE3 over the concatenation of `parts` (integrity of unencrypted objects)."""
    h = blake3.blake3()
    for part in parts:
        h.update(part)
    return h.digest()


def synthetic_nonce(key: bytes, aad: bytes, plaintext: bytes | memoryview) -> bytes:
    """A nonce that is a keyed hash of everything it encrypts (as in SIV): sealing the same
    bytes again gives the same object, so "same bytes" proves two copies of a chunk equal
    without the key (docs/gc.md), and a repeated nonce only ever encrypts the same plaintext
    under the same header. Two different inputs share a nonce with the probability of two
    random nonces colliding."""
    h = blake3.blake3(key=key)
    h.update(len(aad).to_bytes(4, "little"))
    h.update(aad)
    h.update(plaintext)
    return h.digest(length=NONCE_LEN)


def encrypt_after(prefix: bytes, aead: AESGCM, plaintext: bytes | memoryview, aad: bytes,
                  nonce: bytes | None = None) -> bytearray:
    """`prefix | nonce | ciphertext | tag` built in one buffer: no copy of a chunk-sized
    result is made while holding the GIL. The nonce is random unless given."""
    nonce = nonce or os.urandom(NONCE_LEN)
    start = len(prefix) + NONCE_LEN
    out = bytearray(start + len(plaintext) + TAG_LEN)
    out[: len(prefix)] = prefix
    out[len(prefix) : start] = nonce
    aead.encrypt_into(nonce, plaintext, aad, memoryview(out)[start:])
    return out


def decrypt(aead: AESGCM, blob: bytes | memoryview, aad: bytes) -> bytes:
    """Raises InvalidTag (the caller names the object) when anything was altered."""
    mv = memoryview(blob)
    return aead.decrypt(mv[:NONCE_LEN], mv[NONCE_LEN:], aad)
