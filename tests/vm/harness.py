"""Run shell scripts inside a small qemu VM with a real Linux kernel (device-mapper, lvm2, xfs).

The host's kernel has no device-mapper, so tests that need real LVM boot a Debian kernel under
qemu's software emulation (TCG; KVM hangs on these machines). The guest has no disk image of
its own: the host's `/` is shared read-only over 9p and the script runs in a chroot of it, so
every host tool (lvm2, dmsetup, mkfs.xfs, thin_delta, python3, this checkout and its venv) is
there. A per-run scratch folder is shared writable at `/scratch` to pass files in and out.
See /work/shared/notes/lvm-in-a-vm.md for what was verified.

    assets = ensure_vm_assets()            # once: packages, kernel, initramfs (cached)
    res = run_in_vm("lvcreate ...", disks={"pv": 1 << 30}, timeout=120)
    res.check()                            # raises VmError with the logs unless rc == 0
    data = (res.scratch / "out.bin").read_bytes()

The cache lives in $SNAPSHIP_VM_CACHE (default /var/cache/snapship-vm); `setup.sh` fills it.
"""

from __future__ import annotations

import compileall
import functools
import gzip
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parent.parent
SETUP_SH = HERE / "setup.sh"
INIT_SH = HERE / "init.sh"
DEFAULT_CACHE = Path("/var/cache/snapship-vm")
QEMU = "qemu-system-x86_64"
BUSYBOX = Path("/bin/busybox")

# Loaded in the guest, with their dependencies, in dependency order.
MODULES = (
    "virtio_pci", "virtio_blk", "9pnet_virtio", "9p",
    "crc32c_generic", "libcrc32c",
    "dm-mod", "dm-snapshot", "dm-thin-pool", "dm-zero",
    "xfs", "ext4", "loop", "nbd", "overlay", "md-mod", "raid1", "dm-mirror",
)  # fmt: skip

CONSOLE_TAIL_LINES = 40


class VmError(RuntimeError):
    """The VM could not be prepared, did not finish, or the script failed (see `check`)."""


class VmTimeout(VmError):
    """The VM did not power off within the timeout; qemu was killed."""


@dataclass(frozen=True)
class VmAssets:
    kernel: Path
    initramfs: Path
    kernel_version: str
    modules_dir: Path


@dataclass(frozen=True)
class VmResult:
    returncode: int
    """Exit code of the script (bash) in the guest."""
    stdout: str
    stderr: str
    console: str
    """Everything the guest printed on its serial console (kernel + init)."""
    scratch: Path
    """Host side of the guest's /scratch; results written there by the script stay."""
    workdir: Path
    disks: Mapping[str, Path] = field(default_factory=dict)
    """Host-side disk images by name, in attachment order (/dev/vda, /dev/vdb, ...)."""
    seconds: float = 0.0
    """Wall-clock time from starting qemu until it exited."""

    def describe(self) -> str:
        tail = "\n".join(self.console.splitlines()[-CONSOLE_TAIL_LINES:])
        return (
            f"VM script exit code {self.returncode} after {self.seconds:.1f}s "
            f"(workdir {self.workdir})\n"
            f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}\n"
            f"--- console (last {CONSOLE_TAIL_LINES} lines) ---\n{tail}"
        )

    def check(self) -> VmResult:
        """Return self if the script exited 0, else raise VmError with stdout/stderr/console."""
        if self.returncode != 0:
            raise VmError(self.describe())
        return self


def cache_dir() -> Path:
    return Path(os.environ.get("SNAPSHIP_VM_CACHE") or DEFAULT_CACHE)


def _prepared_kernel(cache: Path) -> tuple[str, Path] | None:
    """The newest kernel setup.sh unpacked and depmod'ed, as (version, unpacked dir)."""
    found: list[tuple[str, Path]] = []
    for d in cache.glob("kernel-linux-image-*"):
        if not (d / ".unpacked").is_file() or not (d / ".depmod").is_file():
            continue
        version = d.name.removeprefix("kernel-linux-image-")
        if (d / "boot" / f"vmlinuz-{version}").is_file():
            found.append((version, d))
    if not found:
        return None
    return max(found, key=lambda vd: _version_key(vd[0]))


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.replace("-", ".").split(".") if p.isdigit())


def _tools_present() -> bool:
    return all(shutil.which(t) for t in (QEMU, "modprobe", "cpio", "lvm")) and BUSYBOX.is_file()


