# PYTHON_ARGCOMPLETE_OK  (argcomplete: `register-python-argcomplete snapship` completes this)
"""Entry point: the argument parser and the one place errors become messages and exit codes."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
import traceback
from collections.abc import Iterator
from typing import ClassVar, NoReturn

from snapship import __version__
from snapship.cli import (
    cow_commands,
    job_commands,
    lifecycle_commands,
    nbd_commands,
    options,
    output,
    repo_commands,
    server_commands,
    systemd_commands,
    transfer_commands,
)
from snapship.cli.signals import Terminated, terminate_raises
from snapship.errors import SnapshipError

DESCRIPTION = """\
Block-level backups of block devices, LVM volumes and image files into a deduplicating,
compressed, encrypted repository (a directory, S3, or a snapship server). Every version is a
complete image; any of them restores in one command.

Global options may come before the command or after it. Run `snapship COMMAND --help` for a
command's options and examples; `man snapship` (make man) has them all."""

EXAMPLES = """\
examples:
  export SNAPSHIP_REPO=/srv/backup/repo SNAPSHIP_PASSPHRASE=...
  snapship init
  snapship backup /dev/vg0/root --volume root
  snapship --repo /srv/backup/repo versions
  snapship restore root restored.img
  snapship prune --keep-daily 7 --keep-weekly 4 && snapship gc"""


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error (argparse prints the usage first);
    the error object of docs/json.md when --json is on the command line (`main` says)."""

    json_errors: ClassVar[bool] = False
    argv: ClassVar[list[str]] = []

    def error(self, message: str) -> NoReturn:
        text = f"{message} (see '{self.prog} --help')"
        if not self.json_errors:
            self.exit(2, f"snapship: error: {text}\n")
        command = self.prog.removeprefix("snapship").strip() or _command_in(self, self.argv)
        self.exit(2, output.error_json("usage", text, 2, command) + "\n")


def _wants_json(argv: list[str]) -> bool:
    """Whether --json (or an abbreviation argparse would take for it) is an option here."""
    for arg in argv:
        if arg == "--":
            return False
        if len(arg) >= 3 and "--json".startswith(arg):
            return True
    return False


def _command_in(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """The command a command line names, as far as a parser that failed can tell: the first
    word that is a command (and a subcommand of it); None if there is none."""
    words: list[str] = []
    for arg in argv:
        choices = _commands(parser)
        if not choices:
            break
        if arg in choices:
            words.append(arg)
            parser = choices[arg]
        elif words:
            break
    return " ".join(words) or None


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="snapship", description=DESCRIPTION, epilog=EXAMPLES,
                     formatter_class=options.HelpFormatter)
    parser.add_argument("--version", action="version", version=f"snapship {__version__}")
    options.add_global_options(parser, repo=True, key=True, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands", parser_class=_Parser)
    repo_commands.register(sub)
    transfer_commands.register(sub)
    lifecycle_commands.register(sub)
    cow_commands.register(sub)
    server_commands.register(sub)
    nbd_commands.register(sub)
    job_commands.register(sub)
    systemd_commands.register(sub)
    return parser


class _MessageHandler(logging.Handler):
    """Log records as CLI messages (below the progress line)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            output.message(f"snapship: {record.levelname.lower()}: {self.format(record)}")
        except Exception:
            self.handleError(record)


def _configure(args: argparse.Namespace) -> None:
    output.configure(quiet=args.quiet, verbose=args.verbose, json=args.json)
    log = logging.getLogger("snapship.cli")  # the client's own detail, under -v
    log.propagate = False  # `server` and `nbd serve` set up their own logging
    if not log.handlers:
        log.addHandler(_MessageHandler())
    log.setLevel(logging.DEBUG if args.verbose else logging.WARNING)


@contextlib.contextmanager
def _report_to(args: argparse.Namespace) -> Iterator[None]:
    """Under -q, a command whose stdout only reports what it did (`quiet_report`) prints
    nothing there; its JSON (--json) and what a query command was asked for still come."""
    if not (args.quiet and not args.json and getattr(args, "quiet_report", False)):
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


def _fail(kind: str, text: str, code: int, command: str | None, prefix: str = "") -> int:
    """Say what stopped the command, in one line on stderr: `snapship: PREFIX TEXT` for
    people, the error object of docs/json.md under --json. Returns the exit code."""
    if output.settings.json:
        output.message(output.error_json(kind, text, code, command))
    else:
        output.message(f"snapship: {prefix}{text}")
    return code


def _command_name(args: argparse.Namespace) -> str:
    sub = getattr(args, f"{args.command}_command", None)
    return f"{args.command} {sub}" if sub else str(args.command)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    finally:  # a process runs one command, but tests and embedders call main in-process
        output.configure()
        _Parser.json_errors = False


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    if "_ARGCOMPLETE" in os.environ:  # a shell asks for completions: only then the import
        from snapship.cli.completion import complete

        complete(parser)
    _Parser.argv = sys.argv[1:] if argv is None else list(argv)
    _Parser.json_errors = _wants_json(_Parser.argv)
    args = parser.parse_args(argv)
    if args.quiet and args.verbose:
        parser.error("-q (--quiet) and -v (--verbose) exclude each other")
    _configure(args)
    log = logging.getLogger("snapship.cli")
    log.debug("snapship %s: %s", __version__, " ".join(sys.argv[1:] if argv is None else argv))
    command = _command_name(args)
    started = time.monotonic()
    try:
        with terminate_raises(), _report_to(args):
            code: int = args.func(args)
        log.debug("%s finished in %.2f s (exit %d)", args.command, time.monotonic() - started,
                  code)
        return code
    except SnapshipError as e:
        return _fail(e.kind, str(e), e.exit_code, command, "error: ")
    except KeyboardInterrupt:
        return _fail("interrupted", "interrupted", 130, command)
    except Terminated as e:
        return _fail("terminated", "terminated", 128 + e.signum, command)
    except BrokenPipeError:
        return 141
    except Exception as e:  # a bug: say so in one line, trace only on request
        if os.environ.get("SNAPSHIP_DEBUG") or args.verbose:
            traceback.print_exc()
            hint = ""
        else:
            hint = "snapship: set SNAPSHIP_DEBUG=1 (or use -v) for a traceback"
        _fail("internal", f"internal error: {type(e).__name__}: {e}", 70, command)
        if hint and not output.settings.json:
            output.message(hint)
        return 70


if __name__ == "__main__":
    sys.exit(main())
