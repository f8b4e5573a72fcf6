"""The jobs file (docs/config.md, version 1): its bytes in, a checked `Config` out.

Pure: no I/O beyond the bytes given. `tomllib` parses (and says where a syntax error is);
this module checks what the parsed tables mean and names every mistake with its line. tomllib
keeps no positions, so `key_lines` scans the text once for the line of each table header and
`key =` line: a scan for positions only, never for values. A key it cannot place (inside an
inline table, say) is reported at the line of the nearest enclosing key it can.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from snapship.engine.prune import BUCKETS, Policy, parse_duration
from snapship.engine.snapshot_backup import valid_snapshot_size
from snapship.errors import UsageError
from snapship.formats.manifest import check_name

CONFIG_VERSION = 1
DEFAULT_PATH = "/etc/snapship/snapship.toml"
REMOTE_PREFIXES = ("s3://", "http://", "https://")
KEEP_RULES = ("last", *BUCKETS)
"""prune's --keep-N rules, as `keep-N` keys of a volume's retention table."""

Path = tuple[str, ...]


@dataclass(frozen=True)
class Problem:
    line: int
    key: str
    """The dotted key it is about ("" for the file as a whole)."""
    message: str

    def describe(self, path: str) -> str:
        return f"{path}:{self.line}: {self.message}"


class ConfigInvalid(UsageError):
    """The jobs file does not parse or does not make sense; `problems` lists every mistake."""

    def __init__(self, path: str, problems: list[Problem]) -> None:
        more = len(problems) - 1
        super().__init__(problems[0].describe(path) + (
            f" (and {more} more: snapship config check --config {path})" if more else ""))
        self.path = path
        self.problems = problems


@dataclass(frozen=True)
class RepositoryConfig:
    name: str
    location: str
    """A directory, s3://BUCKET[/PREFIX] or http(s)://HOST:PORT/NAME, as --repo takes it."""
    passphrase_file: str | None = None
    passphrase_command: str | None = None
    token_file: str | None = None
    ca_file: str | None = None

    @property
    def is_local(self) -> bool:
        return not self.location.startswith(REMOTE_PREFIXES)

    @property
    def local_path(self) -> str | None:
        """The directory of a local repository; None for a remote one."""
        return self.location.removeprefix("file://") if self.is_local else None


@dataclass(frozen=True)
class VolumeConfig:
    name: str
    """The table's name in the file; steps and logs name the volume by it."""
    source: str
    volume: str
    """The volume's name in the repositories (default: `name`)."""
    labels: dict[str, str] = field(default_factory=dict)
    snapshot_size: str = "10%"
    pre_snapshot: str | None = None
    post_snapshot: str | None = None
    retention: Policy | None = None
    snapshot_pvs: tuple[str, ...] = ()
    """The PVs its classic snapshots go on (as `--snapshot-pv`; default: the VG's snapshot
    space, if any)."""

    @property
    def is_lvm(self) -> bool:
        return self.source.startswith("lvm:")


@dataclass(frozen=True)
class JobConfig:
    name: str
    volumes: tuple[str, ...]
    """Volumes to back up; in a copy job, the volumes to copy (empty: every volume)."""
    repositories: tuple[str, ...]
    """Where its backups go; in a copy job, where the copies go."""
    schedule: str | None = None
    """A systemd OnCalendar expression (`daily`, `*-*-* 02:00`); None: run by hand only."""
    prune: bool = True
    """Apply each volume's retention after its backups (volumes without one are not pruned)."""
    gc: bool = False
    on_success: str | None = None
    on_failure: str | None = None
    """Shell commands run after the job: when all its steps succeeded, when any failed."""
    copy_from: str | None = None
    """A copy job (periodic sync): copy versions from this repository into `repositories`
    instead of backing anything up."""

    @property
    def all_repositories(self) -> tuple[str, ...]:
        """Every repository the job opens."""
        return (*self.repositories, *((self.copy_from,) if self.copy_from else ()))


@dataclass(frozen=True)
class Config:
    repositories: dict[str, RepositoryConfig]
    volumes: dict[str, VolumeConfig]
    jobs: dict[str, JobConfig]
    metrics_file: str | None = None
    """Where `run` writes Prometheus metrics (node_exporter's textfile collector)."""


# -- positions ----------------------------------------------------------------------------

