"""The pool's locks: one writer at a time, readers beside it, and no commit under a reader's feet.

Two advisory ``flock`` locks, each on its own descriptor (so closing another descriptor of the
same file, the block manager's, never drops one):

* **The writer lock**: exclusive, on the metadata file or device, for as long as a pool is open
  for writing (:class:`MetadataLock`). A second writer gets :class:`~thinpool.errors.BusyError`
  naming the holder's pid (from ``/proc/locks``: flock locks record their owner there), at once
  or, with ``wait``, after polling for up to that many seconds (``None``: no limit).
* **The readers' lock** (:class:`ReadersLock`): the file ``lock`` in the pool directory. A
  reader holds it shared for as long as it has the pool open; a writer takes it exclusively only
  around each commit (:meth:`ReadersLock.exclusive`). Everything a commit references stays
  untouched until the *next* commit (the transaction manager writes only blocks free at the last
  commit; data blocks freed in a transaction are held until it commits), so a reader that read
  the superblock of commit N reads commit N throughout, even while a writer works on N+1: the
  writer waits for it before it commits N+1, after which blocks of N may be reused. Bytes written
  into a volume's own blocks are not versioned: a reader of the volume being written reads them
  as it would read a disk being written.

Within one process, a reader and a writer on the same pool (two ``Pool`` objects) would wait for
each other forever; that pairing is refused with BusyError when the second one opens. A pool
opened from bare metadata (no directory) has no readers' lock: its readers take the writer lock
shared, as before.
"""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager

from .errors import BusyError

READERS_LOCK_NAME = "lock"       # in the pool directory


def _flock(fd: int, exclusive: bool, wait: float | None, blocking: bool = False) -> bool:
    """Take a flock; True when taken. ``wait``: poll up to that many seconds; None: as long as
    it takes (``blocking``: in one blocking call, else polling)."""
    op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    if blocking and wait is None:
        fcntl.flock(fd, op)
        return True
    deadline = None if wait is None else time.monotonic() + wait
    pause = 0.01
    while True:
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if deadline is not None and time.monotonic() >= deadline:
                return False
        left = 1.0 if deadline is None else max(0.0, deadline - time.monotonic())
        time.sleep(min(pause, left))
        pause = min(pause * 2, 0.2)


class MetadataLock:
    """An advisory ``flock`` on the metadata file, held on its own descriptor."""

    def __init__(self, path: str, exclusive: bool, wait: float | None = 0):
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        if not _flock(self.fd, exclusive, wait):
            holder = lock_holders(self.fd, writers_only=True)
            holder = holder[0] if holder else None
            os.close(self.fd)
            if holder == os.getpid():
                who = f" by this process ({holder}): another Pool object has it open"
            else:
                who = f" by process {holder}" if holder else ""
            waited = f" (waited {wait:g} s)" if wait else ""
            raise BusyError(f"pool metadata {path} is locked{who}{waited}; close it there first",
                            holder_pid=holder) from None

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ReadersLock:
    """The readers' lock of a pool directory (see the module docstring)."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._depth = 0

    # -- readers -----------------------------------------------------------------------------
    def share(self) -> None:
        """Hold the lock shared (a reader): waits while a writer commits (a moment)."""
        _flock(self.fd, exclusive=False, wait=None, blocking=True)

    # -- writers -----------------------------------------------------------------------------
    def readers(self) -> list[int]:
        """Pids holding the lock shared now."""
        return lock_holders(self.fd)

    def refuse_own_readers(self, what: str) -> None:
        """BusyError if this very process reads the pool through another Pool object."""
        if os.getpid() in self.readers():
            raise BusyError(f"{what} is open read-only by this process ({os.getpid()}) through "
                            f"another Pool object; close that one first", holder_pid=os.getpid())

    @contextmanager
    def exclusive(self, wait: bool = True, on_wait=None):
        """Hold the lock exclusively for a commit; re-entrant. With ``wait=False``, yield False
        at once instead of waiting when readers hold it. ``on_wait(pids)`` is called once when
        the wait begins."""
        if self._depth:
            self._depth += 1
            try:
                yield True
            finally:
                self._depth -= 1
            return
        if not _flock(self.fd, exclusive=True, wait=0):
            if not wait:
                yield False
                return
            if on_wait is not None:
                on_wait(self.readers())
            _flock(self.fd, exclusive=True, wait=None, blocking=True)
        self._depth = 1
        try:
            yield True
        finally:
            self._depth = 0
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@contextmanager
def lock_metadata(path):
    """Hold the exclusive pool lock on a metadata file or device for the block: fails with
    BusyError, naming the holder, if a pool has it open for writing."""
    lock = MetadataLock(os.fspath(path), exclusive=True)
    try:
        yield
    finally:
        lock.release()


def writer_of(path) -> int | None:
    """The pid holding the writer lock of the metadata at ``path`` (None: no writer, or unknown)."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        pids = lock_holders(fd, writers_only=True)
    finally:
        os.close(fd)
    return pids[0] if pids else None


def lock_holders(fd: int, writers_only: bool = False) -> list[int]:
    """Pids holding a flock on the file behind ``fd``, from /proc/locks (exclusive holders
    only with ``writers_only``)."""
    ino = str(os.fstat(fd).st_ino)
    pids = []
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK":
                    continue
                if writers_only and parts[3] != "WRITE":
                    continue
                if parts[5].split(":")[-1] == ino:
                    pids.append(int(parts[4]))
    except (OSError, ValueError):
        pass
    return pids


def process_command(pid: int | None) -> str:
    """`` (its command line)`` of a process, shortened; empty when unknown."""
    if not pid:
        return ""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return ""
    words = [a.decode(errors="replace") for a in argv if a]
    if len(words) > 1 and os.path.basename(words[0]).startswith("python"):
        words = words[1:]                  # the interpreter of a script: name the script
        if words[0] == "-m" and len(words) > 1:
            words = words[1:]
    if words:
        words[0] = os.path.basename(words[0])
    cmd = " ".join(" ".join(words).split())
    if len(cmd) > 60:
        cmd = cmd[:57] + "..."
    return f" ({cmd})" if cmd else ""
