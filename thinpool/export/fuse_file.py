"""A volume as one regular file in a FUSE filesystem (mfusepy's high-level operations).

The filesystem holds a directory with exactly one file, named after the volume, whose size is
the volume's size. Its operations are the volume's, with a block device's habits:

* ``getattr``: a regular file; ``st_size`` the volume's size, ``st_blocks`` its mapped blocks
  (so ``du`` shows thin usage), ``st_blksize`` the pool's block size.
* ``open``: every handle is ``direct_io`` with ``keep_cache`` off, so no page cache can hide a
  change made through another path (a snapshot revert, NBD). ``O_TRUNC`` is ignored, as a block
  device ignores it; a write open of a read-only file is refused (EROFS).
* ``read`` stops at the end (a short read, as at the end of a file). ``write`` at or past the end
  fails with EFBIG; one that runs over the end writes what fits and says so (a short write).
* ``fsync`` and ``flush`` commit the pool (``Volume.flush``): durable when they return.
* ``fallocate``: ``PUNCH_HOLE|KEEP_SIZE`` (3) is a discard (whole blocks unmapped, edges zeroed),
  ``ZERO_RANGE|KEEP_SIZE`` (17) provisions zeroed blocks (``Volume.write_zeroes``); any other mode
  is EOPNOTSUPP. Ranges past the end are cut at the end, as for ``KEEP_SIZE`` on a file.
* ``truncate`` to the size it has is a no-op; to any other size EPERM (``thinpool resize``
  resizes a volume). Creating, removing or renaming anything is EPERM.
* ``statfs`` describes the pool: its data blocks, used and free.

Errors: thinpool's typed errors become errnos (:func:`errno_of`): no data space ENOSPC, read-only
EROFS, a volume deleted under the file ENXIO, busy EBUSY, an I/O error its errno (EIO), anything
else EIO. Every error is also kept in :attr:`VolumeFile.failures` (the last 32), since the
kernel only passes the errno on. A failed operation leaves what ``Volume`` leaves (nothing
half-made; see volume.py).

Threads: libfuse calls these from its worker threads, concurrently; the pool is thread-safe.
Importing this module without mfusepy raises :class:`~thinpool.errors.MissingDependency`.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from ..errors import (BusyError, DeviceIOError, InvalidArgument, MissingDependency, NoSpace,
                      NotFound, OutOfRange, ReadOnlyError, VolumeReadOnly)

if TYPE_CHECKING:
    from ..volume import Volume

# mfusepy picks libfuse 2 first when both are installed; the exports are written for libfuse 3.
os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
try:
    import mfusepy
except ImportError:
    raise MissingDependency("the FUSE export needs mfusepy: pip install 'thinpool[fuse]'",
                            "mfusepy") from None
except OSError as e:                       # mfusepy: "Unable to find libfuse"
    raise MissingDependency(f"the FUSE export needs libfuse 3 ({e}): install the Debian package "
                            f"libfuse3-3 (apt-get install libfuse3-3)", "libfuse3") from None
if mfusepy.fuse_version_major != 3:
    raise MissingDependency(f"the FUSE export needs libfuse 3; mfusepy loaded libfuse "
                            f"{mfusepy.fuse_version_major} (set FUSE_LIBRARY_NAME=fuse3 before "
                            f"anything imports mfusepy)", "libfuse3")

FUSE = mfusepy.FUSE
FuseOSError = mfusepy.FuseOSError

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE          # 3: the loop driver's discard
ZERO = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE           # 17: its write-zeroes


def errno_of(exc: BaseException) -> int:
    """The errno a FUSE request that failed with ``exc`` answers."""
    if isinstance(exc, (VolumeReadOnly, ReadOnlyError)):
        return errno.EROFS
    if isinstance(exc, OutOfRange):
        return errno.EFBIG
    if isinstance(exc, NoSpace):
        return errno.ENOSPC
    if isinstance(exc, NotFound):
        return errno.ENXIO
    if isinstance(exc, BusyError):
        return errno.EBUSY
    if isinstance(exc, InvalidArgument):
        return errno.EINVAL
    if isinstance(exc, DeviceIOError) and exc.errno:
        return exc.errno
    return errno.EIO


def _answers(op):
    """Turn thinpool's errors (and any other exception) into the FUSE errno; keep the evidence."""
    def wrapped(self, *args):
        try:
            return op(self, *args)
        except FuseOSError:
            raise
        except Exception as exc:   # noqa: BLE001 - every failure becomes an errno for the kernel
            code = errno_of(exc)
            self.failures.append((op.__name__, code, f"{type(exc).__name__}: {exc}"))
            raise FuseOSError(code) from exc
    wrapped.__name__ = op.__name__
    wrapped.__doc__ = op.__doc__
    return wrapped


