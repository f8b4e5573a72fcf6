#!/usr/bin/env python3
"""Benchmark snapship against restic and borg on the same pair of disk images.

For every tool: init, back up day1.img, back up day2.img (a full re-read that dedups against
day 1), restore the day-1 version and check its SHA-256, then time the ``sync`` that makes
the restore durable (snapship's own fsync is inside its restore; restic's and borg's output
is only durable after it). Steps run step by step across the tools (all day-1 backups, then
all day-2 backups, ...), each after the same cache warming and a ``sync``; that is one round,
into new repositories, and the rounds (3 by default) are interleaved so that every tool meets
the same load. Prints the median of the rounds with min and max, and writes every figure as
JSON. Needs root (loop mounts for the images). See bench/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import make_image

MB = 1_000_000
BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_SNAPSHIP = BENCH_DIR.parent / ".venv" / "bin" / "snapship"
PASSPHRASE = "bench-passphrase-not-secret"
STEPS = ("init", "backup-day1", "backup-day2", "restore-day1")
GROUPS = ("snapship", "restic", "borg")
TIME = "/usr/bin/time"  # GNU time (Debian package "time")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


@dataclass
class Cmd:
    argv: list[str]
    stdin: Path | None = None
    stdout: Path | None = None
    cwd: Path | None = None


@dataclass
class Measurement:
    step: str
    argv: list[str]
    seconds: float
    cpu_seconds: float
    maxrss_mb: float  # largest single process of the tree (GNU time %M)
    tree_rss_mb: float  # largest sum over the live tree, sampled every 50 ms
    returncode: int
    log: str

    @property
    def cores(self) -> float:
        return self.cpu_seconds / self.seconds if self.seconds else 0.0

    @property
    def peak_rss_mb(self) -> float:
        return max(self.maxrss_mb, self.tree_rss_mb)


@dataclass
class ToolResult:
    """One tool's figures over every round (lists in round order)."""

    name: str
    version: str = ""
    steps: dict[str, list[Measurement]] = field(default_factory=dict)
    flush_seconds: list[float] = field(default_factory=list)
    """The `sync` after each restore: what it took to make the restored image durable."""
    repo_bytes_day1: list[int] = field(default_factory=list)
    repo_bytes_day2: list[int] = field(default_factory=list)
    restored: str = ""  # which image the restored version must equal: day1 (or day2)
    verified: bool | None = None  # every round's restore matched
    restored_allocated: int | None = None  # disk blocks of the restored file (sparse or not)
    errors: list[str] = field(default_factory=list)
    failed: bool = False  # a step exited non-zero (its later steps were skipped)
    details: Any = None  # the tool's own report, where it gives one (snapship's versions)

    def ok(self, step: str) -> list[Measurement]:
        return [m for m in self.steps.get(step, []) if m.returncode == 0]


class Tool:
    """One column of the table: how to init, back up and restore with one tool."""

    name = ""

    def __init__(self, repo: Path, cache: Path) -> None:
        self.repo = repo
        self.cache = cache
        self.env = dict(os.environ)
        self.restore_target = "day1"  # which image the restore must equal

    def version(self) -> str:
        return ""

    def init(self) -> Cmd:
        raise NotImplementedError

    def backup(self, image: Path, label: str) -> Cmd:
        raise NotImplementedError

    def after_backup(self, label: str, result: ToolResult) -> None:
        """Hook run (untimed) after each backup."""

    def restore(self, label: str, out: Path) -> Cmd:
        raise NotImplementedError


