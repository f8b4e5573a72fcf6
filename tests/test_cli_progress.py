"""Issue 11, items 5 and 6: the progress line and the "retrying" notice, on a real terminal.

The CLI runs with its stderr on a pseudo-terminal of a fixed width (COLUMNS); what it writes
there is played back on a small terminal model (`Screen`) that knows carriage return, newline,
erase-to-end-of-line and wrapping at the right margin. The line must fit the width (a
character in the last column makes terminals wrap), show a rate and an ETA, and no message may
share a line with it. With --json or -q, or off a terminal, nothing is drawn.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.clihelp import (
    CHUNK,
    CLI,
    cli_env,
    image_bytes,
    init_repo_fast_kdf,
    new_chunks,
    wait_for,
    write_image,
)
from tests.serverproc import create_repo_fast_kdf, http_storage, running_server, token_files


class Screen:
    """What a terminal `width` columns wide shows after `data`. `wrapped`: the rows that ran
    past the last column (a long message may; the progress line never must)."""

    def __init__(self, data: str, width: int) -> None:
        self.width = width
        self.wrapped: set[int] = set()
        self.widest = 0
        rows: list[list[str]] = [[]]
        col = 0
        i = 0
        while i < len(data):
            if data.startswith("\x1b[K", i):
                del rows[-1][col:]
                i += 3
                continue
            ch = data[i]
            i += 1
            if ch == "\r":
                col = 0
            elif ch == "\n":
                rows.append([])
                col = 0
            else:
                if col >= width:
                    self.wrapped.add(len(rows) - 1)
                    rows.append([])
                    col = 0
                row = rows[-1]
                row.extend(" " * (col - len(row)))
                if col < len(row):
                    row[col] = ch
                else:
                    row.append(ch)
                col += 1
                self.widest = max(self.widest, col)
        self.lines = ["".join(r).rstrip() for r in rows]

    def progress_wrapped(self) -> bool:
        return any("ETA" in self.lines[i] or "ETA" in self.lines[i + 1]
                   for i in self.wrapped if i + 1 < len(self.lines))


def run_on_terminal(argv: list[str | Path], columns: int, env: dict[str, str] | None = None,
                    during: object = None) -> tuple[int, str, str]:
    """Run the CLI with stderr on a pty `columns` wide; (exit code, stdout, terminal output).
    `during(proc)`, if given, runs while the command does."""
    master, slave = os.openpty()
    full = {**cli_env(), "COLUMNS": str(columns), **(env or {})}
    proc = subprocess.Popen([*CLI, *map(str, argv)], env=full, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the other side is closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        if callable(during):
            during(proc)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        reader.join(10)
        os.close(master)
    return proc.returncode, out, b"".join(chunks).decode("utf-8", "replace")


def progress_lines(screen: Screen) -> list[str]:
    return [line for line in screen.lines if "ETA" in line]


# -- the line itself ------------------------------------------------------------------------


@pytest.mark.parametrize("width", [10, 20, 30, 40, 50, 60, 80, 100, 132, 200])
def test_the_line_fits_every_width_and_keeps_what_matters_longest(width: int) -> None:
    from snapship.cli.output import TerminalProgress

    p = TerminalProgress("backup a-rather-long-volume-name.img")
    p.start(10 << 30)
    p.done = 3 << 30
    p._samples.clear()
    p._samples.append((p.t0, 0))
    line = p.render(width, p.t0 + 30)
    assert 0 < len(line) <= width - 1, line
    assert "30.0%" in line or width < 12, line
    if width >= 60:
        assert "/s" in line and "ETA 1:10" in line, line  # 100 MiB/s, 7 GiB to go
    if width >= 100:
        assert "3.0 GiB / 10.0 GiB" in line, line
    if width >= 132:
        assert "[" in line, line


def test_no_rate_or_eta_before_there_is_data_for_one() -> None:
    from snapship.cli.output import TerminalProgress, format_eta

    p = TerminalProgress("restore x")
    p.start(1 << 30)
    line = p.render(100, p.t0 + 0.1)
    assert "--/s" in line and "ETA --:--" in line
    assert format_eta(None) == "--:--" and format_eta(59.6) == "1:00"
    assert format_eta(3600 * 5 + 61) == "5:01:01" and format_eta(1e9) == ">99h"
    assert format_eta(-3) == "0:00"


def test_a_message_clears_the_line_and_the_line_comes_back(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    from snapship.cli import output
    from snapship.cli.output import TerminalProgress

    master, slave = os.openpty()
    monkeypatch.setenv("COLUMNS", "60")
    with os.fdopen(slave, "w", encoding="utf-8") as tty:
        p = TerminalProgress("backup disk", tty)
        assert p.enabled
        p.start(100)
        p.advance(10)
        output.message("snapship: warning: something", tty)
        p.last = 0.0
        p.advance(10)
        p.finish()
    pieces = []
    while True:  # the writing side is closed: read until the pty says so (EIO)
        try:
            piece = os.read(master, 65536)
        except OSError:
            break
        if not piece:
            break
        pieces.append(piece)
    data = b"".join(pieces).decode()
    os.close(master)
    screen = Screen(data.replace("\n", "\r\n"), 60)
    assert not screen.wrapped
    assert screen.lines[0] == "snapship: warning: something", screen.lines
    assert screen.lines[1].startswith("backup disk") and "20.0%" in screen.lines[1]


# -- through the CLI ------------------------------------------------------------------------


@pytest.fixture
def big(tmp_path: Path) -> tuple[Path, Path]:
    repo = tmp_path / "repo"
    init_repo_fast_kdf(repo)
    img = tmp_path / "disk.img"
    write_image(img, image_bytes(1024 * CHUNK, seed=21))  # 64 MiB: over a second of work
    return repo, img


@pytest.mark.parametrize("columns", [40, 72, 150])
def test_backup_draws_a_line_that_fits_the_terminal(big: tuple[Path, Path],
                                                    columns: int) -> None:
    repo, img = big
    code, out, tty = run_on_terminal(["backup", "--repo", repo, img, "--volume", "disk"],
                                     columns)
    assert code == 0, tty
    screen = Screen(tty, columns)
    assert not screen.wrapped and screen.widest <= columns - 1, repr(tty[-400:])
    assert "\r" in tty  # it was redrawn in place
    drawn = progress_lines(screen)
    assert len(drawn) == 1, screen.lines  # finished: one line, ended by a newline
    assert "100.0%" in drawn[0] and "/s" in drawn[0] and "--/s" not in drawn[0], drawn
    assert "disk@" in out


@pytest.mark.parametrize("flag", ["--json", "-q"])
def test_no_progress_under_json_or_quiet(big: tuple[Path, Path], flag: str) -> None:
    repo, img = big
    code, _out, tty = run_on_terminal(["backup", "--repo", repo, img, "--volume", "disk", flag],
                                      80)
    assert code == 0, tty
    assert tty == "", repr(tty)


def test_a_refused_connection_says_retrying_on_a_terminal_below_the_line(tmp_path: Path
                                                                        ) -> None:
    """The server dies mid-backup: within a few seconds the terminal says "retrying ...
    (Ctrl-C to stop)" on a line of its own, then the error comes, also on its own line."""
    with running_server(tmp_path / "srv") as (server, tokens):
        files = token_files(tmp_path / "tokens", tokens)
        create_repo_fast_kdf(http_storage(server, "db1", tokens["ops"]))
        img = tmp_path / "disk.img"
        write_image(img, image_bytes(1024 * CHUNK, seed=22))
        times: dict[str, float] = {}

        def kill_server_mid_way(proc: subprocess.Popen[str]) -> None:
            wait_for(lambda: proc.poll() is not None
                     or new_chunks(server.root / "db1", set()) >= 40, "some chunks stored")
            server.kill()
            times["killed"] = time.monotonic()

        code, _out, tty = run_on_terminal(
            ["backup", "--repo", server.url("db1"), img, "--volume", "disk", "--token-file",
             files["db1-backup"]], 70, env={"SNAPSHIP_RETRY_TIME": "8"},
            during=kill_server_mid_way)
        took = time.monotonic() - times["killed"]
    assert code == 1, tty
    screen = Screen(tty, 70)
    assert not screen.progress_wrapped(), repr(tty)
    # Messages as a terminal shows them: long ones run on over the next rows.
    text = "".join(line if i in screen.wrapped else line + "\n"
                   for i, line in enumerate(screen.lines))
    notices = [line for line in text.splitlines() if line.startswith("snapship: retrying: ")]
    # Once per retry time, not once per worker: the first within a few seconds of the server's
    # death (the workers' requests, then the lock's release, each retry for up to 8 s).
    assert 1 <= len(notices) <= 4, text
    assert re.search(r"\(failing for [3-6] s; giving up after 8 s; Ctrl-C to stop\)$",
                     notices[0]), text  # a failure after 3 s; the backoff is jittered
    assert server.url("db1") in notices[0] and "connection refused" in notices[0]
    errors = [line for line in text.splitlines() if line.startswith("snapship: error: ")]
    assert len(errors) == 1 and "gave up after" in errors[0], text
    assert text.index(notices[0]) < text.index(errors[0])
    for line in text.splitlines():  # no message shares a line with the progress display
        assert not ("snapship: " in line and "ETA" in line), line
    assert 8 <= took < 60


def test_no_retrying_notice_off_a_terminal(tmp_path: Path) -> None:
    r = subprocess.run([*CLI, "versions", "--repo", "http://127.0.0.1:9/x"],
                       env={**cli_env(), "SNAPSHIP_RETRY_TIME": "4", "SNAPSHIP_TOKEN": "x" * 20},
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.stderr.startswith("snapship: error: ") and "retrying" not in r.stderr, r.stderr
    r = subprocess.run([*CLI, "-v", "versions", "--repo", "http://127.0.0.1:9/x"],
                       env={**cli_env(), "SNAPSHIP_RETRY_TIME": "8", "SNAPSHIP_TOKEN": "x" * 20},
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
                       check=False)
    assert "snapship: retrying: http://127.0.0.1:9/x: connection refused" in r.stderr, r.stderr
