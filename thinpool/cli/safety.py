"""What the commands that write a file they are given check first, and how they write it.

* :func:`refuse_pool_file`: an output (export FILE, dump -o, restore -o, repair -o) that is one
  of a pool's own files under the home (:mod:`thinpool.ownership`, by device and inode) is
  refused with exit 2 before anything is opened.
* :func:`refuse_in_use`: ``create --data/--metadata`` naming a file or device that belongs to a
  pool already is refused with exit 5 (busy: in use).
* :func:`confirm_overwrite`: an existing output that holds something (a non-empty regular file,
  a block device) is only overwritten after a yes on the terminal or with ``--yes``; without a
  terminal and without ``--yes`` the command stops (exit 1) before it changes anything.
* :func:`replacing` writes a regular file through a temporary file beside it, renamed over the
  target only when everything was written and synced: a command that fails (or is interrupted)
  midway leaves the old file as it was and no temporary file behind. A symlink is followed (its
  target is replaced); a hard-linked file's other names keep the old content.
* :func:`os_error` turns an OSError on a given output into a typed error: out of space is 4,
  anything else (a missing directory, no permission, a file too large for the file system) 2.

Nothing here prints; errors are raised for :func:`thinpool.cli.main`.
"""

from __future__ import annotations

import errno
import os
import stat as stat_mod
from collections.abc import Iterator
from contextlib import contextmanager

from thinpool.errors import BusyError, InvalidArgument, NoSpace, ThinpoolError
from thinpool.ownership import owner
from thinpool.units import format_size

from .app import Session, confirm


def refuse_pool_file(session: Session, path, what: str) -> None:
    """Raise InvalidArgument if ``path`` is (or would be created inside) a pool's own file."""
    hit = owner(path, session.home)
    if hit is not None:
        raise InvalidArgument(f"{what} {os.fspath(path)} is {hit.describe()}; writing it would "
                              f"destroy the pool: give a path outside the pools")


def refuse_in_use(session: Session, path, option: str) -> None:
    """Raise BusyError if ``path`` already belongs to a pool under the home."""
    hit = owner(path, session.home)
    if hit is not None:
        raise BusyError(f"{option} {os.fspath(path)} is {hit.describe()}; a file or device "
                        f"holds one pool only: give another one")


def holds_something(path) -> int | None:
    """The size of an existing regular file with data in it (a file that is all hole, such as
    one just made with ``truncate -s``, holds nothing) or of a block device; None otherwise."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    if stat_mod.S_ISREG(st.st_mode):
        if not st.st_size:
            return None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return st.st_size
        try:
            os.lseek(fd, 0, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:          # no data anywhere: nothing to lose
                return None
        finally:
            os.close(fd)
        return st.st_size
    if stat_mod.S_ISBLK(st.st_mode):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return 0
        try:
            return os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)
    return None


def confirm_overwrite(path, yes: bool, what: str = "") -> None:
    """Ask before overwriting an output that holds something (see the module docstring)."""
    size = holds_something(path)
    if size is None:
        return
    kind = "file" if os.path.isfile(path) else "block device"
    confirm(f"Overwrite {kind} {os.fspath(path)} ({format_size(size)}){what}?", yes)


def os_error(e: OSError, path, doing: str = "write") -> ThinpoolError:
    """A typed error for an OSError on an output the user named."""
    why = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"cannot {doing} {os.fspath(path)}: {why}; nothing was changed")
    return InvalidArgument(f"cannot {doing} {os.fspath(path)}: {why}")


@contextmanager
def replacing(path) -> Iterator[int]:
    """A descriptor to write ``path`` through. For a regular file (or a new one): a temporary
    file beside it (symlinks followed), renamed over it after the block finished and it was
    synced, removed if the block raised. An existing device is written in place."""
    target = os.path.realpath(path)
    try:
        st = os.stat(target)
    except OSError:
        st = None
    if st is not None and not stat_mod.S_ISREG(st.st_mode):
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as e:
            raise os_error(e, path) from None
        try:
            yield fd
            try:
                os.fsync(fd)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EROFS):     # pipes, ttys, /dev/null
                    raise
        except OSError as e:
            raise os_error(e, path) from None
        finally:
            os.close(fd)
        return
    directory = os.path.dirname(target) or "."
    tmp = os.path.join(directory, f".{os.path.basename(target)}.thinpool-tmp.{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    except OSError as e:
        raise os_error(e, path) from None
    try:
        if st is not None:
            os.fchmod(fd, stat_mod.S_IMODE(st.st_mode))
        try:
            yield fd
            os.fsync(fd)
        except OSError as e:
            raise os_error(e, path) from None
        os.close(fd)
        fd = -1
        try:
            os.replace(tmp, target)
        except OSError as e:
            raise os_error(e, path) from None
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


@contextmanager
def removed_on_failure(path) -> Iterator[None]:
    """Remove ``path`` if it did not exist before the block and the block raised (a restore
    or repair that failed leaves no half-written new file behind)."""
    existed = os.path.lexists(path)
    try:
        yield
    except BaseException:
        if not existed:
            try:
                os.unlink(path)
            except OSError:
                pass
        raise
