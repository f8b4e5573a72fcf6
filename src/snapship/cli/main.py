"""Entry point: the argument parser and the one place errors become messages and exit codes."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import NoReturn

from snapship import __version__
from snapship.cli import (
    cow_commands,
    lifecycle_commands,
    nbd_commands,
    repo_commands,
    server_commands,
    transfer_commands,
)
from snapship.cli.signals import Terminated
from snapship.errors import SnapshipError


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error (argparse prints the usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"snapship: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--repo", default=os.environ.get("SNAPSHIP_REPO"),
                        help="repository: a directory, s3://BUCKET[/PREFIX], or "
                        "http(s)://HOST:PORT/NAME of a snapship server (default: $SNAPSHIP_REPO)")
    common.add_argument("--token-file", metavar="FILE",
                        help="server repositories: read the token from FILE "
                        "(default: $SNAPSHIP_TOKEN)")
    common.add_argument("--ca", metavar="FILE",
                        help="https repositories: trust the CA certificates in FILE "
                        "(default: $SNAPSHIP_CA, else the system's)")
    common.add_argument("--passphrase-file", metavar="FILE",
                        help="read the passphrase from FILE (default: $SNAPSHIP_PASSPHRASE, "
                        "else a prompt)")
    common.add_argument("--json", action="store_true", help="machine-readable output")

    parser = _Parser(
        prog="snapship", description="Block-level, deduplicating, encrypted backups."
    )
    parser.add_argument("--version", action="version", version=f"snapship {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    repo_commands.register(sub, common)
    transfer_commands.register(sub, common)
    lifecycle_commands.register(sub, common)
    cow_commands.register(sub, common)
    server_commands.register(sub, common)
    nbd_commands.register(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except SnapshipError as e:
        print(f"snapship: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("snapship: interrupted", file=sys.stderr)
        return 130
    except Terminated as e:
        print("snapship: terminated", file=sys.stderr)
        return 128 + e.signum
    except BrokenPipeError:
        return 141
    except Exception as e:  # a bug: say so in one line, trace only on request
        print(f"snapship: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        if os.environ.get("SNAPSHIP_DEBUG"):
            traceback.print_exc()
        else:
            print("snapship: set SNAPSHIP_DEBUG=1 for a traceback", file=sys.stderr)
        return 70


if __name__ == "__main__":
    sys.exit(main())
