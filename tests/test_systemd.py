"""Schedules with systemd (issue 15, item 2): the units `snapship systemd install` writes.

Every generated unit passes the real `systemd-analyze verify` (which loads the instance's
drop-ins through $SYSTEMD_UNIT_PATH, checks every setting and that ExecStart's program
exists), and a schedule it cannot parse fails it. The service's ExecStart= line, taken from
the unit and expanded as systemd does for the instance (%i, %S, %%; Environment=), runs the job.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

from snapship.repository.catalog import Catalog
from snapship.storage.local import LocalStorage
from tests.clihelp import (
    CHUNK,
    PASSPHRASE,
    cli_env,
    describe,
    image_bytes,
    init_repo_fast_kdf,
    ok,
    run_cli,
    write_image,
)

# make test installs it (Makefile TEST_TOOLS: package systemd); never skipped.
ANALYZE = shutil.which("systemd-analyze") or "systemd-analyze"


def jobs_file(tmp: Path, schedule: str = "*-*-* 02:00:00") -> Path:
    (tmp / "pass").write_text(PASSPHRASE + "\n")
    path = tmp / "snap ship.toml"  # a space: ExecStart= must quote it
    (tmp / "metrics").mkdir(exist_ok=True)
    path.write_text(f"""\
version = 1
metrics-file = "{tmp / "metrics" / "snapship.prom"}"

[repositories.local]
location = "{tmp / "repo"}"
passphrase-file = "{tmp / "pass"}"

[repositories.offsite]
location = "https://backup.example:8420/db1"

[volumes.img]
source = "{tmp / "disk.img"}"
retention = {{ keep-last = 1 }}

[volumes.root]
source = "lvm:vg0/root"

[jobs.nightly]
volumes = ["img"]
repositories = ["local"]
schedule = "{schedule}"
gc = true

[jobs.lvm]
volumes = ["root"]
repositories = ["local"]
schedule = "Mon *-*-* 04:00"

[jobs.offsite]
volumes = ["img"]
repositories = ["offsite"]
schedule = "weekly"

