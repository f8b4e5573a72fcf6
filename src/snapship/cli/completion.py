"""Shell completion through argcomplete, imported only when a shell asks for completions.

`eval "$(register-python-argcomplete snapship)"` (bash; see README) makes the shell run
`snapship` with `_ARGCOMPLETE` set on every TAB; `main` then calls `complete`, which prints
the candidates and exits before any command runs. Normal runs never import argcomplete, so
`snapship --help` stays fast.
"""

from __future__ import annotations

import argparse

import argcomplete


def complete(parser: argparse.ArgumentParser) -> None:
    argcomplete.autocomplete(parser)
