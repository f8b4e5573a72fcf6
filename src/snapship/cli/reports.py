"""The one printer of each command's report: JSON and text from the same dict.

A command builds one dict of what it did (the object of docs/json.md, without `version` and
`command`) and hands it to `emit` with the function that describes it for people. So the
text and the JSON cannot say different things, and the variants of a command (gc and verify
run here or on a server, a version shown by `show` or just made by `backup`) print through
one function from the same fields: gc and verify report the same fields wherever they ran
(engine/gc.py's `GcReport` with the warnings it gave, engine/verify.py's
`VerifyReport.to_json()`); a server sends them as JSON, and its log uses the same words
(engine `describe`).

The builders of the version objects (`version_row`, `version_detail`) live here too: the
listing, `show` and `backup` describe a version alike.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from snapship.cli.output import JSON_VERSION, human_bytes, print_json
from snapship.errors import FormatError, UsageError

if TYPE_CHECKING:
    from snapship.formats.manifest import Manifest
    from snapship.formats.summary import Summary
    from snapship.repository.catalog import DamageMark

# The versions' codecs and the prune engine are imported by the reports that need them:
# `locks` and `--help` start without them (docs/perf.md, "Fixed costs").

Report = dict[str, Any]
Describe = Callable[[Report], Iterable[str]]


def emit(command: str, body: Report, describe: Describe, *, json: bool,
         one_line: bool = False) -> None:
    """Print a command's report: the JSON object (`version`, `command` and `body`) with
    --json, else the lines `describe` makes of that same object."""
    obj = {"version": JSON_VERSION, "command": command, **body}
    if json:
        print_json(obj, one_line=one_line)
    else:
        print("\n".join(describe(obj)))


def ref(volume: str, version: str) -> str:
    return f"{volume}@{version}"


def _labels(labels: dict[str, str] | None, sep: str = ",") -> str:
    return sep.join(f"{k}={v}" for k, v in sorted((labels or {}).items()))


# -- versions: the listing, show and backup ------------------------------------------------


def created_from_id(version: str) -> str | None:
    """When a version was made, as its id says (for a manifest that cannot be read), in the
    form manifests record it; None for an id that does not start with a time."""
    from snapship.engine.prune import version_time

    try:
        t = version_time(version)
    except UsageError:
        return None
    return t.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def marks(damage: DamageMark | None, note: str | None) -> Report:
    """A version's protection (`Catalog.protection_note`) and damage mark, as fields."""
    return {"protected": False if note is None else {"note": note},
            "damaged": False if damage is None else {"chunks": len(damage.chunks),
                                                     "deep": damage.deep}}


def version_row(volume: str, version: str, m: Summary | Manifest | None,
                unreadable: str | None, damage: DamageMark | None, note: str | None) -> Report:
    """One row of `versions`: `m` is its summary (or manifest), or None with why it cannot
    be read."""
    return {
        "volume": volume,
        "version_id": version,
        "ref": ref(volume, version),
        "created": m.created if m is not None else created_from_id(version),
        "size": m.size if m is not None else None,
        "source": m.source if m is not None else None,
        "parent": m.parent if m is not None else None,
        "labels": m.labels if m is not None else None,
        "new_bytes_stored": m.stats.get("bytes_new_stored", 0) if m is not None else None,
        **marks(damage, note),
        "unreadable": unreadable,
    }


def version_detail(m: Summary | Manifest, damage: DamageMark | None, note: str | None
                   ) -> Report:
    """What `show` (and `backup`, of the version it made) reports: the row, sizes, what the
    version costs in the repository, its ratios and the statistics of its backup."""
    from snapship.formats import summary as summary_codec
    from snapship.formats.manifest import Manifest

    if isinstance(m, Manifest):
        m = summary_codec.from_manifest(m)
    nonzero = m.chunks - m.zero_chunks
    s = m.stats
    return {
        **version_row(m.volume, m.version, m, None, damage, note),
        "chunk_size": m.chunk_size,
        "chunks": m.chunks,
        "zero_chunks": m.zero_chunks,
        "unique_chunks": m.unique_chunks,
        "data_bytes": m.data_bytes,
        "stored_bytes": m.stored_bytes,
        "dedup_ratio": round(nonzero / m.unique_chunks, 3) if m.unique_chunks else 1.0,
        # Decoding checked the types of these; older writers may have left some out.
        "compression_ratio": round(s.get("bytes_new", 0) / s["bytes_new_stored"], 3)
        if s.get("bytes_new_stored")
        else None,
        "duration": s.get("duration"),
        "stats": s,
    }


def _protection(r: Report) -> str:
    p = r["protected"]
    if p is False:
        return "no"
    return f"yes: {p['note']}" if p["note"] else "yes"


