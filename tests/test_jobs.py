"""Declared jobs (issue 15, item 1): the jobs file, `snapship config check`, `snapship run`.

The run is real: CLI subprocesses on two local repositories (one passphrase from a file, one
from a command, no $SNAPSHIP_PASSPHRASE), three volumes, one of whose source is missing.
The checks of the file are run on the pure module, one mistake at a time, each with the
line it must be reported at.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from snapship.jobs import config as jobs_config
from snapship.jobs.config import ConfigInvalid, check, key_lines, parse
from snapship.repository.catalog import Catalog
from snapship.storage.local import LocalStorage
from tests.clihelp import (
    CHUNK,
    PASSPHRASE,
    describe,
    image_bytes,
    init_repo_fast_kdf,
    run_cli,
    sha256_file,
    write_image,
)

DOCS = Path(__file__).resolve().parent.parent / "docs" / "config.md"


def jobs_file(tmp: Path, one: Path, two: Path) -> str:
    (tmp / "pass").write_text(PASSPHRASE + "\n")
    return f"""\
version = 1

[repositories.one]
location = "{one}"
passphrase-file = "{tmp / "pass"}"

[repositories.two]
location = "file://{two}"
passphrase-command = "cat '{tmp / "pass"}'"

[volumes.a]
source = "{tmp / "a.img"}"
labels = {{ host = "db1" }}
retention = {{ keep-last = 1 }}

[volumes.b]
source = "{tmp / "b.img"}"
volume = "bee"

[volumes.b.retention]
keep-last = 1

[volumes.gone]
source = "{tmp / "gone.img"}"
retention = {{ keep-last = 1 }}

