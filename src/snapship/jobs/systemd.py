"""systemd units for the jobs of a jobs file: text in, text out (writing them is the CLI's).

One templated service, `snapship-run@.service`, runs `snapship run JOB` for the instance name
and carries the hardening every job shares; one templated timer, `snapship-run@.timer`, is
what `systemctl enable --now snapship-run@JOB.timer` enables. What differs per job lives in
a drop-in of its instance (`snapship-run@JOB.service.d/`, `.timer.d/`): the paths it may write
(its local repositories; LVM's run and archive directories), whether it may reach the network
(not when all its repositories are local), whether it may see devices, and its OnCalendar.
"""

from __future__ import annotations

from dataclasses import dataclass

from snapship.errors import UsageError
from snapship.jobs.config import Config, JobConfig

PREFIX = "snapship-run@"
DROP_IN = "50-snapship.conf"
HEADER = "# Written by `snapship systemd install` from {config}; it rewrites this file.\n"


@dataclass(frozen=True)
class UnitFile:
    path: str
    """Relative to the unit directory: `snapship-run@.service`, `snapship-run@J.timer.d/...`."""
    text: str


def exec_quote(word: str) -> str:
    """One word of an ExecStart= line, as systemd splits it (systemd.service, "Command
    lines"): specifiers (`%`) and variables (`$`) escaped, quoted when it holds a space."""
    word = word.replace("%", "%%").replace("$", "$$")
    if word and not any(c in word for c in " \t\"'\\;"):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _path_setting(path: str) -> str:
    """A path of ReadWritePaths=: `-` (a missing one is no error: the run reports it), and
    specifiers escaped; a path with a space cannot be given (systemd splits there)."""
    if any(c.isspace() for c in path):
        raise UsageError(f"systemd install: path {path!r} holds a space, which ReadWritePaths= "
                         "cannot express")
    return "-" + path.replace("%", "%%")


def service_template(executable: str, config_path: str) -> str:
    command = " ".join(exec_quote(w) for w in (executable, "run", "--config", config_path))
    return HEADER.format(config=config_path) + f"""\
[Unit]
Description=snapship job %i (backups, prunes and gc of the jobs file)

[Service]
Type=oneshot
ExecStart={command} %i
# The machine's record of its repositories (README, "What the client remembers").
StateDirectory=snapship
StateDirectoryMode=0700
Environment=SNAPSHIP_STATE_DIR=%S/snapship
UMask=0077
Nice=10
IOSchedulingClass=idle
# Read everything, write only where the job's drop-in says (ReadWritePaths=).
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes
NoNewPrivileges=yes
ProtectKernelTunables=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
"""


def timer_template(config_path: str) -> str:
    return HEADER.format(config=config_path) + """\
[Unit]
Description=snapship job %i on its schedule (OnCalendar= in the instance's drop-in)

[Timer]
Persistent=true
AccuracySec=1min

[Install]
WantedBy=timers.target
"""


def _absolute(what: str, path: str) -> str:
    if not path.startswith("/"):
        raise UsageError(f"systemd install: {what} {path!r} must be an absolute path (a "
                         "service runs in /)")
    return path


def _local_paths(config: Config, job: JobConfig) -> list[str]:
    """The job's local repositories; and every path it names checked to be absolute."""
    paths = []
    for name in job.all_repositories:
        rc = config.repositories[name]
        for key, value in (("passphrase-file", rc.passphrase_file),
                           ("token-file", rc.token_file), ("ca-file", rc.ca_file)):
            if value is not None:
                _absolute(f"repository {name}: {key}", value)
        if rc.local_path is not None:
            paths.append(_absolute(f"repository {name}: location", rc.local_path))
    for name in () if job.copy_from else job.volumes:
        v = config.volumes[name]
        if not v.is_lvm:
            _absolute(f"volume {name}: source", v.source)
    return paths


def service_drop_in(config: Config, job: JobConfig, config_path: str) -> str:
    # A copy job reads repositories only, never its volumes' sources.
    sources = [] if job.copy_from else [config.volumes[v].source for v in job.volumes]
    lvm = any(s.startswith("lvm:") for s in sources)
    devices = lvm or any(s.startswith("/dev/") for s in sources)
    remote = any(not config.repositories[r].is_local for r in job.all_repositories)
    writable = _local_paths(config, job)
    if config.metrics_file is not None:  # written beside, then renamed over
        if not config.metrics_file.startswith("/"):
            raise UsageError(f"systemd install: metrics-file {config.metrics_file!r} must be "
                             "an absolute path (a service runs in /)")
        writable.append(config.metrics_file.rsplit("/", 1)[0] or "/")
    if lvm:  # lvcreate and lvremove: locks, run state, metadata backups
        writable += ["/run/lvm", "/run/lock/lvm", "/etc/lvm/archive", "/etc/lvm/backup"]
    families = ["AF_UNIX"] + (["AF_NETLINK"] if lvm else []) + \
        (["AF_INET", "AF_INET6"] if remote else [])
    lines = [HEADER.format(config=config_path).rstrip("\n")]
    if remote:
        lines += ["[Unit]", "Wants=network-online.target", "After=network-online.target", ""]
    lines.append("[Service]")
    if writable:
        lines.append("ReadWritePaths=" + " ".join(_path_setting(p) for p in writable))
    lines.append("RestrictAddressFamilies=" + " ".join(families))
    if not remote:  # every repository is local: no network at all
        lines.append("PrivateNetwork=yes")
    if not devices:  # image files only
        lines.append("PrivateDevices=yes")
    if not lvm:  # lvm2 may load device-mapper modules
        lines.append("ProtectKernelModules=yes")
    return "\n".join(lines) + "\n"


def timer_drop_in(job: JobConfig, config_path: str) -> str:
    assert job.schedule is not None
    return HEADER.format(config=config_path) + \
        f"[Timer]\nOnCalendar={job.schedule.replace('%', '%%')}\n"


def units(config: Config, *, executable: str, config_path: str) -> list[UnitFile]:
    """Every file `snapship systemd install` writes for `config`: the two templates, and per
    job its service drop-in and, for a job with a schedule, its timer drop-in."""
    out = [UnitFile(f"{PREFIX}.service", service_template(executable, config_path)),
           UnitFile(f"{PREFIX}.timer", timer_template(config_path))]
    for job in config.jobs.values():
        out.append(UnitFile(f"{PREFIX}{job.name}.service.d/{DROP_IN}",
                            service_drop_in(config, job, config_path)))
        if job.schedule is not None:
            out.append(UnitFile(f"{PREFIX}{job.name}.timer.d/{DROP_IN}",
                                timer_drop_in(job, config_path)))
    return out


def scheduled(config: Config) -> list[str]:
    """The timer instances to enable: one per job with a schedule."""
    return [f"{PREFIX}{j.name}.timer" for j in config.jobs.values() if j.schedule is not None]