[jobs.by-hand]
volumes = ["img"]
repositories = ["local"]
""")
    return path


def install(config: Path, unit_dir: Path, *extra: str) -> dict[str, Any]:
    r = ok(run_cli("systemd", "install", "--config", config, "--unit-dir", unit_dir, "--json",
                   *extra))
    obj: dict[str, Any] = json.loads(r.stdout)
    return obj


def verify(unit_dir: Path, *units: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ANALYZE, "verify", *units], capture_output=True, text=True,
                          env={**os.environ, "SYSTEMD_UNIT_PATH": f"{unit_dir}:"},
                          cwd=unit_dir, timeout=120, check=False)


def settings(unit_dir: Path, unit: str) -> dict[str, list[str]]:
    """Key -> values of an instance: its template, then its drop-ins, as systemd merges them."""
    template = re.sub(r"@[^.]+\.", "@.", unit)
    found: dict[str, list[str]] = {}
    paths = [unit_dir / template, *sorted((unit_dir / f"{unit}.d").glob("*.conf"))]
    for path in paths:
        for line in path.read_text().splitlines():
            if line and not line.startswith(("#", "[")):
                key, _, value = line.partition("=")
                found.setdefault(key, []).append(value)
    return found


def test_every_generated_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    config = jobs_file(tmp_path)
    units = tmp_path / "units"
    report = install(config, units)
    assert report["timers"] == ["snapship-run@nightly.timer", "snapship-run@lvm.timer",
                                "snapship-run@offsite.timer"], report
    assert sorted(p.relative_to(units).as_posix() for p in units.rglob("*") if p.is_file()) \
        == sorted(report["written"]) == sorted([
            "snapship-run@.service", "snapship-run@.timer",
            *(f"snapship-run@{j}.service.d/50-snapship.conf"
              for j in ("nightly", "lvm", "offsite", "by-hand")),
            *(f"snapship-run@{j}.timer.d/50-snapship.conf" for j in ("nightly", "lvm", "offsite"))])
    for job in ("nightly", "lvm", "offsite", "by-hand"):
        names = [f"snapship-run@{job}.service"] + \
            ([f"snapship-run@{job}.timer"] if job != "by-hand" else [])
        r = verify(units, *names)
        assert r.returncode == 0 and r.stdout == r.stderr == "", describe(r)  # not a warning

    hardened = {"ProtectSystem": ["strict"], "PrivateTmp": ["yes"], "NoNewPrivileges": ["yes"],
                "ProtectHome": ["read-only"], "Type": ["oneshot"]}
    local = settings(units, "snapship-run@nightly.service")
    lvm = settings(units, "snapship-run@lvm.service")
    remote = settings(units, "snapship-run@offsite.service")
    for s in (local, lvm, remote):
        assert all(s[k] == v for k, v in hardened.items()), s
    # Local repositories only: no network at all, and writes only into the repository.
    assert local["PrivateNetwork"] == ["yes"] and local["RestrictAddressFamilies"] == ["AF_UNIX"]
    assert local["ReadWritePaths"] == [f"-{tmp_path / 'repo'} -{tmp_path / 'metrics'}"]
    assert local["PrivateDevices"] == ["yes"]
    # LVM: devices, netlink (udev), and lvm2's own directories; still no network.
    assert lvm["PrivateNetwork"] == ["yes"] and "PrivateDevices" not in lvm
    assert lvm["RestrictAddressFamilies"] == ["AF_UNIX AF_NETLINK"]
    assert "-/etc/lvm/archive" in lvm["ReadWritePaths"][0].split()
    # A server repository: the network, once it is up; nothing local to write.
    assert "PrivateNetwork" not in remote
    assert remote["ReadWritePaths"] == [f"-{tmp_path / 'metrics'}"]
    assert remote["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert remote["After"] == ["network-online.target"]
    assert settings(units, "snapship-run@lvm.timer")["OnCalendar"] == ["Mon *-*-* 04:00"]
    assert settings(units, "snapship-run@offsite.timer")["WantedBy"] == ["timers.target"]

    # verify is no rubber stamp: a schedule systemd cannot parse fails it.
    install(jobs_file(tmp_path, schedule="every night"), units)
    r = verify(units, "snapship-run@nightly.timer")
    assert r.returncode != 0 and "every night" in r.stderr, describe(r)


def test_the_services_exec_start_runs_the_job(tmp_path: Path) -> None:
    init_repo_fast_kdf(tmp_path / "repo")
    write_image(tmp_path / "disk.img", image_bytes(4 * CHUNK, seed=5))
    units = tmp_path / "units"
    install(jobs_file(tmp_path), units)
    service = settings(units, "snapship-run@nightly.service")
    state_root = tmp_path / "var-lib"  # %S: where StateDirectory= is, for this test
    (state_root / "snapship").mkdir(parents=True)

    def expand(value: str) -> str:
        def one(m: re.Match[str]) -> str:
            return {"i": "nightly", "S": str(state_root), "%": "%"}[m.group(1)]
        return re.sub(r"%(.)", one, value)

    env = {k: v for k, v in cli_env(passphrase=None).items() if k != "SNAPSHIP_STATE_DIR"}
    for assignment in service["Environment"]:
        key, _, value = expand(assignment).partition("=")
        env[key] = value
    argv = [expand(w) for w in shlex.split(service["ExecStart"][0])]
    assert argv[1:] == ["run", "--config", str(tmp_path / "snap ship.toml"), "nightly"], argv
    r = subprocess.run(argv, env=env, cwd="/", stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=120, check=False)
    assert r.returncode == 0, describe(r)
    assert r.stdout.splitlines()[-1] == "run nightly: 3 steps, all succeeded", describe(r)
    assert [v for v, _ in Catalog(LocalStorage(str(tmp_path / "repo"))).versions()] == ["img"]
    assert (state_root / "snapship" / "known-repositories.json").exists()
    assert "snapship_job_success{job=\"nightly\"} 1.0" in \
        (tmp_path / "metrics" / "snapship.prom").read_text()


def test_dry_run_prints_the_units_and_removed_jobs_lose_their_drop_ins(tmp_path: Path) -> None:
    config = jobs_file(tmp_path)
    units = tmp_path / "units"
    r = ok(run_cli("systemd", "install", "--config", config, "--unit-dir", units, "--dry-run"))
    assert not units.exists()
    assert f"# {units / 'snapship-run@.service'}\n" in r.stdout and "ExecStart=" in r.stdout
    dry = install(config, units, "--dry-run")
    real = install(config, units)
    assert dry["units"] == real["units"] and dry["written"] == []
    for unit in real["units"]:
        assert (units / unit["path"]).read_text() == unit["text"]
    config.write_text(config.read_text().replace('[jobs.offsite]\nvolumes = ["img"]\n'
                                                 'repositories = ["offsite"]\n'
                                                 'schedule = "weekly"\n', ""))
    again = install(config, units)
    assert again["removed"] == ["snapship-run@offsite.service.d/50-snapship.conf",
                                "snapship-run@offsite.timer.d/50-snapship.conf"], again
    assert not (units / "snapship-run@offsite.service.d").exists()
    # A relative repository path would mean nothing to a service (it runs in /).
    config.write_text(config.read_text().replace(f'location = "{tmp_path / "repo"}"',
                                                 'location = "repo"'))
    r = run_cli("systemd", "install", "--config", config, "--unit-dir", units)
    assert r.returncode == 2 and "repository local: location 'repo' must be an absolute " \
        "path" in r.stderr, describe(r)
    config.write_text(config.read_text().replace('location = "repo"',
                                                 f'location = "{tmp_path / "repo"}"')
                      .replace(f'source = "{tmp_path / "disk.img"}"', 'source = "disk.img"'))
    r = run_cli("systemd", "install", "--config", config, "--unit-dir", units)
    assert r.returncode == 2 and "volume img: source 'disk.img' must be an absolute path" \
        in r.stderr, describe(r)


def test_a_copy_jobs_units_pass_verify_and_reach_both_repositories(tmp_path: Path) -> None:
    """A copy job (docs/config.md, `copy-from`): its service may write the local source's
    directory and reach the server it copies to, and sees no devices (it reads no source)."""
    config = jobs_file(tmp_path)
    config.write_text(config.read_text() + '\n[jobs.sync]\ncopy-from = "local"\n'
                      'repositories = ["offsite"]\nschedule = "daily"\nprune = false\n')
    units = tmp_path / "units"
    report = install(config, units)
    assert "snapship-run@sync.timer" in report["timers"], report
    r = verify(units, "snapship-run@sync.service", "snapship-run@sync.timer")
    assert r.returncode == 0 and r.stdout == r.stderr == "", describe(r)
    sync = settings(units, "snapship-run@sync.service")
    assert sync["ReadWritePaths"] == [f"-{tmp_path / 'repo'} -{tmp_path / 'metrics'}"], sync
    assert sync["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"], sync
    assert "PrivateNetwork" not in sync and sync["PrivateDevices"] == ["yes"], sync
    assert settings(units, "snapship-run@sync.timer")["OnCalendar"] == ["daily"]