class Snapship(Tool):
    def __init__(self, repo: Path, cache: Path, exe: Path, encrypted: bool,
                 label: str = "snapship") -> None:
        super().__init__(repo, cache)
        self.exe = str(exe)
        self.encrypted = encrypted
        self.name = f"{label} (enc)" if encrypted else f"{label} (none)"
        self.env["SNAPSHIP_PASSPHRASE"] = PASSPHRASE
        self.version_ids: dict[str, str] = {}

    def version(self) -> str:
        return capture([self.exe, "--version"], self.env)

    def init(self) -> Cmd:
        extra = [] if self.encrypted else ["--encryption", "none"]
        return Cmd([self.exe, "init", "--repo", str(self.repo), *extra])

    def backup(self, image: Path, label: str) -> Cmd:
        return Cmd([self.exe, "backup", "--repo", str(self.repo), str(image), "--volume", "disk"])

    def after_backup(self, label: str, result: ToolResult) -> None:
        text = capture([self.exe, "versions", "--repo", str(self.repo), "--json"], self.env)
        try:
            result.details = json.loads(text)
            ids = version_ids(result.details, "disk")
        except (ValueError, TypeError) as exc:
            result.errors.append(
                f"`versions --json` not understood after {label}: {exc}: {text[:300]!r}"
            )
            return
        known = set(self.version_ids.values())
        new = [v for v in ids if v not in known]
        if len(new) == 1:
            self.version_ids[label] = new[0]
        else:
            result.errors.append(f"expected one new version after {label}, found {new}")

    def restore(self, label: str, out: Path) -> Cmd:
        vid = self.version_ids.get(label)
        spec = f"disk@{vid}" if vid else "disk"
        if not vid:  # fall back to the latest version, which is day 2
            self.restore_target = "day2"
        return Cmd([self.exe, "restore", "--repo", str(self.repo), spec, str(out)])


def version_ids(data: Any, volume: str) -> list[str]:
    """Version ids, oldest first, from ``snapship versions --json`` (shape not fixed yet).

    Accepted: a list of objects or of ids; or an object holding such a list under
    ``versions``/``items``, or under the volume's name. An object's id is the first of
    ``id``, ``version``, ``version_id``, ``uuid``, ``name``; objects naming another volume
    (``volume`` key) are ignored. Order: by ``created``/``time``/``timestamp`` when present,
    else as listed.
    """
    if isinstance(data, dict):
        for key in ("versions", "items", volume):
            if key in data:
                return version_ids(data[key], volume)
        raise ValueError("no 'versions' list in the object")
    if not isinstance(data, list):
        raise TypeError(f"unexpected JSON type {type(data).__name__}")
    items: list[tuple[str, str]] = []
    for item in data:
        if isinstance(item, str | int):
            items.append(("", str(item)))
            continue
        if not isinstance(item, dict):
            raise TypeError(f"unexpected item {item!r}")
        if item.get("volume", volume) != volume:
            continue
        vid = next(
            (item[k] for k in ("id", "version", "version_id", "uuid", "name") if k in item), None
        )
        if vid is None:
            raise ValueError(f"no id in {item!r}")
        when = next((str(item[k]) for k in ("created", "time", "timestamp") if k in item), "")
        items.append((when, str(vid)))
    if all(when for when, _ in items):
        items.sort(key=lambda pair: pair[0])
    return [vid for _, vid in items]


class Restic(Tool):
    name = "restic"

    def __init__(self, repo: Path, cache: Path) -> None:
        super().__init__(repo, cache)
        self.env.update(
            RESTIC_REPOSITORY=str(repo), RESTIC_PASSWORD=PASSPHRASE, RESTIC_CACHE_DIR=str(cache)
        )

    def version(self) -> str:
        return capture(["restic", "version"], self.env)

    def init(self) -> Cmd:
        return Cmd(["restic", "init"])

    def backup(self, image: Path, label: str) -> Cmd:
        return Cmd(
            ["restic", "backup", "--stdin", "--stdin-filename", "disk.img", "--tag", label],
            stdin=image,
        )

    def restore(self, label: str, out: Path) -> Cmd:
        return Cmd(["restic", "dump", "--tag", label, "latest", "disk.img"], stdout=out)


class Borg(Tool):
    def __init__(self, repo: Path, cache: Path, encryption: str) -> None:
        super().__init__(repo, cache)
        self.encryption = encryption
        self.name = f"borg {encryption}"
        self.env.update(
            BORG_PASSPHRASE=PASSPHRASE,
            BORG_BASE_DIR=str(cache),
            BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
            BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
        )

    def version(self) -> str:
        return capture(["borg", "--version"], self.env)

    def init(self) -> Cmd:
        return Cmd(["borg", "init", "-e", self.encryption, str(self.repo)])

    def backup(self, image: Path, label: str) -> Cmd:
        # relative name: borg stores the path it is given
        return Cmd(
            [
                "borg",
                "create",
                "--read-special",
                "--chunker-params",
                "fixed,4194304",
                "--compression",
                "zstd,3",
                f"{self.repo}::{label}",
                image.name,
            ],
            cwd=image.parent,
        )

    def restore(self, label: str, out: Path) -> Cmd:
        return Cmd(["borg", "extract", "--stdout", f"{self.repo}::{label}"], stdout=out)