def _damage(r: Report) -> str:
    d = r["damaged"]
    if d is False:
        return "no"
    who = "a deep verify" if d["deep"] else "verify"
    if not d["chunks"]:
        return f"yes: {who} marked it (its list of the chunks cannot be read)"
    return f"yes: {who} found {d['chunks']} damaged chunk(s)"


def describe_row(r: Report) -> str:
    """A version in one line: name, date, size, what it added, its marks, its labels."""
    parts = [r["ref"], r["created"] or "-"]
    if r["unreadable"] is not None:
        parts.append(f"UNREADABLE: {r['unreadable']}")
    else:
        parts.append(f"{human_bytes(r['size']):>10}  +{human_bytes(r['new_bytes_stored']):>10} "
                     "new")
    p = r["protected"]
    if p is not False:
        parts.append(f"protected ({p['note']})" if p["note"] else "protected")
    if r["damaged"] is not False:
        parts.append("DAMAGED: " + _damage(r).removeprefix("yes: "))
    if r["labels"]:
        parts.append(_labels(r["labels"]))
    return "  ".join(parts)


def describe_versions(r: Report) -> list[str]:
    return [describe_row(row) for row in r["versions"]] or ["no versions"]


def describe_version(r: Report) -> list[str]:
    s = r["stats"]
    comp = r["compression_ratio"]
    lines = [
        f"version      {r['ref']}",
        f"created      {r['created']}  ({s.get('mode')}, {r['duration']} s)",
        f"source       {r['source']}",
        f"parent       {r['parent'] or '-'}",
        f"size         {human_bytes(r['size'])} ({r['size']} bytes), "
        f"{r['chunks']} chunks of {human_bytes(r['chunk_size'])}",
        f"data         {human_bytes(r['data_bytes'])} non-zero, "
        f"{r['zero_chunks']} zero chunks (not stored)",
        f"stored       {human_bytes(r['stored_bytes'])} in {r['unique_chunks']} unique chunks",
        f"new          {human_bytes(r['new_bytes_stored'])} added by this version "
        f"({s.get('chunks_new', 0)} chunks)",
        f"dedup        {r['dedup_ratio']}x within the version; compression of new data "
        + (f"{comp}x" if comp else "-"),
        f"read         {human_bytes(s.get('bytes_read', 0))} in {s.get('chunks_read')} chunks",
        *_free_space(s),
        *_snapshot(s),
        f"protected    {_protection(r)}",
        f"damaged      {_damage(r)}",
    ]
    if r["labels"]:
        lines.append("labels       " + _labels(r["labels"], ", "))
    return lines


def _free_space(s: dict[str, Any]) -> list[str]:
    """What the backup knew to be zero and did not read (stats.free_space), if recorded."""
    f = s.get("free_space")
    if not isinstance(f, dict):
        return []
    lines = [f"free space   {f.get('note', '-')}"]
    if f.get("chunks_skipped") or f.get("bytes_zeroed"):
        lines.append(f"skipped      {human_bytes(f.get('bytes_skipped', 0))} not read "
                     f"({f.get('chunks_skipped', 0)} zero chunks), "
                     f"{human_bytes(f.get('bytes_zeroed', 0))} zeroed in chunks read")
    return lines


def _snapshot(s: dict[str, Any]) -> list[str]:
    """The classic tracking snapshot the backup left (stats.snapshot), if recorded."""
    snap = s.get("snapshot")
    if not isinstance(snap, dict) or not isinstance(snap.get("size"), int):
        return []
    pvs = snap.get("pvs")
    where = ", ".join(map(str, pvs)) if isinstance(pvs, list) and pvs else "the volume group"
    note = snap.get("note") or snap.get("requested")
    return [f"snapshot     {human_bytes(snap['size'])} on {where}"
            + (f" ({note})" if isinstance(note, str) else "")]


def describe_backup(r: Report) -> list[str]:
    s = r["stats"]
    duration = s.get("duration") or 0.0
    rate = r["size"] / duration if duration else 0.0
    return [f"{r['ref']}: {human_bytes(r['size'])} backed up in {duration:.1f} s "
            f"({human_bytes(rate)}/s); read {human_bytes(s.get('bytes_read', 0))}, "
            f"{s.get('chunks_new', 0)} new chunks ({human_bytes(r['new_bytes_stored'])} "
            "stored)", *_free_space(s)[1:]]


