"""The pool lock: an advisory ``flock`` on the metadata file or device, held on its own descriptor.

One writer at a time (exclusive lock); readers share the lock. A process that finds the lock
taken gets :class:`~thinpool.errors.BusyError` naming the holder's pid, read from /proc/locks
(flock locks record their owner there); when the holder is this very process (another open
``Pool`` object), the message says so. The lock lives as long as its descriptor, so closing
other descriptors of the same file (the block manager's) never drops it.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager

from .errors import BusyError


class MetadataLock:
    """An advisory ``flock`` on the metadata file, held on its own descriptor."""

    def __init__(self, path: str, exclusive: bool):
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(self.fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(self.fd)
            os.close(self.fd)
            if holder == os.getpid():
                who = f" by this process ({holder}): another Pool object has it open"
            else:
                who = f" by process {holder}" if holder else ""
            raise BusyError(f"pool metadata {path} is locked{who}; close it there first",
                            holder_pid=holder) from None

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@contextmanager
def lock_metadata(path):
    """Hold the exclusive pool lock on a metadata file or device for the block: fails with
    BusyError, naming the holder, if a pool has it open."""
    lock = MetadataLock(os.fspath(path), exclusive=True)
    try:
        yield
    finally:
        lock.release()


def _lock_holder(fd: int) -> int | None:
    """The pid holding a flock on the file behind ``fd``, from /proc/locks."""
    ino = os.fstat(fd).st_ino
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if "->" in parts:
                    continue
                if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5].split(":")[-1] == str(ino):
                    return int(parts[4])
    except (OSError, ValueError):
        pass
    return None
