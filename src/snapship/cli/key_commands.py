"""`snapship key list|add|remove|passwd`: the passphrases that open a repository.

Each passphrase is a key file wrapping the one master secret (docs/format.md, "Keys and
cryptography"), so several people (and an escrow copy) can each have their own, and changing
one rewrites nothing but key files. The repository layer does the steps in a crash-safe
order; this module asks for the passphrases and reports.
"""

from __future__ import annotations

import argparse
import getpass
import socket
from typing import Any

from snapship.cli import options
from snapship.cli.context import (
    open_repository,
    prompt,
    read_passphrase_file,
    run_passphrase_command,
)
from snapship.cli.reports import Report, emit
from snapship.errors import UsageError
from snapship.repository.repo import Repository


def new_passphrase(args: argparse.Namespace) -> bytes:
    """--new-passphrase-file, --new-passphrase-command, else a prompt asked twice."""
    if args.new_passphrase_file:
        return read_passphrase_file(args.new_passphrase_file, "new passphrase file")
    if args.new_passphrase_command:
        return run_passphrase_command(args.new_passphrase_command, "--new-passphrase-command")
    return prompt("New passphrase: ", confirm=True)


def default_label() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _rows(repo: Repository) -> list[dict[str, Any]]:
    return [{"id": k.id, "label": k.label, "created": k.created or None,
             "key_file_version": k.version or None, "kdf": k.kdf or None,
             "current": k.id == repo.key_id, "problem": k.problem}
            for k in repo.describe_keys()]


def cmd_key_list(args: argparse.Namespace) -> int:
    repo = open_repository(args)
    if repo.keys is None:
        raise UsageError(f"{repo.storage.describe()} is not encrypted: it has no keys")
    emit("key list", {"repository": repo.storage.describe(), "keys": _rows(repo)},
         describe_key_list, json=args.json)
    return 0


def cmd_key_add(args: argparse.Namespace) -> int:
    repo = open_repository(args)
    label = args.label if args.label is not None else default_label()
    key_id = repo.add_key(new_passphrase(args), label)
    emit("key add", {"key_id": key_id, "label": label, "keys": _rows(repo)},
         lambda r: [f"added key {r['key_id']} ({r['label'] or 'no label'}); the repository "
                    f"has {len(r['keys'])} keys"], json=args.json)
    return 0


def cmd_key_passwd(args: argparse.Namespace) -> int:
    repo = open_repository(args)
    old = repo.key_id
    key_id = repo.change_passphrase(new_passphrase(args))
    emit("key passwd", {"old_key_id": old, "key_id": key_id, "keys": _rows(repo)},
         lambda r: [f"passphrase changed: key {r['old_key_id']} replaced by {r['key_id']}"],
         json=args.json)
    return 0


def cmd_key_remove(args: argparse.Namespace) -> int:
    repo = open_repository(args)
    repo.remove_key(args.key_id)
    emit("key remove", {"removed": args.key_id, "keys": _rows(repo)},
         lambda r: [f"removed key {r['removed']}; {len(r['keys'])} left"], json=args.json)
    return 0


def describe_key_list(r: Report) -> list[str]:
    lines = []
    for k in r["keys"]:
        mark = "*" if k["current"] else " "
        if k["problem"]:
            lines.append(f"{mark} {k['id']:16}  UNREADABLE: {k['problem']}")
        else:
            lines.append(f"{mark} {k['id']:16}  {k['created'] or '(created: not recorded)':24}  "
                         f"{k['label'] or '-'}")
    lines.append("(* the key the given passphrase opens)")
    return lines


def _new_passphrase_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--new-passphrase-file", metavar="FILE",
                   help="read the new passphrase from FILE (default: a prompt, asked twice)")
    p.add_argument("--new-passphrase-command", metavar="CMD",
                   help="take the new passphrase from the first line CMD prints")


def register(sub: options.SubParsers) -> None:
    p = options.add_command(
        sub, "key", summary="list, add, remove and change the passphrases of a repository",
        description="""
        An encrypted repository has one master key, wrapped once for each passphrase that
        opens it: one per administrator, an escrow copy in a safe. These commands work on
        those key files only; no chunk or version is rewritten.""",
        examples=["snapship key list",
                  "snapship key add --label escrow --new-passphrase-file /root/escrow.pass",
                  "snapship key passwd",
                  "snapship key remove 3f2a9c1d0b7e6a54"])
    key_sub = p.add_subparsers(dest="key_command", required=True, metavar="COMMAND",
                               title="commands")
    p = options.add_command(
        key_sub, "list", summary="the repository's keys",
        description="""
        List the repository's key files: id, when and by whom each was added (its label),
        and which one the given passphrase opens.""",
        examples=["snapship key list", "snapship key list --json"],
        parents=options.parents(repo=True, key=True))
    p.set_defaults(func=cmd_key_list)

    p = options.add_command(
        key_sub, "add", summary="let another passphrase open the repository",
        description="""
        Add a key file for a new passphrase. The repository is opened with an existing one
        (--passphrase-file, --passphrase-command, $SNAPSHIP_PASSPHRASE_FILE,
        $SNAPSHIP_PASSPHRASE or a prompt); the new one comes from --new-passphrase-file,
        --new-passphrase-command or a prompt. A repository of layout version 1 (one key
        file) is upgraded to layout version 2 first (older snapships then refuse it).""",
        examples=["snapship key add --label alice",
                  "snapship key add --label escrow --new-passphrase-file /root/escrow.pass"],
        parents=options.parents(repo=True, key=True))
    p.add_argument("--label", help="who or what the key is for (default: USER@HOST)")
    _new_passphrase_options(p)
    p.set_defaults(func=cmd_key_add, quiet_report=True)

    p = options.add_command(
        key_sub, "passwd", summary="change the passphrase",
        description="""
        Replace the key file that the given passphrase opens by one for a new passphrase.
        The new key file is stored (and flushed) before the old one is deleted: if the
        command is stopped at any point, the old or the new passphrase opens the
        repository. Other keys are untouched.""",
        examples=["snapship key passwd",
                  "snapship key passwd --passphrase-file old.pass --new-passphrase-file new.pass"],
        parents=options.parents(repo=True, key=True))
    _new_passphrase_options(p)
    p.set_defaults(func=cmd_key_passwd, quiet_report=True)

    p = options.add_command(
        key_sub, "remove", summary="stop a passphrase from opening the repository",
        description="""
        Delete a key file (its id from `snapship key list`). The last key, and the key the
        given passphrase opens, are never removed: open with another passphrase to remove
        that one. Whoever kept a copy of the old key file and knows its passphrase can
        still unwrap the master key from that copy: to lock someone out for good, the data
        must move to a repository with a new master key.""",
        examples=["snapship key remove 3f2a9c1d0b7e6a54"],
        parents=options.parents(repo=True, key=True))
    p.add_argument("key_id", metavar="KEY_ID", help="the key to remove")
    p.set_defaults(func=cmd_key_remove, quiet_report=True)
