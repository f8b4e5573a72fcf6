"""`snapship server` (serve repositories over HTTP) and `snapship token` (make a token)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any

from snapship.cli import options
from snapship.cli.context import open_server, open_storage
from snapship.cli.output import warn
from snapship.cli.reports import emit, print_gc, print_verify
from snapship.errors import StorageError, UsageError
from snapship.formats.manifest import check_name

if TYPE_CHECKING:
    from snapship.server.objects import Repositories
    from snapship.storage.http import HttpStorage

# The server's stack (h11, ssl, the app, maintenance, the roles) and the token file's code
# are imported by the commands that use them: other commands register --on-server from here,
# and must not pay for them at start-up.


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT, [IPV6]:PORT; port 0 picks a free one."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def cmd_server(args: argparse.Namespace) -> int:
    from snapship.formats import http_api as api
    from snapship.server.app import App
    from snapship.server.httpd import ApiServer, tls_context
    from snapship.server.maintenance import Scheduler, ServerMaintenance
    from snapship.server.metrics import ServerMetrics
    from snapship.server.tokens import TokenFile

    level = logging.DEBUG if args.debug or args.verbose else (
        logging.WARNING if args.quiet else logging.INFO)
    logging.basicConfig(stream=sys.stderr, level=level,
                        format="%(asctime)s snapship server: %(message)s")
    if not args.debug:  # boto3's notes on every client it makes are not the server's news
        for name in ("boto3", "botocore", "urllib3"):
            logging.getLogger(name).setLevel(logging.WARNING)
    repos = _repositories(args)
    host, port = args.listen
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("give both --tls-cert and --tls-key, or neither")
    if not args.tls_cert and not api.is_loopback(host) and not args.insecure_http:
        raise UsageError(f"without TLS, tokens would cross the network in clear: listen on a "
                         f"loopback address, give --tls-cert and --tls-key, or add "
                         f"--insecure-http (not {host})")
    max_object = args.max_object_size
    memory = args.body_memory
    if memory < max_object:
        raise UsageError("--body-memory must be at least --max-object-size")
    schedule = {task: period for task, period in (("gc", args.gc_every),
                                                  ("verify", args.verify_every)) if period}
    tokens = TokenFile(args.tokens)
    if not len(tokens.table()):
        logging.getLogger("snapship.server").warning(
            "%s holds no tokens: every request will be refused", args.tokens)
    tls = tls_context(args.tls_cert, args.tls_key) if args.tls_cert else None
    metrics = ServerMetrics()
    maintenance = ServerMaintenance(metrics)
    app = App(repos, tokens.table, max_object_size=max_object, maintenance=maintenance,
              metrics=metrics)
    try:
        server = ApiServer((host, port), app, tls=tls, max_connections=args.max_connections,
                           max_unauthenticated=args.max_unauthenticated, body_memory=memory,
                           idle_timeout=args.idle_timeout, header_timeout=args.header_timeout,
                           access_log=args.access_log)
    except OSError as e:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise UsageError(f"cannot listen on {where}: {e.strerror or e}") from None
    stopping = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if not stopping.is_set():
            stopping.set()
            logging.getLogger("snapship.server").info(
                "%s: finishing running requests", signal.Signals(signum).name)
            server.stop_soon()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    logging.getLogger("snapship.server").info("serving %s on %s (%d tokens)", repos.root,
                                              server.url,
                                              len(tokens.table()))
    scheduler = Scheduler(repos, maintenance, schedule)
    scheduler.start()
    server.serve_forever()
    scheduler.stop()
    logging.getLogger("snapship.server").info("stopped")
    return 0


def _repositories(args: argparse.Namespace) -> Repositories:
    """The repositories under --root: a directory's subdirectories, or the prefixes under
    s3://BUCKET/PREFIX (reached as `--repo s3://...` is: the AWS configuration, docs/s3.md)."""
    from snapship.server.objects import Repositories

    if args.root.startswith("s3://"):
        store = open_storage(args.root, args)
        try:
            next(iter(store.list("")), None)  # a missing bucket or bad credentials: now
        except StorageError as e:
            raise UsageError(f"--root {args.root}: {e}") from None
        return Repositories(store)
    if "://" in args.root:
        raise UsageError(f"--root {args.root}: give a directory or an s3:// URL")
    root = os.path.abspath(args.root)
    if not os.path.isdir(root):
        raise UsageError(f"--root {args.root} is not a directory")
    return Repositories(root)


def cmd_token(args: argparse.Namespace) -> int:
    """Create a token: append its hash to the token file, print the token once."""
    from snapship.server.policy import Role
    from snapship.server.tokens import HEADER, hash_token, new_token, parse_tokens, token_line

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
    emit("token", {"name": name, "role": role.value,
                   "repositories": None if repos is None else sorted(repos), "token": token},
         lambda r: [r["token"]], json=args.json)
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
        warn(message)
    print_gc(r, json=args.json, on_server=True)
    return 0


