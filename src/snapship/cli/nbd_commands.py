"""`snapship nbd serve`: every version of the repository as an NBD export."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any

from snapship.cli import options
from snapship.cli.context import open_repository
from snapship.cli.reports import emit
from snapship.cli.transfer_commands import parse_labels
from snapship.engine.pipeline import default_workers
from snapship.errors import UsageError
from snapship.formats.manifest import Manifest
from snapship.nbd.commit import commit_overlay
from snapship.nbd.exports import VersionImage
from snapship.nbd.handshake import TlsMode
from snapship.nbd.names import ExportNames
from snapship.nbd.overlay import Overlay
from snapship.nbd.registry import Committer, OverlayRegistry
from snapship.nbd.server import NbdServer, ServerOptions, make_tls_context
from snapship.repository.repo import Repository

DEFAULT_PORT = 10809


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT, or HOST alone (port 10809)."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":") if sep else ""
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = text, ""
    if not host:
        raise argparse.ArgumentTypeError(f"{text!r} names no host (use e.g. "
                                         f"127.0.0.1:{DEFAULT_PORT})")
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or int(port_text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: port {port_text!r} is not a number 0-65535")
    return host, int(port_text)


def _committer(repo: Repository, labels: dict[str, str]) -> Committer:
    def commit(image: VersionImage, overlay: Overlay) -> Manifest:
        return commit_overlay(repo, image.volume, image.version, overlay, labels)

    return commit


def build_options(args: argparse.Namespace) -> ServerOptions:
    if args.commit and not args.writable:
        raise UsageError("--commit needs --writable")
    if (args.label or args.overlay_dir) and not args.writable:
        raise UsageError("--label and --overlay-dir need --writable")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("TLS needs both --tls-cert and --tls-key")
    if (args.tls or args.tls_client_ca) and not args.tls_cert:
        raise UsageError("--tls and --tls-client-ca need --tls-cert and --tls-key")
    if args.writable:
        try:  # refuse a directory that cannot hold overlays now, not at the first client
            Overlay(0, args.overlay_dir).close()
        except OSError as e:
            where = args.overlay_dir or "the temporary directory"
            raise UsageError(f"cannot make overlay files in {where}: {e.strerror or e}") from None
    ssl_context = None
    tls = TlsMode.OFF
    if args.tls_cert:
        tls = TlsMode(args.tls or "require")
        ssl_context = make_tls_context(args.tls_cert, args.tls_key, args.tls_client_ca)
    return ServerOptions(
        writable=args.writable,
        tls=tls,
        ssl_context=ssl_context,
        cache_bytes=args.cache_size,
        readahead_bytes=args.readahead,
        workers=args.workers or default_workers(),
    )


def cmd_serve(args: argparse.Namespace) -> int:
    host, port = args.listen
    server_options = build_options(args)
    labels = parse_labels(args.label)
    repo = open_repository(args)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("snapship nbd: %(message)s"))
    log = logging.getLogger("snapship.nbd")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if args.debug or args.verbose else
                 logging.WARNING if args.quiet else logging.INFO)
    return asyncio.run(_serve(args, repo, host, port, server_options, labels))


async def _serve(args: argparse.Namespace, repo: Repository, host: str, port: int,
                 opts: ServerOptions, labels: dict[str, str]) -> int:  # fmt: skip
    registry = None
    if opts.writable:
        registry = OverlayRegistry(args.overlay_dir,
                                   _committer(repo, labels) if args.commit else None)
    server = NbdServer(ExportNames(repo, read_only=not opts.writable), registry, opts)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    try:
        addresses = await server.start(host, port)
        listening = [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in addresses]
        emit("nbd serve", {"repository": repo.storage.describe(), "listening": listening,
                           "writable": opts.writable, "commit": bool(args.commit),
                           "tls": opts.tls.value}, describe_serving, json=args.json,
             one_line=True)
        sys.stdout.flush()
        await stop.wait()
    finally:
        await server.close()
    return 0


def describe_serving(r: dict[str, Any]) -> list[str]:
    mode = "read-only" if not r["writable"] else (
        "writable, overlays committed as new versions" if r["commit"]
        else "writable, overlays discarded")
    return [f"serving {r['repository']} on {', '.join(r['listening'])} ({mode}, "
            f"TLS {r['tls']})"]


def register(sub: options.SubParsers) -> None:
    nbd = options.add_command(
        sub, "nbd", summary="serve versions over the Network Block Device protocol",
        description="""
        Serve the repository's versions as NBD exports, for nbdcopy, nbdinfo, qemu-img or
        the kernel's nbd-client (docs/nbd.md).""",
        examples=["snapship nbd serve", "nbdinfo --list nbd://127.0.0.1"])
    nbd_sub = nbd.add_subparsers(dest="nbd_command", required=True, metavar="COMMAND",
                                 title="commands")
    p = options.add_command(
        nbd_sub, "serve", summary="serve every version as an NBD export",
        description="""
        Serve every version of the repository as an NBD export, read-only unless --writable.
        Export names: VOLUME@VERSION (an id, a unique prefix or 'latest') and VOLUME (its
        newest version). Writes go to a copy-on-write overlay, never into a version; with
        --commit, an overlay is stored as a new version when its last client disconnects
        cleanly. SIGTERM, SIGINT or SIGHUP stop it gracefully. See docs/nbd.md.""",
        examples=["snapship nbd serve",
                  "nbdcopy nbd://127.0.0.1/root@20261126-0930 root.img",
                  "snapship nbd serve --listen 0.0.0.0:10809 --tls-cert c.pem --tls-key k.pem",
                  "snapship nbd serve --writable --commit --label via=nbd"],
        parents=options.parents(repo=True, key=True))
    p.add_argument("--listen", default=f"127.0.0.1:{DEFAULT_PORT}", metavar="HOST:PORT",
                   type=parse_listen,
                   help="address to listen on (default: %(default)s; port 0 picks a free one)")
    p.add_argument("--writable", action="store_true",
                   help="accept writes into a copy-on-write overlay (the versions never change)")
    p.add_argument("--commit", action="store_true",
                   help="with --writable: when the last client of an export disconnects "
                   "cleanly, store its overlay as a new version (default: discard it)")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                   help="label for versions made by --commit (repeatable)")
    p.add_argument("--overlay-dir", metavar="DIR",
                   help="where overlay files live (default: the system temporary directory)")
    p.add_argument("--tls-cert", metavar="FILE", help="server certificate (PEM) for TLS")
    p.add_argument("--tls-key", metavar="FILE", help="its private key (PEM)")
    p.add_argument("--tls-client-ca", metavar="FILE",
                   help="require client certificates signed by this CA (PEM)")
    p.add_argument("--tls", choices=[TlsMode.ALLOW.value, TlsMode.REQUIRE.value],
                   help="with a certificate: 'require' refuses clients that do not start TLS "
                   "(the default), 'allow' lets them choose")
    p.add_argument("--cache-size", default="256M", metavar="SIZE", type=options.size(0),
                   help="memory for decoded chunks; 0: none (default: %(default)s)")
    p.add_argument("--readahead", default="8M", metavar="SIZE", type=options.size(0),
                   help="how far ahead of a sequential reader to fetch (default: %(default)s)")
    p.add_argument("--workers", type=options.whole(1), metavar="N",
                   help="threads decoding chunks (default: one per CPU)")
    p.add_argument("--debug", action="store_true",
                   help="log every connection and every refused request (as -v does)")
    p.set_defaults(func=cmd_serve)
