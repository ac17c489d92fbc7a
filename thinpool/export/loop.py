"""The host's side of the exports: every OS call they make, in one place.

Loop devices (``losetup``), the mount table (``/proc/self/mountinfo``), unmounting (``umount``,
``umount -l`` as the last resort), flushing a block device, and the one piece of process state
libfuse changes behind our back (signal dispositions, see :func:`signals_at_default`). Nothing
else in ``thinpool/export`` runs a program or reads ``/proc`` or ``/sys``.

Contract:

* Host programs are found on ``PATH`` and in the sbin directories. A missing one raises
  :class:`~thinpool.errors.MissingDependency` naming the Debian package; a failing one raises
  :class:`~thinpool.errors.ExportError` with its argv, exit code and stderr. Every program runs
  with a timeout (None exit code in the error when it ran out).
* Loop devices are found through sysfs (``/sys/block/loop*/loop/backing_file``), never by
  ``stat`` of the backing file: that keeps working when the backing file is on a FUSE mount whose
  server is gone (``ENOTCONN``), which is when teardown matters most.
* :func:`attach_loop` returns only once the kernel shows the device bound to the file (losetup
  may return before that); if that never happens it detaches the device again before raising.
* Nothing here prints. The calls hold no locks; they are safe from any thread.

Costs: each program is one fork/exec (about 1-3 ms); a sysfs scan reads one small file per loop
device; waiting polls every 10 ms.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import BusyError, ExportError, MissingDependency

_TOOL_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")
_PACKAGES = {"losetup": "util-linux", "umount": "mount", "mount": "mount",
             "mkfs.ext4": "e2fsprogs", "mkfs.xfs": "xfsprogs"}
_SYS_BLOCK = Path("/sys/block")
_POLL = 0.01

#: Seconds any one host program may take.
COMMAND_TIMEOUT = 30.0


# -- programs ----------------------------------------------------------------------------------
def tool(name: str) -> str:
    """The absolute path of host program ``name``; MissingDependency naming its package."""
    path = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), *_TOOL_DIRS]))
    if path is None:
        pkg = _PACKAGES.get(name, name)
        raise MissingDependency(f"{name} is not installed: install the Debian package {pkg} "
                                f"(apt-get install {pkg})", name)
    return path


def run(argv: list[str], timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess:
    """Run a host program (``argv[0]`` a name looked up with :func:`tool`); its result, or
    ExportError when it exits non-zero or times out."""
    full = [tool(argv[0]), *argv[1:]]
    try:
        r = subprocess.run(full, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise ExportError(f"{' '.join(argv)} did not finish within {timeout:g} s", argv=argv,
                          returncode=None, stderr=err) from None
    if r.returncode != 0:
        raise ExportError(f"{' '.join(argv)} failed (exit {r.returncode}): "
                          f"{r.stderr.strip() or 'no message'}", argv=argv,
                          returncode=r.returncode, stderr=r.stderr)
    return r


# -- loop devices ------------------------------------------------------------------------------
def attach_loop(path: Path, *, read_only: bool, timeout: float = 10.0) -> str:
    """``losetup --find --show --direct-io=on [--read-only] PATH``: the new device
    ("/dev/loopN"), once the kernel shows it bound to ``path``."""
    argv = ["losetup", "--find", "--show", "--direct-io=on"]
    if read_only:
        argv.append("--read-only")
    device = run([*argv, str(path)]).stdout.strip()
    if not device.startswith("/dev/loop"):
        raise ExportError(f"losetup printed {device!r}, not a loop device", argv=argv)
    deadline = time.monotonic() + timeout
    while True:
        if backing_file(device) == str(path) and os.path.exists(device):
            return device
        if time.monotonic() > deadline:
            try:
                detach_loop(device)
            except ExportError:
                pass              # (the error below says what is wrong)
            raise ExportError(f"losetup made {device} for {path}, but the kernel did not show it "
                              f"bound to that file within {timeout:g} s; it was detached again")
        time.sleep(_POLL)


def detach_loop(device: str) -> None:
    """``losetup -d DEVICE``. A device that is gone already is not an error. (A device still
    open elsewhere is only marked to go away when it is closed: see :func:`wait_detached`.)"""
    try:
        run(["losetup", "-d", device])
    except ExportError as e:
        if backing_file(device) is None:
            return
        raise e


def backing_file(device: str) -> str | None:
    """The file loop device ``device`` is bound to, as the kernel names it; None if unbound."""
    name = os.path.basename(device)
    try:
        text = (_SYS_BLOCK / name / "loop" / "backing_file").read_text()
    except OSError:
        return None
    return text.rstrip("\n") or None


def loop_devices_of(path: os.PathLike | str) -> list[str]:
    """Every loop device bound to ``path`` (an absolute path, compared as the kernel names the
    backing file; a deleted file's name carries " (deleted)"), sorted."""
    want = os.path.abspath(os.fspath(path))
    found = []
    try:
        names = [n for n in os.listdir(_SYS_BLOCK) if n.startswith("loop")]
    except OSError:
        return []
    for name in names:
        bf = backing_file(name)
        if bf is not None and bf in (want, want + " (deleted)"):
            found.append(f"/dev/{name}")
    return sorted(found, key=lambda d: int(d[len("/dev/loop"):] or 0))


def wait_detached(path: os.PathLike | str, timeout: float) -> bool:
    """Wait until no loop device is bound to ``path`` (``losetup -d`` lets the kernel finish
    asynchronously); True when none is left."""
    deadline = time.monotonic() + timeout
    while loop_devices_of(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(_POLL)
    return True


def flush_block_device(device: str) -> None:
    """``fsync`` a block device: its page cache written and a flush sent down (for a loop
    over a volume's FUSE file that reaches the volume as fsync, a commit). A device that is gone
    is not an error."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENXIO, errno.ENODEV):
            return
        raise ExportError(f"cannot open {device} to flush it: {e.strerror}") from e
    try:
        os.fsync(fd)
    except OSError as e:
        raise ExportError(f"flushing {device} failed: {e.strerror}") from e
    finally:
        os.close(fd)


# -- the mount table ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Mount:
    """One line of ``/proc/self/mountinfo``."""

    device: tuple[int, int]       # major, minor of the mounted device
    mountpoint: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes.
    for code, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, ch)
    return field


def mounts() -> list[Mount]:
    """The mount table of this process's mount namespace."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            major, minor = fields[2].split(":")
            out.append(Mount((int(major), int(minor)), _unescape(fields[4]), fields[sep + 1],
                             _unescape(fields[sep + 2])))
    return out


def is_mountpoint(path: os.PathLike | str) -> bool:
    want = os.path.abspath(os.fspath(path))
    return any(m.mountpoint == want for m in mounts())


def users_of(device: str) -> list[str]:
    """What keeps block device ``device`` busy: "mounted on DIR" for each mount of it and
    "held by NAME" for each sysfs holder (a device-mapper table over it); empty when none."""
    try:
        rdev = os.stat(device).st_rdev
    except OSError:
        return []
    dev = (os.major(rdev), os.minor(rdev))
    found = [f"mounted on {m.mountpoint}" for m in mounts() if m.device == dev]
    try:
        holders = os.listdir(_SYS_BLOCK / os.path.basename(device) / "holders")
    except OSError:
        holders = []
    return found + [f"held by {h}" for h in sorted(holders)]


def unmount(path: os.PathLike | str, timeout: float) -> str:
    """Unmount ``path``: ``umount`` (retried while it is busy, until ``timeout``), then
    ``umount -l`` as the last resort. Returns "umount", "lazy" or "not mounted"."""
    path = os.path.abspath(os.fspath(path))
    deadline = time.monotonic() + timeout
    while is_mountpoint(path):
        try:
            run(["umount", path], timeout=max(1.0, deadline - time.monotonic()))
            return "umount"
        except ExportError as e:
            if not is_mountpoint(path):
                return "umount"
            if time.monotonic() > deadline:
                try:
                    run(["umount", "-l", path])
                except ExportError:
                    raise BusyError(f"{path} could not be unmounted, not even lazily: "
                                    f"{e}") from e
                return "lazy"
        time.sleep(_POLL * 5)
    return "not mounted"


def sweep_run_dir(run_dir: os.PathLike | str) -> list[str]:
    """What a killed server left under its run directory: for each FUSE mountpoint there, the
    loop devices over its file are detached (``losetup -d``; one still mounted somewhere goes
    away once unmounted) and the dead FUSE filesystem is unmounted (lazily when it must be),
    then the empty mountpoint removed. Call it only where no live process serves ``run_dir``
    (the pool's writer lock says so). Returns one line per thing done, for the log."""
    root = os.path.abspath(os.fspath(run_dir))
    done = []
    try:
        entries = sorted(os.listdir(root))
    except OSError:
        return done
    for name in entries:
        where = os.path.join(root, name)
        if is_mountpoint(where):
            try:
                files = os.listdir(where)
            except OSError:           # ENOTCONN: its server is gone
                files = [name]
            for f in files:
                for dev in loop_devices_of(os.path.join(where, f)):
                    try:
                        detach_loop(dev)
                        done.append(f"detached {dev}")
                    except ExportError as e:
                        done.append(f"could not detach {dev}: {e}")
            try:
                done.append(f"unmounted {where} ({unmount(where, timeout=2.0)})")
            except BusyError as e:
                done.append(str(e))
                continue
        try:
            os.rmdir(where)
        except OSError:
            pass
    return done


# -- signal dispositions that libfuse changes ----------------------------------------------------
# libfuse's fuse_main installs its own exit handler for SIGHUP and SIGTERM where they are at
# their default (a SIGTERM then lazily unmounts the FUSE file instead of ending the process, and
# the process lives on: B.5's pitfall 4). The exports run fuse_main in a thread of the host
# process, so they put the defaults back once it has started: signals stay the host's business.
_EXIT_SIGNALS = (signal.SIGHUP, signal.SIGTERM)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.signal.restype = ctypes.c_void_p
_libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]


def _c_handler(sig: int) -> int:
    """The address of the process's C-level handler for ``sig`` (0: SIG_DFL), read with
    sigaction(2) without changing it. The handler is the first field of struct sigaction on
    Linux; the buffer is larger than the structure on every architecture."""
    buf = ctypes.create_string_buffer(512)
    if _libc.sigaction(sig, None, buf) != 0:
        return -1
    return ctypes.c_void_p.from_buffer(buf).value or 0


def signals_at_default() -> list[int]:
    """The exit signals (SIGHUP, SIGTERM) at their default disposition now, both for Python and
    at the C level: those libfuse will take over."""
    return [s for s in _EXIT_SIGNALS
            if signal.getsignal(s) == signal.SIG_DFL and _c_handler(s) == 0]


def restore_default_signals(signals: list[int]) -> None:
    """Put SIG_DFL back for each of ``signals`` that someone else's C code (libfuse) took over,
    unless Python code installed a handler for it meanwhile."""
    for s in signals:
        if signal.getsignal(s) == signal.SIG_DFL and _c_handler(s) not in (0, -1):
            _libc.signal(s, None)