def capture(argv: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    return (proc.stdout or proc.stderr).strip()


def tree_rss_kb(root: int) -> int:
    """Sum of VmRSS over the live descendants of ``root`` (scanning /proc)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        rss[pid] = int(fields[21]) * PAGE_KB
    total = 0
    for pid in rss:
        p = parents.get(pid, 0)
        while p > 1 and p != root:
            p = parents.get(p, 0)
        if p == root:
            total += rss[pid]
    return total


def measure(step: str, cmd: Cmd, env: dict[str, str], log: Path) -> Measurement:
    """Run one step under /usr/bin/time; wall time, CPU time and peak RSS of its tree.

    /usr/bin/time reports its child's max RSS from wait4. Reading it from our own wait4
    would be wrong: a child started with vfork inherits this process's high-water RSS.
    """
    peak = 0
    done = threading.Event()

    def sample(pid: int) -> None:
        nonlocal peak
        while not done.wait(0.05):
            peak = max(peak, tree_rss_kb(pid))

    timing = log.with_suffix(".time")
    argv = [TIME, "-f", "%U %S %M", "-o", str(timing), *cmd.argv]
    with log.open("wb") as logf:
        stdin = cmd.stdin.open("rb") if cmd.stdin else subprocess.DEVNULL
        stdout = cmd.stdout.open("wb") if cmd.stdout else logf
        try:
            start = time.monotonic()
            proc = subprocess.Popen(
                argv, stdin=stdin, stdout=stdout, stderr=logf, cwd=cmd.cwd, env=env
            )
            sampler = threading.Thread(target=sample, args=(proc.pid,), daemon=True)
            sampler.start()
            returncode = proc.wait()
            seconds = time.monotonic() - start
            done.set()
            sampler.join()
        finally:
            for fh in (stdin, stdout):
                if fh is not logf and not isinstance(fh, int):
                    fh.close()
    # the last line holds the format; a line before it may say how the command ended
    user, system, maxrss_kb = timing.read_text().splitlines()[-1].split()
    return Measurement(
        step=step,
        argv=cmd.argv,
        seconds=seconds,
        cpu_seconds=float(user) + float(system),
        maxrss_mb=int(maxrss_kb) * 1024 / MB,
        tree_rss_mb=peak * 1024 / MB,
        returncode=returncode,
        log=str(log),
    )


def read_all(*paths: Path) -> None:
    """Warm the page cache: read every file (recursively) once."""
    for path in paths:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for f in files:
            with f.open("rb", buffering=0) as fh:
                while fh.read(16 << 20):
                    pass


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb", buffering=0) as fh:
        while chunk := fh.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def image_sha256(image: Path) -> str:
    """SHA-256 of an image, cached next to it (keyed by size and mtime)."""
    st = image.stat()
    cache = image.with_suffix(".sha256.json")
    key = f"{st.st_size}:{st.st_mtime_ns}"
    if cache.exists():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return str(saved["sha256"])
    digest = sha256(image)
    cache.write_text(json.dumps({"key": key, "sha256": digest}) + "\n")
    return digest


def dir_bytes(path: Path) -> int:
    """Sum of the sizes of the regular files under ``path``."""
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def ensure_tools(anchors: bool) -> None:
    """Run bench/setup.sh when GNU time (or restic/borg, if wanted) is missing."""
    if os.access(TIME, os.X_OK) and (
        not anchors or (shutil.which("restic") and shutil.which("borg"))
    ):
        return
    print("missing tools: running bench/setup.sh", flush=True)
    subprocess.run(["bash", str(BENCH_DIR / "setup.sh")], check=True)


def run_round(
    tools: list[Tool], images: make_image.ImageSet, rundir: Path,
    results: dict[str, ToolResult], digests: dict[str, str],
) -> None:
    """One round: every step of every tool, step by step across the tools, new repositories."""
    logs, outdir = rundir / "logs", rundir / "out"
    logs.mkdir(parents=True)
    outdir.mkdir()
    for tool in tools:  # borg init, unlike the others, wants its repository's parent to exist
        tool.repo.parent.mkdir(parents=True, exist_ok=True)
    failed: set[str] = set()
    for step in STEPS:
        for tool in tools:
            res = results[tool.name]
            if tool.name in failed:
                continue  # a step failed earlier: its later steps are meaningless
            out = outdir / f"{tool.repo.name}.img"
            if step == "init":
                cmd = tool.init()
            elif step.startswith("backup-"):
                label = step.removeprefix("backup-")
                image = images.day1 if label == "day1" else images.day2
                read_all(image)
                cmd = tool.backup(image, label)
            else:
                read_all(tool.repo)
                cmd = tool.restore("day1", out)
                res.restored = tool.restore_target
            subprocess.run(["sync"], check=True)
            m = measure(step, cmd, tool.env, logs / f"{tool.repo.name}-{step}.log")
            res.steps.setdefault(step, []).append(m)
            flush = time.monotonic()
            subprocess.run(["sync"], check=True)
            flush = time.monotonic() - flush
            print(
                f"  {tool.name:22} {step:13} {m.seconds:7.2f} s  rc={m.returncode}  "
                f"{m.cores:.2f} cores  {m.peak_rss_mb:7.1f} MB"
                + (f"  sync after {flush:.2f} s" if step == "restore-day1" else "")
                + f"  load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            if m.returncode != 0:
                tail = Path(m.log).read_text(errors="replace")[-800:]
                res.errors.append(f"step {step} exited {m.returncode}: {tail}")
                res.failed = True
                failed.add(tool.name)
                out.unlink(missing_ok=True)
                continue
            if step == "backup-day1":
                res.repo_bytes_day1.append(dir_bytes(tool.repo))
            elif step == "backup-day2":
                res.repo_bytes_day2.append(dir_bytes(tool.repo))
            if step.startswith("backup-"):
                tool.after_backup(step.removeprefix("backup-"), res)
            if step == "restore-day1":
                res.flush_seconds.append(flush)
                got = sha256(out) if out.exists() else "missing"
                want = digests[tool.restore_target]
                res.verified = (res.verified is not False) and got == want
                if tool.restore_target != "day1":
                    res.errors.append(
                        f"restored the latest version ({tool.restore_target}),"
                        " not day 1: version id unknown"
                    )
                if got != want:
                    res.errors.append(
                        f"RESTORE MISMATCH: sha256 {got} != {tool.restore_target} {want}"
                    )
                if out.exists():
                    res.restored_allocated = out.stat().st_blocks * 512
                out.unlink(missing_ok=True)


def set_aside(rundir: Path) -> Path:
    """Move the previous run's directory out of the way, to be deleted once this run is
    over (see `run_benchmark` for why not before); returns where it went."""
    previous = rundir.with_name(rundir.name + ".previous")
    shutil.rmtree(previous, ignore_errors=True)  # left only by a run that was stopped
    if rundir.exists():
        rundir.rename(previous)
    return previous


def run_benchmark(
    make: Callable[[Path], list[Tool]], images: make_image.ImageSet, rundir: Path, rounds: int
) -> dict[str, ToolResult]:
    """`rounds` rounds, each with new repositories; the tools' order rotates by one each round
    so that no tool always runs first (or right after the same neighbour)."""
    digests = {"day1": image_sha256(images.day1), "day2": image_sha256(images.day2)}
    results: dict[str, ToolResult] = {}
    for n in range(rounds):
        tools = make(rundir / f"round-{n + 1}")
        if not results:
            results = {t.name: ToolResult(t.name, version=t.version()) for t in tools}
        k = n % len(tools)
        tools = tools[k:] + tools[:k]
        print(f"round {n + 1} of {rounds}: {', '.join(t.name for t in tools)}", flush=True)
        run_round(tools, images, rundir / f"round-{n + 1}", results, digests)
    # Deleted only now, and the last round's repositories stay for a look: on a file system
    # without a journal (this machine's root) ext4 skips every inode deleted in the last
    # minutes when it allocates one, reading each one's inode, so files created right after
    # thousands were deleted cost up to 0.9 s of CPU more (for snapship's 2,400 chunk files;
    # restic's 65 packs hardly notice). Keeping them makes no round pay for the one before.
    for n in range(rounds - 1):
        shutil.rmtree(rundir / f"round-{n + 1}" / "repos", ignore_errors=True)
    return results


def spread(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)


def fmt_speed(ms: list[Measurement], size: int, failed: bool) -> str:
    if not ms:
        return "FAILED" if failed else "-"
    med, lo, hi = spread([m.seconds for m in ms])
    return f"{med:.2f} s ({lo:.2f}-{hi:.2f}), {size / MB / med:.0f} MB/s"


def increment(r: ToolResult) -> list[int]:
    return [b - a for a, b in zip(r.repo_bytes_day1, r.repo_bytes_day2, strict=False)]


def durable(r: ToolResult) -> list[float]:
    """Each round's restore plus the sync after it: until the restored image is durable."""
    return [m.seconds + f for m, f in zip(r.ok("restore-day1"), r.flush_seconds, strict=False)]


def table(results: dict[str, ToolResult], size: int) -> str:
    cols = list(results.values())
    rows: list[tuple[str, list[str]]] = []

    def mb(values: list[int] | list[float]) -> str:
        return "-" if not values else f"{statistics.median(values) / MB:.1f} MB"

    def usage(ms: list[Measurement]) -> str:
        if not ms:
            return "-"
        return (f"{statistics.median(m.cores for m in ms):.2f} / "
                f"{statistics.median(m.cpu_seconds for m in ms):.2f} s / "
                f"{max(m.peak_rss_mb for m in ms):.0f} MB")

    for key, title in (
        ("backup-day1", "day 1 backup (full)"),
        ("backup-day2", "day 2 backup (full re-read)"),
        ("restore-day1", "restore day 1"),
    ):
        rows.append((title, [fmt_speed(r.ok(key), size, r.failed) for r in cols]))
        rows.append(("  cores / CPU / peak RSS", [usage(r.ok(key)) for r in cols]))
    rows.append(("  sync after the restore", [
        "-" if not r.flush_seconds else "{:.2f} s ({:.2f}-{:.2f})".format(*spread(r.flush_seconds))
        for r in cols]))
    rows.append(("restore until durable", [
        "-" if not durable(r) else
        "{:.2f} s ({:.2f}-{:.2f})".format(*spread(durable(r))) for r in cols]))
    peaks = [[m.peak_rss_mb for ms in r.steps.values() for m in ms] for r in cols]
    rows.append(("peak RSS, all steps", [f"{max(p):.0f} MB" if p else "-" for p in peaks]))
    rows.append(("repo size after day 1", [mb(r.repo_bytes_day1) for r in cols]))
    rows.append(("day 2 increment", [mb(increment(r)) for r in cols]))
    rows.append(("restored file, allocated",
                 [mb([r.restored_allocated] if r.restored_allocated else []) for r in cols]))
    verdict = {True: "yes", False: "**NO**", None: "-"}
    rows.append(("restore verified (sha256)", [verdict[r.verified] for r in cols]))
    lines = ["| | " + " | ".join(r.name for r in cols) + " |", "|---|" + "---|" * len(cols)]
    lines += [f"| {title} | " + " | ".join(cells) + " |" for title, cells in rows]
    return "\n".join(lines)


def figures(r: ToolResult, size: int) -> dict[str, float]:
    """Ratio-able figures of one tool, medians of the rounds (missing ones left out)."""
    out: dict[str, float] = {}
    for key, name in (
        ("backup-day1", "day1_mbps"),
        ("backup-day2", "day2_mbps"),
        ("restore-day1", "restore_mbps"),
    ):
        if ms := r.ok(key):
            out[name] = size / MB / statistics.median(m.seconds for m in ms)
            out[name.replace("mbps", "cores")] = statistics.median(m.cores for m in ms)
    if d := durable(r):
        out["durable_restore_mbps"] = size / MB / statistics.median(d)
    if r.repo_bytes_day1:
        out["repo_day1"] = statistics.median(r.repo_bytes_day1)
    if inc := increment(r):
        out["increment_day2"] = statistics.median(inc)
    if peaks := [m.peak_rss_mb for ms in r.steps.values() for m in ms]:
        out["peak_rss"] = max(peaks)
    return out


def ratios(results: dict[str, ToolResult], size: int) -> list[str]:
    figs = {name: figures(r, size) for name, r in results.items()}
    pairs = [
        ("full backup (day 1) throughput", "day1_mbps"),
        ("day 2 backup throughput", "day2_mbps"),
        ("restore throughput (command)", "restore_mbps"),
        ("restore throughput (until durable)", "durable_restore_mbps"),
        ("repo size after day 1", "repo_day1"),
        ("day 2 increment", "increment_day2"),
        ("peak RSS", "peak_rss"),
    ]
    lines: list[str] = []
    for mine in (n for n in figs if n.startswith("snapship")):
        anchors = ["restic", "borg none", *(n for n in figs if n.startswith("snapship")
                                            and n != mine and n.endswith(mine[-5:]))]
        for title, key in pairs:
            parts = [
                f"{figs[mine][key] / figs[a][key]:.2f}x {a}"
                for a in anchors
                if a in figs and key in figs[a] and key in figs[mine] and figs[a][key]
            ]
            if parts:
                lines.append(f"- {mine}, {title}: " + ", ".join(parts))
    return lines


def make_tools(
    groups: list[str], snapship: Path, rundir: Path, extra: bool, baseline: Path | None
) -> list[Tool]:
    """The columns: snapship (encrypted, defaults), restic, borg none; with `extra` also
    snapship --encryption none and borg repokey-blake2; with `baseline` the same snapship
    columns for another build (e.g. main before a change), named "snapship base"."""
    repos, caches = rundir / "repos", rundir / "cache"
    tools: list[Tool] = []
    if "snapship" in groups:
        builds = [("snapship", snapship)] + ([("snapship base", baseline)] if baseline else [])
        for label, exe in builds:
            slug = label.replace(" ", "-")
            tools.append(Snapship(repos / f"{slug}-enc", caches / f"{slug}-enc", exe, True, label))
            if extra:
                tools.append(Snapship(repos / f"{slug}-none", caches / f"{slug}-none", exe, False,
                                      label))
    if "restic" in groups:
        tools.append(Restic(repos / "restic", caches / "restic"))
    if "borg" in groups:
        tools.append(Borg(repos / "borg-none", caches / "borg-none", "none"))
        if extra:
            tools.append(Borg(repos / "borg-blake2", caches / "borg-blake2", "repokey-blake2"))
    return tools


def measurement_json(m: Measurement) -> dict[str, Any]:
    return {**asdict(m), "cores": m.cores, "peak_rss_mb": m.peak_rss_mb}


def rss_scaling(args: argparse.Namespace) -> int:
    """snapship's peak RSS backing up a 1 GiB and a 4 GiB image: it should stay flat."""
    rows: list[dict[str, Any]] = []
    for label in ("1G", "4G"):
        images = make_image.ensure_images(args.workdir, make_image.parse_size(label))
        for encrypted in (True, False):
            rundir = args.workdir / f"rss-{label}-{'enc' if encrypted else 'none'}"
            shutil.rmtree(rundir, ignore_errors=True)
            rundir.mkdir(parents=True)
            tool = Snapship(rundir / "repo", rundir / "cache", args.snapship, encrypted)
            read_all(images.day1)
            for step, cmd in (("init", tool.init()), ("backup", tool.backup(images.day1, ""))):
                m = measure(step, cmd, tool.env, rundir / f"{step}.log")
                if m.returncode != 0:
                    print(f"{tool.name} {step} failed on {label}: see {m.log}", file=sys.stderr)
                    return 1
            rows.append({"image": label, "tool": tool.name, **measurement_json(m)})
            print(
                f"  {label} {tool.name:16} backup {m.seconds:6.2f} s, "
                f"peak RSS {m.peak_rss_mb:6.1f} MB",
                flush=True,
            )
    for name in ("snapship (enc)", "snapship (none)"):
        small, large = (r["peak_rss_mb"] for r in rows if r["tool"] == name)
        print(f"{name}: peak RSS 4 GiB / 1 GiB image = {large / small:.2f}x (flat is ~1.0)")
    out = args.workdir / "rss-scaling.json"
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"results written to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--workdir", type=Path, default=make_image.DEFAULT_WORKDIR)
    parser.add_argument("--size", default="4G", help="image size: 4G (default), 1G for a quick run")
    parser.add_argument("--snapship", type=Path, default=DEFAULT_SNAPSHIP)
    parser.add_argument(
        "--only", default=",".join(GROUPS), help=f"comma-separated subset of {','.join(GROUPS)}"
    )
    parser.add_argument(
        "--extra",
        action="store_true",
        help="also snapship --encryption none and borg repokey-blake2",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another snapship executable (e.g. main's), run beside as 'snapship base'",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds per tool (default 3)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the images")
    parser.add_argument("--json", type=Path, help="results file (default: in the workdir)")
    parser.add_argument(
        "--rss-scaling",
        action="store_true",
        help="only check that snapship's peak RSS is flat for 1 and 4 GiB",
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("run.py needs root (loop mounts to build the images)", file=sys.stderr)
        return 2
    make_image.check_workdir(args.workdir)
    groups = [g.strip() for g in args.only.split(",") if g.strip()]
    if unknown := set(groups) - set(GROUPS):
        parser.error(f"unknown --only group(s): {', '.join(sorted(unknown))}")
    if "snapship" in groups and not os.access(args.snapship, os.X_OK):
        parser.error(f"snapship not found at {args.snapship} (use --snapship or --only)")
    ensure_tools(anchors=not args.rss_scaling and bool({"restic", "borg"} & set(groups)))
    if args.rss_scaling:
        return rss_scaling(args)

    size = make_image.parse_size(args.size)
    images = make_image.ensure_images(args.workdir, size, args.rebuild)
    print(make_image.describe(images.stats), flush=True)
    load_before = os.getloadavg()
    if load_before[0] > 0.5:
        print(
            f"WARNING: load average {load_before[0]:.2f}: other work on this machine will "
            "skew the figures",
            file=sys.stderr,
        )
    rundir = args.workdir / f"run-{make_image.size_label(size)}"
    previous = set_aside(rundir)
    loads: list[float] = []

    def make(where: Path) -> list[Tool]:
        loads.append(os.getloadavg()[0])
        return make_tools(groups, args.snapship, where, args.extra, args.baseline)

    results = run_benchmark(make, images, rundir, args.rounds)
    loads.append(os.getloadavg()[0])
    shutil.rmtree(previous, ignore_errors=True)

    report = [
        f"## Benchmark: {make_image.size_label(size)} image, "
        f"{images.stats.changed_bytes_4k / 2**20:.1f} MiB of 4 KiB blocks changed on day 2",
        "",
        f"Load average (1 min) at the start of each round and at the end: "
        f"{' / '.join(f'{x:.2f}' for x in loads)} on {os.cpu_count()} CPUs; "
        f"{args.rounds} rounds, median (min-max)",
        "",
        table(results, size),
        "",
        "Ratios (snapship / anchor; >1 means larger):",
        *(ratios(results, size) or ["- (no snapship and anchor in this run)"]),
    ]
    print("\n" + "\n".join(report))
    errors = [f"{r.name}: {e}" for r in results.values() for e in r.errors]
    if errors:
        print("\nERRORS:\n" + "\n".join(f"- {e}" for e in errors), file=sys.stderr)
    out = args.json or args.workdir / f"results-{make_image.size_label(size)}.json"
    out.write_text(
        json.dumps(
            {
                "image": asdict(images.stats),
                "results": {
                    name: {
                        **asdict(r),
                        "steps": {k: [measurement_json(m) for m in ms]
                                  for k, ms in r.steps.items()},
                        "figures": figures(r, size),
                    }
                    for name, r in results.items()
                },
                "report": report,
                "errors": errors,
            },
            indent=2,
            default=str,
        )
        + "\n"
    )
    print(f"\nresults written to {out}")
    if any(r.failed or r.verified is False for r in results.values()):
        print(
            "BENCHMARK FAILED: a step failed or a restore did not match (see ERRORS)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
