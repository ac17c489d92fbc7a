"""Volume: byte-addressed I/O on one thin device of a pool.

Semantics (those of a dm-thin device):

* ``read`` of a range nobody wrote returns zeros.
* ``write`` into an unmapped block provisions it: a data block is allocated and written whole
  (the bytes outside the write are zeros), so a reused block never shows its previous owner's data.
* ``write`` into a block shared with another device (the mapping predates the device's latest
  snapshot, the kernel's test) copies the block to a new one first and remaps; no other device's
  bytes change. A write into an exclusive block is done in place.
* ``discard`` unmaps every whole block in its range (freeing the data blocks no one else maps)
  and writes zeros over the partial edges, so the whole range reads as zeros afterwards.
* Requests reaching past ``size`` raise :class:`~thinpool.errors.OutOfRange` and change nothing; a
  write that needs more new blocks than the pool has free raises
  :class:`~thinpool.errors.NoDataSpace` before anything is written.
* ``write_zeroes`` makes a range read as zeros (the block layer's WRITE ZEROES): with
  ``unmap=True`` it is ``discard``; with ``unmap=False`` every block of the range is provisioned,
  as a write of zeros would (unmapped and shared blocks get new data blocks of their own), but the
  whole blocks are zeroed on the data device (a hole punched in a file, ``BLKZEROOUT`` on a
  device) instead of zero bytes passing through memory. Its failures are those of ``write``.
* ``flush`` makes every write before it durable (it commits the pool).
* A handle names its device by id and creation epoch: after the device is deleted every call
  raises :class:`~thinpool.errors.NotFound`, even if a new device got the same id.
* A request that fails leaves no half-made mapping: new blocks are allocated before anything is
  written and given back if writing them fails (the metadata is then as it was). Bytes of a
  failed write that went in place may or may not have landed, as on a disk.

Costs: one mapping-tree range walk per request, then one ``pread``/``pwrite`` per run of
consecutive data blocks (not one per block); allocation is one vectorised request per write.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .errors import InvalidArgument, NoDataSpace, OutOfRange, ThinpoolError, VolumeReadOnly
from .metadata import format as fmt

if TYPE_CHECKING:
    from .pool import Pool


class Volume:
    def __init__(self, pool: "Pool", name: str, dev_id: int, size: int, epoch: int = 0):
        self.pool = pool
        self.name = name
        self.dev_id = dev_id
        self.epoch = epoch
        self.size = size
        self._bs = pool.block_size
        self._hot: tuple | None = None      # read's lock-free state (see read)

    def __repr__(self) -> str:
        return f"Volume({self.name!r}, dev_id={self.dev_id}, size={self.size})"

    # -- helpers -----------------------------------------------------------------------------
    def _live(self):
        """Raise NotFound if the device is gone; refresh the size and the read-only flag from
        the pool's names. Returns the names entry."""
        e = self.pool._live(self)
        self.size = e.size
        return e

    @property
    def read_only(self) -> bool:
        """Whether the volume is marked read-only (``Pool.set_read_only``)."""
        with self.pool._mutex:
            return self._live().read_only

    def check_writable(self, what: str = "write") -> None:
        """Raise :class:`~thinpool.errors.VolumeReadOnly` (naming ``what``) when the volume is
        marked read-only; NotFound when it is gone. Changes nothing."""
        with self.pool._mutex:
            if self._live().read_only:
                raise VolumeReadOnly(self.pool.name, self.name, what)

    def _check_range(self, offset: int, length: int, what: str, limit: int | None = None) -> None:
        if not isinstance(offset, int) or not isinstance(length, int) or isinstance(offset, bool):
            raise InvalidArgument(f"{what}: offset and length must be integers")
        if offset < 0 or length < 0:
            raise InvalidArgument(f"{what}: negative offset or length ({offset}, {length})")
        if offset + length > (self.size if limit is None else limit):
            raise OutOfRange(f"{what} of {length} bytes at offset {offset} reaches past the end "
                             f"of volume {self.name!r} ({self.size} bytes)")

    def _map(self, first: int, last: int) -> dict[int, tuple[int, int]]:
        """Mappings of virtual blocks [first, last]: vblock -> (data block, time)."""
        meta = self.pool._meta
        if first == last:                       # one block: a plain lookup is cheapest
            m = meta.lookup(self.dev_id, first)
            return {} if m is None else {first: m}
        return meta.lookup_range(self.dev_id, first, last)

    # -- read --------------------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        # The hot path, without the pool's lock: a request inside one block whose mapping the
        # metadata's lookup cache holds is one pread. The block could only have been handed to
        # another volume after a commit, abort or close, each of which moves the metadata's
        # generation: the bytes are returned only if it did not move meanwhile. What the path
        # needs is kept in _hot, valid while the generation is the one it was taken at.
        hot = self._hot
        if hot is not None and type(offset) is int and type(length) is int:
            meta, gen, cache, dev, bs = hot
            if meta.generation == gen and offset >= 0 and length > 0 and offset + length <= self.size:
                vb = offset // bs
                rel = offset - vb * bs
                if rel + length <= bs:
                    m = cache.get(vb, _MISS)
                    if m is None:
                        return bytes(length)
                    if m is not _MISS:
                        try:
                            data = dev.read_in_block(m[0], rel, length)
                        except ThinpoolError:
                            data = None            # the locked path below says what is wrong
                        if data is not None and meta.generation == gen:
                            return data
        pool = self.pool
        with pool._guard():
            data = self._read(offset, length)
            meta = pool._meta
            cache = meta.cached_lookups(self.dev_id) if meta is not None else None
            self._hot = None if cache is None or pool._data is None else (
                meta, meta.generation, cache, pool._data, self._bs)
            return data

    def read_into(self, offset: int, out) -> None:
        """:meth:`read` of ``len(out)`` bytes at ``offset`` into the caller's writable buffer
        (a bytearray or a memoryview of one): data is read straight into it and unmapped
        ranges are zero-filled, with no other copy (for servers moving large requests)."""
        out = memoryview(out).cast("B")
        pool = self.pool
        with pool._guard():
            pool._check_readable()
            self._live()
            length = out.nbytes
            self._check_range(offset, length, "read")
            if length == 0:
                return
            bs = self._bs
            maps = self._map(offset // bs, (offset + length - 1) // bs)
            dev = pool._data
            pos = offset
            for vb, db, n in _runs(maps):
                lo = max(offset, vb * bs)
                hi = min(offset + length, (vb + n) * bs)
                if lo > pos:
                    _zero(out[pos - offset: lo - offset])
                dev.read_span_into(db, lo - vb * bs, out[lo - offset: hi - offset])
                pos = hi
            if pos < offset + length:
                _zero(out[pos - offset:])

    def _fast_block(self, offset, length):
        """(cached mapping, vblock) when the request lies inside one block whose mapping the
        metadata's lookup cache already holds; None sends it down the general path. Call it
        holding the pool's mutex."""
        pool = self.pool
        meta = pool._meta
        if (meta is None or pool._data is None or type(offset) is not int or type(length) is not int
                or offset < 0 or length <= 0 or offset + length > self.size):
            return None
        bs = pool.block_size
        vb = offset // bs
        if (offset + length - 1) // bs != vb:
            return None
        self._live()
        cache = meta.cached_lookups(self.dev_id)
        if cache is None or vb not in cache:
            return None
        return cache[vb], vb

    def _read(self, offset: int, length: int) -> bytes:
        pool = self.pool
        pool._check_readable()
        self._live()
        self._check_range(offset, length, "read")
        if length == 0:
            return b""
        bs = pool.block_size
        first, last = offset // bs, (offset + length - 1) // bs
        maps = self._map(first, last)
        if not maps:
            return bytes(length)
        out = bytearray(length)
        dev = pool._data
        for vb, db, n in _runs(maps):
            lo = max(offset, vb * bs)
            hi = min(offset + length, (vb + n) * bs)
            out[lo - offset: hi - offset] = dev.read_span(db, lo - vb * bs, hi - lo)
        return bytes(out)

    # -- write -------------------------------------------------------------------------------
    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        pool = self.pool
        if type(data) is bytes:
            with pool._mutex:
                fast = self._fast_block(offset, len(data))
                if fast is not None and not self.pool._registry.volumes[self.name].read_only:
                    m, vb = fast
                    meta = pool._meta
                    # An exclusive block already mapped: written in place, no metadata change.
                    if (m is not None and not pool.read_only and not pool._failed
                            and not meta.needs_check
                            and meta.devices[self.dev_id].snapshotted_time <= m[1]):
                        pool._data.write_in_block(m[0], offset - vb * pool.block_size, data)
                        return
        with self.pool._guard():
            while not self._write(offset, data):
                pass       # waited for space: the pool may have changed, start over

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        """Make ``length`` bytes at ``offset`` read as zeros. ``unmap=True``: as :meth:`discard`
        (whole blocks unmapped). ``unmap=False``: the blocks stay (or become) provisioned, so a
        later write into them needs no new data block; new blocks are allocated before anything
        changes (NoDataSpace changes nothing). Costs one zeroing call per run of whole blocks."""
        if unmap:
            with self.pool._guard():
                self._discard(offset, length, "write zeroes")
            return
        with self.pool._guard():
            while not self._write(offset, None, zero_length=length):
                pass       # waited for space: the pool may have changed, start over

    def _write(self, offset: int, data, limit: int | None = None,
               zero_length: int | None = None) -> bool:
        """Write ``data`` at ``offset``; ``data=None`` writes ``zero_length`` zeros (whole
        blocks zeroed on the data device, see :meth:`write_zeroes`). False: it waited for space
        and changed nothing; the caller starts over."""
        if data is None:
            length, what = zero_length, "write zeroes"
        else:
            data = memoryview(data).cast("B")
            length, what = data.nbytes, "write"
        pool = self.pool
        if self._live().read_only:
            raise VolumeReadOnly(pool.name, self.name, what)
        self._check_range(offset, length, what, limit)
        pool._check_writable()
        if length == 0:
            return True
        bs = pool.block_size
        first, last = offset // bs, (offset + length - 1) // bs
        meta = pool._meta
        # The block before the write too, in the same walk: new blocks go right after its data
        # block when it has one (sequential writes stay contiguous on the data device).
        maps = self._map(max(first - 1, 0), last)
        in_place: dict[int, int] = {}
        fresh: list[int] = []          # virtual blocks that need a new data block
        shared_src: dict[int, int] = {}
        for vb in range(first, last + 1):
            m = maps.get(vb)
            if m is None:
                fresh.append(vb)
            elif meta.is_shared(self.dev_id, m[1]):
                fresh.append(vb)
                shared_src[vb] = m[0]
            else:
                in_place[vb] = m[0]
        end = offset + length
        dev = pool._data
        new = np.zeros(0, np.int64)
        mark = meta.mark()
        if fresh:   # allocate first: running out of space must change nothing
            prev = maps.get(fresh[0] - 1)           # (maps covers first - 1 .. last)
            new = pool._allocate(len(fresh), None if prev is None else prev[0] + 1)
            if new is None:
                return False
        # Writes into exclusive blocks, one pwrite per run.
        for vb, db, n in _runs({v: (b, 0) for v, b in in_place.items()}):
            lo = max(offset, vb * bs)
            hi = min(end, (vb + n) * bs)
            _put(dev, db, lo - vb * bs, data, lo - offset, hi - lo)
        if not fresh:
            return True
        # New blocks: only the first and last block of a write can be partly covered. Those get
        # the shared original copied in (copy-on-write) or are zeroed first, so a reused block
        # never shows old bytes; then each run of new blocks takes one write.
        try:
            for v, db in zip(fresh, new.tolist()):
                if v not in (first, last) or (offset <= v * bs and end >= (v + 1) * bs):
                    continue
                if v in shared_src:
                    dev.copy_blocks(shared_src[v], db, 1)
                else:                 # zeros around the written part, unless a hole already
                    lo, hi = max(offset, v * bs) - v * bs, min(end, (v + 1) * bs) - v * bs
                    dev.zero_around(db, lo, hi)
            for vb, db, n in _runs({v: (int(b), 0) for v, b in zip(fresh, new)}, 1 << 30):
                lo = max(offset, vb * bs)
                hi = min(end, (vb + n) * bs)
                _put(dev, db, lo - vb * bs, data, lo - offset, hi - lo)
        except BaseException:
            pool._release(new, mark)     # the transaction is as it was before this write
            raise
        if len(fresh) == 1:
            meta.insert(self.dev_id, fresh[0], int(new[0]))
        else:
            meta.insert_run(self.dev_id, fresh, new)
        return True

    # -- discard -----------------------------------------------------------------------------
    def discard(self, offset: int, length: int) -> None:
        with self.pool._guard():
            self._discard(offset, length)

    def _discard(self, offset: int, length: int, what: str = "discard") -> None:
        pool = self.pool
        if self._live().read_only:
            raise VolumeReadOnly(pool.name, self.name, what)
        self._check_range(offset, length, what)
        pool._check_writable()
        if length == 0:
            return
        bs = pool.block_size
        end = offset + length
        whole_lo = -(-offset // bs)
        whole_hi = end // bs
        # Partial edges: zero the bytes inside mapped blocks.
        edges = []
        if whole_lo > whole_hi:                     # inside a single block
            edges.append((offset, end))
        else:
            if offset < whole_lo * bs:
                edges.append((offset, whole_lo * bs))
            if end > whole_hi * bs:
                edges.append((whole_hi * bs, end))
        meta = pool._meta
        dirty = []
        for lo, hi in edges:
            m = meta.lookup(self.dev_id, lo // bs)
            if m is not None:
                dirty.append((lo, hi, meta.is_shared(self.dev_id, m[1])))
        need = sum(shared for _, _, shared in dirty)
        if need and pool._alloc.available() < need:
            raise NoDataSpace(f"discard needs {need} free block(s) to zero a shared partial block")
        for lo, hi, _ in dirty:
            self.write(lo, bytes(hi - lo))
        if whole_hi > whole_lo:
            pool._meta.remove_range(self.dev_id, whole_lo, whole_hi)

    def flush(self) -> None:
        with self.pool._mutex:
            self._live()
        self.pool.commit()

    # -- resizing (the pool's device change calls these) -------------------------------------
    def tail_to_zero(self, old_size: int, length: int) -> int | None:
        """For the ``length`` bytes from ``old_size`` (inside the last block, where a shrink may
        have left data): None when they read as zeros already, else how many new data blocks
        zeroing them needs (1 when the block is shared, else 0). One lookup, one read."""
        with self.pool._guard():
            self._live()
            meta = self.pool._meta
            m = meta.lookup(self.dev_id, old_size // self._bs)
            if m is None:
                return None
            tail = self.pool._data.read_span(m[0], old_size % self._bs, length)
            if tail.count(0) == length:
                return None
            return int(meta.is_shared(self.dev_id, m[1]))

    def zero_tail(self, old_size: int, length: int) -> None:
        """Write zeros over the ``length`` bytes from ``old_size`` (see :meth:`tail_to_zero`),
        before the size grows past them."""
        with self.pool._guard():
            self._live()
            while not self._write(old_size, bytes(length), limit=old_size + length):
                pass

    # -- information -------------------------------------------------------------------------
    @property
    def mapped_blocks(self) -> int:
        with self.pool._mutex:
            self._live()
            return self.pool._meta.device(self.dev_id).mapped_blocks

    def blocks_to_provision(self, offset: int, length: int) -> int:
        """How many new data blocks a write of ``length`` bytes at ``offset`` would take now:
        the blocks it covers that are unmapped or shared."""
        with self.pool._mutex:
            self._live()
            if length <= 0:
                return 0
            bs = self.pool.block_size
            first, last = offset // bs, (offset + length - 1) // bs
            meta = self.pool._meta
            own = sum(1 for _, t in self._map(first, last).values()
                      if not meta.is_shared(self.dev_id, t))
            return last - first + 1 - own

    def mapped_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The ``[start, end)`` byte ranges of ``[offset, offset + length)`` whose blocks are
        mapped (provisioned), in order, adjacent blocks merged; the rest reads as zeros.
        OutOfRange past the end. One mapping-tree range walk (what NBD's ``base:allocation``
        and ``qemu-img map`` ask for)."""
        with self.pool._guard():
            self.pool._check_readable()
            self._live()
            self._check_range(offset, length, "mapped_ranges")
            if length == 0:
                return []
            bs = self._bs
            end = offset + length
            out: list[tuple[int, int]] = []
            for vb in sorted(self._map(offset // bs, (end - 1) // bs)):
                lo, hi = max(vb * bs, offset), min((vb + 1) * bs, end)
                if out and out[-1][1] == lo:
                    out[-1] = (out[-1][0], hi)
                else:
                    out.append((lo, hi))
            return out

    def mappings(self) -> list[tuple[int, int, int]]:
        """Every mapping as (virtual block, data block, time), in order."""
        out = []
        with self.pool._mutex:
            self._live()
            for keys, vals in self.pool._meta.mappings(self.dev_id):
                for k, v in zip(keys.tolist(), vals.tolist()):
                    out.append((k, v >> 24, v & fmt.TIME_MASK))
        return out


_ZEROS = memoryview(bytes(1 << 20))


def _zero(view: memoryview) -> None:
    """Fill a writable byte view with zeros."""
    n, pos = view.nbytes, 0
    while pos < n:
        k = min(len(_ZEROS), n - pos)
        view[pos:pos + k] = _ZEROS[:k]
        pos += k


_MISS = object()           # "not in the lookup cache" (None there means "known unmapped")


def _put(dev, db: int, rel: int, data, at: int, n: int) -> None:
    """Write ``n`` bytes from ``rel`` of data block ``db`` on (through the following blocks of
    the run): ``data[at:at + n]``, or zeros when ``data`` is None, the whole blocks among them
    zeroed on the device in one call."""
    if data is not None:
        dev.write_span(db, rel, data[at: at + n])
        return
    bs = dev.block_size
    end = rel + n
    lo, hi = -(-rel // bs), end // bs            # the whole blocks of the span: [lo, hi)
    if lo >= hi:
        dev.write_span(db, rel, bytes(n))
        return
    if rel < lo * bs:
        dev.write_span(db, rel, bytes(lo * bs - rel))
    dev.zero_blocks(db + lo, hi - lo)
    if end > hi * bs:
        dev.write_span(db + hi, 0, bytes(end - hi * bs))


def _runs(maps: dict[int, tuple[int, int]], max_len: int = 256):
    """Group vblock -> (data block, _) into runs (vblock, data block, length) that are
    consecutive in both."""
    start, n = None, 0
    for vb in sorted(maps):
        db = maps[vb][0]
        if start is not None and vb == start[0] + n and db == start[1] + n and n < max_len:
            n += 1
            continue
        if start is not None:
            yield start[0], start[1], n
        start, n = (vb, db), 1
    if start is not None:
        yield start[0], start[1], n
