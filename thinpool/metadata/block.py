"""The 4 KiB block manager: the only code that does OS I/O on the metadata device.

Contract:

* ``read(b, validator)`` returns the block's 4096 bytes as immutable ``bytes`` after the kind's
  validator accepted them (checksum with the kind's salt, self-location, kind-specific bounds).
  A block that fails validation raises :class:`~thinpool.errors.CorruptBlock` naming the block and
  the check; nothing is cached for it. Cost: one ``pread`` and one CRC on a miss, a dict lookup on
  a hit.
* ``write_many(blocks)`` seals each block through its validator (fills ``blocknr``, computes the
  checksum last) and writes them in ascending order, coalescing neighbours into one ``pwritev``.
  ``flush()`` makes every write before it durable (``fdatasync``).
* ``read_nodes(blocks)`` is the bulk path of read-only walkers: many B-tree nodes as one numpy
  array, one ``preadv`` per run of neighbouring blocks, every node checked in vectorised passes
  (one CRC call per block). It answers None instead of naming a bad block: the caller then reads
  the same nodes one by one with ``read``, which names it. It bypasses the cache.
* Clean blocks are kept in a bounded LRU cache (``cache_blocks`` entries, default 8192 = 32 MiB);
  it never grows past that bound. Writes replace the cached copy.
* OS errors never come out raw: a failed read, write or flush raises
  :class:`~thinpool.errors.MetadataIOError` naming the block and the operation; ENOSPC or EDQUOT
  on a write (a sparse metadata file on a full file system) raises
  :class:`~thinpool.errors.NoMetadataSpace`. A failed write leaves the block's cached copy
  forgotten (what reached the disk is unknown).
* Nothing here knows about transactions: shadowing and commit order live in ``transaction.py``.
"""

from __future__ import annotations

import errno as _errno
import os
import stat
import struct
from collections import OrderedDict
from typing import Iterable, Protocol

import numpy as np

from ..errors import (ChecksumMismatch, CorruptBlock, InvalidArgument, MetadataError,
                      MetadataIOError, NoMetadataSpace)
from . import format as fmt
from .checksum import block_checksum, block_checksums, seal, stored_checksum

_BLKGETSIZE64 = 0x80081272
_BLOCKNR = struct.Struct("<Q")


class Validator(Protocol):
    kind: str

    def check(self, buf: bytes, blocknr: int) -> None: ...

    def prepare(self, buf: bytearray, blocknr: int) -> None: ...


class _SaltedValidator:
    """Checksum with a salt over bytes 4..4095 and a self-location field at offset 8."""

    def __init__(self, kind: str, salt: int):
        self.kind = kind
        self.salt = salt

    def check(self, buf: bytes, blocknr: int) -> None:
        got = block_checksum(buf, self.salt)
        want = stored_checksum(buf)
        if got != want:
            raise ChecksumMismatch(blocknr, self.kind, want, got)
        where = _BLOCKNR.unpack_from(buf, 8)[0]
        if where != blocknr:
            raise CorruptBlock(blocknr, self.kind, "wrong location",
                               f"block says it is block {where}")

    def prepare(self, buf: bytearray, blocknr: int) -> None:
        _BLOCKNR.pack_into(buf, 8, blocknr)
        seal(buf, self.salt)


class _NodeValidator(_SaltedValidator):
    """B-tree nodes: also flags, and that the header's entry counts fit in the block."""

    def check(self, buf: bytes, blocknr: int) -> None:
        super().check(buf, blocknr)
        _, flags, _, nr, mx, vs, _ = fmt.NODE_HEADER.unpack_from(buf, 0)
        if flags not in (fmt.INTERNAL_NODE, fmt.LEAF_NODE):
            raise CorruptBlock(blocknr, self.kind, "bad node flags", f"flags={flags}")
        if vs == 0 or 32 + (8 + vs) * mx > fmt.BLOCK_SIZE:
            raise CorruptBlock(blocknr, self.kind, "node does not fit in a block",
                               f"max_entries={mx} value_size={vs}")
        if mx % 3 != 0:
            raise CorruptBlock(blocknr, self.kind, "max_entries not a multiple of 3", f"max_entries={mx}")
        if nr > mx:
            raise CorruptBlock(blocknr, self.kind, "too many entries", f"nr_entries={nr} > max_entries={mx}")

    def all_valid(self, nodes: np.ndarray, blocks: np.ndarray) -> bool:
        """:meth:`check` for an array of whole nodes (``(k, 4096)`` bytes read from ``blocks``):
        True when every one passes; which one fails, and why, is :meth:`check`'s to say."""
        crc = block_checksums(nodes, self.salt)
        h = nodes.reshape(-1).view(fmt.NODE_BLOCK_DTYPE)
        flags, mx, vs = h["flags"], h["max_entries"], h["value_size"]
        return bool(np.array_equal(crc, h["csum"])
                    and np.array_equal(h["blocknr"], blocks.astype(np.uint64))
                    and ((flags == fmt.INTERNAL_NODE) | (flags == fmt.LEAF_NODE)).all()
                    and (vs > 0).all()
                    and (32 + (8 + vs.astype(np.int64)) * mx <= fmt.BLOCK_SIZE).all()
                    and (mx % 3 == 0).all()
                    and (h["nr_entries"] <= mx).all())


