"""`snapship server` (serve repositories over HTTP) and `snapship token` (make a token)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import Any

from snapship.cli.context import open_server, open_storage
from snapship.cli.output import parse_size, print_json
from snapship.cli.reports import print_gc, print_verify
from snapship.errors import UsageError
from snapship.formats import http_api as api
from snapship.formats.manifest import check_name
from snapship.server.app import App
from snapship.server.httpd import ApiServer, tls_context
from snapship.server.maintenance import Scheduler, ServerMaintenance
from snapship.server.objects import Repositories
from snapship.server.policy import Role
from snapship.server.tokens import (
    HEADER,
    TokenFile,
    hash_token,
    new_token,
    parse_tokens,
    token_line,
)
from snapship.storage.http import HttpStorage

_PERIOD_UNITS = {"s": 1, "h": 3600, "d": 86400}


def parse_period(text: str, option: str) -> float:
    """N followed by s, h or d (seconds, hours, days)."""
    number, unit = text[:-1], text[-1:]
    if unit not in _PERIOD_UNITS or not number.isdigit() or int(number) == 0:
        raise UsageError(f"{option} {text!r} is not a period such as 90s, 6h or 7d")
    return int(number) * _PERIOD_UNITS[unit]


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT, [IPV6]:PORT; port 0 picks a free one."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--listen {text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _size(text: str, option: str) -> int:
    try:
        return parse_size(text)
    except ValueError:
        raise UsageError(f"{option} {text!r} is not a size (e.g. 256M)") from None


def _positive_int(value: int, option: str) -> int:
    if value <= 0:
        raise UsageError(f"{option} must be at least 1 (not {value})")
    return value


def _seconds(text: str, option: str) -> float:
    """A number of seconds, more than zero (e.g. 20 or 2.5)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise UsageError(f"{option} {text!r} is not a number of seconds above zero")
    return value


def cmd_server(args: argparse.Namespace) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s snapship server: %(message)s")
    root = os.path.abspath(args.root)
    if not os.path.isdir(root):
        raise UsageError(f"--root {args.root} is not a directory")
    host, port = parse_listen(args.listen)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("give both --tls-cert and --tls-key, or neither")
    if not args.tls_cert and not api.is_loopback(host) and not args.insecure_http:
        raise UsageError(f"without TLS, tokens would cross the network in clear: listen on a "
                         f"loopback address, give --tls-cert and --tls-key, or add "
                         f"--insecure-http (not {host})")
    max_object = _size(args.max_object_size, "--max-object-size")
    memory = _size(args.body_memory, "--body-memory")
    if memory < max_object:
        raise UsageError("--body-memory must be at least --max-object-size")
    max_connections = _positive_int(args.max_connections, "--max-connections")
    max_unauthenticated = _positive_int(args.max_unauthenticated, "--max-unauthenticated")
    header_timeout = _seconds(args.header_timeout, "--header-timeout")
    idle_timeout = _seconds(args.idle_timeout, "--idle-timeout")
    schedule = {task: parse_period(period, f"--{task}-every")
                for task, period in (("gc", args.gc_every), ("verify", args.verify_every))
                if period}
    tokens = TokenFile(args.tokens)
    if not len(tokens.table()):
        logging.getLogger("snapship.server").warning(
            "%s holds no tokens: every request will be refused", args.tokens)
    tls = tls_context(args.tls_cert, args.tls_key) if args.tls_cert else None
    repos = Repositories(root)
    maintenance = ServerMaintenance()
    app = App(repos, tokens.table, max_object_size=max_object, maintenance=maintenance)
    try:
        server = ApiServer((host, port), app, tls=tls, max_connections=max_connections,
                           max_unauthenticated=max_unauthenticated, body_memory=memory,
                           idle_timeout=idle_timeout, header_timeout=header_timeout,
                           access_log=args.access_log)
    except OSError as e:
        raise UsageError(f"cannot listen on {args.listen}: {e.strerror or e}") from None
    stopping = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if not stopping.is_set():
            stopping.set()
            logging.getLogger("snapship.server").info(
                "%s: finishing running requests", signal.Signals(signum).name)
            server.stop_soon()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    logging.getLogger("snapship.server").info("serving %s on %s (%d tokens)", root, server.url,
                                              len(tokens.table()))
    scheduler = Scheduler(repos, maintenance, schedule)
    scheduler.start()
    server.serve_forever()
    scheduler.stop()
    logging.getLogger("snapship.server").info("stopped")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    """Create a token: append its hash to the token file, print the token once."""
    name = args.name
    role = Role(args.role)
    repos = None if args.repos == "*" else frozenset(
        check_name("repository", r) for r in args.repos.split(","))
    path = args.tokens
    try:
        with open(path, encoding="utf-8") as f:
            existing = f.read()
    except FileNotFoundError:
        existing = ""
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read token file {path}: {getattr(e, 'strerror', None) or e}"
                         ) from None
    if existing.strip():
        table = parse_tokens(existing, f"token file {path}")
        if name in table.names():
            raise UsageError(f"token file {path} already has a token named {name!r}")
    token = new_token()
    line = token_line(name, role, repos, hash_token(token))
    parse_tokens(f"{HEADER}\n{line}", "the new token line")  # the name must be valid too
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            if not existing.strip():
                f.write(f"{HEADER}\n# name\trole\trepositories\ttoken hash\n")
            elif not existing.endswith("\n"):
                f.write("\n")
            f.write(line)
    except OSError as e:
        raise UsageError(f"cannot write token file {path}: {e.strerror or e}") from None
    if args.json:
        print_json({"name": name, "role": role.value, "repositories": args.repos,
                    "token": token})
    else:
        print(token)
    return 0


