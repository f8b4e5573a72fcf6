# PYTHON_ARGCOMPLETE_OK  (argcomplete: `register-python-argcomplete snapship` completes this)
"""Entry point: the argument parser and the one place errors become messages and exit codes."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import time
import traceback
from collections.abc import Iterator
from typing import ClassVar, NoReturn

from snapship import __version__
from snapship.cli import options, output
from snapship.cli.allocator import keep_freed_memory
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


COMMAND_MODULES = ("repo_commands", "key_commands", "copy_commands", "transfer_commands",
                   "lifecycle_commands", "cow_commands", "server_commands", "nbd_commands",
                   "mount_commands", "job_commands", "systemd_commands", "snapspace_commands")
"""Modules under snapship.cli with a `register(subparsers)`, in the order of `--help`."""

COMMANDS: dict[str, tuple[str, str]] = {
    "init": ("repo_commands", "create a repository"),
    "versions": ("repo_commands", "list versions"),
    "show": ("repo_commands", "details of one version"),
    "verify": ("repo_commands", "check that every version is restorable"),
    "key": ("key_commands", "list, add, remove and change the passphrases of a repository"),
    "copy": ("copy_commands", "copy versions to another repository"),
    "backup": ("transfer_commands", "back up a file or block device"),
    "restore": ("transfer_commands", "restore a version to a file, device or pipe"),
    "prune": ("lifecycle_commands", "forget versions no retention rule keeps"),
    "forget": ("lifecycle_commands", "forget named versions"),
    "protect": ("lifecycle_commands", "keep versions whatever prune's rules say"),
    "unprotect": ("lifecycle_commands", "let prune forget versions again"),
    "gc": ("lifecycle_commands", "delete chunks no version uses (safe beside running backups)"),
    "locks": ("lifecycle_commands", "list running operations' locks"),
    "cow": ("cow_commands", "dm-snapshot COW stores: inspect one, export one"),
    "server": ("server_commands", "serve repositories over HTTP(S) to token holders"),
    "token": ("server_commands", "create a token for `snapship server`"),
    "nbd": ("nbd_commands", "serve versions over the Network Block Device protocol"),
    "mount": ("mount_commands", "mount a version's file system (read-only)"),
    "umount": ("mount_commands", "unmount a version mounted by snapship mount"),
    "run": ("job_commands", "run the jobs of the jobs file (backup, prune, gc)"),
    "config": ("job_commands", "check the jobs file"),
    "systemd": ("systemd_commands", "systemd units for the jobs file's schedules"),
    "snapspace": ("snapspace_commands", "snapshot space: loop-device PVs for tracking snapshots"),
}
"""Each command: the module that registers it and its line in `snapship --help`. The lazy
parser shows these lines and imports a command's module only once the command is named, so
`snapship --help` and a light command never load the engine, the servers or their libraries
(tests/test_startup.py checks that this table matches what the modules register)."""


class _LazySubParsers(argparse._SubParsersAction):  # type: ignore[type-arg]
    """Subcommands that are placeholders until named: then their module registers them."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:  # fmt: skip
        assert isinstance(values, list) and values
        realize(self, COMMANDS[values[0]][0])
        super().__call__(parser, namespace, values, option_string)


def realize(sub: argparse._SubParsersAction, module: str) -> None:  # type: ignore[type-arg]
    """Replace the placeholders of `module`'s commands by what the module registers."""
    names = {name for name, (mod, _) in COMMANDS.items() if mod == module}
    if not any(getattr(sub.choices.get(n), "placeholder", False) for n in names):
        return
    for name in names:
        sub.choices.pop(name, None)
    sub._choices_actions = [a for a in sub._choices_actions if a.dest not in names]
    importlib.import_module(f"snapship.cli.{module}").register(sub)


def build_parser(*, lazy: bool = False) -> argparse.ArgumentParser:
    """The whole parser; `lazy`: each command's module is imported only when it is named."""
    parser = _Parser(prog="snapship", description=DESCRIPTION, epilog=EXAMPLES,
                     formatter_class=options.HelpFormatter)
    parser.add_argument("--version", action="version", version=f"snapship {__version__}")
    options.add_global_options(parser, repo=True, key=True, top=True)
    if lazy:
        parser.register("action", "parsers", _LazySubParsers)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands", parser_class=_Parser)
    if not lazy:
        for module in COMMAND_MODULES:
            importlib.import_module(f"snapship.cli.{module}").register(sub)
        return parser
    for name, (_, summary) in COMMANDS.items():
        sub.add_parser(name, help=summary).placeholder = True  # type: ignore[attr-defined]
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
    completing = "_ARGCOMPLETE" in os.environ
    parser = build_parser(lazy=not completing)
    if completing:  # a shell asks for completions: only then the import
        from snapship.cli.completion import complete

        complete(parser)
    _Parser.argv = sys.argv[1:] if argv is None else list(argv)
    _Parser.json_errors = _wants_json(_Parser.argv)
    args = parser.parse_args(argv)
    if args.quiet and args.verbose:
        parser.error("-q (--quiet) and -v (--verbose) exclude each other")
    _configure(args)
    keep_freed_memory()
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