_KEY_PART = r'(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|\'[^\']*\')'
_DOTTED = rf"{_KEY_PART}(?:\s*\.\s*{_KEY_PART})*"
_HEADER = re.compile(rf"\s*\[\[?\s*({_DOTTED})\s*\]\]?")
_ASSIGN = re.compile(rf"\s*({_DOTTED})\s*=")
_PART = re.compile(_KEY_PART)


def _split(dotted: str) -> Path:
    return tuple(p[1:-1] if p[0] in "\"'" else p for p in _PART.findall(dotted))


def key_lines(text: str) -> dict[Path, int]:
    """The (first) line of each table header and `key = ...` line, by its full dotted path."""
    lines: dict[Path, int] = {}
    table: Path = ()
    in_string: str | None = None  # inside a multi-line string: no keys there
    for number, line in enumerate(text.splitlines(), 1):
        if in_string is None:
            header = _HEADER.match(line)
            assign = None if header else _ASSIGN.match(line)
            if header:
                table = _split(header.group(1))
                lines.setdefault(table, number)
            elif assign:
                lines.setdefault(table + _split(assign.group(1)), number)
        for quote in ('"""', "'''"):
            if in_string in (None, quote) and line.count(quote) % 2:
                in_string = quote if in_string is None else None
    return lines


# -- checking -----------------------------------------------------------------------------


class _Checker:
    def __init__(self, lines: dict[Path, int]) -> None:
        self.lines = lines
        self.problems: list[Problem] = []

    def line(self, path: Path) -> int:
        while path and path not in self.lines:
            path = path[:-1]
        return self.lines.get(path, 1)

    def problem(self, path: Path, message: str) -> None:
        self.problems.append(Problem(self.line(path), ".".join(path), message))

    def table(self, d: dict[str, Any], path: Path, key: str) -> dict[str, Any]:
        value = d.get(key, {})
        if not isinstance(value, dict):
            self.problem((*path, key), f"{_name((*path, key))} must be a table")
            return {}
        return value

    def known(self, d: dict[str, Any], path: Path, keys: Iterable[str]) -> None:
        allowed = set(keys)
        for key in d:
            if key not in allowed:
                self.problem((*path, key), f"unknown key {_name((*path, key))} (known: "
                             f"{', '.join(sorted(allowed))})")

    def string(self, d: dict[str, Any], path: Path, key: str, *, required: bool = False
               ) -> str | None:
        if key not in d:
            if required:
                self.problem(path, f"{_name(path)} needs {key}")
            return None
        value = d[key]
        if not isinstance(value, str) or not value:
            self.problem((*path, key), f"{_name((*path, key))} must be a non-empty string")
            return None
        if "\n" in value or "\0" in value:
            self.problem((*path, key), f"{_name((*path, key))} must be one line")
            return None
        return value

    def boolean(self, d: dict[str, Any], path: Path, key: str, default: bool) -> bool:
        value = d.get(key, default)
        if not isinstance(value, bool):
            self.problem((*path, key), f"{_name((*path, key))} must be true or false")
            return default
        return value

    def names(self, d: dict[str, Any], path: Path, key: str, among: dict[str, Any],
              what: str) -> tuple[str, ...]:
        value = d.get(key)
        where = (*path, key)
        if value is None:
            self.problem(path, f"{_name(path)} needs {key} (a list of {what} names)")
            return ()
        if not isinstance(value, list) or not value or \
                not all(isinstance(v, str) for v in value):
            self.problem(where, f"{_name(where)} must be a non-empty list of {what} names")
            return ()
        for v in value:
            if v not in among:
                self.problem(where, f"{_name(where)} names {what} {v!r}, which the file "
                             f"does not define" + (f" (defined: {', '.join(sorted(among))})"
                                                   if among else ""))
        if len(set(value)) != len(value):
            self.problem(where, f"{_name(where)} names a {what} twice")
        return tuple(dict.fromkeys(value))


def _name(path: Path) -> str:
    return ".".join(path) if path else "the file"


def _checked(check: Callable[[str, str], object], kind: str, name: str) -> str | None:
    try:
        check(kind, name)
    except UsageError as e:
        return str(e)
    return None


