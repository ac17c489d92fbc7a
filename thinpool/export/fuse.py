"""A volume as a block device: its FUSE file (fuse_file.py) with a loop device over it.

::

    a = attach(pool, "vol0", read_only=False, run_dir=Path("/run/thinpool/demo"))
    a.loop_device            # "/dev/loop3": mkfs, mount, fstrim it as any disk
    a.close()                # once nothing has it mounted

:func:`attach` mounts a FUSE filesystem at ``run_dir/<volume>/`` served by a background thread
of this process (libfuse's multi-threaded loop, through mfusepy), holding one file named after the
volume, then binds a loop device to that file with ``losetup --find --show --direct-io=on``
(``--read-only`` too for a read-only attachment). It returns once the loop device exists.
:meth:`Attachment.close` is the one safe teardown, in the only order that works (the kernel
refuses to unmount a FUSE file a loop device uses, and a loop device detached while a filesystem
on it is mounted only goes away later): refuse while anything has the loop device mounted or
holds it (BusyError, exit 5, saying where), flush the device, ``losetup -d``, wait until the
kernel has let go of the file, unmount the FUSE filesystem (``umount -l`` as the last resort),
join its thread, commit.

Guarantees:

* **Read-only.** A volume marked read-only in the pool, a pool opened read-only, or
  ``read_only=True`` gives a read-only FUSE mount, file and loop device.
* **No stale caches.** The FUSE file is always opened ``direct_io`` and the loop device uses
  direct I/O, so what the pool holds is what the device reads, whatever else changed it.
* **Durability.** A flush of the loop device (a filesystem's journal commit, ``sync``) reaches the
  file as ``fsync``, which commits the pool. ``close`` commits too.
* **Nothing left behind on failure.** If any step of :func:`attach` fails (or is interrupted),
  the steps done are undone (loop device detached, FUSE unmounted, its thread joined, the
  mountpoint directory removed if it made it) before the error propagates.
* **Idempotent close.** A second ``close`` does nothing. A ``close`` that refuses (busy) or times
  out changes nothing it cannot finish later: call it again. A failure of the final commit is
  raised after the teardown is complete.
* **Signals.** libfuse takes over SIGHUP and SIGTERM where they are at their default; ``attach``
  gives them back (loop.py), so a SIGTERM still ends the process. At interpreter exit the
  attachments still open are closed where nothing has them mounted.

Caveats: a loop device over a FUSE file served by the same process can deadlock under heavy
memory pressure (the kernel waits for writeback that this process must serve); direct I/O on
both sides keeps the dirty page cache that causes it small. libfuse writes a harmless "Ignoring
invalid max threads value" line to stderr when a session starts. Callers of ``close`` must not
hold the pool's lock (the flush goes through the FUSE threads, which take it).

Errors: NotFound (no such volume), InvalidArgument (a run directory that cannot be made, a
mountpoint with files in it), BusyError (the volume is attached here already; ``close`` while
the device is in use), MissingDependency (mfusepy, libfuse 3, losetup), ExportError (a mount or
a host program failed; nothing is left behind).
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import BusyError, ExportError, InvalidArgument, ThinpoolError
from . import loop
from .fuse_file import FUSE, VolumeFile

if TYPE_CHECKING:
    from ..pool import Pool

#: Seconds attach waits for the FUSE filesystem to come up.
START_TIMEOUT = 10.0

_open: set["Attachment"] = set()        # attachments not closed yet (closed at exit)
_open_guard = threading.Lock()


class Attachment:
    """One volume attached as a loop device over its FUSE file (see :func:`attach`)."""

    def __init__(self, pool: "Pool", volume: str, read_only: bool, mountpoint: Path,
                 made_dir: bool):
        self.pool = pool
        self.volume = volume
        self.read_only = read_only
        self.mountpoint = mountpoint
        #: The one file in the FUSE filesystem: ``mountpoint / volume``.
        self.file = mountpoint / volume
        #: The loop device ("/dev/loopN"); it keeps its name after close.
        self.loop_device: str | None = None
        self._bound = False               # the loop device is ours and bound to the file
        self._made_dir = made_dir
        self._ops = VolumeFile(pool.volume(volume), read_only)
        self._thread: threading.Thread | None = None
        self._thread_errors: list[BaseException] = []
        self._closed = False
        self._closing = threading.Lock()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (f"<Attachment {self.pool.name}/{self.volume} {self.loop_device} on {self.file}"
                f"{' ro' if self.read_only else ''} {state}>")

    def __enter__(self) -> "Attachment":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def failures(self) -> list[tuple[str, int, str]]:
        """The last requests the FUSE file failed: (operation, errno, what the library raised)."""
        return list(self._ops.failures)

    def close(self, timeout: float = 10.0) -> None:
        """The safe teardown (see the module's docstring). BusyError while a filesystem on the
        loop device is mounted or something holds it, or when the device is still open
        elsewhere ``timeout`` seconds after ``losetup -d``; idempotent."""
        with self._closing:
            if self._closed:
                return
            deadline = time.monotonic() + timeout
            if self._bound:
                self._detach_loop(deadline)
            self._stop_fuse(deadline)
            self._closed = True
            with _open_guard:
                _open.discard(self)
            if not self.read_only:
                self.pool.volume(self.volume).flush()

    # -- the steps -------------------------------------------------------------------------
    def _start_fuse(self) -> None:
        """Mount the FUSE filesystem and start its thread; returns once it serves the file."""
        options = {"fsname": f"thinpool:{self.pool.name}/{self.volume}", "subtype": "thinpool"}
        if self.read_only:
            options["ro"] = True
        ops, errors = self._ops, self._thread_errors

        def serve() -> None:
            try:
                FUSE(ops, str(self.mountpoint), foreground=True, raw_fi=True, **options)
            except BaseException as e:  # noqa: BLE001 - reported by attach
                errors.append(e)

        thread = threading.Thread(
            target=serve, name=f"thinpool-fuse {self.pool.name}/{self.volume}", daemon=True)
        signals = loop.signals_at_default()
        thread.start()
        self._thread = thread
        deadline = time.monotonic() + START_TIMEOUT
        while not ops.started.wait(0.01):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                why = (f"it ended: {errors[0]!r}" if errors else
                       "it ended" if not self._thread.is_alive() else
                       f"it did not start within {START_TIMEOUT:g} s")
                raise ExportError(f"mounting the FUSE file of {self.pool.name}/{self.volume} at "
                                  f"{self.mountpoint} failed: {why}")
        loop.restore_default_signals(signals)
        try:
            os.stat(self.file)                         # served by the thread: it answers
        except OSError as e:
            raise ExportError(f"the FUSE file {self.file} does not answer: {e.strerror}") from e

    def _detach_loop(self, deadline: float) -> None:
        dev = self.loop_device
        if loop.backing_file(dev) != str(self.file):
            self._bound = False       # gone already (autoclear): its number may be another's now
            return
        users = loop.users_of(dev)
        if users:
            raise BusyError(f"{dev} (volume {self.pool.name}/{self.volume}) is in use: "
                            f"{', '.join(users)}; unmount it first, then detach")
        try:
            loop.flush_block_device(dev)
        except ThinpoolError:
            pass           # (a dead FUSE thread: nothing more can reach the pool; see close)
        loop.detach_loop(dev)
        if not loop.wait_detached(self.file, max(0.0, deadline - time.monotonic())):
            raise BusyError(f"{dev} (volume {self.pool.name}/{self.volume}) is still open "
                            f"elsewhere after 'losetup -d'; the kernel detaches it when the last "
                            f"user closes it: close this attachment again then")
        self._bound = False

    def _stop_fuse(self, deadline: float) -> None:
        if self._thread is not None:
            loop.unmount(self.mountpoint, max(1.0, deadline - time.monotonic()))
            self._thread.join(max(1.0, deadline - time.monotonic()))
            if self._thread.is_alive():
                raise ExportError(f"the FUSE thread of {self.file} did not end after its unmount")
            self._thread = None
        if self._made_dir:
            try:
                self.mountpoint.rmdir()
            except OSError:
                pass                  # (someone put something there: leave it)
            self._made_dir = False

    def _undo(self) -> None:
        """Tear down whatever attach had set up, after a failure midway."""
        deadline = time.monotonic() + START_TIMEOUT
        try:
            if self._bound:
                loop.detach_loop(self.loop_device)
                loop.wait_detached(self.file, START_TIMEOUT)
                self._bound = False
        finally:
            self._stop_fuse(deadline)


def attach(pool: "Pool", volume: str, *, read_only: bool, run_dir: Path) -> Attachment:
    """Attach volume ``volume`` of ``pool`` as a loop device over a FUSE file at
    ``run_dir/<volume>/<volume>``; returns once the loop device exists. See the module's
    docstring for what it guarantees and raises."""
    vol = pool.volume(volume)                          # NotFound
    read_only = bool(read_only or vol.read_only or pool.read_only)
    mountpoint, made_dir = _mountpoint(Path(run_dir), volume)
    a = None
    try:
        a = Attachment(pool, volume, read_only, mountpoint, made_dir)
        a._start_fuse()
        a.loop_device = loop.attach_loop(a.file, read_only=read_only)
        a._bound = True
    except BaseException:
        try:
            if a is not None:
                a._undo()
            elif made_dir:
                mountpoint.rmdir()
        except (ThinpoolError, OSError):
            pass                      # (the first error is the one to report)
        raise
    with _open_guard:
        _open.add(a)
    return a


def _mountpoint(run_dir: Path, volume: str) -> tuple[Path, bool]:
    """``run_dir/volume`` made (or found empty and unmounted) and resolved; whether it was made."""
    where = run_dir / volume
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        where = where.resolve()
        if loop.is_mountpoint(where):
            raise BusyError(f"{where} is mounted already: is volume {volume} attached already? "
                            f"(detach it first)")
        try:
            where.mkdir()
            return where, True
        except FileExistsError:
            if not where.is_dir() or any(where.iterdir()):
                raise InvalidArgument(f"cannot attach {volume} at {where}: it exists and is not "
                                      f"an empty directory") from None
            return where, False
    except OSError as e:
        raise InvalidArgument(f"cannot make the mountpoint {where} in the run directory "
                              f"{run_dir}: {e.strerror or e}") from e


@atexit.register
def _close_at_exit() -> None:
    with _open_guard:
        left = list(_open)
    for a in left:
        try:
            a.close(timeout=5.0)
        except Exception:  # noqa: BLE001 - at exit, close what can be closed
            pass
