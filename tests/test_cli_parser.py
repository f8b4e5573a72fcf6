"""Issue 11, item 2 (the parser half): global options before the command, -q and -v, usage
errors for bad numbers, help with descriptions and examples, which commands offer what,
shell completion, the man page, and a fast `--help`.

The parser walk (`every_command`) visits every command of the real parser, so a new option or
command is checked as soon as it exists: an option that takes a value must be classified
below, and each numeric one is given bad values that must each be a one-line usage error
(exit 2) naming it. The walk runs `main()` in this process (fast); the headline cases and
everything else run the real CLI in a subprocess.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapship.cli.main import build_parser, main
from tests.clihelp import (
    CHUNK,
    CLI,
    PASSPHRASE,
    assert_one_line_error,
    backup,
    cli_env,
    describe,
    image_bytes,
    init_repo_fast_kdf,
    ok,
    run_cli,
    write_image,
)


def every_command(parser: argparse.ArgumentParser | None = None, path: tuple[str, ...] = ()
                  ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """(command words, parser) of every runnable command (`nbd serve`, not `nbd`)."""
    parser = parser or build_parser()
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if path and not groups:
        yield path, parser
    for group in groups:
        for name, sub in group.choices.items():
            yield from every_command(sub, (*path, name))


def every_group(parser: argparse.ArgumentParser | None = None, path: tuple[str, ...] = ()
                ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every parser with a help of its own, groups (`nbd`, `cow`) included."""
    parser = parser or build_parser()
    if path:
        yield path, parser
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from every_group(sub, (*path, name))