[jobs.nightly]
volumes = ["a", "b", "gone"]
repositories = ["one", "two"]
schedule = "*-*-* 02:00:00"
gc = true
"""


def versions(repo: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for vol, ver in Catalog(LocalStorage(str(repo))).versions():
        out.setdefault(vol, []).append(ver)
    return out


def test_run_backs_up_prunes_and_gcs_and_a_missing_source_fails_alone(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    init_repo_fast_kdf(one)
    init_repo_fast_kdf(two)
    write_image(tmp_path / "a.img", image_bytes(6 * CHUNK, seed=1))
    write_image(tmp_path / "b.img", image_bytes(3 * CHUNK + 100, seed=2))
    config = tmp_path / "snapship.toml"
    config.write_text(jobs_file(tmp_path, one, two))

    r = run_cli("run", "--config", config, passphrase=None)
    assert r.returncode == 1, describe(r)
    failed = r.stderr.strip().splitlines()
    # The log names each failure: job, volume, repository, what went wrong; one line each.
    assert len(failed) == 2, describe(r)
    for line, name in zip(failed, ("one", "two"), strict=True):
        assert line.startswith(f"snapship: error: nightly: backup gone -> {name}: FAILED "
                               "(source): ") and "gone.img" in line, line
    lines = r.stdout.splitlines()
    said = [re.sub(r": (ok|skipped).*", "", line) for line in lines[:-1]]
    assert said == [f"nightly: {step}" for name in ("one", "two") for step in (
        f"backup a -> {name}", f"backup b -> {name}", f"prune a in {name}",
        f"prune b in {name}", f"prune gone in {name}", f"gc {name}")], describe(r)
    assert "nightly: prune gone in one: skipped: its backup failed" in lines, describe(r)
    assert lines[-1] == "run nightly: 14 steps, 2 FAILED", describe(r)
    first = {str(repo): versions(repo) for repo in (one, two)}
    for repo in (one, two):
        assert sorted(first[str(repo)]) == ["a", "bee"], first
        assert all(len(v) == 1 for v in first[str(repo)].values()), first

    # A second run, with a changed image: keep-last 1 forgets the first versions and gc
    # gives back the chunks only they used; the JSON says so, step by step.
    write_image(tmp_path / "a.img", image_bytes(6 * CHUNK, seed=3))
    r = run_cli("run", "nightly", "--config", config, "--json", passphrase=None)
    assert r.returncode == 1, describe(r)
    obj = json.loads(r.stdout)
    assert obj["ok"] is False and obj["jobs"] == ["nightly"]
    steps = [(s["step"], s["repository"], s["volume"], s["outcome"]) for s in obj["steps"]]
    assert steps == [step for name in ("one", "two") for step in (
        ("backup", name, "a", "ok"), ("backup", name, "b", "ok"),
        ("backup", name, "gone", "failed"), ("prune", name, "a", "ok"),
        ("prune", name, "b", "ok"), ("prune", name, "gone", "skipped"),
        ("gc", name, None, "ok"))], steps
    by = {(s["step"], s["repository"], s["volume"]): s for s in obj["steps"]}
    for repo_name, repo in (("one", one), ("two", two)):
        now = versions(repo)
        assert all(len(v) == 1 for v in now.values()) and now != first[str(repo)], now
        a = by[("backup", repo_name, "a")]["result"]
        assert a["labels"] == {"host": "db1"} and a["parent"] == first[str(repo)]["a"][0], a
        assert by[("prune", repo_name, "a")]["result"]["forgotten"] == \
            [f"a@{first[str(repo)]['a'][0]}"]
        gc = by[("gc", repo_name, None)]["result"]
        assert gc["chunks_freed"] == 6 and gc["finished"], gc  # a's six old chunks
        gone = by[("backup", repo_name, "gone")]
        assert gone["error"]["kind"] == "source" and gone["result"] is None, gone

    # Only the named job runs; a job the file lacks is an error naming it.
    r = run_cli("run", "weekly", "--config", config, passphrase=None)
    assert r.returncode == 1 and "no job 'weekly'" in r.stderr, describe(r)


def test_a_wrong_passphrase_fails_that_repositorys_steps_only(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    init_repo_fast_kdf(one)
    init_repo_fast_kdf(two)
    write_image(tmp_path / "a.img", image_bytes(2 * CHUNK, seed=1))
    write_image(tmp_path / "b.img", image_bytes(2 * CHUNK, seed=2))
    config = tmp_path / "snapship.toml"
    config.write_text(jobs_file(tmp_path, one, two).replace(
        "passphrase-command = \"cat", "passphrase-command = \"echo wrong; cat"))
    r = run_cli("run", "--config", config, "--json", passphrase=None)
    assert r.returncode == 1, describe(r)
    steps = json.loads(r.stdout)["steps"]
    outcome = {(s["step"], s["repository"], s["volume"]): s["outcome"] for s in steps}
    assert outcome[("backup", "one", "a")] == "ok" and outcome[("gc", "one", None)] == "ok"
    kinds = {s["error"]["kind"] for s in steps if s["repository"] == "two" and s["error"]}
    assert kinds == {"auth"}, steps  # opened once: every step there fails with its error
    assert outcome[("backup", "two", "a")] == "failed" and outcome[("gc", "two", None)] == \
        "failed", steps


# -- config check: each kind of mistake, with its line ------------------------------------------

GOOD = """\
version = 1

[repositories.r]
location = "/srv/repo"

[volumes.v]
source = "/dev/sda1"

[volumes.v.retention]
keep-last = 2

