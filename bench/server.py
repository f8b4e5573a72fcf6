#!/usr/bin/env python3
"""Backup and restore throughput through `snapship server` over loopback, against a
local-directory repository, in one run.

For each target (local directory, the server over http://127.0.0.1, and with --tls over
https://127.0.0.1 with a self-made CA): a fresh repository, a full backup of day1.img (page
cache warm), a restore of that version to a file, its SHA-256 checked against the image.
Rounds alternate the targets; the table shows the best round of each, with the ratio to
local. The server runs as a separate process with a backup token for backups and a read token
for restores, as it would in production. Needs root for the image (see bench/README.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import make_image
from run import image_sha256, read_all, sha256

MB = 1_000_000
BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_SNAPSHIP = BENCH_DIR.parent / ".venv" / "bin" / "snapship"
DEFAULT_WORKDIR = Path("/var/tmp/snapship-bench-server")
PASSPHRASE = "bench-passphrase-not-secret"


@dataclass
class Step:
    seconds: float
    cpu_client: float
    cpu_server: float | None = None


@dataclass
class Round:
    target: str
    backup: Step
    restore: Step
    verified: bool
    repo_bytes: int


@dataclass
class Results:
    size: int
    image: str
    rounds: list[Round] = field(default_factory=list)


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    r = os.times()
    return r.children_user + r.children_system


class Server:
    """`snapship server` as a subprocess on a free loopback port."""

    def __init__(self, exe: str, root: Path, tokens: Path, tls: tuple[Path, Path] | None,
                 log: Path) -> None:
        argv = [exe, "server", "--root", str(root), "--tokens", str(tokens), "--listen",
                "127.0.0.1:0"]
        if tls:
            argv += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
        self.log = log.open("w")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.PIPE, text=True)
        self.url = ""
        ready = threading.Event()

        def follow() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.log.write(line)
                self.log.flush()
                m = re.search(r" on (https?://\S+)", line)
                if m and not ready.is_set():
                    self.url = m.group(1)
                    ready.set()

        threading.Thread(target=follow, daemon=True).start()
        if not ready.wait(30):
            self.proc.kill()
            raise SystemExit(f"snapship server did not start; see {log}")

    def cpu(self) -> float:
        return proc_cpu(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.log.close()


def make_tls(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a certificate for 127.0.0.1: (CA, cert, key) PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def snapship(exe: str, args: list[str], env: dict[str, str], log: Path,
             server: Server | None = None) -> tuple[Step, str]:
    subprocess.run(["sync"], check=True)
    cpu0, scpu0 = children_cpu(), server.cpu() if server else 0.0
    start = time.monotonic()
    proc = subprocess.run([exe, *args], env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True)
    seconds = time.monotonic() - start
    step = Step(seconds, children_cpu() - cpu0, server.cpu() - scpu0 if server else None)
    log.write_text(f"$ snapship {' '.join(args)}\n{proc.stdout}{proc.stderr}")
    if proc.returncode != 0:
        raise SystemExit(f"snapship {args[0]} failed ({proc.returncode}); see {log}:\n"
                         f"{proc.stderr.strip()}")
    return step, proc.stdout


def dir_bytes(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file())


def one_round(exe: str, target: str, image: Path, image_sha: str, rundir: Path,
              servers: dict[str, Server], tokens: dict[str, Path], ca: Path | None,
              encryption: str, number: int) -> Round:
    logs = rundir / "logs"
    name = f"r{number}-{target.replace(' ', '-')}"
    env = {**os.environ, "SNAPSHIP_PASSPHRASE": PASSPHRASE}
    env.pop("SNAPSHIP_TOKEN", None)
    server = servers.get(target)
    if server is None:
        repo_dir = rundir / "repos" / name
        repo = str(repo_dir)
        backup_env = restore_env = env
    else:
        repo_dir = rundir / "server-root" / name
        repo = f"{server.url}/{name}"
        if ca is not None:
            env["SNAPSHIP_CA"] = str(ca)
        backup_env = {**env, "SNAPSHIP_TOKEN": tokens["backup"].read_text().strip()}
        restore_env = {**env, "SNAPSHIP_TOKEN": tokens["read"].read_text().strip()}
    snapship(exe, ["init", "--repo", repo, "--encryption", encryption], backup_env,
             logs / f"{name}-init.log")
    read_all(image)
    backup, out = snapship(exe, ["backup", "--repo", repo, str(image), "--volume", "disk",
                                 "--json"], backup_env, logs / f"{name}-backup.log", server)
    version = json.loads(out)["version_id"]
    restored = rundir / "restored.img"
    restored.unlink(missing_ok=True)
    subprocess.run(["sync"], check=True)
    read_all(repo_dir)
    restore, _ = snapship(exe, ["restore", "--repo", repo, f"disk@{version}", str(restored)],
                          restore_env, logs / f"{name}-restore.log", server)
    verified = sha256(restored) == image_sha
    restored.unlink()
    size = dir_bytes(repo_dir)
    shutil.rmtree(repo_dir)
    return Round(target, backup, restore, verified, size)


def best(rounds: list[Round], target: str, step: str) -> Step:
    steps: list[Step] = [getattr(r, step) for r in rounds if r.target == target]
    return min(steps, key=lambda s: s.seconds)


def table(results: Results, targets: list[str]) -> str:
    size = results.size
    local = {s: best(results.rounds, "local", s).seconds for s in ("backup", "restore")}
    rows = ["| | " + " | ".join(targets) + " |", "|---" * (len(targets) + 1) + "|"]
    for step in ("backup", "restore"):
        cells = []
        for t in targets:
            s = best(results.rounds, t, step)
            cell = f"{s.seconds:.2f} s ({size / MB / s.seconds:.0f} MB/s)"
            if t != "local":
                cell += f", {100 * local[step] / s.seconds:.0f}% of local"
            cells.append(cell)
        rows.append(f"| {step} | " + " | ".join(cells) + " |")
    for step in ("backup", "restore"):
        cells = []
        for t in targets:
            s = best(results.rounds, t, step)
            server = f" + server {s.cpu_server:.1f}" if s.cpu_server is not None else ""
            cells.append(f"client {s.cpu_client:.1f}{server}")
        rows.append(f"| {step} CPU s | " + " | ".join(cells) + " |")
    ok = {t: all(r.verified for r in results.rounds if r.target == t) for t in targets}
    rows.append("| restores sha256-verified | "
                + " | ".join("yes" if ok[t] else "NO" for t in targets) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--size", default="1G", help="image size (default 1G)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tls", action="store_true", help="also measure https://")
    parser.add_argument("--encryption", default="aes-256-gcm", choices=["aes-256-gcm", "none"])
    parser.add_argument("--snapship", type=Path, default=DEFAULT_SNAPSHIP)
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/server.py needs root (the image is built with loop mounts)",
              file=sys.stderr)
        return 2
    make_image.check_workdir(args.workdir)
    size = make_image.parse_size(args.size)
    images = make_image.ensure_images(args.workdir, size)
    image_sha = image_sha256(images.day1)
    rundir = args.workdir / f"server-run-{make_image.size_label(size)}"
    shutil.rmtree(rundir, ignore_errors=True)
    (rundir / "logs").mkdir(parents=True)
    (rundir / "server-root").mkdir()
    exe = str(args.snapship)
    tokens_file = rundir / "tokens"
    tokens: dict[str, Path] = {}
    for role in ("backup", "read"):
        out = subprocess.run([exe, "token", f"bench-{role}", "--role", role, "--tokens",
                              str(tokens_file)], capture_output=True, text=True, check=True)
        tokens[role] = rundir / f"{role}.token"
        tokens[role].write_text(out.stdout)
    servers = {"server http": Server(exe, rundir / "server-root", tokens_file, None,
                                     rundir / "logs" / "server-http.log")}
    ca = None
    if args.tls:
        ca, cert, key = make_tls(rundir / "pki")
        servers["server https"] = Server(exe, rundir / "server-root", tokens_file, (cert, key),
                                         rundir / "logs" / "server-https.log")
    targets = ["local", *servers]
    results = Results(size=images.stats.size, image=str(images.day1))
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    try:
        for n in range(args.rounds):
            for target in targets:
                r = one_round(exe, target, images.day1, image_sha, rundir, servers, tokens,
                              ca if target == "server https" else None, args.encryption, n)
                results.rounds.append(r)
                print(f"round {n + 1} {target}: backup {r.backup.seconds:.2f} s, restore "
                      f"{r.restore.seconds:.2f} s, verified {r.verified}", flush=True)
    finally:
        for s in servers.values():
            s.stop()
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(f"\n{make_image.size_label(size)} image ({results.size / MB:.0f} MB), encryption "
          f"{args.encryption}, best of {args.rounds} rounds:\n")
    print(table(results, targets))
    out = args.json or rundir / "results.json"
    out.write_text(json.dumps(asdict(results), indent=2) + "\n")
    return 0 if all(r.verified for r in results.rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