SUPERBLOCK_VALIDATOR = _SaltedValidator("superblock", fmt.SUPERBLOCK_CSUM_XOR)
NODE_VALIDATOR = _NodeValidator("btree node", fmt.BTREE_CSUM_XOR)
BITMAP_VALIDATOR = _SaltedValidator("space map bitmap", fmt.BITMAP_CSUM_XOR)
INDEX_VALIDATOR = _SaltedValidator("metadata space map index", fmt.INDEX_CSUM_XOR)


class BlockManager:
    """Reads and writes whole 4 KiB metadata blocks of one file or block device."""

    def __init__(self, path: str | os.PathLike, read_only: bool = False, cache_blocks: int = 8192):
        self.path = os.fspath(path)
        self.read_only = read_only
        flags = os.O_RDONLY if read_only else os.O_RDWR
        try:
            self._fd = os.open(self.path, flags | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise InvalidArgument(f"metadata device {self.path} does not exist") from None
        except IsADirectoryError:
            raise InvalidArgument(f"metadata device {self.path} is a directory") from None
        st = os.fstat(self._fd)
        if stat.S_ISBLK(st.st_mode):
            import fcntl
            buf = fcntl.ioctl(self._fd, _BLKGETSIZE64, b"\0" * 8)
            size = struct.unpack("<Q", buf)[0]
        elif stat.S_ISREG(st.st_mode):
            size = st.st_size
        else:
            os.close(self._fd)
            raise InvalidArgument(f"metadata device {self.path} is neither a file nor a block device")
        self.nr_blocks = size // fmt.BLOCK_SIZE
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_max = cache_blocks
        self._checked: dict[int, str] = {}

    # -- reading -----------------------------------------------------------------------------
    def read_raw(self, b: int) -> bytes:
        """Read a block without validation (for tools that examine damage)."""
        if b >= self.nr_blocks:
            raise CorruptBlock(b, "block", "past the end of the metadata device",
                               f"device has {self.nr_blocks} blocks")
        try:
            data = os.pread(self._fd, fmt.BLOCK_SIZE, b * fmt.BLOCK_SIZE)
        except OSError as e:
            raise self._io_error(e, "read", b) from e
        if len(data) != fmt.BLOCK_SIZE:
            raise MetadataError(f"short read of metadata block {b} from {self.path}")
        return data

    def read_nodes(self, blocks: np.ndarray) -> np.ndarray | None:
        """B-tree nodes ``blocks`` as a ``(k, 4096)`` uint8 array, or None if any of them is past
        the end of the device or fails :data:`NODE_VALIDATOR`'s checks (see the module's contract)."""
        blocks = np.asarray(blocks, np.int64)
        k = len(blocks)
        out = np.empty((k, fmt.BLOCK_SIZE), np.uint8)
        if k == 0:
            return out
        if int(blocks.min()) < 0 or int(blocks.max()) >= self.nr_blocks:
            return None
        order = np.argsort(blocks, kind="stable")
        sb = blocks[order]
        brk = np.flatnonzero((np.diff(sb) != 1) | (np.diff(order) != 1)) + 1
        starts = np.concatenate(([0], brk)).tolist()
        ends = np.concatenate((brk, [k])).tolist()
        mv = memoryview(out.reshape(-1))
        bs = fmt.BLOCK_SIZE
        for a, z in zip(starts, ends):
            # A run of neighbouring blocks that also sit next to each other in the output.
            first_out = int(order[a])
            want = (z - a) * bs
            try:
                got = os.preadv(self._fd, [mv[first_out * bs: first_out * bs + want]], int(sb[a]) * bs)
            except OSError as e:
                raise self._io_error(e, "read", int(sb[a])) from e
            if got != want:
                return None
        return out if NODE_VALIDATOR.all_valid(out, blocks) else None

    def read(self, b: int, validator: Validator) -> bytes:
        cache = self._cache
        data = cache.get(b)
        if data is not None:
            cache.move_to_end(b)
            if self._checked.get(b) == validator.kind:
                return data
        else:
            data = self.read_raw(b)
        validator.check(data, b)
        self._remember(b, data, validator.kind)
        return data

    def _remember(self, b: int, data: bytes, kind: str) -> None:
        cache = self._cache
        cache[b] = data
        cache.move_to_end(b)
        self._checked[b] = kind
        while len(cache) > self._cache_max:
            old, _ = cache.popitem(last=False)
            self._checked.pop(old, None)

    def forget(self, b: int) -> None:
        self._cache.pop(b, None)
        self._checked.pop(b, None)

    def clear_cache(self) -> None:
        self._cache.clear()
        self._checked.clear()

    # -- writing -----------------------------------------------------------------------------
    def write_many(self, blocks: Iterable[tuple[int, bytearray, Validator]]) -> None:
        """Seal and write blocks in ascending order, one ``pwritev`` per run of neighbours."""
        if self.read_only:
            raise MetadataError("metadata device is open read-only")
        items = sorted(blocks, key=lambda t: t[0])
        run: list[bytes] = []
        run_start = -1
        for b, buf, validator in items:
            if b >= self.nr_blocks:
                raise MetadataError(f"write to metadata block {b} past the end ({self.nr_blocks} blocks)")
            validator.prepare(buf, b)
            data = bytes(buf)
            self._remember(b, data, validator.kind)
            if run and b == run_start + len(run) and len(run) < 512:
                run.append(data)
            else:
                self._writev(run_start, run)
                run, run_start = [data], b
        self._writev(run_start, run)

    def _io_error(self, e: OSError, op: str, block: int | None):
        """The typed error for an OS error of ``op`` on ``block``."""
        where = "" if block is None else f" block {block}"
        msg = f"cannot {op} metadata{where} of {self.path}: {e.strerror or e}"
        if op == "write" and e.errno in (_errno.ENOSPC, _errno.EDQUOT):
            return NoMetadataSpace(msg)
        return MetadataIOError(msg, device=self.path, operation=op, block=block, errno=e.errno)

    def _writev(self, start: int, bufs: list[bytes]) -> None:
        try:
            self._writev_raw(start, bufs)
        except OSError as e:
            for b in range(start, start + len(bufs)):
                self.forget(b)
            raise self._io_error(e, "write", start) from e

    def _writev_raw(self, start: int, bufs: list[bytes]) -> None:
        while bufs:
            chunk = bufs[:512]
            n = os.pwritev(self._fd, chunk, start * fmt.BLOCK_SIZE)
            total = len(chunk) * fmt.BLOCK_SIZE
            if n != total:
                # Short write: finish the rest block by block.
                done = n // fmt.BLOCK_SIZE
                for i in range(done, len(chunk)):
                    self._write_all(start + i, chunk[i])
            start += len(chunk)
            bufs = bufs[512:]

    def _write_all(self, b: int, data: bytes) -> None:
        off = 0
        while off < len(data):
            off += os.pwrite(self._fd, data[off:], b * fmt.BLOCK_SIZE + off)

    def write(self, b: int, buf: bytearray, validator: Validator) -> None:
        self.write_many([(b, buf, validator)])

    def zero_block(self, b: int) -> None:
        """Overwrite a block with zeros and flush (to invalidate, e.g., a half-written superblock)."""
        self.forget(b)
        try:
            self._write_all(b, bytes(fmt.BLOCK_SIZE))
            os.fsync(self._fd)
        except OSError as e:
            raise self._io_error(e, "write", b) from e

    def flush(self) -> None:
        # fdatasync: the blocks and whatever the file system needs to read them back (a sparse
        # file's new extents); not the modification time, whose journal commit an fsync would
        # add to every metadata commit.
        if not self.read_only:
            try:
                os.fdatasync(self._fd)
            except OSError as e:
                raise self._io_error(e, "flush", None) from e

    def refresh_size(self) -> int:
        """Re-read the device size (after the file was grown); returns the block count."""
        st = os.fstat(self._fd)
        if stat.S_ISREG(st.st_mode):
            self.nr_blocks = st.st_size // fmt.BLOCK_SIZE
        return self.nr_blocks

    def grow(self, nr_blocks: int) -> None:
        """Grow a regular metadata file to ``nr_blocks`` (sparse)."""
        st = os.fstat(self._fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument("cannot grow a metadata block device; give a larger device")
        if nr_blocks > self.nr_blocks:
            try:
                os.ftruncate(self._fd, nr_blocks * fmt.BLOCK_SIZE)
            except OSError as e:
                raise InvalidArgument(f"cannot grow metadata file {self.path} to "
                                      f"{nr_blocks * fmt.BLOCK_SIZE} bytes: {e.strerror}") from None
            self.nr_blocks = nr_blocks

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.clear_cache()


def create_metadata_file(path, size: int) -> None:
    """Create a new sparse metadata file of ``size`` bytes (rounded up to whole blocks)."""
    size = -(-size // fmt.BLOCK_SIZE) * fmt.BLOCK_SIZE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise InvalidArgument(f"cannot create metadata file {path}: {e.strerror}") from None
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    except OSError as e:
        os.close(fd)
        os.unlink(path)
        raise InvalidArgument(f"cannot make metadata file {path} {size} bytes: {e.strerror}") from None
    os.close(fd)


def device_size(path) -> int:
    """Size in bytes of a metadata file or block device."""
    bm = BlockManager(path, read_only=True, cache_blocks=1)
    try:
        return bm.nr_blocks * fmt.BLOCK_SIZE
    finally:
        bm.close()


def new_block_buffer() -> bytearray:
    return bytearray(fmt.BLOCK_SIZE)


__all__ = ["BlockManager", "Validator", "SUPERBLOCK_VALIDATOR", "NODE_VALIDATOR",
           "BITMAP_VALIDATOR", "INDEX_VALIDATOR", "new_block_buffer", "seal"]