[jobs.j]
volumes = ["v"]
repositories = ["r"]
"""

MISTAKES = [
    # (what, replace this, with that, line, words of the message)
    ("syntax", 'source = "/dev/sda1"', 'source = "/dev/sda1', 7, "not valid TOML"),
    ("unknown key", "keep-last = 2", "keep-lats = 2", 10, "unknown key volumes.v.retention"),
    ("wrong type", "keep-last = 2", 'keep-last = "2"', 10, "whole number"),
    ("out of range", "keep-last = 2", "keep-last = 0", 10, "whole number of 1 or more"),
    ("undefined name", 'repositories = ["r"]', 'repositories = ["r", "offsite"]', 14,
     "'offsite', which the file does not define"),
    ("missing key", 'source = "/dev/sda1"', 'labels = { a = "b" }', 6, "volumes.v needs source"),
    ("bad duration", "keep-last = 2", 'keep-within = "7 days"', 10, "invalid duration"),
    ("lvm option on a file", 'source = "/dev/sda1"',
     'source = "/dev/sda1"\npre-snapshot = "sync"', 8, "is for lvm:VG/LV sources"),
    ("both passphrases", 'location = "/srv/repo"',
     'location = "/srv/repo"\npassphrase-file = "/p"\npassphrase-command = "cat /p"', 6,
     "not both"),
    ("bad volume name", 'source = "/dev/sda1"', 'source = "/dev/sda1"\nvolume = "a/b"', 8,
     "invalid volume name"),
    ("version", "version = 1", "version = 2", 1, "version = 1 is needed"),
    ("bad lvm source", 'source = "/dev/sda1"', 'source = "lvm:vg0"', 7, "lvm:VG/LV"),
    ("snapshot-pv not a list", 'source = "/dev/sda1"',
     'source = "lvm:vg/lv"\nsnapshot-pv = "/dev/sdb1"', 8, "list of PV paths"),
    ("snapshot-pv on a file", 'source = "/dev/sda1"',
     'source = "/dev/sda1"\nsnapshot-pv = ["/dev/sdb1"]', 8, "is for lvm:VG/LV sources"),
    ("bad job name", "[jobs.j]", '[jobs."j k"]', 12, "job name"),
    ("no rule", "keep-last = 2", "", 9, "has no rule"),
    ("copy from nowhere", 'repositories = ["r"]', 'repositories = ["r"]\ncopy-from = "x"', 15,
     "copy-from names repository 'x', which the file does not define"),
    ("copy into itself", 'repositories = ["r"]', 'repositories = ["r"]\ncopy-from = "r"', 15,
     "copy-from may not be one of its repositories"),
]


def test_the_good_file_and_the_documented_example_pass() -> None:
    config = parse(GOOD.encode(), "good.toml")
    assert list(config.jobs) == ["j"] and config.volumes["v"].retention is not None
    lvm = parse(GOOD.replace('source = "/dev/sda1"', 'source = "lvm:vg/lv"\n'
                             'snapshot-size = "auto"\nsnapshot-pv = ["/dev/sdb1", "/dev/sdc"]'
                             ).encode(), "lvm.toml").volumes["v"]
    assert (lvm.snapshot_size, lvm.snapshot_pvs) == ("auto", ("/dev/sdb1", "/dev/sdc"))
    example = re.search(r"^```toml\n(.*?)^```$", DOCS.read_text(), re.S | re.M)
    assert example is not None
    documented, problems = check(example.group(1).encode())
    assert problems == [] and documented is not None, problems
    assert sorted(documented.jobs) == ["nightly", "offsite-sync", "weekly-offsite"]
    assert documented.jobs["offsite-sync"].copy_from == "local"
    assert documented.volumes["boot"].volume == "db1-boot"
    assert not documented.repositories["offsite"].is_local


@pytest.mark.parametrize(("what", "old", "new", "line", "words"), MISTAKES,
                         ids=[m[0] for m in MISTAKES])
def test_config_check_names_each_mistake_with_its_line(what: str, old: str, new: str,
                                                       line: int, words: str) -> None:
    assert old in GOOD
    config, problems = check(GOOD.replace(old, new, 1).encode())
    assert config is None and problems, what
    assert (problems[0].line, words in problems[0].message) == (line, True), problems
    with pytest.raises(ConfigInvalid, match=f"^f.toml:{line}: "):
        parse(GOOD.replace(old, new, 1).encode(), "f.toml")


def test_config_check_on_the_command_line_lists_every_mistake(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.replace("keep-last = 2", "keep-lats = 2")
                   .replace('repositories = ["r"]', 'repositories = ["x"]'))
    r = run_cli("config", "check", "--config", bad)
    assert r.returncode == 1, describe(r)
    assert r.stdout.splitlines() == [
        f"{bad}:10: unknown key volumes.v.retention.keep-lats (known: keep-daily, keep-hourly, "
        "keep-last, keep-monthly, keep-weekly, keep-within, keep-yearly)",
        f"{bad}:14: jobs.j.repositories names repository 'x', which the file does not define "
        "(defined: r)",
        f"{bad}: 2 problem(s)"], describe(r)
    # systemd's own calendar grammar, asked of systemd-analyze (make test installs it).
    when = tmp_path / "when.toml"
    when.write_text(GOOD.replace('repositories = ["r"]', 'repositories = ["r"]\n'
                                 'schedule = "every night"'))
    r = run_cli("config", "check", "--config", when, "--json")
    assert r.returncode == 1, describe(r)
    assert json.loads(r.stdout)["problems"] == [{
        "line": 15, "key": "jobs.j.schedule", "message": "jobs.j.schedule 'every night' is "
        "not a calendar expression systemd reads (man systemd.time)"}], describe(r)
    good = tmp_path / "good.toml"
    good.write_text(GOOD.replace('repositories = ["r"]', 'repositories = ["r"]\n'
                                 'schedule = "Mon *-*-* 04:00"'))
    r = run_cli("config", "check", "--config", good)
    assert r.returncode == 0 and r.stdout == f"{good}: ok: 1 job(s): j\n", describe(r)
    # Run refuses a file with a mistake, before doing anything: a usage error, exit 2.
    r = run_cli("run", "--config", bad)
    assert r.returncode == 2 and f"{bad}:" in r.stderr and "1 more" in r.stderr, describe(r)
    r = run_cli("run", "--config", tmp_path / "none.toml")
    assert r.returncode == 2 and "cannot read the jobs file" in r.stderr, describe(r)


def test_key_lines_skip_multi_line_strings_and_follow_tables() -> None:
    text = ('a = 1\n[t]\nb = """\nc = 2\n"""\n"q.k" . d = 3\n[[arr]]\ne = 4\n'
            "[t.u]\nf = '''x'''\ng = 5\n")
    lines = key_lines(text)
    assert lines == {("a",): 1, ("t",): 2, ("t", "b"): 3, ("t", "q.k", "d"): 6,
                     ("arr",): 7, ("arr", "e"): 8, ("t", "u"): 9, ("t", "u", "f"): 10,
                     ("t", "u", "g"): 11}, lines
    assert jobs_config.DEFAULT_PATH == "/etc/snapship/snapship.toml"


def test_a_copy_job_syncs_local_to_a_server_sending_only_what_is_new(tmp_path: Path) -> None:
    """Periodic sync (issue 15, item 3) as a job of the file: `copy-from` a local repository
    into a snapship server's, with a backup token there; run by `snapship run`, scheduled
    like any job, counted in the metrics file."""
    from prometheus_client.parser import text_string_to_metric_families

    from snapship.jobs import systemd
    from tests.serverproc import create_repo_fast_kdf, http_storage, running_server, token_files

    local = tmp_path / "local"
    init_repo_fast_kdf(local)
    (tmp_path / "pass").write_text(PASSPHRASE + "\n")
    a = image_bytes(8 * CHUNK, seed=1)
    write_image(tmp_path / "a.img", a)
    write_image(tmp_path / "b.img", image_bytes(2 * CHUNK, seed=2))
    with running_server(tmp_path / "srv") as (server, tokens):
        create_repo_fast_kdf(http_storage(server, "offsite", tokens["ops"]))
        files = token_files(tmp_path / "tokens", tokens)
        config = tmp_path / "snapship.toml"
        config.write_text(f"""\
