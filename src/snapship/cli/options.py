"""The parser's shared parts: global options, value types, help layout.

Global options (`--repo`, `--json`, `-q`...) are accepted before the command and after it.
The top-level parser holds them with their real defaults; each command's parser holds copies
of the ones it uses, with `argparse.SUPPRESS` as default, so that a copy left out does not
overwrite what was given before the command (argparse copies a command's namespace over the
top-level one). Before the command, an option the command has no use for is ignored, as its
environment variable would be (`snapship --passphrase-file F prune ...`).

Value types turn a bad number into a usage error naming its option (exit 2), at parse time:
`argparse` reports an `ArgumentTypeError` as "argument --keep-last: ...".
"""

from __future__ import annotations

import argparse
import math
import os
import textwrap
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from snapship.cli.output import parse_size
from snapship.formats.constants import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE

if TYPE_CHECKING:  # not subscriptable at run time; annotations only
    SubParsers = argparse._SubParsersAction[Any]


class HelpFormatter(argparse.HelpFormatter):
    """Descriptions and epilogs as written in paragraphs: a paragraph of plain lines is
    re-flowed to the terminal's width, one with an indented line (examples) is kept as is."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out = []
        for paragraph in textwrap.dedent(text).strip("\n").split("\n\n"):
            lines = paragraph.splitlines()
            if any(line.startswith(" ") for line in lines):
                out.append("\n".join(indent + line for line in lines))
            else:
                out.append(textwrap.fill(" ".join(paragraph.split()), width,
                                         initial_indent=indent, subsequent_indent=indent))
        return "\n\n".join(out)


def add_command(sub: SubParsers, name: str, *, summary: str, description: str,
                examples: Sequence[str] = (), parents: Sequence[argparse.ArgumentParser] = (),
                **kwargs: Any) -> argparse.ArgumentParser:
    """A command's parser: `summary` is its line in `snapship --help`, `description` the
    paragraph(s) of its own --help, `examples` command lines (a `# ...` comment may follow)."""
    epilog = None
    if examples:
        epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples)
    # One line per paragraph: the help formatter fills it to the terminal, the man page's
    # generator to the page.
    text = "\n\n".join(" ".join(p.split()) for p in textwrap.dedent(description).strip()
                        .split("\n\n"))
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=summary, description=text, epilog=epilog, parents=list(parents),
        formatter_class=HelpFormatter, **kwargs)
    parser.examples = list(examples)  # type: ignore[attr-defined]  # for the man page
    return parser


# -- global options ---------------------------------------------------------------------

REPO_HELP = ("repository: a directory, s3://BUCKET[/PREFIX], or http(s)://HOST:PORT/NAME of "
             "a snapship server (default: $SNAPSHIP_REPO)")
TOKEN_FILE_HELP = ("server repositories: read the token from FILE (default: the token in "
                   "$SNAPSHIP_TOKEN)")
LIMIT_HELP = ("remote repositories (a server, S3): hold {what} to RATE bytes per second "
              "(K, M, G: 1024-based), for every request of the command together (default: no "
              "limit)")
CA_HELP = ("https repositories: trust the CA certificates in FILE (default: $SNAPSHIP_CA, "
           "else the system's)")
PASSPHRASE_FILE_HELP = ("read the passphrase from FILE (default: --passphrase-command, else "
                        "the file $SNAPSHIP_PASSPHRASE_FILE, else $SNAPSHIP_PASSPHRASE, else a "
                        "prompt)")
PASSPHRASE_COMMAND_HELP = ("run CMD (split into words like a shell, not run by one) and take "
                           "the first line it prints as the passphrase")
JSON_HELP = ("one JSON object on stdout, errors as one on stderr (no progress display; "
             "docs/json.md)")
QUIET_HELP = ("no progress display and no report of what was done; warnings and errors still "
              "go to stderr")
VERBOSE_HELP = "more detail on stderr: retries, timings, tracebacks of internal errors"


def add_global_options(parser: argparse.ArgumentParser, *, repo: bool = False,
                       key: bool = False, json: bool = True, top: bool = False) -> None:
    """The global options a parser accepts: output options always (`--json` if `json`),
    the repository's location and credentials if `repo`, the passphrase file if `key` (a
    command that can use the key). `top`: the top-level parser, with the real defaults."""

    def default(value: object) -> object:
        return value if top else argparse.SUPPRESS

    title = "global options" if top else "global options (also accepted before the command)"
    group = parser.add_argument_group(title)
    if repo:
        group.add_argument("--repo", metavar="REPO", default=default(
            os.environ.get("SNAPSHIP_REPO")), help=REPO_HELP)
        group.add_argument("--token-file", metavar="FILE", default=default(None),
                           help=TOKEN_FILE_HELP)
        group.add_argument("--ca", metavar="FILE", default=default(None), help=CA_HELP)
        if not top:
            # After the command only: on the top-level parser, argparse would take `--limit`
            # (cow inspect's own option) for an abbreviation of these and refuse it.
            limits = parser.add_argument_group("bandwidth limits")
            limits.add_argument("--limit-upload", metavar="RATE", type=size(1), default=None,
                                help=LIMIT_HELP.format(what="uploads"))
            limits.add_argument("--limit-download", metavar="RATE", type=size(1),
                                default=None, help=LIMIT_HELP.format(what="downloads"))
    if key:
        group.add_argument("--passphrase-file", metavar="FILE", default=default(None),
                           help=PASSPHRASE_FILE_HELP)
        group.add_argument("--passphrase-command", metavar="CMD", default=default(None),
                           help=PASSPHRASE_COMMAND_HELP)
    if json:
        group.add_argument("--json", action="store_true", default=default(False),
                           help=JSON_HELP)
    group.add_argument("-q", "--quiet", action="store_true", default=default(False),
                       help=QUIET_HELP)
    group.add_argument("-v", "--verbose", action="store_true", default=default(False),
                       help=VERBOSE_HELP)


def parents(*, repo: bool = False, key: bool = False, json: bool = True
            ) -> list[argparse.ArgumentParser]:
    """A command parser's `parents=`: its copies of the global options it uses."""
    p = argparse.ArgumentParser(add_help=False)
    add_global_options(p, repo=repo, key=key, json=json)
    return [p]


