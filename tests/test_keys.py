"""Several passphrases per repository (issue 15, item 4): `key add/list/remove/passwd`, the
layout-2 key files, the layout-1 reader, crash safety of a passphrase change, the passphrase
sources, and the server's rule that only an admin changes key files."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from snapship.crypto import Keys
from snapship.errors import AuthFailed, Corrupt, FormatError, NotFound, PermissionDenied, UsageError
from snapship.formats.config import KeyFile, decode_config, encode_config, encode_keyfile
from snapship.repository.catalog import Catalog
from snapship.repository.repo import Repository
from snapship.storage.base import Storage, StorageDefaults
from snapship.storage.local import LocalStorage
from tests.clihelp import (
    PASSPHRASE,
    assert_one_line_error,
    backup,
    describe,
    image_bytes,
    init_repo_fast_kdf,
    ok,
    run_cli,
    sha256,
    write_image,
)
from tests.conftest import FAST_KDF
from tests.serverproc import create_repo_fast_kdf, http_storage, run_cli_env, running_server

OLD, NEW = b"old passphrase", b"new passphrase"


def opens(storage: Storage, passphrase: bytes) -> bool:
    try:
        Repository.open(storage, lambda: passphrase)
    except AuthFailed:
        return False
    return True


def make_v1_repo(storage: Storage, passphrase: bytes) -> Keys:
    """A repository as snapship 0.3 and older wrote it: config version 1, `keys/repokey`."""
    repo = Repository.create(storage, passphrase=lambda: passphrase, kdf=FAST_KDF,
                             chunk_size=64 * 1024)
    assert repo.keys is not None and repo.key_id is not None
    from snapship import crypto
    from snapship.crypto import ScryptParams

    cfg = decode_config(storage.get("config"))[0]
    v1 = type(cfg)(**{**cfg.__dict__, "version": 1})
    params = ScryptParams(FAST_KDF.n, FAST_KDF.r, FAST_KDF.p).with_new_salt()
    kek = crypto.derive_kek(passphrase, params)
    nonce, wrapped = crypto.wrap(kek, repo.keys.master, b"snapship key v1 " +
                                 cfg.repo_id.encode())
    storage.put("keys/repokey", encode_keyfile(KeyFile("scrypt", params.n, params.r, params.p,
                                                       params.salt, nonce, wrapped, version=1)))
    storage.delete(f"keys/{repo.key_id}")
    storage.put("config", encode_config(v1, repo.keys.mac(v1.signed_part())))
    return repo.keys


# -- the repository layer ------------------------------------------------------------------


def test_add_passwd_remove(tmp_path: Path) -> None:
    storage = LocalStorage(str(tmp_path / "repo"))
    repo = Repository.create(storage, passphrase=lambda: OLD, kdf=FAST_KDF, key_label="init")
    first = repo.key_id
    assert first is not None
    escrow = repo.add_key(b"escrow", "escrow", FAST_KDF)
    assert [k.id for k in repo.describe_keys()] == sorted([first, escrow])
    assert opens(storage, OLD) and opens(storage, b"escrow") and not opens(storage, b"x")

    new_id = repo.change_passphrase(NEW, FAST_KDF)
    assert not opens(storage, OLD), "the old passphrase still opens"
    assert opens(storage, NEW) and opens(storage, b"escrow")
    labels = {k.id: k.label for k in repo.describe_keys()}
    assert set(labels) == {new_id, escrow} and labels[new_id] == "init"
    # The same master key: what was sealed before reads after.
    again = Repository.open(storage, lambda: NEW)
    assert again.keys is not None and repo.keys is not None
    assert again.keys.master == repo.keys.master and again.key_id == new_id

    with pytest.raises(UsageError, match="opened with"):
        again.remove_key(new_id)
    with pytest.raises(NotFound, match="no key"):
        again.remove_key("0123456789abcdef")
    again.remove_key(escrow)
    assert not opens(storage, b"escrow")
    with pytest.raises(UsageError, match="last key"):
        again.remove_key(new_id)
    assert opens(storage, NEW)


def test_a_key_file_under_another_name_does_not_open(tmp_path: Path) -> None:
    storage = LocalStorage(str(tmp_path / "repo"))
    repo = Repository.create(storage, passphrase=lambda: OLD, kdf=FAST_KDF)
    blob = storage.get(f"keys/{repo.key_id}")
    storage.delete(f"keys/{repo.key_id}")
    storage.put("keys/0000000000000000", blob)
    with pytest.raises(Corrupt, match="names itself"):
        Repository.open(storage, lambda: OLD)


def test_a_damaged_key_file_does_not_stop_another_from_opening(tmp_path: Path) -> None:
    storage = LocalStorage(str(tmp_path / "repo"))
    repo = Repository.create(storage, passphrase=lambda: OLD, kdf=FAST_KDF)
    repo.add_key(NEW, "second", FAST_KDF)
    storage.put(f"keys/{repo.key_id}", b"{not json")
    assert opens(storage, NEW)
    with pytest.raises(AuthFailed, match="wrong passphrase"):
        Repository.open(storage, lambda: OLD)


def test_layout_1_is_read_and_upgraded_on_the_first_key_change(tmp_path: Path) -> None:
    storage = LocalStorage(str(tmp_path / "repo"))
    make_v1_repo(storage, OLD)
    repo = Repository.open(storage, lambda: OLD)
    assert repo.config.version == 1 and repo.key_id == "repokey"
    assert [k.version for k in repo.describe_keys()] == [1]
    # A stray layout-2 key file means nothing to a layout-1 repository.
    assert Catalog(storage).key_ids() == ["repokey"]
    new_id = repo.change_passphrase(NEW, FAST_KDF)
    assert decode_config(storage.get("config"))[0].version == 2
    assert Catalog(storage).key_ids() == [new_id]
    assert opens(storage, NEW) and not opens(storage, OLD)


def test_an_unknown_key_file_version_is_refused(tmp_path: Path) -> None:
    storage = LocalStorage(str(tmp_path / "repo"))
    repo = Repository.create(storage, passphrase=lambda: OLD, kdf=FAST_KDF)
    obj = json.loads(storage.get(f"keys/{repo.key_id}"))
    obj["version"] = 3
    storage.put(f"keys/{repo.key_id}", json.dumps(obj).encode())
    with pytest.raises(FormatError, match="key file version 3"):
        Repository.open(storage, lambda: OLD)


# -- a kill at every step of `key passwd` --------------------------------------------------


class Crash(Exception):
    """The process died here."""


class CrashingStorage(StorageDefaults):
    """A backend that dies at its `at`-th change (put, delete, rename, flush): before doing
    it, or, with `after`, once it is done. Reads pass through."""

    def __init__(self, inner: Storage, at: int, after: bool) -> None:
        self.inner, self.at, self.after, self.changes = inner, at, after, 0
        self.capabilities = inner.capabilities

    def _change(self, do: Any) -> None:
        n = self.changes
        self.changes += 1
        if n == self.at and not self.after:
            raise Crash(n)
        do()
        if n == self.at:
            raise Crash(n)

    def put(self, key: str, data: bytes | bytearray) -> None:
        self._change(lambda: self.inner.put(key, data))

    def delete(self, key: str) -> None:
        self._change(lambda: self.inner.delete(key))

    def rename(self, src: str, dst: str) -> None:
        self._change(lambda: self.inner.rename(src, dst))

    def flush(self) -> None:
        self._change(self.inner.flush)

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def stat(self, key: str) -> int | None:
        return self.inner.stat(key)

    def list(self, prefix: str, after: str | None = None) -> Iterator[tuple[str, int]]:
        return self.inner.list(prefix, after)

    def describe(self) -> str:
        return self.inner.describe()


def crash_points() -> Iterable[tuple[int, bool]]:
    for at in range(64):
        yield at, False
        yield at, True


@pytest.mark.parametrize("layout", [1, 2])
def test_a_kill_at_every_step_of_passwd_leaves_a_passphrase_that_opens(
    tmp_path: Path, layout: int
) -> None:
    steps = 0
    for i, (at, after) in enumerate(crash_points()):
        storage = LocalStorage(str(tmp_path / f"repo-{i}"))
        if layout == 1:
            make_v1_repo(storage, OLD)
        else:
            Repository.create(storage, passphrase=lambda: OLD, kdf=FAST_KDF)
        repo = Repository.open(CrashingStorage(storage, at, after), lambda: OLD)
        try:
            repo.change_passphrase(NEW, FAST_KDF)
        except Crash:
            steps += 1
            assert opens(storage, OLD) or opens(storage, NEW), (at, after)
            continue
        # Past the last change: it completed.
        assert not opens(storage, OLD) and opens(storage, NEW)
        break
    else:
        raise AssertionError("passwd never completed")
    # Layout 2: put, flush, delete, flush; layout 1 also rewrites the config and flushes.
    assert steps == 2 * (6 if layout == 1 else 4), steps


# -- the CLI ---------------------------------------------------------------------------------


def test_key_commands_and_passphrase_sources(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    init_repo_fast_kdf(repo)
    img = tmp_path / "disk.img"
    data = image_bytes(4 * 65536, seed=3)
    write_image(img, data)
    backup(repo, img, "disk")
    new = tmp_path / "new.pass"
    new.write_text("second passphrase\n")

    added = json.loads(ok(run_cli("key", "add", "--repo", repo, "--label", "escrow",
                                  "--new-passphrase-file", new, "--json")).stdout)
    assert added["label"] == "escrow" and len(added["keys"]) == 2
    # --passphrase-command: the new passphrase opens, the old one still does.
    listed = json.loads(ok(run_cli("key", "list", "--repo", repo, "--json",
                                   "--passphrase-command", f"cat {new}",
                                   passphrase=None)).stdout)
    current = [k for k in listed["keys"] if k["current"]]
    assert [k["id"] for k in current] == [added["key_id"]]

    # passwd of the first key via SNAPSHIP_PASSPHRASE_FILE.
    old_file = tmp_path / "old.pass"
    old_file.write_text(PASSPHRASE + "\n")
    third = tmp_path / "third.pass"
    third.write_text("third passphrase\n")
    env = {"SNAPSHIP_PASSPHRASE_FILE": str(old_file)}
    r = run_cli_env("key", "passwd", "--repo", repo, "--new-passphrase-file", third, "--json",
                    env={**env, "SNAPSHIP_PASSPHRASE": ""})
    changed = json.loads(ok(r).stdout)
    assert changed["old_key_id"] != changed["key_id"]
    assert_one_line_error(run_cli("versions", "--repo", repo), "wrong passphrase", code=1)
    r = run_cli("restore", "--repo", repo, "disk", tmp_path / "out.img",
                "--passphrase-file", third, passphrase=None)
    ok(r)
    assert sha256((tmp_path / "out.img").read_bytes()) == sha256(bytes(data))

    # remove: not the one opened with, not the last.
    r = run_cli("key", "remove", "--repo", repo, changed["key_id"], "--passphrase-file",
                third, passphrase=None)
    assert_one_line_error(r, "opened with", code=2)
    removed = json.loads(ok(run_cli("key", "remove", "--repo", repo, added["key_id"],
                                    "--passphrase-file", third, "--json",
                                    passphrase=None)).stdout)
    assert [k["id"] for k in removed["keys"]] == [changed["key_id"]]
    r = run_cli("key", "remove", "--repo", repo, changed["key_id"], "--passphrase-file",
                third, passphrase=None)
    assert_one_line_error(r, "last key", code=2)

    # A failing or silent passphrase command: one line.
    r = run_cli("versions", "--repo", repo, "--passphrase-command", "false", passphrase=None)
    assert_one_line_error(r, "--passphrase-command", "failed", code=1)
    r = run_cli("versions", "--repo", repo, "--passphrase-command", "true", passphrase=None)
    assert_one_line_error(r, "printed no passphrase", code=2)
    r = run_cli("versions", "--repo", repo, "--passphrase-command", "/no/such", passphrase=None)
    assert_one_line_error(r, "cannot be run", code=2)
    r = run_cli_env("versions", "--repo", repo,
                    env={"SNAPSHIP_PASSPHRASE_FILE": str(tmp_path / "missing")})
    assert_one_line_error(r, "SNAPSHIP_PASSPHRASE_FILE", code=2)


def test_only_an_admin_token_changes_key_files_on_a_server(tmp_path: Path) -> None:
    with running_server(tmp_path / "srv") as (server, tokens):
        backup_store = http_storage(server, "db", tokens["db1-backup"])
        create_repo_fast_kdf(backup_store)  # init with a backup token: allowed
        with_backup = Repository.open(backup_store, lambda: PASSPHRASE.encode())
        with pytest.raises(PermissionDenied, match="admin"):
            with_backup.add_key(NEW, "mallory", FAST_KDF)
        with pytest.raises(PermissionDenied):
            with_backup.change_passphrase(NEW, FAST_KDF)
        assert opens(backup_store, PASSPHRASE.encode()) and not opens(backup_store, NEW)
        # A backup token cannot delete one either.
        with pytest.raises(PermissionDenied):
            backup_store.delete(f"keys/{with_backup.key_id}")

        new = tmp_path / "new.pass"
        new.write_text(NEW.decode() + "\n")
        r = run_cli_env("key", "passwd", "--repo", server.url("db"), "--new-passphrase-file",
                        new, env={"SNAPSHIP_TOKEN": tokens["ops"]})
        assert r.returncode == 0, describe(r)
        assert opens(backup_store, NEW) and not opens(backup_store, PASSPHRASE.encode())
        assert os.path.exists(server.root / "db" / "config")