class VolumeFile(mfusepy.Operations):
    """The FUSE operations of one volume's file. (No attribute may be named after a FUSE
    operation, such as ``lock``: mfusepy would take it for one.)"""

    use_ns = True

    def __init__(self, volume: "Volume", read_only: bool):
        self._vol = volume
        self._file = "/" + volume.name
        self._ro = read_only
        self._bs = volume.pool.block_size
        self._born = time.time_ns()
        #: Set once libfuse has started serving (its init callback ran).
        self.started = threading.Event()
        #: The last failed requests: (operation, errno, what the library raised).
        self.failures: deque[tuple[str, int, str]] = deque(maxlen=32)

    # -- session ----------------------------------------------------------------------------
    def init_with_config(self, conn, config) -> None:
        self.started.set()

    # -- attributes and names ---------------------------------------------------------------
    def _times(self) -> dict:
        t = self._born
        return {"st_atime": t, "st_mtime": t, "st_ctime": t}

    @_answers
    def getattr(self, path, fh=None):
        if path == "/":
            return {"st_mode": stat.S_IFDIR | (0o555 if self._ro else 0o755), "st_nlink": 2,
                    **self._times()}
        if path != self._file:
            raise FuseOSError(errno.ENOENT)
        mapped = self._vol.mapped_blocks              # (refreshes the size too)
        return {"st_mode": stat.S_IFREG | (0o444 if self._ro else 0o644), "st_nlink": 1,
                "st_size": self._vol.size, "st_blocks": mapped * self._bs // 512,
                "st_blksize": self._bs, **self._times()}

    @_answers
    def readdir(self, path, fh):
        if path != "/":
            raise FuseOSError(errno.ENOTDIR)
        return [".", "..", self._file[1:]]

    @_answers
    def statfs(self, path):
        st = self._vol.pool.stat()
        return {"f_bsize": st.block_size, "f_frsize": st.block_size,
                "f_blocks": st.data_blocks_total, "f_bfree": st.data_blocks_free,
                "f_bavail": st.data_blocks_free, "f_files": 1, "f_ffree": 0, "f_favail": 0,
                "f_namemax": 255}

    def _refuse(self, *args):
        raise FuseOSError(errno.EPERM)

    create = mknod = mkdir = unlink = rmdir = rename = symlink = link = chmod = chown = _refuse

    def utimens(self, path, times=None):
        return 0                                      # (times are not kept)

    @_answers
    def truncate(self, path, length, fh=None):
        if path != self._file:
            raise FuseOSError(errno.EPERM)
        if length != self._vol.size:                  # (a size, not a content change)
            raise FuseOSError(errno.EPERM)
        return 0

    # -- I/O --------------------------------------------------------------------------------
    @_answers
    def open(self, path, fi):
        if path != self._file:
            raise FuseOSError(errno.EISDIR if path == "/" else errno.ENOENT)
        if (fi.flags & os.O_ACCMODE) != os.O_RDONLY and (self._ro or self._vol.read_only):
            raise FuseOSError(errno.EROFS)
        fi.direct_io = 1
        fi.keep_cache = 0
        return 0

    def release(self, path, fh):
        return 0

    @_answers
    def read(self, path, size, offset, fh):
        n = min(size, self._vol.size - offset)
        if n <= 0:
            return b""
        return self._vol.read(offset, n)

    @_answers
    def write(self, path, data, offset, fh):
        if self._ro:
            raise FuseOSError(errno.EROFS)
        room = self._vol.size - offset
        if room <= 0:
            raise FuseOSError(errno.EFBIG)
        if len(data) > room:
            data = data[:room]
        self._vol.write(offset, data)
        return len(data)

    @_answers
    def fsync(self, path, datasync, fh):
        if not self._ro:
            self._vol.flush()
        return 0

    @_answers
    def flush(self, path, fh):
        if not self._ro:
            self._vol.flush()
        return 0

    @_answers
    def fallocate(self, path, mode, offset, size, fh):
        if mode not in (PUNCH, ZERO):
            raise FuseOSError(errno.EOPNOTSUPP)
        if self._ro:
            raise FuseOSError(errno.EROFS)
        end = min(offset + size, self._vol.size)
        if offset < 0 or size <= 0:
            raise FuseOSError(errno.EINVAL)
        if offset >= end:
            return 0
        if mode == PUNCH:
            self._vol.discard(offset, end - offset)
        else:
            self._vol.write_zeroes(offset, end - offset, unmap=False)
        return 0


__all__ = ["FUSE", "FuseOSError", "VolumeFile", "errno_of", "PUNCH", "ZERO"]