def add_on_server_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--on-server", action="store_true",
                   help="http(s) repositories: run it on the snapship server, next to the "
                   "data (admin token; nothing crosses the network, no key needed)")


def _server_storage(args: argparse.Namespace) -> HttpStorage:
    if not (args.repo or "").startswith(("http://", "https://")):
        open_storage(args.repo, args)  # a usage error of its own, if it is not even that
        raise UsageError("--on-server needs a repository on a snapship server "
                         "(--repo http(s)://HOST:PORT/NAME)")
    return open_server(args.repo, args)


def cmd_gc_on_server(args: argparse.Namespace) -> int:
    r = _server_storage(args).maintenance("gc", {})
    for message in r.get("warnings", []):
        print(f"snapship: warning: {message}", file=sys.stderr)
    print_gc(r, json=args.json, where="gc on the server")
    return 0


def cmd_verify_on_server(args: argparse.Namespace) -> int:
    if args.sample is not None or args.volume:
        raise UsageError("--on-server verifies every version completely: drop --sample and "
                         "--volume")
    r = _server_storage(args).maintenance("verify", {"deep": bool(args.deep)})
    return print_verify(r, json=args.json, where="verify on the server")


def register(sub: argparse._SubParsersAction[Any], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("server", help="serve repositories over HTTP(S) to token holders",
                       description="Serve the repositories under --root (one directory each) "
                       "over the HTTP API of docs/http-api.md. Clients use "
                       "--repo http(s)://HOST:PORT/NAME.")
    p.add_argument("--root", required=True, metavar="DIR",
                   help="directory holding one repository per subdirectory")
    p.add_argument("--listen", default="127.0.0.1:8420", metavar="HOST:PORT",
                   help="address to listen on (default: %(default)s; port 0: any free port)")
    p.add_argument("--tokens", required=True, metavar="FILE",
                   help="token file (docs/http-api.md); re-read when it changes")
    p.add_argument("--tls-cert", metavar="FILE", help="certificate chain (PEM) for https")
    p.add_argument("--tls-key", metavar="FILE", help="private key (PEM) for https")
    p.add_argument("--insecure-http", action="store_true",
                   help="allow plain http on a non-loopback address")
    p.add_argument("--max-object-size", default="256M", metavar="SIZE",
                   help="largest object a client may put (default: %(default)s)")
    p.add_argument("--body-memory", default="1G", metavar="SIZE",
                   help="request bodies held in memory at once (default: %(default)s)")
    p.add_argument("--max-connections", type=int, default=64, metavar="N",
                   help="connections of token holders served at once; more get 503 "
                   "(default: %(default)s)")
    p.add_argument("--max-unauthenticated", type=int, default=256, metavar="N",
                   help="connections that have not yet shown a valid token; when full, the "
                   "oldest is dropped (default: %(default)s)")
    p.add_argument("--header-timeout", default="20", metavar="SECONDS",
                   help="a request's line and headers (and the TLS handshake, on a new "
                   "connection) must arrive within this time (default: %(default)s)")
    p.add_argument("--idle-timeout", default="120", metavar="SECONDS",
                   help="close a connection idle this long between requests, or stalled "
                   "this long in a body (default: %(default)s)")
    p.add_argument("--gc-every", metavar="PERIOD",
                   help="run gc on every repository this often (e.g. 24h; s, h or d)")
    p.add_argument("--verify-every", metavar="PERIOD",
                   help="run a keyless verify of every repository this often (e.g. 7d)")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.add_argument("--debug", action="store_true", help="log connection-level detail")
    p.set_defaults(func=cmd_server)

    p = sub.add_parser("token", help="create a token for `snapship server`",
                       description="Create a random token, append its hash to the token file "
                       "and print the token (only this once).")
    p.add_argument("name", help="the token's name, as the server logs it")
    p.add_argument("--role", required=True, choices=[r.value for r in Role],
                   help="read: restore; backup: add, never delete or overwrite; admin: all")
    p.add_argument("--repos", default="*", metavar="NAME[,NAME...]",
                   help="repositories it may use (default: every one)")
    p.add_argument("--tokens", required=True, metavar="FILE", help="token file to append to")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_token)
