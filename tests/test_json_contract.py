"""The --json contract (issue 11, section 2): every command's JSON against docs/json.md.

The schemas are read from docs/json.md itself (its ```json blocks with a `$schema`), so the
documentation cannot drift from what the commands print: every command that takes --json
(found by walking the real parser) must have a schema, and its output, from real CLI
subprocesses on a local repository, success and error alike, must validate against it. The
--on-server variants of gc and verify run through a real `snapship server` and must validate
against the same schemas as the local ones. The examples in the document are checked too,
and so are the error kinds: every exception class's kind is one the document lists.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

import snapship
from snapship.changes.cow import build_store
from snapship.cli.main import build_parser
from snapship.errors import SnapshipError
from tests.clihelp import (
    CHUNK,
    CLI,
    Result,
    cli_env,
    describe,
    image_bytes,
    init_repo_fast_kdf,
    ok,
    run_cli,
    write_image,
)
from tests.lvmhost import host_vg
from tests.serverproc import create_repo_fast_kdf, http_storage, run_cli_env, running_server

DOC = Path(__file__).resolve().parent.parent / "docs" / "json.md"
ERROR_ID = "urn:snapship:json:1:error"


# -- the document -------------------------------------------------------------------------


def json_blocks() -> list[Any]:
    text = DOC.read_text()
    return [json.loads(m.group(1)) for m in re.finditer(r"^```json\n(.*?)^```$", text,
                                                         re.S | re.M)]


SCHEMAS = [b for b in json_blocks() if isinstance(b, dict) and "$schema" in b]
EXAMPLES = [b for b in json_blocks() if not (isinstance(b, dict) and "$schema" in b)]
REGISTRY: Registry[Any] = Registry().with_resources(
    (s["$id"], Resource.from_contents(s, default_specification=DRAFT202012)) for s in SCHEMAS)
# A command whose output takes another shape under an option (restore --instant) has a schema
# per shape; the variants say so (`x-variant-of`) and are checked by id where they run.
BY_COMMAND = {s["properties"]["command"]["const"]: s for s in SCHEMAS
              if "const" in s.get("properties", {}).get("command", {})
              and "x-variant-of" not in s}
BY_ID = {s["$id"]: s for s in SCHEMAS}


def commands_with_json() -> list[str]:
    """Every command (and subcommand) whose parser takes --json after the command."""
    found = []

    def walk(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            if any("--json" in a.option_strings for a in parser._actions):
                found.append(" ".join(path))
            return
        for name, sub in subs[0].choices.items():
            walk(sub, (*path, name))

    walk(build_parser(), ())
    return sorted(found)


COMMANDS = commands_with_json()


def problems(schema: dict[str, Any], obj: Any) -> list[str]:
    validator = Draft202012Validator(schema, registry=REGISTRY)
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))]


def assert_valid(command: str, obj: Any) -> None:
    assert command in BY_COMMAND, f"docs/json.md has no schema for {command}"
    found = problems(BY_COMMAND[command], obj)
    assert not found, f"{command} --json does not match docs/json.md:\n" + "\n".join(found) \
        + "\n" + json.dumps(obj, indent=1)[:3000]


def error_object(r: Result) -> dict[str, Any]:
    """The error object of a failed --json command, checked against the error schema and
    against what the process did (its exit code, nothing on stdout)."""
    assert r.returncode != 0, describe(r)
    assert r.stdout == "", describe(r)
    lines = r.stderr.strip().splitlines()
    assert lines and not [line for line in lines[:-1] if line.startswith("{")], describe(r)
    obj: dict[str, Any] = json.loads(lines[-1])
    found = problems(BY_ID[ERROR_ID], obj)
    assert not found, "\n".join(found) + "\n" + describe(r)
    assert obj["error"]["exit_code"] == r.returncode, describe(r)
    return obj


# -- the document's own checks --------------------------------------------------------------


def test_every_schema_is_a_draft_2020_12_schema_with_an_id_of_its_own() -> None:
    assert len(SCHEMAS) >= len(COMMANDS) + 2  # the error object and the definitions too
    ids = [s["$id"] for s in SCHEMAS]
    assert len(ids) == len(set(ids)), ids
    for s in SCHEMAS:
        assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema", s["$id"]
        Draft202012Validator.check_schema(s)


def test_every_command_that_takes_json_has_a_schema_and_no_other_does() -> None:
    assert {"init", "backup", "versions", "gc", "cow inspect", "nbd serve", "token"} <= \
        set(COMMANDS)
    assert "server" not in COMMANDS  # it logs; docs/json.md says so
    assert sorted(BY_COMMAND) == COMMANDS
    for command, schema in BY_COMMAND.items():
        required = set(schema["required"])
        assert {"version", "command"} <= required, command
        assert schema["properties"]["version"] == {"const": 1}, command
        assert schema.get("additionalProperties") is False or \
            schema.get("unevaluatedProperties") is False, f"{command}: not strict"


def test_the_examples_in_the_document_match_their_schemas() -> None:
    assert len(EXAMPLES) >= 3
    for example in EXAMPLES:
        schema = BY_ID[ERROR_ID] if "error" in example else BY_COMMAND[example["command"]]
        assert not problems(schema, example), (example, problems(schema, example))


def every_error_class() -> Iterator[type[SnapshipError]]:
    for module in pkgutil.walk_packages(snapship.__path__, "snapship."):
        importlib.import_module(module.name)

    def under(cls: type[SnapshipError]) -> Iterator[type[SnapshipError]]:
        yield cls
        for sub in cls.__subclasses__():
            yield from under(sub)

    yield from under(SnapshipError)


def test_every_error_kind_is_documented() -> None:
    kinds = set(BY_ID[ERROR_ID]["properties"]["error"]["properties"]["kind"]["enum"])
    table = set(re.findall(r"^\| `([a-z-]+)` \|", DOC.read_text(), re.M))
    assert table == kinds, (table ^ kinds)
    classes = list(every_error_class())
    assert len(classes) > 15, classes
    for cls in classes:
        assert cls.__dict__.get("kind", cls.kind) in kinds, cls
    # What main adds: stops and bugs.
    assert {"interrupted", "terminated", "internal"} <= kinds


# -- every command, for real ----------------------------------------------------------------


@dataclass
class Outputs:
    ok: dict[str, list[Any]] = field(default_factory=dict)
    errors: list[tuple[str | None, dict[str, Any]]] = field(default_factory=list)

    def run(self, command: str, *args: Any, code: int = 0, **kw: Any) -> Any:
        """`snapship COMMAND ARGS... --json`: its object, kept for the schema check."""
        r = run_cli(*command.split(), *args, "--json", **kw)
        assert r.returncode == code, describe(r)
        obj = json.loads(r.stdout)
        self.ok.setdefault(command, []).append(obj)
        return obj

    def fail(self, argv: list[Any], kind: str, **kw: Any) -> dict[str, Any]:
        r = run_cli(*argv, **kw)
        obj = error_object(r)
        assert obj["error"]["kind"] == kind, describe(r)
        self.errors.append((obj["command"], obj))
        return obj


def flip_last_byte(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0x40
    path.write_bytes(bytes(blob))


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> Outputs:
    """Every command with --json, run on a local repository, in success and failure."""
    tmp = tmp_path_factory.mktemp("contract")
    out = Outputs()
    out.run("init", "--repo", tmp / "plain", "--encryption", "none")
    repo = tmp / "repo"
    init_repo_fast_kdf(repo)

    img = tmp / "disk.img"
    data = image_bytes(16 * CHUNK, seed=7, zero_chunks=(3, 4))
    write_image(img, data)
    first = out.run("backup", "--repo", repo, img, "--volume", "disk", "--label", "host=db1")
    for i in (0, 1):
        data[i * CHUNK : (i + 1) * CHUNK] = image_bytes(CHUNK, seed=20 + i)
        write_image(img, data)
        out.run("backup", "--repo", repo, img, "--volume", "disk")
    write_image(tmp / "other.img", image_bytes(3 * CHUNK + 5, seed=8))
    out.run("backup", "--repo", repo, tmp / "other.img", "--volume", "other")
    fs = tmp / "fs.img"  # a clean ext4: its free space is skipped and the skip recorded
    with open(fs, "wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(fs)], check=True)
    skipped = out.run("backup", "--repo", repo, fs, "--volume", "fs")
    assert skipped["stats"]["free_space"]["skipped"] is True
    out.run("show", "--repo", repo, "fs")
    v1 = first["version_id"]

    out.run("protect", "--repo", repo, f"disk@{v1[:19]}", "--note", "audit")
    out.run("protect", "--repo", repo, "other")
    out.run("unprotect", "--repo", repo, "other@latest")
    out.run("versions", "--repo", repo)
    out.run("versions", "--repo", repo, "--volume", "other")
    out.run("show", "--repo", repo, f"disk@{v1}")
    out.run("show", "--repo", repo, "disk")
    out.run("restore", "--repo", repo, "disk", tmp / "restored.img")
    out.run("restore", "--repo", repo, "--differential", f"disk@{v1}", tmp / "restored.img")
    out.run("verify", "--repo", repo)
    out.run("verify", "--repo", repo, "--deep", "--sample", "50", "--volume", "disk")
    out.run("verify", "--repo", repo, f"disk@{v1}", "--against", tmp / "restored.img")
    out.run("verify", "--repo", repo, "other", "--against", tmp / "restored.img", code=1)
    out.run("cow export", "--repo", repo, "disk", f"disk@{v1}", tmp / "old.cow")
    store = tmp / "snap.cow"
    store.write_bytes(build_store(8, {10: b"a", 11: b"b", 500: b"c"}))
    out.run("cow inspect", store, "--limit", "1")
    keyed = tmp / "keyed"
    init_repo_fast_kdf(keyed)
    (tmp / "second.pass").write_text("second passphrase\n")
    (tmp / "third.pass").write_text("third passphrase\n")
    added = out.run("key add", "--repo", keyed, "--label", "escrow", "--new-passphrase-file",
                    tmp / "second.pass")
    out.run("key list", "--repo", keyed)
    out.run("key passwd", "--repo", keyed, "--passphrase-file", tmp / "second.pass",
            "--new-passphrase-file", tmp / "third.pass", passphrase=None)
    first = next(k["id"] for k in out.run("key list", "--repo", keyed, "--passphrase-file",
                                          tmp / "third.pass", passphrase=None)["keys"]
                 if not k["current"])
    out.run("key remove", "--repo", keyed, first, "--passphrase-file", tmp / "third.pass",
            passphrase=None)
    assert added["key_id"] != first
    copied = tmp / "copied"
    init_repo_fast_kdf(copied)
    assert out.run("copy", "--from", repo, "--to", copied, "disk")["copied"]
    assert out.run("copy", "--from", repo, "--to", copied)["chunks_sent"] > 0
    out.run("token", "t1", "--role", "backup", "--repos", "db2,db1", "--tokens", tmp / "tok")
    out.run("token", "t2", "--role", "admin", "--tokens", tmp / "tok")

    # Damage: a flipped chunk (found by a deep verify: exit 1), a manifest that cannot be read.
    damaged = shutil.copytree(repo, tmp / "damaged")
    from snapship.repository.catalog import Catalog
    from snapship.storage.local import LocalStorage

    refs = Catalog(LocalStorage(str(damaged))).load_refs("disk", v1)
    cid = refs.ids[:32].hex()
    flip_last_byte(damaged / "chunks" / cid[:2] / cid)
    next((damaged / "versions" / "other").iterdir()).write_bytes(b"not a manifest")
    report = out.run("verify", "--repo", damaged, "--deep", code=1)
    assert report["affected_versions"] and report["bad_versions"], report
    rows = out.run("versions", "--repo", damaged)["versions"]
    assert any(r["damaged"] for r in rows) and any(r["unreadable"] for r in rows), rows
    shown = out.run("show", "--repo", damaged, f"disk@{v1}")
    assert shown["damaged"] and shown["protected"] == {"note": "audit"}, shown

    # Locks: none; a dead backup's and an unreadable one, listed and cleared.
    out.run("locks", "--repo", repo)
    (repo / "locks").mkdir(exist_ok=True)
    session = "20260101T000000-deadbeef0000"
    from snapship.repository import locks

    (repo / "locks" / f"writer-{session}").write_text(json.dumps({
        "v": 1, "kind": "writer", "session": session, "machine": locks.MACHINE,
        "pid": 4_000_001, "pid_start": "1", "started": "2026-01-01T00:00:00+00:00",
        "heartbeat": 0.0, "command": "backup disk"}))
    (repo / "locks" / "gc-20260101T000000-0123456789ab").write_text("not a lock")
    listed = out.run("locks", "--repo", repo, passphrase=None)
    assert len(listed["locks"]) == 2, listed
    cleared = out.run("locks", "--repo", repo, "--clear-stale", passphrase=None)
    assert len(cleared["cleared"]) == 2 and cleared["locks"] == [], cleared

    out.run("prune", "--repo", repo, "--keep-last", "1", "--dry-run", passphrase=None)
    out.run("prune", "--repo", repo, "--keep-last", "2", passphrase=None)
    versions = [r["ref"] for r in out.run("versions", "--repo", repo)["versions"]
                if r["volume"] == "disk"]
    out.run("forget", "--repo", repo, versions[-2], passphrase=None)
    out.run("gc", "--repo", repo)
    out.run("gc", "--repo", repo, passphrase=None)

    # nbd serve: one line, as soon as it listens.
    proc = subprocess.Popen([*CLI, "nbd", "serve", "--repo", str(repo), "--listen",
                             "127.0.0.1:0", "--json"], env=cli_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        serving = json.loads(line)
        out.ok.setdefault("nbd serve", []).append(serving)
        port = serving["listening"][0].rsplit(":", 1)[1]
        # A second server on that port: the error object, kind usage.
        out.fail(["nbd", "serve", "--repo", repo, "--listen", f"127.0.0.1:{port}", "--json"],
                 "usage")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 0

    # mount and umount: an ext4 image, mounted through nbdfuse and a loop device.
    content = tmp / "fs"
    content.mkdir()
    (content / "f").write_bytes(b"x" * 5000)
    fs = tmp / "fs.img"
    with open(fs, "wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(content), str(fs)], check=True)
    out.run("backup", "--repo", repo, fs, "--volume", "fs")
    mnt = tmp / "mnt"
    mnt.mkdir()
    out.run("mount", "--repo", repo, "fs", mnt)
    out.run("umount", mnt)
    out.fail(["mount", "--repo", repo, "fs", tmp / "nodir", "--json"], "usage")
    out.fail(["umount", mnt, "--json"], "not-found")

    # nbd checkpoint: a live export written through, then cut into a version.
    state = tmp / "live"
    proc = subprocess.Popen([*CLI, "nbd", "serve", "--repo", str(repo), "--listen",
                             "127.0.0.1:0", "--json", "--writable", "--state-dir", str(state)],
                            env=cli_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        serving = json.loads(proc.stdout.readline())
        out.ok["nbd serve"].append(serving)
        port = serving["listening"][0].rsplit(":", 1)[1]
        r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 64k",
                            f"nbd://127.0.0.1:{port}/other"], capture_output=True, timeout=60)
        assert r.returncode == 0, r
        cp = out.run("nbd checkpoint", "other", "--state-dir", state)
        assert cp["changed"] and cp["dirty_bytes"] == 64 << 10, cp
        out.fail(["nbd", "checkpoint", "nosuch", "--state-dir", state, "--json"], "usage")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 0
    out.fail(["nbd", "checkpoint", "other", "--state-dir", state, "--json"], "usage")

    # Errors, of every kind a local repository can give.
    out.fail(["versions", "--repo", tmp / "none", "--json"], "not-found")
    out.fail(["show", "--repo", repo, "disk@nope", "--json"], "not-found")
    out.fail(["restore", "--repo", repo, "nosuch", tmp / "x.img", "--json"], "not-found")
    out.fail(["versions", "--repo", repo, "--json"], "auth", passphrase="wrong")
    out.fail(["prune", "--repo", repo, "--json"], "usage")
    out.fail(["init", "--repo", repo, "--json"], "usage")
    out.fail(["forget", "--repo", repo, versions[-1], "--json"], "usage")
    out.fail(["token", "t1", "--role", "read", "--tokens", tmp / "tok", "--json"], "usage")
    out.fail(["backup", "--repo", repo, tmp / "missing.img", "--json"], "source")
    out.fail(["restore", "--repo", repo, "disk", tmp / "no-such-dir" / "x.img", "--json"],
             "target")
    out.fail(["cow", "inspect", img, "--json"], "format")
    out.fail(["verify", "--repo", repo, "--on-server", "--json"], "usage")
    out.fail(["--json", "prune", "--keep-last", "0"], "usage")
    out.fail(["--json", "no-such-command"], "usage")
    out.fail(["--json", "cow"], "usage")
    # The jobs file (docs/config.md): a run whose missing source fails alone (exit 1).
    jobs = tmp / "snapship.toml"
    jobs.write_text(f'version = 1\n[repositories.r]\nlocation = "{repo}"\n'
                    f'[volumes.disk]\nsource = "{img}"\nretention = {{ keep-last = 2 }}\n'
                    f'[volumes.gone]\nsource = "{tmp / "gone.img"}"\n'
                    'retention = { keep-last = 1 }\n'
                    '[jobs.j]\nvolumes = ["disk", "gone"]\nrepositories = ["r"]\ngc = true\n')
    ran = out.run("run", "--config", jobs, code=1)
    assert [(s["step"], s["outcome"]) for s in ran["steps"]] == [
        ("backup", "ok"), ("backup", "failed"), ("prune", "ok"), ("prune", "skipped"),
        ("gc", "ok")], ran
    out.run("config check", "--config", jobs)
    bad = tmp / "bad.toml"
    bad.write_text(jobs.read_text().replace("keep-last = 2", "keep-last = 0"))
    assert out.run("config check", "--config", bad, code=1)["problems"][0]["line"] == 6
    out.fail(["run", "--config", bad, "--json"], "usage")
    out.fail(["run", "--config", jobs, "nosuch", "--json"], "not-found")
    # A copy job (periodic sync) into a second repository: the run's `copy` step.
    init_repo_fast_kdf(tmp / "offsite")
    synced = tmp / "sync.toml"
    synced.write_text(jobs.read_text() + f'[repositories.o]\nlocation = "{tmp / "offsite"}"\n'
                      '[jobs.sync]\ncopy-from = "r"\nrepositories = ["o"]\nprune = false\n')
    ran = out.run("run", "sync", "--config", synced)
    assert [(s["step"], s["outcome"]) for s in ran["steps"]] == [("copy", "ok")], ran
    out.run("systemd install", "--config", jobs, "--unit-dir", tmp / "units", "--dry-run")
    out.run("systemd install", "--config", jobs, "--unit-dir", tmp / "units")
    # Snapshot space on a real VG of a loop device (docs/snapspace.md).
    (tmp / "lvm").mkdir()
    with host_vg(tmp / "lvm") as (vg, _):
        space_file = tmp / "lvm" / "space.img"
        out.run("snapspace add", vg, "--file", space_file, "--size", "32M", "--unit-dir",
                tmp / "units")
        out.run("snapspace status", vg, "--unit-dir", tmp / "units")
        out.run("snapspace status", "--unit-dir", tmp / "units")
        out.fail(["snapspace", "add", vg, "--file", space_file, "--size", "32M", "--json"],
                 "usage")
        out.fail(["snapspace", "remove", vg + "-no", "--json"], "not-found")
        out.run("snapspace remove", vg, "--unit-dir", tmp / "units", "--keep-file")

    with locks.Lock(LocalStorage(str(repo)), locks.GC, "gc").acquire():
        out.fail(["gc", "--repo", repo, "--json"], "busy")
    return out


@pytest.mark.parametrize("command", COMMANDS)
def test_the_json_of_every_command_matches_its_schema(outputs: Outputs, command: str) -> None:
    assert outputs.ok.get(command), f"the test ran no `{command} --json`: add it to outputs"
    for obj in outputs.ok[command]:
        assert obj["command"] == command and obj["version"] == 1
        assert_valid(command, obj)


def test_errors_under_json_match_the_error_schema(outputs: Outputs) -> None:
    kinds = {obj["error"]["kind"] for _command, obj in outputs.errors}
    assert {"not-found", "auth", "usage", "source", "target", "format", "busy"} <= kinds
    codes = {obj["error"]["kind"]: obj["error"]["exit_code"] for _c, obj in outputs.errors}
    assert codes["usage"] == 2 and codes["busy"] == 75 and codes["not-found"] == 1
    commands = {command for command, _obj in outputs.errors}
    assert {"versions", "prune", "gc", "cow inspect", "nbd serve", None} <= commands, commands


def test_schemas_are_strict_enough_to_notice_drift(outputs: Outputs) -> None:
    """An added field, a missing one, a wrong type: each fails validation."""
    for command in COMMANDS:
        obj = outputs.ok[command][0]
        assert problems(BY_COMMAND[command], {**obj, "surprise": 1}), command
        for key in obj:
            assert problems(BY_COMMAND[command], {k: v for k, v in obj.items() if k != key}), \
                (command, key)
    row = outputs.ok["versions"][0]["versions"][0]
    bad = {**outputs.ok["versions"][0], "versions": [{**row, "size": "big"}]}
    assert problems(BY_COMMAND["versions"], bad)


# -- on a server: the same schemas ---------------------------------------------------------


def test_gc_and_verify_on_the_server_match_the_local_schemas(tmp_path: Path) -> None:
    with running_server(tmp_path / "srv") as (server, tokens):
        url = server.url("db")
        create_repo_fast_kdf(http_storage(server, "db", tokens["ops"]))
        img = tmp_path / "disk.img"
        write_image(img, image_bytes(8 * CHUNK, seed=3))
        admin = {"SNAPSHIP_TOKEN": tokens["ops"]}

        def cli(*args: Any, env: dict[str, str] = admin) -> Result:
            return run_cli_env(*args, "--json", env=env)

        ok(cli("backup", "--repo", url, img, "--volume", "disk",
               env={"SNAPSHIP_TOKEN": tokens["db1-backup"]}))
        local: dict[str, Any] = {}
        for command, args, code in (("gc", (), 0), ("verify", (), 0),
                                    ("verify", ("--deep",), 0)):
            r = cli(command, "--repo", url, "--on-server", *args)
            assert r.returncode == code, describe(r)
            obj = json.loads(r.stdout)
            assert obj["on_server"] is True
            assert_valid(command, obj)
            local[command] = obj
        # Damage seen by the server's verify (keyless: a truncated chunk): exit 1.
        chunk = next(p for p in (server.root / "db" / "chunks").glob("*/*"))
        chunk.write_bytes(chunk.read_bytes()[:-1])
        r = cli("verify", "--repo", url, "--on-server", "--deep")
        assert r.returncode == 1, describe(r)
        damaged = json.loads(r.stdout)
        assert_valid("verify", damaged)
        assert damaged["bad_chunks"] and damaged["affected_versions"], damaged
        # The local variants print the same fields.
        r = run_cli("gc", "--repo", server.root / "db", "--json", passphrase=None)
        assert sorted(json.loads(ok(r).stdout)) == sorted(local["gc"])
        r = run_cli("verify", "--repo", server.root / "db", "--json")
        assert sorted(json.loads(r.stdout)) == sorted(local["verify"]), describe(r)
        # A role that may not: the error object, kind permission.
        r = cli("gc", "--repo", url, "--on-server",
                env={"SNAPSHIP_TOKEN": tokens["db1-backup"]})
        obj = error_object(r)
        assert obj["error"]["kind"] == "permission" and obj["command"] == "gc", obj