def run_setup(cache: Path) -> None:
    """Run setup.sh (installs packages, downloads and unpacks the kernel). Needs root."""
    env = dict(os.environ, SNAPSHIP_VM_CACHE=str(cache))
    proc = subprocess.run(
        ["/bin/sh", str(SETUP_SH)], env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise VmError(
            f"{SETUP_SH} failed with exit code {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr[-4000:]}"
        )


def assets_available() -> bool:
    """True if the VM can be used without installing anything (no root needed)."""
    return _tools_present() and _prepared_kernel(cache_dir()) is not None


def _module_files(kdir: Path, version: str) -> list[Path]:
    """The .ko files for MODULES and their dependencies, in load order, without duplicates."""
    files: list[Path] = []
    for name in MODULES:
        proc = subprocess.run(
            ["modprobe", "-d", str(kdir), "-S", version, "--show-depends", name],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise VmError(f"module {name} not found for kernel {version}: {proc.stderr.strip()}")
        for line in proc.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "insmod":
                path = Path(parts[1])
                if path not in files:
                    files.append(path)
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise VmError(f"two modules share a file name: {names}")
    return files


def _build_initramfs(kdir: Path, version: str, cache: Path) -> Path:
    modules = _module_files(kdir, version)
    init = INIT_SH.read_bytes()
    h = hashlib.sha256()
    h.update(init)
    h.update(version.encode())
    h.update(BUSYBOX.read_bytes())
    for m in modules:
        h.update(str(m).encode())
        h.update(str(m.stat().st_size).encode())
    out = cache / f"initramfs-{version}-{h.hexdigest()[:16]}.cpio.gz"
    if not out.is_file():
        _pack_initramfs(out, modules, init, cache)
    for stale in cache.glob("initramfs-*.cpio.gz"):  # built from an older init.sh or kernel
        if stale != out:
            stale.unlink(missing_ok=True)
    return out


def _pack_initramfs(out: Path, modules: list[Path], init: bytes, cache: Path) -> None:
    with tempfile.TemporaryDirectory(dir=cache, prefix="initramfs.") as tmp:
        root = Path(tmp) / "root"
        for d in ("bin", "sbin", "proc", "sys", "dev", "modules", "usr/bin", "usr/sbin"):
            (root / d).mkdir(parents=True, exist_ok=True)
        shutil.copy2(BUSYBOX, root / "bin" / "busybox")
        (root / "bin" / "sh").symlink_to("busybox")
        for m in modules:
            shutil.copy2(m, root / "modules" / m.name)
        (root / "modules.list").write_text("".join(m.name + "\n" for m in modules))
        (root / "init").write_bytes(init)
        (root / "init").chmod(0o755)
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        proc = subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"],
            input="\n".join(names).encode() + b"\n",
            cwd=root,
            capture_output=True,
            check=False,
        )
        if proc.returncode != 0:
            raise VmError(f"cpio failed: {proc.stderr.decode(errors='replace')}")
        part = Path(tmp) / "initramfs.cpio.gz"
        part.write_bytes(gzip.compress(proc.stdout, compresslevel=1))
        os.replace(part, out)


@functools.cache
def ensure_vm_assets() -> VmAssets:
    """Make sure qemu, the tools, a kernel and the initramfs exist; run setup.sh if not."""
    cache = cache_dir()
    prepared = _prepared_kernel(cache) if _tools_present() else None
    if prepared is None:
        run_setup(cache)
        prepared = _prepared_kernel(cache)
        if prepared is None or not _tools_present():
            raise VmError(f"{SETUP_SH} ran but the kernel or tools are still missing in {cache}")
    version, kdir = prepared
    initramfs = _build_initramfs(kdir, version, cache)
    return VmAssets(
        kernel=kdir / "boot" / f"vmlinuz-{version}",
        initramfs=initramfs,
        kernel_version=version,
        modules_dir=kdir / "lib" / "modules" / version,
    )


def guest_env() -> dict[str, str]:
    """Environment of the script in the guest: this checkout importable, venv python first."""
    path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    pythonpath = [str(CHECKOUT / "src")]
    python = "/usr/bin/python3"
    if sys.prefix != sys.base_prefix:  # running in a venv: use it in the guest too
        pythonpath.append(sysconfig.get_paths()["purelib"])
        python = str(Path(sys.prefix) / "bin" / "python")
        path = f"{Path(sys.prefix) / 'bin'}:{path}"
    return {
        "PATH": path,
        "HOME": "/tmp",
        "LANG": "C.UTF-8",
        "PYTHONPATH": ":".join(pythonpath),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHON": python,
        "SNAPSHIP_CHECKOUT": str(CHECKOUT),
        "SNAPSHIP_IN_VM": "1",
    }


def compile_checkout() -> None:
    """Byte-compile the checkout's sources on the host. The guest reads them over a
    read-only 9p share with PYTHONDONTWRITEBYTECODE: without up-to-date .pyc files every
    interpreter start there compiles each module it imports from source, seconds under
    emulation (in CI, where the VM tests run first, nothing has compiled them yet)."""
    compileall.compile_dir(str(CHECKOUT / "src"), quiet=1)


def run_in_vm(
    script: str,
    *,
    disks: Mapping[str, int] | None = None,
    timeout: float,
    memory_mb: int = 1024,
    smp: int = 2,
    workdir: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> VmResult:
    """Boot the VM, run `script` with /bin/bash in the chroot of the host's /, power off.

    `disks` maps a name to a size in bytes; each becomes a sparse file `<workdir>/disks/
    <name>.img` attached, in order, as /dev/vda, /dev/vdb, ... `workdir` (default: a new
    temporary folder, left in place for the caller) holds `scratch/`, the guest's /scratch,
    which the caller may fill before the run. Inside, $PYTHON is the interpreter running
    this harness (the venv's), and `import snapship` works. Raises VmTimeout (qemu killed,
    console tail in the message) if the guest does not power off within `timeout` seconds,
    VmError if the guest never ran the script; a failing script is a VmResult with
    returncode != 0 (use `.check()`).
    """
    assets = ensure_vm_assets()
    compile_checkout()
    wd = Path(tempfile.mkdtemp(prefix="snapship-vm.")) if workdir is None else workdir
    scratch = wd / "scratch"
    control = scratch / ".vm"
    if control.exists():
        shutil.rmtree(control)
    control.mkdir(parents=True)
    guest = guest_env()
    guest.update(env or {})
    (control / "env.sh").write_text(
        "".join(f"export {k}={shlex.quote(v)}\n" for k, v in guest.items())
    )
    (control / "script.sh").write_text(script)
    (control / "checkout").write_text(str(CHECKOUT))

    disk_paths: dict[str, Path] = {}
    drive_args: list[str] = []
    if disks:
        (wd / "disks").mkdir(exist_ok=True)
        for name, size in disks.items():
            p = wd / "disks" / f"{name}.img"
            with open(p, "wb") as f:
                f.truncate(size)
            disk_paths[name] = p
            drive_args += ["-drive", f"file={p},format=raw,if=virtio,cache=unsafe"]

    cmd = [
        QEMU, "-accel", "tcg", "-cpu", "max", "-smp", str(smp), "-m", str(memory_mb),
        "-nographic", "-no-reboot", "-nic", "none", "-no-user-config",
        "-kernel", str(assets.kernel), "-initrd", str(assets.initramfs),
        "-append", "console=ttyS0 panic=-1 quiet",
        "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
        "-fsdev", f"local,id=scratch,path={scratch},security_model=none",
        "-device", "virtio-9p-pci,fsdev=scratch,mount_tag=scratch",
        *drive_args,
    ]  # fmt: skip
    console_path = wd / "console.log"
    start = time.monotonic()
    with open(console_path, "wb") as console_file:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=console_file, stderr=subprocess.STDOUT
        )
        try:
            proc.wait(timeout=timeout)
        except BaseException as e:  # timeout, or Ctrl-C: never leave qemu running
            proc.kill()
            proc.wait()
            if not isinstance(e, subprocess.TimeoutExpired):
                raise
            seconds = time.monotonic() - start
            raise VmTimeout(
                f"VM did not finish within {timeout:.0f}s (qemu killed after {seconds:.1f}s; "
                f"workdir {wd})\n--- console (last {CONSOLE_TAIL_LINES} lines) ---\n"
                + _tail(console_path)
            ) from None
    seconds = time.monotonic() - start
    console = console_path.read_text(errors="replace")

    rc_file = control / "rc"
    if not rc_file.is_file():
        init_error = control / "init-error"
        why = init_error.read_text().strip() if init_error.is_file() else "no exit code written"
        raise VmError(
            f"VM exited (qemu status {proc.returncode}, {seconds:.1f}s) without running the "
            f"script to the end: {why}; workdir {wd}\n"
            f"--- console (last {CONSOLE_TAIL_LINES} lines) ---\n{_tail(console_path)}"
        )
    return VmResult(
        returncode=int(rc_file.read_text().strip()),
        stdout=_read(control / "stdout"),
        stderr=_read(control / "stderr"),
        console=console,
        scratch=scratch,
        workdir=wd,
        disks=disk_paths,
        seconds=seconds,
    )


def _read(p: Path) -> str:
    return p.read_text(errors="replace") if p.is_file() else ""


def _tail(p: Path, lines: int = CONSOLE_TAIL_LINES) -> str:
    return "\n".join(_read(p).splitlines()[-lines:])


if __name__ == "__main__":  # manual use: python tests/vm/harness.py 'lsblk; lvm version'
    res = run_in_vm(" ".join(sys.argv[1:]) or "true", disks={"a": 1 << 30}, timeout=300)
    print(res.describe())
    sys.exit(res.returncode)
