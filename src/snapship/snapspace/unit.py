"""The systemd unit of snapshot space: the shipped template, its instance names, and its
installation into a unit directory (enabling is the `WantedBy=` symlink `systemctl enable`
makes, made here, so it works the same with or without a running systemd).

One instance per snapshot-space file, named by the file's path as `systemd-escape --path`
escapes it; the template's `%f` turns the name back into the path.
"""

from __future__ import annotations

import os
import tempfile
from importlib import resources

TEMPLATE = "snapship-snapspace@.service"
PREFIX = "snapship-snapspace@"
WANTED_BY = "local-fs.target"
DEFAULT_UNIT_DIR = "/etc/systemd/system"
_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:_.")


def template_text() -> str:
    return resources.files("snapship.snapspace").joinpath(TEMPLATE).read_text("utf-8")


def escape_path(path: str) -> str:
    """`systemd-escape --path PATH` (systemd.unit(5), "String Escaping for Inclusion in
    Unit Names"): slashes to dashes, every other byte outside [A-Za-z0-9:_.] (and a leading
    dot) as \\xNN."""
    parts = [p for p in path.split("/") if p]
    if not parts:
        return "-"
    out = []
    for i, byte in enumerate("/".join(parts).encode()):
        c = chr(byte)
        if c == "/":
            out.append("-")
        elif c in _PLAIN and not (i == 0 and c == "."):
            out.append(c)
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out)


def instance(path: str) -> str:
    return f"{PREFIX}{escape_path(os.path.abspath(path))}.service"


def _wants(unit_dir: str, unit: str) -> str:
    return os.path.join(unit_dir, f"{WANTED_BY}.wants", unit)


def install(unit_dir: str, path: str) -> list[str]:
    """Write the template (atomically) and enable the instance of `path`; the files made."""
    os.makedirs(unit_dir, exist_ok=True)
    target = os.path.join(unit_dir, TEMPLATE)
    fd, tmp = tempfile.mkstemp(dir=unit_dir, prefix=".snapship-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(template_text())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
    link = _wants(unit_dir, instance(path))
    os.makedirs(os.path.dirname(link), exist_ok=True)
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink(target, link)
    return [target, link]


def enabled(unit_dir: str, path: str) -> bool:
    return os.path.lexists(_wants(unit_dir, instance(path)))


def enabled_files(unit_dir: str) -> list[str]:
    """The files of every enabled instance, by their names (what %f makes of them)."""
    try:
        names = sorted(os.listdir(os.path.join(unit_dir, f"{WANTED_BY}.wants")))
    except OSError:
        return []
    return [unescape_path(n[len(PREFIX):-len(".service")]) for n in names
            if n.startswith(PREFIX) and n.endswith(".service") and n != TEMPLATE]


def unescape_path(name: str) -> str:
    """What `%f` makes of an instance name: the inverse of `escape_path`."""
    raw = bytearray()
    i = 0
    while i < len(name):
        if name.startswith("\\x", i) and i + 4 <= len(name):
            raw.append(int(name[i + 2:i + 4], 16))
            i += 4
        else:
            raw += b"/" if name[i] == "-" else name[i].encode()
            i += 1
    return "/" + raw.decode(errors="surrogateescape").lstrip("/")


def disable(unit_dir: str, path: str) -> list[str]:
    """Remove the instance's enabling symlink; the files removed (the template stays: other
    instances use it)."""
    link = _wants(unit_dir, instance(path))
    if not os.path.lexists(link):
        return []
    os.unlink(link)
    return [link]
