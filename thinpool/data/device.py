"""The data device: the only code in the data layer that does OS I/O on a pool's data.

A :class:`DataDevice` is an open regular file (normally sparse) or block device, seen as
``nr_blocks = size // block_size`` fixed-size data blocks. Everything above it (the allocator,
volumes, snapshots) addresses data by block number; only this module turns block numbers into byte
offsets and system calls.

Guarantees
----------
* **Bounds.** Every call checks its block range against ``nr_blocks`` before any I/O and raises
  :class:`~thinpool.errors.InvalidArgument` for a range that is negative or reaches past the pool,
  so a bug above cannot scribble outside the pool (a file's tail beyond the last whole block is never
  touched). Sub-block calls (:meth:`read`, :meth:`write`) must stay inside their one block, so a bug
  cannot spill into a neighbouring block owned by another volume either.
* **Whole transfers.** Reads and writes loop until done (short ``pread``/``pwrite`` are retried);
  a read that meets end-of-file (a file truncated behind our back) is padded with zeros.
* **Position independence.** All I/O is positional (``pread``/``pwrite``/``ioctl``/``fallocate``
  with explicit offsets), so calls on disjoint blocks may run concurrently from several threads.
  ``close`` must not race with other calls.
* **Durability** is only promised after :meth:`sync` (``fdatasync``), except :meth:`create_file`
  and :meth:`grow`, which sync their size change (and the new directory entry) before returning.
  :meth:`sync` skips the system call when nothing changed through this object since the last one,
  and covers the writes completed before it was called, also while other threads go on writing
  (a write that completes during a sync counts as unsynced); :meth:`sync_ahead` is the same sync
  for a caller that keeps its failure for the next :meth:`sync` to raise.
* **Early write-back.** Every :data:`WRITEBACK_BYTES` written (or copied) through a device, the
  write-back of its dirty pages is started (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, which
  does not wait), as the kernel's dm-thin writes a bio through to the disk: so the data a commit
  must sync is mostly on its way already, and a commit's ``fdatasync`` (which a pool's writers may
  have to wait for) has little left to do. A hint only: it promises nothing, raises nothing, and
  its counters may lose a count when threads write at once.
* **Zeroing vs. punching.** After :meth:`zero_blocks` the blocks read as zeros, guaranteed.
  :meth:`punch_blocks` only gives space back (for *free* blocks) and says whether it could; what the
  blocks read afterwards is unspecified on block devices (discard), zeros on files.
* **Exclusive block devices.** A block device opened for writing is opened ``O_EXCL``: if it is
  mounted or held by another exclusive opener, :meth:`open` raises
  :class:`~thinpool.errors.BusyError` instead of corrupting it.

Errors
------
``InvalidArgument`` for bad arguments (block size, ranges, lengths, shrinking, resizing a block
device, a path that is neither a regular file nor a block device, a file larger than the file
system or the process allows: EFBIG, whose message names that limit and leaves the file as it was); ``NotFound`` for a missing path;
``AlreadyExists`` when :meth:`create_file` meets an existing path; ``ReadOnlyError`` for changing a
device opened read-only; ``BusyError`` for a device in use (EBUSY); ``NoDataSpace`` when the
filesystem under a sparse file is full (ENOSPC, EDQUOT); ``DeviceIOError`` (device, operation,
data block, errno) for any other OS error of an I/O; ``ThinpoolError`` for use after
:meth:`close`. OS errors are chained (``raise ... from``), so the errno survives as
``err.__cause__.errno``. "Not supported" (no hole punching, no discard, no ``copy_file_range``,
no ``BLKZEROOUT``) is never an error: each call falls back or reports it, as documented per method.

Costs
-----
``read_blocks``/``write_blocks``/``copy_blocks`` move ``count * block_size`` bytes (a copy may be
done in the kernel, or shared as a reflink by the filesystem, via ``copy_file_range``; the fallback
moves 1 MiB chunks through user space). ``read_blocks`` allocates one buffer of the result's size.
``zero_blocks`` and ``punch_blocks`` are one system call where supported (the zero-writing fallback
costs a full write of the range). ``open``/``create_file``/``grow`` are a handful of system calls.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct
import threading
from typing import Callable

from thinpool.errors import (
    AlreadyExists,
    BusyError,
    DeviceIOError,
    InvalidArgument,
    NoDataSpace,
    NotFound,
    ReadOnlyError,
    ThinpoolError,
)

__all__ = ["DataDevice", "DEFAULT_BLOCK_SIZE"]

DEFAULT_BLOCK_SIZE = 64 * 1024  # dm-thin's usual data block size (DESIGN.md: Pool.create)
_SECTOR = 512  # block sizes must be whole sectors: the unit of every block-device ioctl below

# --- Linux ABI -------------------------------------------------------------------------------
# <asm-generic/ioctl.h>: _IOC(dir, type, nr, size) = dir << 30 | size << 16 | type << 8 | nr


def _ioc(direction: int, kind: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (kind << 8) | nr


_IOC_READ = 2
# <linux/fs.h>
BLKGETSIZE64 = _ioc(_IOC_READ, 0x12, 114, ctypes.sizeof(ctypes.c_size_t))  # u64 size in bytes
BLKDISCARD = _ioc(0, 0x12, 119, 0)  # u64 range[2] = {start, length}
BLKZEROOUT = _ioc(0, 0x12, 127, 0)  # u64 range[2] = {start, length}
_RANGE = struct.Struct("=QQ")

# <linux/fs.h>: sync_file_range flags
SYNC_FILE_RANGE_WRITE = 2   # start write-back of the range's dirty pages; do not wait

# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

# errnos that mean "this file/device/kernel cannot do that", as opposed to a real failure.
_UNSUPPORTED = frozenset(
    {errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.ENOTTY, errno.EINVAL}
)
# errnos after which copy_file_range is retried the slow way (EXDEV: cross-filesystem; EBADF and
# EPERM are what some kernels return for special files).
_COPY_FALLBACK = _UNSUPPORTED | {errno.EXDEV, errno.EBADF, errno.EPERM}

# Early write-back: after this many bytes written through a device, their write-back starts
# (see "Early write-back" in the module docstring).
WRITEBACK_BYTES = 32 << 20
_CHUNK = 1 << 20  # bytes per user-space copy or zero-fill step
_ZEROS = bytes(_CHUNK)
_MAX_COPY = 1 << 30  # bytes per copy_file_range call (the kernel caps a call near 2 GiB anyway)

_NOT_LOOKED_UP = object()
_fallocate_fn: object = _NOT_LOOKED_UP
_sync_file_range_fn: object = _NOT_LOOKED_UP


def _libc_function(name: str, argtypes: list, *alternatives: str) -> Callable[..., int] | None:
    """libc's function ``name`` (or the first of ``alternatives`` it has), None where there is none.

    The process's own symbols first: find_library runs ldconfig in a child process, and a fork
    from a FUSE request's thread can deadlock (the child's closing of an inherited descriptor
    of the FUSE file waits for a lock that request holds)."""
    for lib in (None, "find"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") if lib else None, use_errno=True)
        except OSError:
            continue
        for symbol in (*alternatives, name):
            fn = getattr(libc, symbol, None)
            if fn is not None:
                fn.argtypes = argtypes
                fn.restype = ctypes.c_int
                return fn
    return None


def _libc_fallocate() -> Callable[..., int] | None:
    """libc's 64-bit-offset ``fallocate``, or None where there is none (looked up once)."""
    global _fallocate_fn
    if _fallocate_fn is _NOT_LOOKED_UP:
        _fallocate_fn = _libc_function(
            "fallocate", [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64], "fallocate64")
    return _fallocate_fn  # type: ignore[return-value]


