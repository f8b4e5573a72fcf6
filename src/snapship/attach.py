"""The edge to the kernel for using a served version as a block device: NBD clients, loop
devices, partition tables, mounts.

Every command `snapship mount` and instant restore run on the machine (`nbd-client`,
`nbdfuse`, `mount`, `umount`, `partx`, `blkid`) and every look at what is attached
(/sys/block/nbd*, /proc/self/mountinfo, `losetup -j`) is here, behind the small set of
functions below, so the commands above hold only the order of things and the state record.
Each detaching function is idempotent: it does nothing when the thing is already gone, so a
tear-down after a crash can simply run every step again.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from snapship.errors import SnapshipError

FUSE_FILE = "nbd"
"""The file nbdfuse shows under its mount point (its default name)."""

_WAIT = 30.0


class AttachError(SnapshipError):
    """A command that attaches or detaches a device failed."""


def run(argv: Sequence[str], what: str) -> str:
    try:
        p = subprocess.run(list(argv), capture_output=True, text=True, check=False,
                           stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise AttachError(f"cannot {what}: {argv[0]} is not installed") from None
    if p.returncode != 0:
        detail = (p.stderr.strip() or p.stdout.strip()).splitlines()
        raise AttachError(f"cannot {what}: {argv[0]} exited {p.returncode}"
                          + (f": {detail[-1]}" if detail else ""))
    return p.stdout


def wait_for(condition_ok: Callable[[], bool], what: str, timeout: float = _WAIT) -> None:
    """Poll `condition_ok()` until true; AttachError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while not condition_ok():
        if time.monotonic() > deadline:
            raise AttachError(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(delay)  # polling a condition with a deadline, not a fixed wait
        delay = min(delay * 2, 0.2)


# -- processes --------------------------------------------------------------------------


def process_start(pid: int) -> str | None:
    """The start time of process `pid` (field 22 of /proc/PID/stat), None if it is gone: with
    the pid it names one process, never a later one that reused the number."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else fields[19]


def alive(pid: int, start: str | None) -> bool:
    return start is not None and process_start(pid) == start


def stop_process(pid: int, start: str | None, timeout: float = _WAIT) -> bool:
    """SIGTERM the process, then SIGKILL it if it has not gone within `timeout`; True if it
    was alive."""
    if not alive(pid, start):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    try:
        wait_for(lambda: not alive(pid, start), f"the exit of process {pid}", timeout)
    except AttachError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not alive(pid, start), f"the exit of process {pid}")
    return True


# -- mounts -----------------------------------------------------------------------------


@dataclass(frozen=True)
class MountEntry:
    target: str
    source: str
    fstype: str


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts() -> list[MountEntry]:
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, after = left.split(), right.split()
        found.append(MountEntry(_unescape(fields[4]), _unescape(after[1]), after[0]))
    return found


def mounted_at(path: str) -> MountEntry | None:
    """The mount on `path` (the last one, if several are stacked), None if nothing is."""
    entries = [m for m in mounts() if m.target == path]
    return entries[-1] if entries else None


def mount(device: str, directory: str, fstype: str, options: Sequence[str]) -> None:
    run(["mount", "-t", fstype, "-o", ",".join(options), device, directory],
        f"mount {device} on {directory}")


def unmount(directory: str) -> bool:
    """Unmount whatever is mounted on `directory`; False if nothing was. A busy file system
    (a shell inside it) is an AttachError and stays mounted."""
    if mounted_at(directory) is None:
        return False
    p = subprocess.run(["umount", directory], capture_output=True, text=True, check=False,
                       stdin=subprocess.DEVNULL)
    if p.returncode != 0 and mounted_at(directory) is not None:
        detail = p.stderr.strip().splitlines()
        raise AttachError(f"cannot unmount {directory}: "
                          f"{detail[-1] if detail else f'umount exited {p.returncode}'}")
    return True


# -- what is on a device ----------------------------------------------------------------


def filesystem_type(device: str, offset: int = 0) -> str | None:
    """What libblkid finds at `offset` of the device or file (e.g. "xfs"), None if nothing."""
    p = subprocess.run(["blkid", "-p", "-O", str(offset), "-o", "value", "-s", "TYPE", device],
                       capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL)
    return p.stdout.strip() or None


@dataclass(frozen=True)
class Partition:
    number: int
    start: int
    """Bytes from the start of the disk."""
    size: int


def partitions(device: str) -> list[Partition]:
    """The partition table of a device or image file (MBR or GPT, read by partx/libblkid)."""
    out = run(["partx", "--show", "--bytes", "--noheadings", "--output",
               "NR,START,SECTORS", device], f"read the partition table of {device}")
    found = []
    for line in out.splitlines():
        nr, start, sectors = line.split()
        found.append(Partition(int(nr), int(start) * 512, int(sectors) * 512))
    return found


# -- loop devices -----------------------------------------------------------------------


def loops_backed_by(path: str) -> list[str]:
    p = subprocess.run(["losetup", "--noheadings", "--output", "NAME", "--associated", path],
                       capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL)
    return p.stdout.split() if p.returncode == 0 else []


def detach_loop(device: str) -> None:
    subprocess.run(["losetup", "--detach", device], capture_output=True, check=False,
                   stdin=subprocess.DEVNULL)


# -- the kernel's NBD client ------------------------------------------------------------


def kernel_nbd_available() -> bool:
    """Whether /dev/nbd* devices exist (the nbd module), loading the module if need be."""
    if not Path("/sys/module/nbd").is_dir():
        subprocess.run(["modprobe", "nbd"], capture_output=True, check=False,
                       stdin=subprocess.DEVNULL)
    return Path("/sys/block/nbd0").is_dir()


def nbd_connected(device: str) -> bool:
    """Whether the kernel has a connection on /dev/nbdN (its pid file exists while it does)."""
    return Path("/sys/block", Path(device).name, "pid").exists()


def free_nbd_devices(writable: bool = False) -> list[str]:
    """Unconnected /dev/nbdN devices; `writable`: only those the kernel has not left
    read-only (6.1 keeps a device read-only once a read-only export was attached to it)."""
    found = []
    for d in sorted(Path("/sys/block").glob("nbd*"), key=lambda d: int(d.name[3:] or 0)):
        if not d.name[3:].isdigit():
            continue
        size = (d / "size").read_text().strip() if (d / "size").exists() else "0"
        read_only = writable and (d / "ro").exists() and (d / "ro").read_text().strip() == "1"
        if not (d / "pid").exists() and size == "0" and not read_only:
            found.append(f"/dev/{d.name}")
    return found


def nbd_connect(socket_path: str, export: str, device: str, read_only: bool) -> None:
    """Attach the export to `device` (512-byte blocks, nbd-client's default: a file system
    made on a disk with 512-byte sectors does not mount on a device with larger ones)."""
    argv = ["nbd-client", "-N", export, "-u", socket_path, device]
    if read_only:
        argv.append("-readonly")
    run(argv, f"attach {export} to {device}")
    wait_for(lambda: nbd_connected(device), f"the connection of {device}")


def nbd_disconnect(device: str, wait: bool = True) -> None:
    """Disconnect `device`: its outstanding and future I/O fail at once (a dead server's
    requests would otherwise wait for the kernel's 30 s timeout). The kernel lets go of the
    device only once nobody has it open: `wait` waits for that (`wait_nbd_released`)."""
    if nbd_connected(device):
        subprocess.run(["nbd-client", "-d", device], capture_output=True, check=False,
                       stdin=subprocess.DEVNULL)
        if wait:
            wait_nbd_released(device)


def wait_nbd_released(device: str) -> None:
    wait_for(lambda: not nbd_connected(device), f"the disconnection of {device}")


# -- nbdfuse ----------------------------------------------------------------------------


def start_nbdfuse(directory: str, socket_path: str, export: str, read_only: bool) -> int:
    """Show the export as `directory`/nbd (a FUSE mount); returns nbdfuse's pid once the file
    is there. nbdfuse runs until its mount point is unmounted."""
    uri = f"nbd+unix:///{export}?socket={socket_path}"
    argv = ["nbdfuse", *(["-r"] if read_only else []), directory, uri]
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
    except FileNotFoundError:
        raise AttachError("cannot show the export as a file: nbdfuse is not installed "
                          "(Debian: libnbd-bin)") from None

    def ready() -> bool:
        if proc.poll() is not None:
            detail = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
            raise AttachError(f"nbdfuse exited {proc.returncode}"
                              + (f": {detail.splitlines()[-1]}" if detail else ""))
        entry = mounted_at(directory)
        return entry is not None and entry.fstype.startswith("fuse")

    wait_for(ready, f"nbdfuse mounting {directory}")
    return proc.pid


def stop_nbdfuse(directory: str, pid: int | None, start: str | None) -> None:
    """Unmount nbdfuse's mount point (which ends it), and end it if it is still there."""
    with contextlib.suppress(AttachError):
        unmount(directory)
    if mounted_at(directory) is not None:
        # A FUSE server that no longer answers keeps its mount busy: only a lazy unmount
        # detaches it, and ending the server then frees it.
        subprocess.run(["umount", "-l", directory], capture_output=True, check=False,
                       stdin=subprocess.DEVNULL)
    if pid is not None:
        stop_process(pid, start, timeout=5)
