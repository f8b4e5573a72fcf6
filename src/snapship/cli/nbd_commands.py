"""`snapship nbd serve`: every version of the repository as an NBD export; `snapship nbd
checkpoint`: a version cut from a running server's live export."""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal
import sys
from pathlib import Path
from typing import Any

from snapship.cli import options
from snapship.cli.context import open_repository
from snapship.cli.reports import emit
from snapship.cli.transfer_commands import parse_labels
from snapship.engine.pipeline import default_workers
from snapship.errors import UsageError
from snapship.formats.manifest import Manifest
from snapship.nbd import authz as az
from snapship.nbd.commit import commit_overlay
from snapship.nbd.control import ControlServer, request_checkpoint
from snapship.nbd.durable import DurableLayer
from snapship.nbd.exports import VersionImage
from snapship.nbd.handshake import TlsMode
from snapship.nbd.live import LiveRegistry, StateDirLock
from snapship.nbd.names import ExportNames
from snapship.nbd.overlay import Overlay
from snapship.nbd.registry import Committer, OverlayRegistry, Registry
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


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """N with an optional unit s, m, h or d (e.g. 90s, 15m, 1h), above zero: in seconds."""
    match = _DURATION.fullmatch(text.strip())
    if not match or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 90s, 15m or 1h")
    return float(match[1]) * _DURATION_UNITS[match[2]]


def _committer(repo: Repository, labels: dict[str, str]) -> Committer:
    def commit(image: VersionImage, overlay: Overlay) -> Manifest:
        return commit_overlay(repo, image.volume, image.version, overlay, labels)

    return commit


def build_options(args: argparse.Namespace) -> ServerOptions:
    if args.commit and not args.writable:
        raise UsageError("--commit needs --writable")
    if (args.label or args.overlay_dir or args.state_dir) and not args.writable:
        raise UsageError("--label, --overlay-dir and --state-dir need --writable")
    if args.state_dir and (args.commit or args.overlay_dir):
        raise UsageError("--state-dir keeps overlays and cuts checkpoints: it takes neither "
                         "--commit nor --overlay-dir")
    if (args.checkpoint_every or args.checkpoint_on_flush) and not args.state_dir:
        raise UsageError("--checkpoint-every and --checkpoint-on-flush need --state-dir")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("TLS needs both --tls-cert and --tls-key")
    if (args.tls or args.tls_client_ca) and not args.tls_cert:
        raise UsageError("--tls and --tls-client-ca need --tls-cert and --tls-key")
    if args.tls_authz and not args.tls_client_ca:
        raise UsageError("--tls-authz needs --tls-client-ca: it authorizes client certificates")
    if args.tls_authz and args.tls == TlsMode.ALLOW.value:
        raise UsageError("--tls-authz needs --tls require: a client without TLS has no "
                         "certificate to authorize")
    if args.writable and not args.state_dir:
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
        authz=load_authz(args.tls_authz) if args.tls_authz else None,
        cache_bytes=args.cache_size,
        readahead_bytes=args.readahead,
        workers=args.workers or default_workers(),
    )


def load_authz(path: str) -> az.Authz:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read the TLS authorization file {path}: "
                         f"{getattr(e, 'strerror', None) or e}") from None
    try:
        return az.parse(text)
    except az.AuthzError as e:
        raise UsageError(f"TLS authorization file {path}: {e}") from None


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
    names = ExportNames(repo, read_only=not opts.writable)
    registry: Registry | None = None
    control: ControlServer | None = None
    lock: StateDirLock | None = None
    if args.state_dir:
        lock = StateDirLock(Path(args.state_dir))
        live = _live_registry(args, repo, names, labels)
        await asyncio.to_thread(live.load)
        control = ControlServer(live)
        registry = live
    elif opts.writable:
        registry = OverlayRegistry(args.overlay_dir,
                                   _committer(repo, labels) if args.commit else None)
    server = NbdServer(names, registry, opts)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    try:
        if control is not None:
            await control.start()
            assert isinstance(registry, LiveRegistry)
            registry.start()
        addresses = await server.start(host, port)
        listening = [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in addresses]
        emit("nbd serve", {"repository": repo.storage.describe(), "listening": listening,
                           "writable": opts.writable, "commit": bool(args.commit),
                           "state_dir": args.state_dir, "tls": opts.tls.value},
             describe_serving, json=args.json, one_line=True)
        sys.stdout.flush()
        await stop.wait()
    finally:
        if control is not None:
            await control.close()
        await server.close()
        if lock is not None:
            lock.release()
    return 0