version = 1
metrics-file = "{tmp_path / "snapship.prom"}"

[repositories.local]
location = "{local}"
passphrase-file = "{tmp_path / "pass"}"

[repositories.off]
location = "{server.url("offsite")}"
passphrase-file = "{tmp_path / "pass"}"
token-file = "{files["db1-backup"]}"

[volumes.a]
source = "{tmp_path / "a.img"}"

[volumes.b]
source = "{tmp_path / "b.img"}"

[jobs.nightly]
volumes = ["a", "b"]
repositories = ["local"]

[jobs.offsite]
copy-from = "local"
volumes = ["a"]
repositories = ["off"]
schedule = "daily"
prune = false
""")
        assert run_cli("config", "check", "--config", config).returncode == 0
        parsed = parse(config.read_bytes(), str(config))
        drop_in = systemd.service_drop_in(parsed, parsed.jobs["offsite"], str(config))
        # it reads the local repository and reaches the server; it reads no volume's source
        assert f"ReadWritePaths=-{local} " in drop_in and "AF_INET" in drop_in, drop_in
        assert "PrivateNetwork" not in drop_in and "PrivateDevices=yes" in drop_in, drop_in

        def run(job: str) -> dict[str, object]:
            r = run_cli("run", job, "--config", config, "--json", passphrase=None)
            assert r.returncode == 0, describe(r)
            out: dict[str, object] = json.loads(r.stdout)
            return out

        def copy_step(job_run: dict[str, object]) -> dict[str, object]:
            steps = job_run["steps"]
            assert isinstance(steps, list) and [s["step"] for s in steps] == ["copy"], steps
            assert steps[0]["repository"] == "off" and steps[0]["outcome"] == "ok", steps
            result: dict[str, object] = steps[0]["result"]
            return result

        first_backup = run("nightly")
        first = copy_step(run("offsite"))
        v1 = next(s["result"]["version_id"] for s in first_backup["steps"]  # type: ignore
                  if s["volume"] == "a")
        assert first["copied"] == [f"a@{v1}"] and first["mode"] == "re-encrypt", first
        assert first["chunks_sent"] == 8, first  # only volume a: b stays local
        again = copy_step(run("offsite"))
        assert again["copied"] == [] and again["present"] == [f"a@{v1}"], again
        assert again["chunks_sent"] == 0 and again["bytes_sent"] == 0, again

        # The next night a changes in two chunks: the sync sends those two.
        a[CHUNK : 2 * CHUNK] = image_bytes(CHUNK, seed=3)
        a[5 * CHUNK : 6 * CHUNK] = image_bytes(CHUNK, seed=4)
        sha2 = write_image(tmp_path / "a.img", a)
        run("nightly")
        third = copy_step(run("offsite"))
        assert len(third["copied"]) == 1 and third["chunks_sent"] == 2, third  # type: ignore
        samples = {(s.name, s.labels.get("job"), s.labels.get("repository")): s.value
                   for f in text_string_to_metric_families(
                       (tmp_path / "snapship.prom").read_text()) for s in f.samples}
        assert samples[("snapship_copy_success", "offsite", "off")] == 1
        assert samples[("snapship_copy_sent_bytes", "offsite", "off")] == third["bytes_sent"]
        assert samples[("snapship_copy_sent_chunks", "offsite", "off")] == 2
        assert samples[("snapship_copy_copied_versions", "offsite", "off")] == 1

        # What the server holds restores byte-identical, with a read token.
        out_img = tmp_path / "restored.img"
        r = run_cli("restore", "--repo", server.url("offsite"), "a", out_img,
                    "--token-file", files["restorer"])
        assert r.returncode == 0, describe(r)
        assert sha256_file(out_img) == sha2
        r = run_cli("versions", "--repo", server.url("offsite"), "--json",
                    "--token-file", files["restorer"])
        assert [v["volume"] for v in json.loads(r.stdout)["versions"]] == ["a", "a"], \
            describe(r)
