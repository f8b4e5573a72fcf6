"""A config edited to switch encryption off is refused (issue 10, item 5).

Whoever controls the storage can rewrite `config`. An encrypted config carries a MAC, but one
claiming `"encryption": "none"` (its `mac` deleted) has nothing to check it with. Three rules
stop it (docs/format.md, "The client's record"): a key file beside a config that says "none"
is refused; a passphrase configured for a repository this machine has never met, whose config
says "none", is refused; and the known-repositories file refuses a repository whose encryption
or chunk size differs from what this machine first saw. Every test drives the real CLI; a
fresh `state` directory plays a machine that has never met the repository.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.clihelp import (
    CHUNK,
    CLI,
    PASSPHRASE,
    assert_one_line_error,
    backup,
    chunk_files,
    cli_env,
    describe,
    image_bytes,
    init_repo,
    init_repo_fast_kdf,
    ok,
    restore,
    run_cli,
    sha256_file,
    state_dir,
    write_image,
)

KNOWN_FILE = "known-repositories.json"


def tree(repo: Path) -> dict[str, bytes]:
    return {str(p.relative_to(repo)): p.read_bytes() for p in repo.rglob("*") if p.is_file()}


def switch_encryption_off(repo: Path, *, delete_key: bool) -> None:
    """The attack: config says "none", its MAC is gone (and, optionally, the key file)."""
    cfg = json.loads((repo / "config").read_text())
    assert cfg["encryption"] == "aes-256-gcm" and "mac" in cfg
    cfg["encryption"] = "none"
    del cfg["mac"]
    (repo / "config").write_text(json.dumps(cfg, indent=1, sort_keys=True) + "\n")
    if delete_key:
        for key_file in (repo / "keys").iterdir():
            key_file.unlink()


def encrypted_repo_with_a_version(tmp_path: Path, *, remember: bool = True) -> Path:
    repo = tmp_path / "repo"
    init_repo_fast_kdf(repo, remember=remember)
    write_image(tmp_path / "old.img", image_bytes(4 * CHUNK, seed=1))
    backup(repo, tmp_path / "old.img", "old")
    return repo


def secret_image(tmp_path: Path) -> tuple[Path, bytes]:
    """A new volume's data, recognisable if it ever lands in the repository as plaintext."""
    secret = b"TOP-SECRET-PAYLOAD-" * (CHUNK // 19 + 1)
    img = tmp_path / "secret.img"
    img.write_bytes(secret[:CHUNK] * 3)
    return img, secret[:64]


def assert_no_plaintext(repo: Path, marker: bytes) -> None:
    for path in repo.rglob("*"):
        if path.is_file():
            assert marker not in path.read_bytes(), f"plaintext stored in {path}"


def test_config_switched_off_with_the_key_file_still_there(tmp_path: Path) -> None:
    """(d) The key file gives the edit away, whatever this machine knows or is given."""
    repo = encrypted_repo_with_a_version(tmp_path)
    switch_encryption_off(repo, delete_key=False)
    img, marker = secret_image(tmp_path)
    before = tree(repo)
    chunks_before = chunk_files(repo)
    for passphrase, state in [(PASSPHRASE, None), (None, tmp_path / "fresh-state")]:
        r = run_cli("backup", "--repo", repo, img, "--volume", "new", passphrase=passphrase,
                    state=state)
        assert_one_line_error(r, "config was altered", "key files (keys/", "not encrypted",
                              code=1)
        assert r.stdout == ""
    assert chunk_files(repo) == chunks_before, "new chunk files were stored"
    assert tree(repo) == before
    assert not (repo / "versions" / "new").exists()
    assert_no_plaintext(repo, marker)


def test_config_switched_off_and_key_deleted_with_a_passphrase_configured(
    tmp_path: Path
) -> None:
    """(e) No key file any more: a configured passphrase says encryption was expected."""
    repo = encrypted_repo_with_a_version(tmp_path)
    switch_encryption_off(repo, delete_key=True)
    img, marker = secret_image(tmp_path)
    before = tree(repo)
    fresh = tmp_path / "fresh-state"  # a machine that never met this repository
    r = run_cli("backup", "--repo", repo, img, "--volume", "new", state=fresh)
    assert_one_line_error(r, str(repo), "not encrypted", "passphrase is configured", code=1)
    pw = tmp_path / "pw"
    pw.write_text(PASSPHRASE + "\n")
    r = run_cli("backup", "--repo", repo, img, "--volume", "new", "--passphrase-file", pw,
                passphrase=None, state=fresh)
    assert_one_line_error(r, "not encrypted", "passphrase is configured", code=1)
    # On the machine that knows it, the record says more.
    r = run_cli("backup", "--repo", repo, img, "--volume", "new")
    assert_one_line_error(r, "config was altered", "encryption aes-256-gcm",
                          "now says encryption none", code=1)
    assert tree(repo) == before
    assert not (fresh / KNOWN_FILE).exists(), "a refused repository was recorded"
    assert_no_plaintext(repo, marker)


def test_known_repositories_catch_the_edit_without_a_passphrase(tmp_path: Path) -> None:
    """(f) No key file, no passphrase configured (a user who would type it at a prompt): only
    the record can tell. `init` records; so does the first successful open."""
    img, marker = secret_image(tmp_path)
    made_by_init = tmp_path / "by-init"
    init_repo(made_by_init)  # the real `snapship init`, recorded by it
    opened_once = tmp_path / "opened"
    init_repo_fast_kdf(opened_once, remember=False)
    ok(run_cli("versions", "--repo", opened_once))  # the first open records it
    for repo in (made_by_init, opened_once):
        repo_id = json.loads((repo / "config").read_text())["repo_id"]
        switch_encryption_off(repo, delete_key=True)
        before = tree(repo)
        commands = (["backup", img, "--volume", "new"], ["versions"], ["prune", "--keep-last", "1"])
        for args in commands:
            r = run_cli(*args, "--repo", repo, passphrase=None)
            assert_one_line_error(r, "config was altered", repo_id, "encryption aes-256-gcm",
                                  "now says encryption none", code=1)
        assert tree(repo) == before
        assert_no_plaintext(repo, marker)
        records = json.loads((state_dir() / KNOWN_FILE).read_text())["repositories"]
        assert records[repo_id]["encryption"] == "aes-256-gcm"
        assert records[repo_id]["location"] == str(repo)


def test_known_repositories_catch_a_changed_chunk_size(tmp_path: Path) -> None:
    """(f) An unencrypted config has no MAC: the record is what notices a new chunk size."""
    repo = tmp_path / "repo"
    ok(run_cli("init", "--repo", repo, "--encryption", "none", "--chunk-size", "64K"))
    write_image(tmp_path / "a.img", image_bytes(3 * CHUNK, seed=2))
    backup(repo, tmp_path / "a.img", "a")
    cfg = json.loads((repo / "config").read_text())
    cfg["chunk_size"] = 2 * CHUNK
    (repo / "config").write_text(json.dumps(cfg))
    for passphrase in (PASSPHRASE, None):
        r = run_cli("backup", "--repo", repo, tmp_path / "a.img", "--volume", "b",
                    passphrase=passphrase)
        assert_one_line_error(r, "config was altered", "chunk size 65536",
                              "now says encryption none, chunk size 131072", code=1)


def test_honest_unencrypted_repositories_still_work(tmp_path: Path) -> None:
    """(g) Made by `init` here: with or without a passphrase configured. Never met before:
    refused only while a passphrase is configured, until a command without one records it."""
    sha = write_image(tmp_path / "a.img", image_bytes(5 * CHUNK + 3, seed=3, zero_chunks=(1,)))
    made_here = tmp_path / "made-here"
    ok(run_cli("init", "--repo", made_here, "--encryption", "none", "--chunk-size", "64K"))
    for passphrase in (PASSPHRASE, None):
        r = ok(run_cli("backup", "--repo", made_here, tmp_path / "a.img", "--volume", "a",
                       passphrase=passphrase))
        assert r.stderr == ""
        out = tmp_path / f"out-{passphrase is None}.img"
        ok(run_cli("restore", "--repo", made_here, "a", out, passphrase=passphrase))
        assert sha256_file(out) == sha

    elsewhere = tmp_path / "made-elsewhere"
    init_repo_fast_kdf(elsewhere, "none", remember=False)  # by another machine, say
    r = run_cli("backup", "--repo", elsewhere, tmp_path / "a.img", "--volume", "a")
    assert_one_line_error(r, "not encrypted", "passphrase is configured",
                          "without SNAPSHIP_PASSPHRASE", code=1)
    assert not (elsewhere / "versions").exists()
    ok(run_cli("backup", "--repo", elsewhere, tmp_path / "a.img", "--volume", "a",
               passphrase=None))  # accepted as unencrypted, and remembered
    ok(run_cli("backup", "--repo", elsewhere, tmp_path / "a.img", "--volume", "a"))
    restore(elsewhere, "a", tmp_path / "out-elsewhere.img")
    assert sha256_file(tmp_path / "out-elsewhere.img") == sha


# -- the known-repositories file itself ------------------------------------------------------


def test_state_file_location_defaults(tmp_path: Path) -> None:
    """$SNAPSHIP_STATE_DIR, else $XDG_STATE_HOME/snapship, else ~/.local/state/snapship."""
    env = cli_env()
    del env["SNAPSHIP_STATE_DIR"]
    env.pop("XDG_STATE_HOME", None)
    env["HOME"] = str(tmp_path / "home")
    for n, extra in enumerate([{}, {"XDG_STATE_HOME": str(tmp_path / "xdg")}]):
        r = subprocess.run([*CLI, "init", "--repo", str(tmp_path / f"r{n}"), "--encryption",
                            "none"], env={**env, **extra}, capture_output=True, text=True,
                           check=False, stdin=subprocess.DEVNULL)
        assert r.returncode == 0 and r.stderr == "", describe(r)
    home_file = tmp_path / "home" / ".local" / "state" / "snapship" / KNOWN_FILE
    xdg_file = tmp_path / "xdg" / "snapship" / KNOWN_FILE
    assert len(json.loads(home_file.read_text())["repositories"]) == 1
    assert len(json.loads(xdg_file.read_text())["repositories"]) == 1
    assert oct(home_file.stat().st_mode & 0o777) == oct(0o600)
    assert oct(home_file.parent.stat().st_mode & 0o777) == oct(0o700)


def test_parallel_commands_all_get_recorded(tmp_path: Path) -> None:
    state = tmp_path / "state"
    procs = [subprocess.Popen([*CLI, "init", "--repo", str(tmp_path / f"r{i}"), "--encryption",
                               "none", "--json"], env=cli_env(None, state), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL) for i in range(8)]
    ids = set()
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and err == "", err
        ids.add(json.loads(out)["repository_id"])
    assert set(json.loads((state / KNOWN_FILE).read_text())["repositories"]) == ids
    assert sorted(p.name for p in state.iterdir()) == [KNOWN_FILE, KNOWN_FILE + ".lock"]


def test_damaged_state_file_is_refused_in_one_line(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / KNOWN_FILE).write_text("{not json")
    repo = tmp_path / "repo"
    init_repo_fast_kdf(repo, "none", remember=False)
    r = run_cli("versions", "--repo", repo, passphrase=None, state=state)
    assert_one_line_error(r, "known-repositories file", str(state / KNOWN_FILE), "damaged",
                          code=1)
    # `init` itself succeeds (the repository is made), and says it could not record it.
    r = run_cli("init", "--repo", tmp_path / "new", "--encryption", "none", state=state)
    assert r.returncode == 0, describe(r)
    assert r.stderr.startswith("snapship: warning: ") and "not recorded" in r.stderr
    assert (state / KNOWN_FILE).read_text() == "{not json"


def test_test_suite_state_is_not_the_real_home() -> None:
    state = Path(cli_env()["SNAPSHIP_STATE_DIR"])
    assert state == state_dir() == Path(os.environ["SNAPSHIP_STATE_DIR"])
    assert not str(state).startswith(str(Path.home() / ".local")), state