def add_source_options(parser: argparse.ArgumentParser, what: str) -> None:
    group = parser.add_argument_group(f"the {what}")
    group.add_argument("--from-token-file", metavar="FILE",
                       help=f"server repositories: the {what}'s token (default: the same as "
                       "for --repo)")
    group.add_argument("--from-passphrase-file", metavar="FILE",
                       help=f"read the {what}'s passphrase from FILE (default: the same as "
                       "for --repo)")
    group.add_argument("--from-passphrase-command", metavar="CMD",
                       help=f"take the {what}'s passphrase from the first line CMD prints")


# -- value types: a bad value is a usage error naming its option -------------------------


def _named(fn: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    fn.__name__ = name  # argparse names the type in some of its own messages
    return fn


def whole(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """A whole number from `minimum` (to `maximum`)."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum or (maximum is not None and value > maximum):
            span = f"from {minimum} to {maximum}" if maximum is not None else \
                f"of {minimum} or more"
            raise argparse.ArgumentTypeError(f"must be a whole number {span} (not {value})")
        return value

    return _named(parse, "whole number")


def size(minimum: int = 0) -> Callable[[str], int]:
    """A size such as 64K, 256M, 1G or plain bytes, at least `minimum` bytes."""

    def parse(text: str) -> int:
        try:
            value = parse_size(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a size such as 64K, 256M or 1G") from None
        if value < minimum:
            least = "above zero" if minimum == 1 else f"at least {minimum} bytes"
            raise argparse.ArgumentTypeError(f"must be {least} (not {text})")
        return value

    return _named(parse, "size")


def chunk_size(text: str) -> int:
    """A repository's chunk size: a power of two from 64K to 16M."""
    try:
        value = parse_size(text)
    except ValueError:
        value = 0
    if value < MIN_CHUNK_SIZE or value > MAX_CHUNK_SIZE or value & (value - 1):
        raise argparse.ArgumentTypeError(
            f"chunk size {text!r} is not a power of two from {MIN_CHUNK_SIZE >> 10}K to "
            f"{MAX_CHUNK_SIZE >> 20}M")
    return value


def percent(text: str) -> float:
    """A percentage above 0, at most 100."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError(f"must be a percentage above 0, at most 100 (not "
                                         f"{text!r})")
    return value


def seconds(text: str) -> float:
    """A number of seconds above zero (e.g. 20 or 2.5)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above zero")
    return value


_PERIOD_UNITS = {"s": 1, "h": 3600, "d": 86400}


def period(text: str) -> float:
    """N followed by s, h or d (seconds, hours, days), N at least 1: in seconds."""
    number, unit = text[:-1], text[-1:]
    if unit not in _PERIOD_UNITS or not number.isdigit() or int(number) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a period such as 90s, 6h or 7d")
    return int(number) * _PERIOD_UNITS[unit]


def snapshot_size(text: str) -> str:
    """`N%` of the origin (N at least 1), a size lvcreate takes (`2G`, `512M`, `1.5T`), or
    `auto`."""
    # Imported here, not at the top: every command imports this module, and the engine is
    # not for commands that never snapshot (tests/test_startup.py).
    from snapship.engine.snapshot_backup import valid_snapshot_size

    if valid_snapshot_size(text):
        return text
    raise argparse.ArgumentTypeError(
        f"{text!r} is neither N% of the origin (N at least 1), a size such as 2G, nor auto")


# -- completion (argcomplete reads an action's `completer`; nothing is imported for it) -----


def completes(action: argparse.Action, completer: Callable[..., list[str]]) -> None:
    action.completer = completer  # type: ignore[attr-defined]


def _versions(parsed_args: argparse.Namespace) -> list[tuple[str, str]]:
    """(volume, version) of the repository named so far on the command line, keyless; none
    if it cannot be read at once (a TAB must not wait out the retries)."""
    os.environ["SNAPSHIP_RETRY_TIME"] = "0"
    try:
        from snapship.cli.context import open_storage
        from snapship.repository.catalog import Catalog

        return Catalog(open_storage(parsed_args.repo, parsed_args)).versions()
    except Exception:
        return []


VERSION_HELP = ("VERSION: an id or a unique prefix of one, 'latest' (the default), 'latest~N' "
                "(the Nth before it), or a local date or time, YYYY-MM-DD[THH:MM[:SS]] (the "
                "newest version made at or before the end of that day, minute or second; a "
                "trailing Z means UTC)")
"""How a version is named, for every command that takes VOLUME[@VERSION] (selection.py)."""


def complete_version_refs(prefix: str, parsed_args: argparse.Namespace, **_: Any) -> list[str]:
    """VOLUME and VOLUME@VERSION."""
    pairs = _versions(parsed_args)
    names = sorted({v for v, _ in pairs}) + [f"{v}@{n}" for v, n in pairs]
    return [n for n in names if n.startswith(prefix)]


def complete_volumes(prefix: str, parsed_args: argparse.Namespace, **_: Any) -> list[str]:
    return sorted({v for v, _ in _versions(parsed_args) if v.startswith(prefix)})
