#!/usr/bin/env python3
"""Backup and restore throughput into remote repositories, against a local directory.

One run backs up the day-1 benchmark image (bench/make_image.py; 1 GiB by default) into each
target and restores it, step by step across the targets (every init, then every backup, then
every restore), each after the same cache warming and a ``sync`` (bench/run.py's harness), and
checks every restore's SHA-256. It does so ``--rounds`` times, each into new repositories,
and prints the best round's wall time, MB/s and ratio to the local directory, with the CPU
the client and the server used (the best of several rounds filters out other work on a shared
machine; every round is in the JSON). Targets:

- ``local``: a directory repository (the reference);
- ``s3``: SeaweedFS (``weed server -s3``, from tests/seaweed.py) over loopback, data on the
  same disk as the local repository;
- ``http``: ``snapship server`` (from tests/serverproc.py) over loopback, plain http, the
  admin token; bench/server.py measures it in more detail (TLS, per-role tokens).

Another target is one more ``Target`` subclass in ``TARGETS``.

    .venv/bin/python bench/remote.py [--size 1G] [--only local,s3] [--workdir DIR]

Needs root to build the images (loop mounts) unless they exist; see bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import make_image
import run

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.seaweed import WeedServer, aws_env  # noqa: E402
from tests.serverproc import ServerProc, write_tokens  # noqa: E402

MB = 1_000_000
STEPS = ("init", "backup", "restore")


class Target:
    """Where a repository lives for one column of the table, and what serves it."""

    name = ""

    def start(self, rundir: Path) -> None:
        """Start whatever serves the repository (called once, before any step)."""

    def stop(self) -> None:
        """Stop it (called once, after the last step, also after a failure)."""

    def repo(self, round_: int) -> str:
        """The repository of round `round_` (a new one each round)."""
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        """Variables the CLI needs to reach the repository."""
        return {}

    def server_cpu(self) -> float:
        """CPU seconds the serving process has used so far (0 for none)."""
        return 0.0


class LocalTarget(Target):
    name = "local"

    def start(self, rundir: Path) -> None:
        self.path = rundir / "repos"
        self.path.mkdir(parents=True, exist_ok=True)

    def repo(self, round_: int) -> str:
        return str(self.path / f"local-{round_}")


class SeaweedTarget(Target):
    name = "s3 (SeaweedFS)"

    def start(self, rundir: Path) -> None:
        self.server = WeedServer(rundir / "weed" / "data", rundir / "weed.log")
        self.server.start()
        self.server.client().create_bucket(Bucket="bench")

    def stop(self) -> None:
        self.server.kill()

    def repo(self, round_: int) -> str:
        return f"s3://bench/round-{round_}"

    def env(self) -> dict[str, str]:
        return aws_env(self.server.endpoint)

    def server_cpu(self) -> float:
        return process_cpu(self.server.proc.pid) if self.server.proc else 0.0


class ServerTarget(Target):
    name = "http (snapship server)"

    def start(self, rundir: Path) -> None:
        rundir.mkdir(parents=True, exist_ok=True)
        self.tokens = write_tokens(rundir / "tokens")
        self.server = ServerProc(rundir / "server-root", rundir / "tokens").start()

    def stop(self) -> None:
        self.server.stop()

    def repo(self, round_: int) -> str:
        return self.server.url(f"round-{round_}")

    def env(self) -> dict[str, str]:
        return {"SNAPSHIP_TOKEN": self.tokens["ops"]}

    def server_cpu(self) -> float:
        return process_cpu(self.server.proc.pid) if self.server.proc else 0.0


TARGETS: dict[str, type[Target]] = {"local": LocalTarget, "s3": SeaweedTarget,
                                     "http": ServerTarget}


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process and its waited-for children, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    name: str
    rounds: list[dict[str, dict[str, Any]]] = field(default_factory=list)
    verified: bool | None = None
    errors: list[str] = field(default_factory=list)

    def best(self, step: str) -> dict[str, Any] | None:
        done = [r[step] for r in self.rounds if step in r and r[step]["returncode"] == 0]
        return min(done, key=lambda m: float(m["seconds"])) if done else None

    def mbps(self, step: str, size: int) -> float | None:
        m = self.best(step)
        return size / MB / m["seconds"] if m else None


def run_round(targets: list[Target], results: list[Result], round_: int, image: Path,
              digest: str, rundir: Path, exe: Path) -> None:
    logs, out = rundir / "logs", rundir / "out.img"
    logs.mkdir(parents=True, exist_ok=True)
    for res in results:
        res.rounds.append({})
    for step in STEPS:
        for target, res in zip(targets, results, strict=True):
            if res.errors:
                continue
            env = {**os.environ, "SNAPSHIP_PASSPHRASE": run.PASSPHRASE, **target.env()}
            repo = target.repo(round_)
            if step == "init":
                cmd = run.Cmd([str(exe), "init", "--repo", repo])
            elif step == "backup":
                run.read_all(image)
                cmd = run.Cmd([str(exe), "backup", "--repo", repo, str(image), "--volume",
                               "disk"])
            else:
                cmd = run.Cmd([str(exe), "restore", "--repo", repo, "disk", str(out)])
            subprocess.run(["sync"], check=True)
            server_before = target.server_cpu()
            slug = f"{target.name.split()[0]}-{round_}-{step}"
            m = run.measure(step, cmd, env, logs / f"{slug}.log")
            server = target.server_cpu() - server_before
            subprocess.run(["sync"], check=True)
            res.rounds[-1][step] = {**run.measurement_json(m), "server_cpu_seconds": server}
            print(f"  round {round_} {target.name:16} {step:8} {m.seconds:7.2f} s  "
                  f"rc={m.returncode}  client {m.cores:.2f} cores, server "
                  f"{server / m.seconds:.2f} cores", flush=True)
            if m.returncode != 0:
                tail = Path(m.log).read_text(errors="replace")[-800:]
                res.errors.append(f"{step} exited {m.returncode}: {tail}")
            elif step == "restore":
                ok = run.sha256(out) == digest
                res.verified = ok if res.verified is None else res.verified and ok
                if not ok:
                    res.errors.append("RESTORE MISMATCH: the restored image's sha256 differs")
                out.unlink(missing_ok=True)


def table(results: list[Result], size: int) -> str:
    local = next((r for r in results if r.name == "local"), None)
    lines = ["| target | backup | vs local | restore | vs local | client / server cores "
             "(backup; restore) | restores verified |", "|---|---|---|---|---|---|---|"]
    for r in results:
        cells = [r.name]
        for step in ("backup", "restore"):
            m, mine = r.best(step), r.mbps(step, size)
            ref = local.mbps(step, size) if local else None
            cells.append(f"{m['seconds']:.2f} s ({mine:.0f} MB/s)" if m and mine else "FAILED")
            cells.append(f"{mine / ref:.0%}" if mine and ref else "-")
        cores = []
        for step in ("backup", "restore"):
            m = r.best(step)
            if m:
                cores.append(f"{m['cores']:.2f} / {m['server_cpu_seconds'] / m['seconds']:.2f}")
        cells.append("; ".join(cores) or "-")
        cells.append({True: "yes", False: "**NO**", None: "-"}[r.verified])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--workdir", type=Path, default=make_image.DEFAULT_WORKDIR)
    parser.add_argument("--size", default="1G", help="image size (default 1G)")
    parser.add_argument("--snapship", type=Path, default=run.DEFAULT_SNAPSHIP)
    parser.add_argument("--only", default=",".join(TARGETS),
                        help=f"comma-separated subset of {','.join(TARGETS)}")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, best counts (default 3)")
    parser.add_argument("--json", type=Path, help="results file (default: in the workdir)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    if unknown := set(names) - set(TARGETS):
        parser.error(f"unknown target(s): {', '.join(sorted(unknown))}")
    if not os.access(args.snapship, os.X_OK):
        parser.error(f"snapship not found at {args.snapship} (use --snapship)")
    make_image.check_workdir(args.workdir)
    run.ensure_tools(anchors=False)
    size = make_image.parse_size(args.size)
    images = make_image.ensure_images(args.workdir, size)
    digest = run.image_sha256(images.day1)
    rundir = args.workdir / f"remote-{make_image.size_label(size)}"
    previous = run.set_aside(rundir)
    load_before = os.getloadavg()[0]
    targets = [TARGETS[n]() for n in names]
    results = [Result(t.name) for t in targets]
    try:
        for t in targets:
            t.start(rundir)
        for round_ in range(1, args.rounds + 1):
            run_round(targets, results, round_, images.day1, digest, rundir, args.snapship)
    finally:
        for t in targets:
            t.stop()
    shutil.rmtree(previous, ignore_errors=True)
    report = [
        f"## Remote repositories: day-1 image of {make_image.size_label(size)}, "
        f"{images.stats.used_bytes_day1 / MB:.0f} MB used, best of {args.rounds} rounds",
        "",
        f"Load average (1 min) before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f} "
        f"on {os.cpu_count()} CPUs",
        "",
        table(results, size),
    ]
    print("\n" + "\n".join(report))
    errors = [f"{r.name}: {e}" for r in results for e in r.errors]
    if errors:
        print("\nERRORS:\n" + "\n".join(f"- {e}" for e in errors), file=sys.stderr)
    out = args.json or args.workdir / f"remote-{make_image.size_label(size)}.json"
    out.write_text(json.dumps({"image": asdict(images.stats),
                               "results": [asdict(r) for r in results],
                               "report": report, "errors": errors}, indent=2) + "\n")
    print(f"\nresults written to {out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
