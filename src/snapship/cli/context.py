"""Builds what a command needs from its options: storage, passphrase, repository.

This is the only place that chooses a concrete storage backend.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys

from snapship.engine.pipeline import default_workers
from snapship.errors import AuthFailed, UsageError
from snapship.repository.repo import PassphraseSource, Repository
from snapship.storage.base import Storage
from snapship.storage.local import LocalStorage


def open_storage(spec: str | None) -> Storage:
    if not spec:
        raise UsageError("no repository given: use --repo PATH or set SNAPSHIP_REPO")
    if spec.startswith("s3://"):
        # boto3 takes a third of a second to import: only S3 repositories pay for it.
        from snapship.storage.s3 import S3Storage
        from snapship.storage.s3_client import ClientOptions

        # A connection for every request in flight: the engines' windows, gc's 32 threads.
        # Connections are opened on demand: a large pool costs nothing.
        workers = max(default_workers(), S3Storage.parallelism)
        return S3Storage.open(spec, ClientOptions(max_connections=max(64, 4 * workers)),
                              list_lag=s3_list_lag())
    if spec.startswith("file://"):
        spec = spec[len("file://") :]
    elif "://" in spec:
        raise UsageError(
            f"unsupported repository location {spec!r}: give a directory path or s3://BUCKET"
        )
    return LocalStorage(spec)


def s3_list_lag() -> float:
    """`SNAPSHIP_S3_LIST_LAG`: seconds a store that lists late needs (docs/s3.md)."""
    text = os.environ.get("SNAPSHIP_S3_LIST_LAG", "0")
    try:
        lag = float(text)
    except ValueError:
        lag = -1.0
    if not 0 <= lag <= 3600:
        raise UsageError(f"SNAPSHIP_S3_LIST_LAG={text!r} is not a number of seconds (0..3600)")
    return lag


def passphrase_source(args: argparse.Namespace, confirm: bool = False) -> PassphraseSource:
    """Where the passphrase comes from: --passphrase-file, SNAPSHIP_PASSPHRASE, or a prompt.

    Returned as a callable so unencrypted repositories never ask for one.
    """

    def get() -> bytes:
        path = getattr(args, "passphrase_file", None)
        if path:
            try:
                with open(path, "rb") as f:
                    value = f.readline().rstrip(b"\r\n")
            except OSError as e:
                raise UsageError(f"cannot read passphrase file {path}: {e.strerror}") from None
            if not value:
                raise UsageError(f"passphrase file {path} is empty")
            return value
        env = os.environ.get("SNAPSHIP_PASSPHRASE")
        if env:
            return env.encode()
        if not sys.stdin.isatty():
            raise AuthFailed(
                "a passphrase is needed: set SNAPSHIP_PASSPHRASE or use --passphrase-file"
            )
        first = getpass.getpass("Repository passphrase: ")
        if confirm and getpass.getpass("Repeat passphrase: ") != first:
            raise UsageError("the passphrases do not match")
        if not first:
            raise UsageError("an empty passphrase is not allowed")
        return first.encode()

    return get


def open_repository(args: argparse.Namespace) -> Repository:
    return Repository.open(open_storage(args.repo), passphrase_source(args))