def value_options(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for a in parser._actions:
        if a.option_strings and a.nargs != 0 and not isinstance(a, argparse._HelpAction):
            yield a


COMMANDS = {" ".join(path) for path, _ in every_command()}
NO_REPOSITORY = {"cow inspect", "server", "token", "umount", "run", "config check",
                 "systemd install", "nbd checkpoint", "snapspace add", "snapspace status",
                 "snapspace remove"}
EXPECTED_COMMANDS = {"init", "versions", "show", "verify", "backup", "restore", "prune",
                     "forget", "protect", "unprotect", "gc", "locks", "cow inspect",
                     "cow export", "server", "token", "nbd serve", "key list", "key add",
                     "key passwd", "key remove", "copy", "mount", "umount",
                     "run", "config check", "systemd install", "nbd checkpoint",
                     "snapspace add", "snapspace status", "snapspace remove"}

# Options whose value is free text (a path, a name, a command line): nothing to check here.
TEXT = {"--repo", "--token-file", "--ca", "--passphrase-file", "--passphrase-command",
        "--new-passphrase-file", "--new-passphrase-command", "--from", "--to",
        "--from-token-file", "--from-passphrase-file", "--from-passphrase-command",
        "--copy-key-from", "--volume", "--label",
        "--changed-ranges", "--pre-snapshot", "--post-snapshot", "--note", "--root", "--tokens",
        "--tls-cert", "--tls-key", "--overlay-dir", "--tls-client-ca", "--tls-authz", "--repos",
        "--against",
        "--thin-pool", "--pv", "--config", "--unit-dir", "--executable",
        "--metrics-file", "--state-dir", "--file", "--snapshot-pv"}
WHOLE_1 = ["0", "-1", "-5", "x", "1.5", ""]
SIZE_1 = ["0", "-1", "x", "1.5M", "4X", ""]
SIZE_0 = ["-1", "x", "4X", ""]
SECONDS = ["0", "-1", "inf", "nan", "x", ""]
PERIOD = ["0h", "-1h", "5", "x", "2w", ""]
LIMITS = ("--limit-upload", "--limit-download")
# (command, option) -> values that must each be a usage error naming the option.
BAD_VALUES = {
    **{(c, o): SIZE_1 for c in EXPECTED_COMMANDS - NO_REPOSITORY for o in LIMITS},
    ("init", "--chunk-size"): ["0", "-1", "3000", "32K", "32M", "x", ""],
    ("init", "--compression-level"): ["-1", "20", "x", "1.5"],
    ("verify", "--sample"): ["0", "-5", "101", "nan", "inf", "x", ""],
    ("backup", "--snapshot-size"): ["0%", "-5%", "0", "-1G", "x%", "x", "", "Auto", "auto%"],
    ("snapspace add", "--size"): SIZE_1,
    ("prune", "--keep-within"): ["0d", "-1d", "x", "0y0m", ""],
    **{("prune", f"--keep-{r}"): WHOLE_1
       for r in ("last", "hourly", "daily", "weekly", "monthly", "yearly")},
    ("cow inspect", "--origin-size"): WHOLE_1,
    ("cow inspect", "--limit"): ["-5", "-1", "x", "1.5"],
    ("cow export", "--cow-chunk-size"): SIZE_1,
    ("server", "--listen"): ["x", "127.0.0.1:99999", ":8420", "127.0.0.1:"],
    ("server", "--max-object-size"): SIZE_1,
    ("server", "--body-memory"): SIZE_1,
    ("server", "--max-connections"): WHOLE_1,
    ("server", "--max-unauthenticated"): WHOLE_1,
    ("server", "--header-timeout"): SECONDS,
    ("server", "--idle-timeout"): SECONDS,
    ("server", "--gc-every"): PERIOD,
    ("server", "--verify-every"): PERIOD,
    ("nbd serve", "--listen"): [":10809", "127.0.0.1:99999", "[::1]:x"],
    ("nbd serve", "--cache-size"): SIZE_0,
    ("nbd serve", "--readahead"): SIZE_0,
    ("nbd serve", "--workers"): WHOLE_1,
    ("nbd serve", "--checkpoint-every"): ["0", "-1", "0s", "x", "1w", "15 m", ""],
    ("nbd serve", "--checkpoint-min-interval"): ["0", "-1", "0s", "x", "1w", ""],
    ("mount", "--partition"): WHOLE_1,
}


def test_the_walk_sees_every_command() -> None:
    assert COMMANDS == EXPECTED_COMMANDS


def test_every_option_with_a_value_is_classified() -> None:
    unclassified = [f"{' '.join(path)} {a.option_strings[-1]}"
                    for path, parser in every_command() for a in value_options(parser)
                    if a.choices is None and a.option_strings[-1] not in TEXT
                    and (" ".join(path), a.option_strings[-1]) not in BAD_VALUES]
    assert unclassified == [], "classify these options in TEXT or BAD_VALUES"
    assert {c for c, _ in BAD_VALUES} <= COMMANDS


def parse_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """main(argv) in this process: its exit code and what it wrote to stderr."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    return int(e.value.code or 0), capsys.readouterr().err


@pytest.mark.parametrize(("command", "option"), sorted(BAD_VALUES))
def test_bad_numbers_are_one_line_usage_errors_naming_the_option(
        command: str, option: str, capsys: pytest.CaptureFixture[str]) -> None:
    for bad in BAD_VALUES[command, option]:
        code, err = parse_error([*command.split(), f"{option}={bad}"], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, (bad, err)
        assert lines[0].startswith(f"snapship: error: argument {option}"), (bad, err)
        assert "internal error" not in err and "Traceback" not in err


@pytest.mark.parametrize(("option", "args"), [
    ("--keep-last", ["prune", "--keep-last", "-1"]),
    ("--keep-daily", ["prune", "--keep-daily", "0"]),
    ("--sample", ["verify", "--deep", "--sample", "0"]),
    ("--workers", ["nbd", "serve", "--workers", "0"]),
    ("--cache-size", ["nbd", "serve", "--cache-size", "-1"]),
])  # fmt: skip
def test_bad_numbers_through_the_cli(tmp_path: Path, option: str, args: list[str]) -> None:
    """The headline cases, as a user meets them (`prune --keep-last -1` was exit 70)."""
    repo = tmp_path / "repo"
    init_repo_fast_kdf(repo)
    write_image(tmp_path / "d.img", image_bytes(4 * CHUNK, seed=1))
    backup(repo, tmp_path / "d.img", "d")
    assert_one_line_error(run_cli(*args, "--repo", repo), option, code=2)


def test_cow_inspect_refuses_a_negative_limit() -> None:
    assert_one_line_error(run_cli("cow", "inspect", "--limit", "-5", "/dev/null"), "--limit",
                          code=2)


def test_server_refuses_zero_connections(tmp_path: Path) -> None:
    r = run_cli("server", "--root", tmp_path, "--tokens", tmp_path / "t",
                "--max-connections", "0")
    assert_one_line_error(r, "--max-connections", code=2)


# -- global options before the command ------------------------------------------------------


@pytest.fixture
def repo_with_a_version(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    init_repo_fast_kdf(repo)
    write_image(tmp_path / "d.img", image_bytes(4 * CHUNK, seed=2))
    backup(repo, tmp_path / "d.img", "d")
    return repo


def run_env(*args: str | Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *map(str, args)], env={**cli_env(), **env},
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=120, check=False)


def test_global_options_before_the_command(repo_with_a_version: Path, tmp_path: Path) -> None:
    repo = repo_with_a_version
    orders: list[list[str | Path]] = [
        ["--repo", repo, "--json", "versions"], ["--json", "--repo", repo, "versions"],
        ["--repo", repo, "versions", "--json"], ["versions", "--repo", repo, "--json"]]
    for argv in orders:
        rows = json.loads(ok(run_cli(*argv)).stdout)["versions"]
        assert [r["volume"] for r in rows] == ["d"], argv
    # Given before the command, an option is not overwritten by the command's own default
    # (the environment's, for --repo), and one given after the command wins.
    elsewhere = tmp_path / "nothing-here"
    rows = json.loads(ok(run_env("--repo", repo, "versions", "--json",
                                 SNAPSHIP_REPO=str(elsewhere))).stdout)["versions"]
    assert len(rows) == 1
    assert len(json.loads(ok(run_cli("--repo", elsewhere, "versions", "--repo", repo,
                                     "--json")).stdout)["versions"]) == 1
    # The passphrase file, before the command.
    (tmp_path / "pass").write_text(PASSPHRASE + "\n")
    r = run_cli("--passphrase-file", tmp_path / "pass", "--repo", repo, "--json", "versions",
                passphrase=None)
    assert len(json.loads(ok(r).stdout)["versions"]) == 1
    # `token` had a --json of its own whose default overwrote one given before it.
    r = ok(run_cli("--json", "token", "t1", "--role", "read", "--tokens", tmp_path / "tok"))
    assert json.loads(r.stdout)["name"] == "t1"


def test_a_global_option_a_command_has_no_use_for_is_ignored_before_it(
        repo_with_a_version: Path, tmp_path: Path) -> None:
    """Before the command, it is like its environment variable; after it, it is refused."""
    r = ok(run_cli("--passphrase-file", tmp_path / "absent", "--repo", repo_with_a_version,
                   "locks", "--json"))
    assert json.loads(r.stdout)["locks"] == []
    r = run_cli("locks", "--passphrase-file", tmp_path / "absent", "--repo",
                repo_with_a_version)
    assert_one_line_error(r, "unrecognized arguments: --passphrase-file", code=2)


def test_quiet_prints_no_report_but_its_json_errors_and_warnings(
        repo_with_a_version: Path, tmp_path: Path) -> None:
    repo = repo_with_a_version
    img = tmp_path / "e.img"
    write_image(img, image_bytes(4 * CHUNK, seed=3))
    quiet: list[list[str | Path]] = [["-q", "backup", img], ["backup", img, "--quiet"]]
    for argv in quiet:
        r = run_cli(*argv, "--repo", repo)
        assert r.returncode == 0 and r.stdout == "" and r.stderr == "", describe(r)
    r = ok(run_cli("-q", "backup", img, "--repo", repo, "--json"))
    assert json.loads(r.stdout)["volume"] == "e.img"
    # What a query was asked for still comes, and errors still do.
    assert "e.img@" in ok(run_cli("-q", "versions", "--repo", repo)).stdout
    assert_one_line_error(run_cli("-q", "show", "nope", "--repo", repo), "nope")
    assert_one_line_error(run_cli("-q", "-v", "versions", "--repo", repo), "exclude each other",
                          code=2)


def test_verbose_says_more_on_stderr(repo_with_a_version: Path) -> None:
    r = run_cli("-v", "versions", "--repo", repo_with_a_version)
    assert r.returncode == 0, describe(r)
    assert "snapship: debug: repository " in r.stderr and "chunk size" in r.stderr
    assert "snapship: debug:" not in run_cli("versions", "--repo", repo_with_a_version).stderr


# -- which command offers which option ------------------------------------------------------

USES_THE_KEY = {"init", "versions", "show", "verify", "backup", "restore", "gc", "cow export",
                "nbd serve", "key list", "key add", "key passwd", "key remove", "copy", "mount"}


def options_of(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def test_passphrase_file_only_where_a_key_can_be_used() -> None:
    offering = {" ".join(p) for p, parser in every_command()
                if "--passphrase-file" in options_of(parser)}
    assert offering == USES_THE_KEY


def test_repository_options_only_where_there_is_a_repository() -> None:
    for path, parser in every_command():
        has = {"--repo", "--token-file", "--ca"} & options_of(parser)
        expected = set() if " ".join(path) in NO_REPOSITORY else {"--repo", "--token-file",
                                                                   "--ca"}
        assert has == expected, path
        assert {"-q", "--quiet", "-v", "--verbose"} <= options_of(parser), path
        assert ("--json" in options_of(parser)) == (path != ("server",)), path


def test_token_file_help_names_the_token_variable_for_what_it_is() -> None:
    text = build_parser().format_help()
    assert "(default: the token in $SNAPSHIP_TOKEN)" in " ".join(text.split())


# -- help -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(p for p, _ in every_group()), ids=" ".join)
def test_every_help_has_a_description_and_examples(path: tuple[str, ...],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([*path, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    paragraphs = text.split("\n\n")
    description = paragraphs[1]  # after the usage
    assert len(" ".join(description.split())) >= 80, text
    assert "\nexamples:\n" in text
    examples = text.split("\nexamples:\n", 1)[1].splitlines()
    assert examples and all(line.startswith("  ") for line in examples if line), text
    assert any(line.strip().startswith(("snapship ", "nbdcopy ", "nbdinfo "))
               for line in examples)


def test_top_level_help_lists_every_command_with_its_summary() -> None:
    r = ok(run_cli("--help"))
    for name in sorted({c.split()[0] for c in COMMANDS}):
        line = next((ln for ln in r.stdout.splitlines() if ln.strip().startswith(name + " ")),
                    None)
        assert line is not None and len(line.split()) >= 3, (name, r.stdout)
    assert "global options" in r.stdout and "examples:" in r.stdout


def test_help_fits_a_narrow_terminal() -> None:
    r = subprocess.run([*CLI, "backup", "--help"], env={**cli_env(), "COLUMNS": "60"},
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, describe(r)
    prose = r.stdout.split("\nexamples:\n")[0]
    assert max(len(line) for line in prose.splitlines()) <= 60


# -- completion, the man page, start-up time -----------------------------------------------


def complete(line: str, tmp_path: Path) -> list[str]:
    out = tmp_path / "completions"
    env = {**cli_env(), "_ARGCOMPLETE": "1", "COMP_LINE": line, "COMP_POINT": str(len(line)),
           "_ARGCOMPLETE_STDOUT_FILENAME": str(out), "_ARGCOMPLETE_IFS": "\n"}
    r = subprocess.run([*CLI], env=env, capture_output=True, text=True, timeout=60,
                       check=False, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, describe(r)
    return out.read_text().split("\n")


def test_shell_completion_through_argcomplete(tmp_path: Path) -> None:
    assert "prune" in [c.strip() for c in complete("snapship pr", tmp_path)]
    assert "--keep-last" in [c.strip() for c in complete("snapship prune --keep-l", tmp_path)]
    assert "serve" in [c.strip() for c in complete("snapship nbd s", tmp_path)]
    entry = Path(__file__).parents[1] / "src/snapship/cli/main.py"
    assert "PYTHON_ARGCOMPLETE_OK" in entry.read_text()[:1024]  # argcomplete looks there


def test_version_refs_complete_from_the_repository(repo_with_a_version: Path,
                                                  tmp_path: Path) -> None:
    found = [c.strip() for c in complete(f"snapship show --repo {repo_with_a_version} d",
                                         tmp_path)]
    assert "d" in found and any(c.startswith("d@") for c in found), found


def test_help_imports_no_completion_or_display_library() -> None:
    code = ("import sys\nfrom snapship.cli.main import main\ntry:\n    main(['--help'])\n"
            "except SystemExit:\n    pass\n"
            "print(sorted(m for m in ('argcomplete', 'rich', 'boto3') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 0, describe(r)
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout


def test_the_man_page_is_generated_from_the_parser(tmp_path: Path) -> None:
    pytest.importorskip("argparse_manpage")
    page = tmp_path / "snapship.1"
    r = subprocess.run([sys.executable, "-m", "snapship.cli.manpage", str(page)],
                       env=cli_env(), capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, describe(r)
    text = page.read_text()
    assert text.startswith(".TH SNAPSHIP \"1\"")
    for command in sorted(COMMANDS):
        assert f".SH COMMAND \\fI\\,'snapship {command}'\\/\\fR\n" in text, command
        assert f".SS snapship {command}\n" in text, command  # its examples
    assert ".SH EXAMPLES" in text and r"snapship prune \-\-keep\-daily 7" in text