def _live_registry(args: argparse.Namespace, repo: Repository, names: ExportNames,
                   labels: dict[str, str]) -> LiveRegistry:  # fmt: skip
    def open_version(volume: str, version: str) -> VersionImage | None:
        return names.open(f"{volume}@{version}")

    def commit(image: VersionImage, layer: DurableLayer) -> Manifest:
        return commit_overlay(repo, image.volume, image.version, layer, labels,
                              command="nbd checkpoint")

    return LiveRegistry(Path(args.state_dir), open_version, commit,
                        checkpoint_every=args.checkpoint_every,
                        checkpoint_on_flush=args.checkpoint_min_interval
                        if args.checkpoint_on_flush else None)


def cmd_checkpoint(args: argparse.Namespace) -> int:
    answer = request_checkpoint(Path(args.state_dir), args.export)
    emit("nbd checkpoint", {
        "volume": answer["volume"], "version_id": answer["checkpoint"],
        "ref": f"{answer['volume']}@{answer['checkpoint']}", "changed": answer["changed"],
        "dirty_bytes": answer["dirty_bytes"], "seconds": answer["seconds"]},
        describe_checkpoint, json=args.json)
    return 0


def describe_checkpoint(r: dict[str, Any]) -> list[str]:
    if not r["changed"]:
        return [f"{r['ref']} (nothing written since it)"]
    return [f"{r['ref']} ({r['dirty_bytes']} bytes changed, {r['seconds']} s)"]


def describe_serving(r: dict[str, Any]) -> list[str]:
    mode = "read-only" if not r["writable"] else (
        "writable, overlays kept in a state directory" if r["state_dir"] else
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
        cleanly. With --state-dir, each volume has one live export whose overlay is durable
        (FLUSH, FUA) and survives restarts, and checkpoints store it as versions while
        clients stay connected (a mirror leg: docs/live.md). SIGTERM, SIGINT or SIGHUP stop
        it gracefully. See docs/nbd.md.""",
        examples=["snapship nbd serve",
                  "nbdcopy nbd://127.0.0.1/root@20261126-0930 root.img",
                  "snapship nbd serve --listen 0.0.0.0:10809 --tls-cert c.pem --tls-key k.pem",
                  "snapship nbd serve --writable --commit --label via=nbd",
                  "snapship nbd serve --writable --state-dir /var/lib/snapship/live "
                  "--checkpoint-every 15m"],
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
    p.add_argument("--state-dir", metavar="DIR",
                   help="with --writable: keep each volume's overlay in DIR, durable on FLUSH "
                   "and FUA and across restarts, one live export per volume (docs/nbd.md)")
    p.add_argument("--checkpoint-every", metavar="DURATION", type=duration,
                   help="with --state-dir: store each live export that changed as a new "
                   "version this often (e.g. 15m)")
    p.add_argument("--checkpoint-on-flush", action="store_true",
                   help="with --state-dir: store a live export as a new version after a "
                   "client's FLUSH, at most once per --checkpoint-min-interval")
    p.add_argument("--checkpoint-min-interval", metavar="DURATION", type=duration,
                   default=60.0,
                   help="least time between checkpoints made on a FLUSH (default: 60s)")
    p.add_argument("--tls-cert", metavar="FILE", help="server certificate (PEM) for TLS")
    p.add_argument("--tls-key", metavar="FILE", help="its private key (PEM)")
    p.add_argument("--tls-client-ca", metavar="FILE",
                   help="require client certificates signed by this CA (PEM)")
    p.add_argument("--tls-authz", metavar="FILE",
                   help="with --tls-client-ca: which volumes each client certificate (by its "
                   "CN or DNS names) may reach; others are hidden (docs/nbd.md, TLS)")
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

    c = options.add_command(
        nbd_sub, "checkpoint", summary="store a running live export as a new version",
        description="""
        Ask the server running on a state directory (snapship nbd serve --writable
        --state-dir DIR) to store the live export of EXPORT (a volume) as a new version, at
        a FLUSH boundary, without disconnecting its clients. Prints the new version once it
        is stored. See docs/nbd.md.""",
        examples=["snapship nbd checkpoint root --state-dir /var/lib/snapship/live"],
        parents=options.parents())
    c.add_argument("export", metavar="EXPORT", help="the live export's volume")
    c.add_argument("--state-dir", metavar="DIR", required=True,
                   help="the state directory of the running server")
    c.set_defaults(func=cmd_checkpoint)
