"""`snapship nbd serve` option errors: one line each, nothing started."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.clihelp import assert_one_line_error, init_repo_fast_kdf, run_cli


@pytest.mark.parametrize(("args", "fragments"), [
    (["--commit"], ["--commit needs --writable"]),
    (["--label", "a=b"], ["--label", "--writable"]),
    (["--writable", "--label", "nolabel"], ["label 'nolabel'"]),
    (["--listen", ":10809"], ["names no host"]),
    (["--listen", "127.0.0.1:99999"], ["port '99999'"]),
    (["--cache-size", "lots"], ["--cache-size", "not a size"]),
    (["--writable", "--overlay-dir", "/nonexistent/dir"], ["cannot make overlay files in"]),
])  # fmt: skip
def test_bad_options(tmp_path: Path, args: list[str], fragments: list[str]) -> None:
    init_repo_fast_kdf(tmp_path / "repo")
    r = run_cli("nbd", "serve", "--repo", tmp_path / "repo", *args)
    assert_one_line_error(r, *fragments, code=2)


def test_no_repository_and_a_busy_port(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("nbd", "serve", "--repo", tmp_path / "none"),
                          "no snapship repository")
    init_repo_fast_kdf(tmp_path / "repo")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run_cli("nbd", "serve", "--repo", tmp_path / "repo", "--listen", f"127.0.0.1:{port}")
    line = assert_one_line_error(r, code=2)
    assert line == f"snapship: error: cannot listen on 127.0.0.1:{port}: Address already in use"