def _repository(c: _Checker, name: str, d: dict[str, Any]) -> RepositoryConfig | None:
    path = ("repositories", name)
    c.known(d, path, ("location", "passphrase-file", "passphrase-command", "token-file",
                      "ca-file"))
    location = c.string(d, path, "location", required=True)
    pfile = c.string(d, path, "passphrase-file")
    pcommand = c.string(d, path, "passphrase-command")
    token = c.string(d, path, "token-file")
    ca = c.string(d, path, "ca-file")
    if pfile and pcommand:
        c.problem((*path, "passphrase-command"), f"{_name(path)}: give passphrase-file or "
                  "passphrase-command, not both")
    if location is None:
        return None
    if "://" in location and not location.startswith((*REMOTE_PREFIXES, "file://")):
        c.problem((*path, "location"), f"{_name(path)}.location {location!r} is neither a "
                  "directory nor an s3:// or http(s):// URL")
    if (token or ca) and not location.startswith(("http://", "https://")):
        c.problem((*path, "token-file" if token else "ca-file"),
                  f"{_name(path)}: token-file and ca-file are for http(s):// repositories")
    return RepositoryConfig(name, location, pfile, pcommand, token, ca)


def _retention(c: _Checker, path: Path, d: dict[str, Any]) -> Policy | None:
    before = len(c.problems)
    c.known(d, path, [f"keep-{r}" for r in KEEP_RULES] + ["keep-within"])
    counts: dict[str, int] = {}
    for rule in KEEP_RULES:
        key = f"keep-{rule}"
        if key in d:
            value = d[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                c.problem((*path, key), f"{_name((*path, key))} must be a whole number of "
                          f"1 or more (not {value!r})")
            else:
                counts[rule] = value
    within = None
    if "keep-within" in d:
        text = c.string(d, path, "keep-within")
        if text is not None:
            try:
                within = parse_duration(text)
            except UsageError as e:
                c.problem((*path, "keep-within"), f"{_name((*path, 'keep-within'))}: {e}")
            else:
                if not (within.years or within.months or within.days or within.hours):
                    c.problem((*path, "keep-within"), f"{_name((*path, 'keep-within'))} "
                              "keeps nothing: give a duration above zero")
                    within = None
    policy = Policy(**counts, within=within)
    if policy.is_empty():
        if len(c.problems) == before:
            c.problem(path, f"{_name(path)} has no rule: give at least one keep-* key")
        return None
    return policy


def _volume(c: _Checker, name: str, d: dict[str, Any]) -> VolumeConfig | None:
    path = ("volumes", name)
    c.known(d, path, ("source", "volume", "labels", "snapshot-size", "snapshot-pv",
                      "pre-snapshot", "post-snapshot", "retention"))
    source = c.string(d, path, "source", required=True)
    volume = c.string(d, path, "volume") or name
    bad = _checked(check_name, "volume", volume)
    if bad:
        c.problem(path + (("volume",) if "volume" in d else ()), f"{_name(path)}: {bad}")
    labels = c.table(d, path, "labels")
    for key, value in labels.items():
        if not isinstance(value, str) or not key:
            c.problem((*path, "labels", key), f"{_name((*path, 'labels', key))} must be a "
                      "string")
    size = c.string(d, path, "snapshot-size")
    pvs = d.get("snapshot-pv", [])
    if not isinstance(pvs, list) or not all(isinstance(v, str) and v.startswith("/dev/")
                                            and "\n" not in v for v in pvs):
        c.problem((*path, "snapshot-pv"), f"{_name((*path, 'snapshot-pv'))} must be a list "
                  "of PV paths such as \"/dev/sdb1\"")
        pvs = []
    pre = c.string(d, path, "pre-snapshot")
    post = c.string(d, path, "post-snapshot")
    if size is not None and not valid_snapshot_size(size):
        c.problem((*path, "snapshot-size"), f"{_name((*path, 'snapshot-size'))} {size!r} "
                  "is neither N% of the origin (N at least 1), a size such as 2G, nor auto")
    if source is not None and not source.startswith("lvm:"):
        for key, value in (("snapshot-size", size), ("snapshot-pv", pvs or None),
                           ("pre-snapshot", pre), ("post-snapshot", post)):
            if value is not None:
                c.problem((*path, key), f"{_name((*path, key))} is for lvm:VG/LV sources "
                          f"(the source is {source})")
    if source is not None and source.startswith("lvm:"):
        vg, sep, lv = source.removeprefix("lvm:").partition("/")
        if not (vg and sep and lv) or "/" in lv:
            c.problem((*path, "source"), f"{_name(path)}.source {source!r} is not of the "
                      "form lvm:VG/LV")
    retention = None
    if "retention" in d:
        retention = _retention(c, (*path, "retention"), c.table(d, path, "retention"))
    if source is None or bad:
        return None
    return VolumeConfig(name, source, volume, {k: v for k, v in labels.items()
                                               if isinstance(v, str)},
                        size or "10%", pre, post, retention, tuple(pvs))


def _job(c: _Checker, name: str, d: dict[str, Any], volumes: dict[str, Any],
         repositories: dict[str, Any]) -> JobConfig:
    path = ("jobs", name)
    c.known(d, path, ("volumes", "repositories", "schedule", "prune", "gc", "on-success",
                      "on-failure", "copy-from"))
    copy_from = c.string(d, path, "copy-from")
    if copy_from is not None and copy_from not in repositories:
        c.problem((*path, "copy-from"), f"{_name((*path, 'copy-from'))} names repository "
                  f"{copy_from!r}, which the file does not define"
                  + (f" (defined: {', '.join(sorted(repositories))})" if repositories else ""))
    # A copy job without volumes copies every volume of its source.
    vols = () if copy_from is not None and "volumes" not in d else \
        c.names(d, path, "volumes", volumes, "volume")
    repos = c.names(d, path, "repositories", repositories, "repository")
    if copy_from is not None and copy_from in repos:
        c.problem((*path, "copy-from"), f"{_name(path)} copies from {copy_from!r} into "
                  "itself: copy-from may not be one of its repositories")
    schedule = c.string(d, path, "schedule")
    return JobConfig(name, vols, repos, schedule, c.boolean(d, path, "prune", True),
                     c.boolean(d, path, "gc", False), c.string(d, path, "on-success"),
                     c.string(d, path, "on-failure"), copy_from)


_JOB_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
"""Job names become systemd instance names (`snapship-run@NAME.service`): no escaping."""


def check(data: bytes) -> tuple[Config | None, list[Problem]]:
    """The configuration in `data` and every problem found (the config is None when there is
    any: a file with a mistake is not half-used)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, [Problem(data[: e.start].count(b"\n") + 1, "", "not UTF-8 text")]
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column \d+\)", str(e))
        return None, [Problem(int(m.group(1)) if m else 1, "", f"not valid TOML: {e}")]
    c = _Checker(key_lines(text))
    c.known(doc, (), ("version", "metrics-file", "repositories", "volumes", "jobs"))
    metrics = c.string(doc, (), "metrics-file")
    if metrics is not None and not metrics.endswith(".prom"):
        c.problem(("metrics-file",), f"metrics-file {metrics!r} must end in .prom (what "
                  "node_exporter's textfile collector reads)")
    version = doc.get("version")
    if version != CONFIG_VERSION:
        c.problem(("version",), f"version = {CONFIG_VERSION} is needed (this snapship reads "
                  f"version {CONFIG_VERSION} of the file; found {version!r})")
    sections: dict[str, dict[str, dict[str, Any]]] = {}
    for section in ("repositories", "volumes", "jobs"):
        tables = c.table(doc, (), section)
        sections[section] = {}
        for name, d in tables.items():
            if not isinstance(d, dict):
                c.problem((section, name), f"{section}.{name} must be a table")
            elif section == "jobs" and not _JOB_NAME.fullmatch(name):
                c.problem((section, name), f"job name {name!r}: use letters, digits and . _ - "
                          "(at most 64)")
            else:
                sections[section][name] = d
    repositories = {n: r for n, d in sections["repositories"].items()
                    if (r := _repository(c, n, d)) is not None}
    volumes = {n: v for n, d in sections["volumes"].items()
               if (v := _volume(c, n, d)) is not None}
    jobs = {n: _job(c, n, d, sections["volumes"], sections["repositories"])
            for n, d in sections["jobs"].items()}
    if not jobs and not c.problems:
        c.problem(("jobs",), "the file defines no job ([jobs.NAME])")
    seen: dict[str, str] = {}
    for v in volumes.values():  # two sources into one history would mix them
        if v.volume in seen:
            c.problem(("volumes", v.name), f"volumes.{v.name} and volumes.{seen[v.volume]} "
                      f"are both volume {v.volume!r}")
        seen.setdefault(v.volume, v.name)
    if c.problems:
        return None, sorted(c.problems, key=lambda p: p.line)
    return Config(repositories, volumes, jobs, metrics), []


def parse(data: bytes, path: str) -> Config:
    """The configuration in `data` (read from `path`, named in errors); ConfigInvalid if it
    has any problem."""
    config, problems = check(data)
    if config is None:
        raise ConfigInvalid(path, problems)
    return config
