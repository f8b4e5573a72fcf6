"""Issue 11, section 2: errors under --json are one JSON line on stderr (docs/json.md): the
error object with a stable `error.kind` per exception class and the exit code as ever (2
usage, 75 busy, 130/143/129 stopped, 70 internal, 1 otherwise); argparse's usage errors too
when --json is on the command line. Without --json, errors stay a line for people.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from snapship.cli import main as cli_main
from snapship.cli import repo_commands
from snapship.cli.signals import Terminated
from snapship.errors import SnapshipError
from tests.clihelp import (
    CHUNK,
    assert_json_error,
    backup,
    describe,
    image_bytes,
    init_repo_fast_kdf,
    run_cli,
    write_image,
)


def test_errors_under_json_are_one_json_line_with_a_kind(tmp_path: Path) -> None:
    repo, img = tmp_path / "repo", tmp_path / "disk.img"
    init_repo_fast_kdf(repo)
    write_image(img, image_bytes(4 * CHUNK, seed=1))
    backup(repo, img, "disk")
    r = run_cli("versions", "--repo", tmp_path / "none", "--json")
    obj = assert_json_error(r, "not-found", 1, "no snapship repository")
    assert obj["command"] == "versions"
    r = run_cli("prune", "--repo", repo, "--json")
    assert_json_error(r, "usage", 2, "no retention rule")
    r = run_cli("show", "--repo", repo, "disk@nope", "--json")
    assert_json_error(r, "not-found", 1, "nope")
    r = run_cli("versions", "--repo", repo, "--json", passphrase="wrong")
    assert_json_error(r, "auth", 1, "wrong passphrase")
    r = run_cli("backup", "--repo", repo, tmp_path / "missing.img", "--json")
    assert_json_error(r, "source", 1, "missing.img")
    # Before the command too, and for gc's lock: 75, so a scheduler retries.
    from snapship.repository import locks
    from snapship.storage.local import LocalStorage

    with locks.Lock(LocalStorage(str(repo)), locks.GC, "gc").acquire():
        r = run_cli("--json", "gc", "--repo", repo)
        assert_json_error(r, "busy", 75, "gc is already running")
    # Without --json, errors stay a line for people.
    r = run_cli("prune", "--repo", repo)
    assert r.returncode == 2 and r.stderr.startswith("snapship: error: "), describe(r)


def test_usage_errors_of_the_parser_under_json(tmp_path: Path) -> None:
    obj = assert_json_error(run_cli("prune", "--repo", tmp_path, "--keep-last", "0", "--json"),
                     "usage", 2, "--keep-last")
    assert obj["command"] == "prune"
    obj = assert_json_error(run_cli("--json", "cow", "inspect"), "usage", 2, "path")
    assert obj["command"] == "cow inspect"
    obj = assert_json_error(run_cli("--json", "no-such-command"), "usage", 2, "no-such-command")
    assert obj["command"] is None
    assert_json_error(run_cli("--json", "-q", "-v", "versions"), "usage", 2, "exclude each other")
    # Without --json on the command line: the line for people.
    r = run_cli("prune", "--keep-last", "0")
    assert r.returncode == 2 and r.stderr.startswith("snapship: error: "), describe(r)


@pytest.mark.parametrize(("raised", "kind", "code"), [
    (KeyboardInterrupt(), "interrupted", 130),
    (Terminated(signal.SIGTERM), "terminated", 143),
    (Terminated(signal.SIGHUP), "terminated", 129),
    (RuntimeError("a bug"), "internal", 70),
])
def test_stops_and_internal_errors_under_json(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str],
                                              raised: BaseException, kind: str, code: int
                                              ) -> None:
    def fail(_args: object) -> int:
        raise raised

    monkeypatch.setattr(repo_commands, "cmd_versions", fail)
    monkeypatch.delenv("SNAPSHIP_DEBUG", raising=False)
    assert cli_main.main(["versions", "--repo", "/nonexistent", "--json"]) == code
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    obj = json.loads(lines[0])
    assert obj == {"version": 1, "command": "versions",
                   "error": {"kind": kind, "message": obj["error"]["message"],
                             "exit_code": code}}
    if kind == "internal":
        assert obj["error"]["message"] == "internal error: RuntimeError: a bug"


def test_every_error_class_has_a_kind() -> None:
    from snapship.changes.lvm import LvmError
    from snapship.repository.locks import LeaseLost

    def every(cls: type[SnapshipError]) -> list[type[SnapshipError]]:
        return [cls, *(c for sub in cls.__subclasses__() for c in every(sub))]

    kinds = {c: c.kind for c in every(SnapshipError)}
    assert kinds[LeaseLost] == "lease-lost" and kinds[LvmError] == "lvm"
    assert all(isinstance(k, str) and k for k in kinds.values()), kinds