def cmd_verify_on_server(args: argparse.Namespace) -> int:
    if args.sample is not None or args.volume:
        raise UsageError("--on-server verifies every version completely: drop --sample and "
                         "--volume")
    r = _server_storage(args).maintenance("verify", {"deep": bool(args.deep)})
    return print_verify(r, json=args.json, on_server=True)


def register(sub: options.SubParsers) -> None:
    from snapship.server.policy import Role

    p = options.add_command(
        sub, "server", summary="serve repositories over HTTP(S) to token holders",
        description="""
        Serve the repositories under --root (one directory each, or one prefix each of an
        S3 bucket: several servers may serve one bucket) over the HTTP API of
        docs/http-api.md. Clients use --repo http(s)://HOST:PORT/NAME with a token (`snapship
        token` makes them): read tokens restore, backup tokens add and never delete, admin
        tokens may do everything. Encryption stays on the clients: the server never sees a
        passphrase, a key or plaintext. SIGTERM, SIGINT or SIGHUP stop it gracefully, after
        the running requests.""",
        examples=["snapship server --root /srv/snapship/repos --tokens /srv/snapship/tokens",
                  "snapship server --root /srv/snapship/repos --tokens /srv/snapship/tokens \\",
                  "    --listen 0.0.0.0:8420 --tls-cert cert.pem --tls-key key.pem --gc-every 24h",
                  "AWS_ENDPOINT_URL=http://s3.lan:8333 snapship server --root s3://backups/srv \\",
                  "    --tokens /srv/snapship/tokens"],
        parents=options.parents(json=False))
    p.add_argument("--root", required=True, metavar="DIR|s3://BUCKET[/PREFIX]",
                   help="directory holding one repository per subdirectory, or an S3 "
                   "location holding one per prefix (AWS configuration as for --repo s3://)")
    p.add_argument("--listen", default="127.0.0.1:8420", metavar="HOST:PORT", type=parse_listen,
                   help="address to listen on (default: %(default)s; port 0: any free port)")
    p.add_argument("--tokens", required=True, metavar="FILE",
                   help="token file (docs/http-api.md); re-read when it changes")
    p.add_argument("--tls-cert", metavar="FILE", help="certificate chain (PEM) for https")
    p.add_argument("--tls-key", metavar="FILE", help="private key (PEM) for https")
    p.add_argument("--insecure-http", action="store_true",
                   help="allow plain http on a non-loopback address")
    p.add_argument("--max-object-size", default="256M", metavar="SIZE", type=options.size(1),
                   help="largest object a client may put (default: %(default)s)")
    p.add_argument("--body-memory", default="1G", metavar="SIZE", type=options.size(1),
                   help="request bodies held in memory at once (default: %(default)s)")
    p.add_argument("--max-connections", type=options.whole(1), default=64, metavar="N",
                   help="connections of token holders served at once; more get 503 "
                   "(default: %(default)s)")
    p.add_argument("--max-unauthenticated", type=options.whole(1), default=256, metavar="N",
                   help="connections that have not yet shown a valid token; when full, the "
                   "oldest is dropped (default: %(default)s)")
    p.add_argument("--header-timeout", default="20", metavar="SECONDS", type=options.seconds,
                   help="a request's line and headers (and the TLS handshake, on a new "
                   "connection) must arrive within this time (default: %(default)s)")
    p.add_argument("--idle-timeout", default="120", metavar="SECONDS", type=options.seconds,
                   help="close a connection idle this long between requests, or stalled "
                   "this long in a body (default: %(default)s)")
    p.add_argument("--gc-every", metavar="PERIOD", type=options.period,
                   help="run gc on every repository this often (e.g. 24h; s, h or d)")
    p.add_argument("--verify-every", metavar="PERIOD", type=options.period,
                   help="run a keyless verify of every repository this often (e.g. 7d)")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.add_argument("--debug", action="store_true",
                   help="log connection-level detail (as -v does)")
    p.set_defaults(func=cmd_server)

    p = options.add_command(
        sub, "token", summary="create a token for `snapship server`",
        description="""
        Create a random token, append its hash to the token file and print the token: this is
        the only time it is shown (the server keeps only the hash). A running server picks
        the new line up by itself. Roles: read restores; backup adds chunks and versions but
        can never delete or overwrite anything; admin may also prune, gc and verify.""",
        examples=["snapship token db1 --role backup --repos db1 --tokens /srv/snapship/tokens",
                  "snapship token ops --role admin --tokens /srv/snapship/tokens",
                  "snapship token audit --role read --repos db1,db2 --tokens tokens --json"],
        parents=options.parents())
    p.add_argument("name", help="the token's name, as the server logs it")
    p.add_argument("--role", required=True, choices=[r.value for r in Role],
                   help="read: restore; backup: add, never delete or overwrite; admin: all")
    p.add_argument("--repos", default="*", metavar="NAME[,NAME...]",
                   help="repositories it may use (default: every one)")
    p.add_argument("--tokens", required=True, metavar="FILE", help="token file to append to")
    p.set_defaults(func=cmd_token)