def describe_restore(r: Report) -> list[str]:
    rate = r["size"] / r["duration"] if r["duration"] else 0.0
    line = (f"restored {r['ref']} to {r['target']}: {human_bytes(r['size'])} in "
            f"{r['duration']:.1f} s ({human_bytes(rate)}/s)")
    if r.get("mode", "full") == "full":
        return [line]
    lines = [line + f", {r['mode']}"]
    rb = r.get("rollback")
    if rb is not None:
        lines.append(f"since {r['volume']}@{rb['newest']} was backed up: "
                     f"{rb['changed_since_backup']} chunks written on the LV "
                     f"({rb['change_source']}), {rb['differ_from_newest']} differ in the version")
    lines.append((f"compared {r['chunks_compared']} of {r['chunks']} chunks; "
                  if r["mode"] == "differential" else "")
                 + f"fetched {r['chunks_fetched']} ({human_bytes(r['bytes_fetched'])}); "
                 f"wrote {r['chunks_written'] + r['chunks_zero']} of {r['chunks']} "
                 f"({r['chunks_zero']} of them zero)")
    return lines


def describe_init(r: Report) -> list[str]:
    return [f"created repository {r['repository']} (chunk size {human_bytes(r['chunk_size'])}, "
            f"encryption {r['encryption']})"]


# -- the lifecycle ------------------------------------------------------------------------


def describe_prune(r: Report) -> list[str]:
    lines = []
    for vol, decisions in r["volumes"].items():
        for d in decisions:
            if d["keep"]:
                lines.append(f"keep    {ref(vol, d['version_id'])}  ({', '.join(d['reasons'])})")
            else:
                lines.append(f"forget  {ref(vol, d['version_id'])}")
    verb = "would forget" if r["dry_run"] else "forgot"
    lines.append(f"{verb} {len(r['forgotten'])} version(s); gc will free "
                 f"{human_bytes(r['bytes_freeable'])} in {r['chunks_freeable']} chunks"
                 + ("" if r["dry_run"] else " (run `snapship gc`)"))
    return lines


def describe_forget(r: Report) -> list[str]:
    return [*(f"forgot {name}" for name in r["forgotten"]),
            f"gc will free {human_bytes(r['bytes_freeable'])} in {r['chunks_freeable']} chunks "
            "(run `snapship gc`)"]


def describe_protect(r: Report) -> list[str]:
    if r["command"] == "unprotect":
        return [f"unprotected {name}" for name in r["unprotected"]]
    note = f" ({r['note']})" if r["note"] else ""
    return [f"protected {name}{note}" for name in r["protected"]]


def lock_row(kind: str, session: str, command: str, pid: int, machine: str, started: str,
             alive: bool, problem: str) -> Report:
    """A lock as `locks` lists it; an object that is no readable lock has only its `problem`
    (and what its key says)."""
    if problem:
        return {"kind": kind, "session": session, "command": None, "pid": None,
                "machine": None, "started": None, "alive": alive, "problem": problem}
    return {"kind": kind, "session": session, "command": command, "pid": pid,
            "machine": machine.split("/", 1)[0], "started": started, "alive": alive,
            "problem": None}


def _describe_lock(row: Report) -> str:
    if row["problem"] is not None:
        return (f"{row['kind']:6} {row['session']}  UNREADABLE: {row['problem']}"
                + ("" if row["alive"] else " (--clear-stale removes it)"))
    state = "" if row["alive"] else "  STALE (--clear-stale removes it)"
    return (f"{row['kind']:6} {row['command']}  pid {row['pid']} on {row['machine']} "
            f"since {row['started']}{state}")


def describe_locks(r: Report) -> list[str]:
    # What --clear-stale removed was said as it happened (warnings); the list is what is left.
    return [_describe_lock(row) for row in r["locks"]] or ["no locks"]


def print_gc(r: Report, *, json: bool, on_server: bool = False) -> None:
    """A gc report (local, or a server's reply: only the fields of docs/json.md)."""
    from snapship.engine import gc  # the engines: only for the commands that report them

    names = [f.name for f in dataclasses.fields(gc.GcReport)] + ["warnings"]
    where = "gc on the server" if on_server else "gc"
    emit("gc", {"on_server": on_server, **_fields(r, names, "gc report")},
         lambda obj: gc.describe(obj, where), json=json)


def print_verify(r: Report, *, json: bool, on_server: bool = False) -> int:
    """Print the report (local, or a server's reply); the exit code it means (0 ok, 1 damage
    found)."""
    from snapship.engine import verify

    names = list(verify.VerifyReport().to_json())
    where = "verify on the server" if on_server else "verify"
    body = _fields(r, names, "verify report")
    emit("verify", {"on_server": on_server, **body}, lambda obj: verify.describe(obj, where),
         json=json)
    return 0 if body["ok"] else 1


def _fields(r: Report, names: list[str], what: str) -> Report:
    """The documented fields of a report (a server of another release may send more)."""
    missing = [n for n in names if n not in r]
    if missing:
        raise FormatError(f"the {what} lacks {', '.join(missing)}")
    return {n: r[n] for n in names}
