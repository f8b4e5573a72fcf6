"""`python -m snapship.cli.manpage FILE`: the man page, generated from the parser (`make man`).

argparse-manpage (a dev dependency, not needed at run time) writes the page: synopsis,
description, every command's usage, description and options. It leaves out the commands'
epilogs, so their examples are added here as an EXAMPLES section, one subsection per command.
"""

from __future__ import annotations

import argparse
import sys

from argparse_manpage.manpage import Manpage  # type: ignore[import-untyped]

from snapship import __version__
from snapship.cli.main import build_parser


def _roff(text: str) -> str:
    """Text for a roff line: backslashes and hyphens escaped, no line starting with a dot."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text.startswith((".", "'")) else text


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
              ) -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(" ".join(path), parser)] if path else []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _commands(sub, (*path, name))
    return found


def examples_section(parser: argparse.ArgumentParser) -> str:
    lines = []
    for name, sub in _commands(parser):
        examples = getattr(sub, "examples", [])
        if not examples:
            continue
        lines += [f".SS {_roff('snapship ' + name)}", ".nf"]
        lines += [_roff(e) for e in examples]
        lines.append(".fi")
    return "\n".join(lines)


def build(parser: argparse.ArgumentParser | None = None) -> str:
    parser = parser or build_parser()
    top_examples = parser.epilog
    parser.epilog = None  # the top-level examples go into EXAMPLES with the others
    page = Manpage(parser, {
        "project_name": "snapship",
        "version": __version__,
        "description": "block-level, deduplicating, encrypted backups",
        "manual_title": "snapship manual",
    })
    top = ""
    if top_examples:
        body = [line[2:] for line in top_examples.splitlines()[1:]]
        top = "\n".join([".nf", *(_roff(b) for b in body), ".fi"])
    page.add_section("examples", "=", "\n".join(filter(None, [top, examples_section(parser)])))
    return str(page)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m snapship.cli.manpage FILE", file=sys.stderr)
        return 2
    with open(args[0], "w", encoding="utf-8") as f:
        f.write(build())
    return 0


if __name__ == "__main__":
    sys.exit(main())