def _start_writeback(fd: int) -> None:
    """``sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)``: start writing the dirty pages of
    the whole file back, without waiting for them. A hint: where libc has no such call, or
    the call fails, nothing happens (the error of a failed write-back is reported by the next
    ``fdatasync``, which waits for it: this call does not consume it)."""
    global _sync_file_range_fn
    if _sync_file_range_fn is _NOT_LOOKED_UP:
        _sync_file_range_fn = _libc_function(
            "sync_file_range", [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint])
    fn = _sync_file_range_fn
    if fn is not None:
        fn(fd, 0, 0, SYNC_FILE_RANGE_WRITE)   # type: ignore[operator]


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)``; raises OSError (ENOSYS when libc has no such call)."""
    fn = _libc_fallocate()
    if fn is None:
        raise OSError(errno.ENOSYS, "fallocate is not available")
    while fn(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err))


def _os_error(exc: OSError, what: str, *, device: str = "", operation: str = "open",
              block: int | None = None) -> ThinpoolError:
    """Map an OSError from ``what`` to the thinpool error a caller can act on (an I/O error
    keeps the device, the operation and the block)."""
    msg = f"{what}: {exc.strerror or exc}"
    code = exc.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        return NoDataSpace(msg)
    if code == errno.EROFS:
        return ReadOnlyError(msg)
    if code == errno.EBUSY:
        return BusyError(msg)
    if code == errno.ENOENT:
        return NotFound(msg)
    if code == errno.EEXIST:
        return AlreadyExists(msg)
    return DeviceIOError(msg, device=device, operation=operation, block=block, errno=code)


def _check_int(name: str, value: object, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{name} must be an integer, not {type(value).__name__}")
    if value < minimum:
        raise InvalidArgument(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_block_size(block_size: object) -> int:
    _check_int("block_size", block_size, _SECTOR)
    assert isinstance(block_size, int)
    if block_size % _SECTOR:
        raise InvalidArgument(f"block_size must be a multiple of {_SECTOR} bytes, got {block_size}")
    return block_size


class DataDevice:
    """An open data device addressed in blocks of ``block_size`` bytes (see the module docstring).

    Attributes (read-only by convention): ``path``, ``block_size``, ``size`` (bytes),
    ``nr_blocks`` (``size // block_size``), ``is_block_device``, ``read_only``.
    Construct with :meth:`open` or :meth:`create_file`, not directly.
    """

    def __init__(self, fd: int, path: str, block_size: int, *, is_block_device: bool,
                 read_only: bool):
        self._fd = fd
        self.path = path
        self.block_size = block_size
        self.is_block_device = is_block_device
        self.read_only = read_only
        self._copy_file_range_ok = True  # until the kernel refuses once (then pread/pwrite)
        # Set by every call that changes the device once its system call has returned (or
        # failed), cleared by sync() just before its fdatasync: a sync with nothing written
        # through this object since the last one skips the system call (what an earlier opener
        # wrote was its own to sync), and a change that completes while a sync runs is left
        # for the next one, never taken as covered.
        self._dirty = False
        self._sync_lock = threading.Lock()   # one fdatasync at a time (see sync)
        self._sync_error: ThinpoolError | None = None   # kept by sync_ahead for sync to raise
        self._unstarted = 0       # bytes written since the last early write-back started
        self.size = 0
        self.nr_blocks = 0
        self._refresh_size()

    # --- construction ------------------------------------------------------------------------

    @classmethod
    def create_file(cls, path: str | os.PathLike[str], size_bytes: int,
                    block_size: int = DEFAULT_BLOCK_SIZE) -> DataDevice:
        """Create a new sparse regular file of ``size_bytes`` and open it read-write.

        Raises AlreadyExists if ``path`` exists (whatever it is); InvalidArgument for a bad size or
        block size; NotFound if the parent directory is missing. The file (mode 0600) and its
        directory entry are synced before returning. Cost: no data is written.
        """
        _check_int("size_bytes", size_bytes)
        _check_block_size(block_size)
        path = os.fspath(path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise AlreadyExists(f"cannot create data file {path!r}: it exists already") from None
        except OSError as exc:
            raise _os_error(exc, f"cannot create data file {path!r}", device=path) from exc
        try:
            os.ftruncate(fd, size_bytes)
            os.fsync(fd)
            _fsync_dir(os.path.dirname(os.path.abspath(path)))
        except OSError as exc:
            what = f"cannot create data file {path!r} of {_size(size_bytes)}"
            too_big = _too_large(fd, exc, 0, size_bytes, what, "a smaller --size")
            os.close(fd)
            _unlink_quietly(path)
            if too_big is not None:
                raise too_big from None
            raise _os_error(exc, f"cannot create data file {path!r} of {size_bytes} bytes",
                            device=path) from exc
        except BaseException:
            os.close(fd)
            _unlink_quietly(path)
            raise
        return cls(fd, path, block_size, is_block_device=False, read_only=False)

    @classmethod
    def open(cls, path: str | os.PathLike[str], block_size: int, read_only: bool = False
             ) -> DataDevice:
        """Open an existing regular file or block device as a data device.

        A block device opened for writing is opened exclusively (BusyError if in use). Raises
        NotFound for a missing path, InvalidArgument for a bad block size or a path that is neither
        a regular file nor a block device.
        """
        _check_block_size(block_size)
        path = os.fspath(path)
        try:
            st = os.stat(path)
        except OSError as exc:
            raise _os_error(exc, f"cannot open data device {path!r}", device=path) from exc
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise InvalidArgument(f"data device {path!r} is neither a regular file nor a block device")
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        if stat.S_ISBLK(st.st_mode) and not read_only:
            flags |= os.O_EXCL  # Linux: fail with EBUSY if mounted or claimed elsewhere
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise _os_error(exc, f"cannot open data device {path!r}", device=path) from exc
        try:
            st = os.fstat(fd)  # the path may have changed between stat and open
            is_blk = stat.S_ISBLK(st.st_mode)
            if not (is_blk or stat.S_ISREG(st.st_mode)):
                raise InvalidArgument(
                    f"data device {path!r} is neither a regular file nor a block device")
            return cls(fd, path, block_size, is_block_device=is_blk, read_only=read_only)
        except BaseException:
            os.close(fd)
            raise

    # --- life cycle --------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Close the device (idempotent). Does not sync: call :meth:`sync` first if needed."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> DataDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = "block device" if self.is_block_device else "file"
        state = "closed" if self.closed else ("read-only" if self.read_only else "read-write")
        return (f"<DataDevice {self.path!r} {kind} {self.nr_blocks} x {self.block_size} B "
                f"{state}>")

    def sync(self) -> None:
        """Make every write completed before the call durable (``fdatasync``: data and the file
        size). Free when nothing was written, copied, zeroed or punched through this object since
        the last sync (a commit that only changes metadata, such as a snapshot, pays no data
        sync). Safe from several threads, beside writes: syncs run one at a time, so a sync that
        finds nothing new returns only after a sync already under way has finished; a write
        that completes while the system call runs is synced by the next call. Raises the error
        of a failed :meth:`sync_ahead` (once) instead of syncing."""
        fd = self._live_fd()
        with self._sync_lock:
            if self._sync_error is not None:
                error, self._sync_error = self._sync_error, None
                raise error
            self._fdatasync(fd)

    def sync_ahead(self) -> None:
        """:meth:`sync`, for a caller that does not hold the lock its writers take (a pool
        syncs the data this way before taking its mutex to commit, then calls :meth:`sync`
        again, which only has what was written meanwhile left to do). Raises nothing: a
        failure is kept and raised by the next :meth:`sync`, so that whoever commits meets it
        (after a failed ``fdatasync`` Linux may report success for the same lost pages)."""
        try:
            fd = self._live_fd()
        except ThinpoolError:
            return                 # closed meanwhile: the commit that follows says so
        with self._sync_lock:
            if self._sync_error is not None:
                return
            try:
                self._fdatasync(fd)
            except ThinpoolError as e:
                self._sync_error = e

    def _fdatasync(self, fd: int) -> None:
        if not self._dirty:
            return
        self._dirty = False       # before the call: a write completing during it marks it again
        try:
            os.fdatasync(fd)
        except OSError as exc:
            self._dirty = True
            raise _os_error(exc, f"cannot sync {self.path!r}", device=self.path,
                            operation="sync") from exc

    def grow(self, new_size_bytes: int) -> None:
        """Make the device ``new_size_bytes`` long and refresh ``size``/``nr_blocks``.

        A file is extended sparsely (and synced); shrinking raises InvalidArgument. A block device
        cannot be resized here: this succeeds only if the device already has that size (it was
        grown outside, e.g. an LV extended), else raises InvalidArgument.
        """
        _check_int("new_size_bytes", new_size_bytes)
        fd = self._live_fd()
        if self.is_block_device:
            self._refresh_size()
            if new_size_bytes != self.size:
                raise InvalidArgument(
                    f"cannot resize a block device: {self.path!r} has {self.size} bytes, "
                    f"asked for {new_size_bytes}")
            return
        if new_size_bytes < self.size:
            raise InvalidArgument(
                f"cannot shrink data file {self.path!r} from {self.size} to {new_size_bytes} bytes")
        if new_size_bytes == self.size:
            return
        self._check_writable("grow")
        try:
            os.ftruncate(fd, new_size_bytes)
            os.fsync(fd)
        except OSError as exc:
            too_big = _too_large(fd, exc, self.size, new_size_bytes,
                                 f"cannot grow data file {self.path!r} to {_size(new_size_bytes)}",
                                 "a smaller size")
            if too_big is not None:
                raise too_big from None
            raise _os_error(exc, f"cannot grow {self.path!r} to {new_size_bytes} bytes",
                                device=self.path, operation="grow") from exc
        self._refresh_size()

    # --- reads and writes --------------------------------------------------------------------

    def read_blocks(self, block: int, count: int) -> bytes:
        """Return the ``count`` blocks starting at ``block`` (zero-padded at end-of-file)."""
        offset, length = self._range(block, count)
        return self._pread(offset, length)

    def read(self, block: int, offset_in_block: int, length: int) -> bytes:
        """Return ``length`` bytes at ``offset_in_block`` within one block (no spill-over)."""
        offset = self._sub_block(block, offset_in_block, length)
        return self._pread(offset, length)

    def write_blocks(self, block: int, data: bytes | bytearray | memoryview) -> None:
        """Write whole blocks starting at ``block``; ``len(data)`` must be a multiple of block_size."""
        view = memoryview(data).cast("B")
        if view.nbytes % self.block_size:
            raise InvalidArgument(
                f"write of {view.nbytes} bytes is not a whole number of {self.block_size}-byte "
                f"blocks")
        offset, _ = self._range(block, view.nbytes // self.block_size)
        self._check_writable("write")
        self._pwrite(offset, view)

    def write(self, block: int, offset_in_block: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset_in_block`` within one block (no spill-over)."""
        view = memoryview(data).cast("B")
        offset = self._sub_block(block, offset_in_block, view.nbytes)
        self._check_writable("write")
        self._pwrite(offset, view)

    def read_span(self, block: int, offset_in_block: int, length: int) -> bytes:
        """``length`` bytes from ``offset_in_block`` of ``block`` on, which may run on through
        the following blocks: for a caller that owns a run of consecutive data blocks."""
        first, nbytes = self._span(block, offset_in_block, length)
        return self._pread(first, nbytes)

    def read_span_into(self, block: int, offset_in_block: int, out: memoryview) -> None:
        """:meth:`read_span` into the caller's writable buffer ``out`` (its length is the
        length to read): no allocation, no copy in user space."""
        first, nbytes = self._span(block, offset_in_block, out.nbytes)
        self._pread_into(first, out)

    def write_span(self, block: int, offset_in_block: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` from ``offset_in_block`` of ``block`` on, through following blocks."""
        view = memoryview(data).cast("B")
        first, _ = self._span(block, offset_in_block, view.nbytes)
        self._check_writable("write")
        self._pwrite(first, view)

    def _span(self, block: int, offset_in_block: int, length: int) -> tuple[int, int]:
        _check_int("offset_in_block", offset_in_block)
        _check_int("length", length)
        if offset_in_block >= self.block_size:
            raise InvalidArgument(f"offset {offset_in_block} is not inside a {self.block_size}-byte block")
        count = -(-(offset_in_block + length) // self.block_size)
        offset, _ = self._range(block, count)
        return offset + offset_in_block, length

    def allocated_bytes(self) -> int | None:
        """Bytes the host has allocated for a file (``st_blocks``); None for a block device."""
        if self.is_block_device:
            return None
        return os.fstat(self._live_fd()).st_blocks * 512

    def read_in_block(self, block: int, offset_in_block: int, length: int) -> bytes:
        """The hot path of small reads: ``length`` bytes inside one block, one ``pread``.
        The caller guarantees ``offset_in_block + length <= block_size``."""
        if block >= self.nr_blocks or block < 0:
            raise InvalidArgument(f"block {block} is out of range ({self.nr_blocks} blocks)")
        try:
            data = os.pread(self._fd, length, block * self.block_size + offset_in_block)
        except OSError as exc:
            off = block * self.block_size + offset_in_block
            raise self._io_error(exc, f"cannot read {length} bytes at {off} from {self.path!r}",
                                 "read", off) from exc
        if len(data) == length:
            return data
        return self._pread(block * self.block_size + offset_in_block, length)

    def write_in_block(self, block: int, offset_in_block: int, data) -> None:
        """The hot path of small writes: ``data`` inside one block, one ``pwrite``.
        The caller guarantees it fits in the block."""
        if not 0 <= block < self.nr_blocks:
            raise InvalidArgument(f"block {block} is out of range ({self.nr_blocks} blocks)")
        if self.read_only:
            self._check_writable("write")
        off = block * self.block_size + offset_in_block
        try:
            n = os.pwrite(self._fd, data, off)
        except OSError as exc:
            raise self._io_error(exc, f"cannot write {len(data)} bytes at {off} to {self.path!r}",
                                 "write", off) from exc
        finally:
            self._dirty = True    # after the call (see sync)
        if n != len(data):
            self._pwrite(off + n, memoryview(data).cast("B")[n:])
        else:
            self._unstarted += n          # _written, inline: the hot path
            if self._unstarted >= WRITEBACK_BYTES:
                self._written(0)

    def zero_around(self, block: int, lo: int, hi: int) -> None:
        """Make bytes [0, lo) and [hi, block_size) of ``block`` read as zeros (the caller is
        about to write [lo, hi) of a newly allocated block).

        Nothing to do when the block is a hole of a file (``SEEK_DATA`` finds no data in it):
        blocks freed by a commit are punched, and a fresh pool's blocks were never written, so
        that is the common case and costs one ``lseek``. Otherwise (a block device, stale bytes
        left by an aborted transaction, a file system without ``SEEK_DATA``) zeros are written."""
        offset = self._sub_block(block, 0, self.block_size)
        if not 0 <= lo <= hi <= self.block_size:
            raise InvalidArgument(f"zero_around({lo}, {hi}) outside a {self.block_size}-byte block")
        self._check_writable("zero")
        if lo == 0 and hi == self.block_size:
            return
        if not self.is_block_device:
            try:
                if os.lseek(self._fd, offset, os.SEEK_DATA) >= offset + self.block_size:
                    return
            except OSError as exc:
                if exc.errno == errno.ENXIO:      # no data at or after it: a hole to the end
                    return
                # (EINVAL and the like: no SEEK_DATA here; write the zeros)
        if lo:
            self._write_zeros(offset, lo)
        if hi < self.block_size:
            self._write_zeros(offset + hi, self.block_size - hi)

    def copy_blocks(self, src: int, dst: int, count: int) -> None:
        """Copy ``count`` blocks from ``src`` to ``dst`` inside the device.

        The ranges must not overlap (InvalidArgument: copies are for breaking sharing into fresh
        blocks, so an overlap means a bug). Uses ``os.copy_file_range`` (in-kernel, possibly a
        reflink), falling back to pread/pwrite where it is absent or refused.
        """
        src_off, length = self._range(src, count)
        dst_off, _ = self._range(dst, count)
        if count and src < dst + count and dst < src + count:
            raise InvalidArgument(
                f"copy of {count} blocks from {src} to {dst}: source and destination overlap")
        self._check_writable("copy")
        done = 0
        if self._copy_file_range_ok:
            done = self._copy_in_kernel(src_off, dst_off, length)
        while done < length:
            chunk = self._pread(src_off + done, min(_CHUNK, length - done))
            self._pwrite(dst_off + done, memoryview(chunk))
            done += len(chunk)

    def zero_blocks(self, block: int, count: int) -> None:
        """Make ``count`` blocks from ``block`` read as zeros.

        Files: punch a hole (space is released); block devices: ``BLKZEROOUT``. Either falls back
        to writing zeros when the call is not supported.
        """
        offset, length = self._range(block, count)
        self._check_writable("zero")
        if length == 0:
            return
        if self._release(offset, length, zero=True):
            return
        self._write_zeros(offset, length)

    def punch_blocks(self, block: int, count: int) -> bool:
        """Give the space of ``count`` free blocks back: a hole in a file, a discard on a device.

        Returns False, and changes nothing, when the file system or device cannot do it; never
        raises for that. Contents afterwards: zeros on files, unspecified on block devices.
        """
        offset, length = self._range(block, count)
        self._check_writable("punch")
        if length == 0:
            return True
        return self._release(offset, length, zero=False)

    # --- internals ---------------------------------------------------------------------------

    def _io_error(self, exc: OSError, what: str, operation: str, offset: int) -> ThinpoolError:
        return _os_error(exc, what, device=self.path, operation=operation,
                         block=offset // self.block_size)

    def _live_fd(self) -> int:
        if self._fd < 0:
            raise ThinpoolError(f"data device {self.path!r} is closed")
        return self._fd

    def _check_writable(self, what: str) -> None:
        if self.read_only:
            raise ReadOnlyError(f"cannot {what}: data device {self.path!r} is open read-only")

    def _refresh_size(self) -> None:
        fd = self._live_fd()
        try:
            if self.is_block_device:
                size = _block_device_size(fd)
            else:
                size = os.fstat(fd).st_size
        except OSError as exc:
            raise _os_error(exc, f"cannot read the size of {self.path!r}", device=self.path,
                            operation="stat") from exc
        self.size = size
        self.nr_blocks = size // self.block_size

    def _range(self, block: int, count: int) -> tuple[int, int]:
        """Byte offset and length of blocks [block, block + count); checks bounds."""
        _check_int("block", block)
        _check_int("count", count)
        if block + count > self.nr_blocks:
            raise InvalidArgument(
                f"blocks [{block}, {block + count}) are out of range: {self.path!r} has "
                f"{self.nr_blocks} blocks")
        self._live_fd()
        return block * self.block_size, count * self.block_size

    def _sub_block(self, block: int, offset_in_block: int, length: int) -> int:
        """Byte offset of ``length`` bytes at ``offset_in_block`` of ``block``; checks bounds."""
        offset, _ = self._range(block, 1)
        _check_int("offset_in_block", offset_in_block)
        _check_int("length", length)
        if offset_in_block + length > self.block_size:
            raise InvalidArgument(
                f"{length} bytes at offset {offset_in_block} cross the end of a "
                f"{self.block_size}-byte block")
        return offset + offset_in_block

    def _pread(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        view = memoryview(buf)
        done = 0
        try:
            while done < length:
                n = os.preadv(self._fd, [view[done:]], offset + done)
                if n == 0:
                    break  # end of file: the rest stays zero
                done += n
        except OSError as exc:
            raise self._io_error(exc, f"cannot read {length} bytes at {offset} from {self.path!r}",
                                 "read", offset) from exc
        finally:
            view.release()
        return bytes(buf)

    def _pread_into(self, offset: int, view: memoryview) -> None:
        length = view.nbytes
        done = 0
        try:
            while done < length:
                n = os.preadv(self._fd, [view[done:]], offset + done)
                if n == 0:                 # end of file: the rest reads as zeros
                    view[done:] = bytes(length - done)
                    return
                done += n
        except OSError as exc:
            raise self._io_error(exc, f"cannot read {length} bytes at {offset} from {self.path!r}",
                                 "read", offset) from exc

    def _pwrite(self, offset: int, view: memoryview) -> None:
        done = 0
        length = view.nbytes
        try:
            while done < length:
                n = os.pwrite(self._fd, view[done:], offset + done)
                if n <= 0:
                    raise OSError(errno.EIO, "pwrite made no progress")
                done += n
        except OSError as exc:
            raise self._io_error(exc, f"cannot write {length} bytes at {offset} to {self.path!r}",
                                 "write", offset) from exc
        finally:
            self._dirty = True    # after the calls (see sync)
        self._written(length)

    def _written(self, length: int) -> None:
        """Count ``length`` bytes written towards the next early write-back, starting it when
        they reach :data:`WRITEBACK_BYTES` (all of the device's dirty pages: the kernel finds
        them by their tags, so the cost does not grow with the device)."""
        self._unstarted += length
        if self._unstarted >= WRITEBACK_BYTES:
            self._unstarted = 0
            _start_writeback(self._fd)

    def _write_zeros(self, offset: int, length: int) -> None:
        zeros = memoryview(_ZEROS)
        done = 0
        while done < length:
            n = min(_CHUNK, length - done)
            self._pwrite(offset + done, zeros[:n])
            done += n

    def _copy_in_kernel(self, src_off: int, dst_off: int, length: int) -> int:
        """Copy with copy_file_range as far as it goes; returns the bytes copied."""
        copy_file_range = getattr(os, "copy_file_range", None)
        if copy_file_range is None:
            self._copy_file_range_ok = False
            return 0
        try:
            done = self._copy_range(copy_file_range, src_off, dst_off, length)
        finally:
            self._dirty = True    # after the calls (see sync)
        self._written(done)
        return done

    def _copy_range(self, copy_file_range, src_off: int, dst_off: int, length: int) -> int:
        done = 0
        while done < length:
            try:
                n = copy_file_range(self._fd, self._fd, min(_MAX_COPY, length - done),
                                    src_off + done, dst_off + done)
            except OSError as exc:
                if exc.errno in _COPY_FALLBACK:
                    self._copy_file_range_ok = False
                    break
                raise self._io_error(exc, f"cannot copy {length} bytes from {src_off} to {dst_off} "
                                     f"in {self.path!r}", "copy", dst_off) from exc
            if n == 0:
                break  # source beyond end-of-file: let the fallback pad with zeros
            done += n
        return done

    def _release(self, offset: int, length: int, *, zero: bool) -> bool:
        """Punch a hole (file) or zero-out / discard (block device); False if unsupported."""
        try:
            if self.is_block_device:
                request = BLKZEROOUT if zero else BLKDISCARD
                fcntl.ioctl(self._fd, request, _RANGE.pack(offset, length))
            else:
                _fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno in _UNSUPPORTED:
                return False
            what = "zero" if zero else "release"
            raise self._io_error(exc, f"cannot {what} {length} bytes at {offset} of {self.path!r}",
                                 what, offset) from exc
        finally:
            self._dirty = True    # after the call (see sync)
        return True


def _block_device_size(fd: int) -> int:
    buf = bytearray(8)
    try:
        fcntl.ioctl(fd, BLKGETSIZE64, buf)
        return struct.unpack("=Q", buf)[0]
    except OSError:
        return os.lseek(fd, 0, os.SEEK_END)


def _size(n: int) -> str:
    from thinpool.units import format_size
    return f"{format_size(n)} ({n} bytes)"


def _too_large(fd: int, exc: OSError, size: int, wanted: int, what: str,
               smaller: str) -> InvalidArgument | None:
    """For EFBIG ("File too large") from growing a regular file from ``size`` to ``wanted``
    bytes: the error naming the file system's limit, found by a binary search with
    ``ftruncate`` (about 45 calls, no data written), and what to do instead. The file is put
    back to ``size``. None for any other error."""
    if exc.errno != errno.EFBIG:
        return None
    lo, hi = size, wanted                   # lo: a size the file system takes; hi: one it refuses
    try:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            try:
                os.ftruncate(fd, mid)
                lo = mid
            except OSError as e:
                if e.errno != errno.EFBIG:
                    raise
                hi = mid
        os.ftruncate(fd, size)
    except OSError:
        return InvalidArgument(f"{what}: the file system refuses a file that large; give "
                               f"{smaller}, or a block device as the data device (--data)")
    import resource
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    who = ("this process's file size limit (ulimit -f) allows"
           if soft != resource.RLIM_INFINITY and soft <= lo + 1 else "the file system there allows")
    return InvalidArgument(f"{what}: {who} files of at most {_size(lo)}; "
                           f"give {smaller}, or a block device as the data device (--data)")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
