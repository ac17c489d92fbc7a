"""dm-thin pool metadata: superblock, device details, the two-level mapping tree, transactions.

This is the kernel's ``dm-thin-metadata.c`` in Python, on top of the block manager, transaction
manager, space maps and B-trees of this package.

State and guarantees:

* Thin devices are 24-bit ids. Each has details (``mapped_blocks``, ``transaction_id``,
  ``creation_time``, ``snapshotted_time``) and a mapping tree ``virtual block -> (data block << 24 |
  time)`` whose root is held in the top-level tree ``dev_id -> root``.
* :meth:`create_snap` is O(1): the origin's root gains one reference, the snapshot points at the
  same root and the pool ``time`` goes up by one. Sharing is broken lazily by copy-on-write when a
  shared node is shadowed (its children gain a reference) - never at snapshot time.
* A mapping ``(block, t)`` of device ``d`` is *shared* when ``d.snapshotted_time > t``
  (:meth:`is_shared`), the kernel's conservative rule; writers must then copy the data block.
* Device roots and details live in memory during a transaction and are written into the trees at
  :meth:`commit`, which then commits the data space map, the metadata space map, every other block
  and last the superblock (flushing before and after it). After a crash the metadata is exactly
  the last commit. :meth:`abort` throws the transaction away and re-reads the superblock.
* **One owner of the transaction's view.** Everything derived from the metadata (space maps,
  trees, device roots and details, lookup caches) belongs to this object and is rebuilt by
  :meth:`_load` alone, which every open and every :meth:`abort` goes through; callers keep no
  references to those parts beyond one call (the pool's allocator goes through
  :meth:`alloc_data`; a volume's lock-free read state is checked against :attr:`generation`).
* **What an exception midway leaves.** Each mutating method validates its arguments first and
  raises (``NotFound``, ``AlreadyExists``, ``InvalidArgument``) before changing anything; once it
  has begun to change state it counts one change (:attr:`changes`, back to 0 at every commit and
  load). An exception after that point may leave the in-memory transaction half updated: the
  caller must :meth:`abort` (the pool does, and degrades). :meth:`intact_since` tells a caller
  whether anything changed since a :meth:`mark`.
* **Freed data blocks wait for the commit.** A data block whose count drops to 0 is not handed
  out again before the next commit, even if it was allocated in this transaction (the kernel's
  rule for metadata blocks, kept for data too): a reader that looked its mapping up before the
  free can never read another volume's bytes in it without the generation moving.
* Errors: :class:`~thinpool.errors.MetadataError` subclasses for damage, ``NotFound`` /
  ``AlreadyExists`` for device ids, ``NoMetadataSpace`` / ``NoDataSpace`` when space runs out.

Costs: lookup/insert/remove of one mapping O(log n) node reads; create_thin/create_snap O(1);
delete O(unshared nodes of the device); commit O(changed blocks) plus vectorised space-map diffs.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ..errors import (AlreadyExists, IncompatibleMetadata, InvalidArgument, MetadataError,
                      NoDataSpace, NotFound, ReadOnlyError)
from . import format as fmt
from .block import SUPERBLOCK_VALIDATOR, BlockManager
from .btree import BTree, ValueType
from .space_map_disk import DataSpaceMap, MetadataSpaceMap
from .transaction import TransactionManager


@dataclass
class Device:
    """Mutable in-memory copy of one device's details."""

    dev_id: int
    mapped_blocks: int
    transaction_id: int
    creation_time: int
    snapshotted_time: int

    def record(self) -> np.ndarray:
        return np.array((self.mapped_blocks, self.transaction_id, self.creation_time,
                         self.snapshotted_time), dtype=fmt.DETAILS_DTYPE)


class ThinMetadata:
    """An open pool-metadata device."""

    def __init__(self, bm: BlockManager):
        self.bm = bm
        self.read_only = bm.read_only
        self.changes = 0          # state changes since the last commit or load
        self.commits = 0          # commits made through this object
        self.generation = 0       # see _reset_changes
        self._lcache: dict[int, dict[int, tuple[int, int] | None]] = {}
        #: Entered around every commit, before anything changes (the pool sets it: a commit
        #: waits there until no reader of the last commit is left; see locking.py).
        self.commit_gate = nullcontext

    # -- opening -----------------------------------------------------------------------------
    @classmethod
    def format(cls, path, data_block_size: int, nr_data_blocks: int) -> "ThinMetadata":
        """Write a fresh, empty pool's metadata to ``path`` (an existing file or block device).

        ``data_block_size`` is in 512-byte sectors."""
        check_data_block_size(data_block_size)
        bm = BlockManager(path)
        try:
            if bm.nr_blocks < 16:
                raise InvalidArgument(f"metadata device {bm.path} is too small "
                                      f"({bm.nr_blocks} blocks of 4 KiB; at least 16 needed)")
            self = cls(bm)
            self.metadata_sm = MetadataSpaceMap(bm.nr_blocks)
            self.metadata_sm.inc(0)                 # the superblock
            self.tm = TransactionManager(bm, self.metadata_sm)
            self._trees()
            self.metadata_sm.create_on_disk(self.tm)
            self.data_sm = DataSpaceMap(nr_data_blocks)
            self.data_sm.create_on_disk(self.tm)
            self.details_root = self.details_tree.empty()
            self.top_root = self.top_tree.empty()
            self.sb = fmt.Superblock(
                flags=0, blocknr=0, uuid=bytes(16), magic=fmt.THIN_MAGIC,
                version=fmt.METADATA_VERSION, time=0, trans_id=0, metadata_snap=0,
                data_sm_root=bytes(128), metadata_sm_root=bytes(128), data_mapping_root=0,
                device_details_root=0, data_block_size=data_block_size,
                metadata_block_size=fmt.METADATA_BLOCK_SECTORS,
                metadata_nr_blocks=self.metadata_sm.nr_blocks, compat_flags=0,
                compat_ro_flags=0, incompat_flags=0)
            self.time = 0
            self.trans_id = 0
            self.devices: dict[int, Device] = {}
            self.roots: dict[int, int] = {}
            self._reset_changes()
            self.commit()
            return self
        except BaseException:
            bm.close()
            raise

    @classmethod
    def open(cls, path, read_only: bool = False) -> "ThinMetadata":
        bm = BlockManager(path, read_only=read_only)
        try:
            self = cls(bm)
            self._load()
            return self
        except BaseException:
            bm.close()
            raise

    def _trees(self) -> None:
        self.mapping_vt = ValueType("mapping", fmt.U64, inc=self._inc_data, dec=self._dec_data,
                                    equal=lambda a, b: (int(a) >> 24) == (int(b) >> 24))
        self.mapping_tree = BTree(self.tm, self.mapping_vt)
        self.top_tree = BTree(self.tm, ValueType("top level", fmt.U64, inc=self._inc_roots,
                                                 dec=self._dec_roots))
        self.details_tree = BTree(self.tm, ValueType("device details", fmt.DETAILS_DTYPE))

    def _inc_data(self, values: np.ndarray) -> None:
        self.data_sm.inc_many(values >> np.uint64(24))

    def _dec_data(self, values: np.ndarray) -> None:
        self.data_sm.dec_many(values >> np.uint64(24))

    def _inc_roots(self, values: np.ndarray) -> None:
        for r in values.tolist():
            self.tm.inc(r)

    def _dec_roots(self, values: np.ndarray) -> None:
        for r in values.tolist():
            self.mapping_tree.delete(r)

    def _load(self) -> None:
        """(Re)build the whole view from the committed superblock: the only place that does."""
        self.changes += 1                  # a half-done load is a half-done change
        self.generation += 1               # (and no lock-free reader trusts what it had)
        self._lcache = {}
        self.bm.clear_cache()
        raw = self.bm.read(fmt.SUPERBLOCK_LOCATION, SUPERBLOCK_VALIDATOR)
        sb = fmt.Superblock.unpack(raw)
        if sb.magic != fmt.THIN_MAGIC:
            raise MetadataError(f"{self.bm.path} is not dm-thin pool metadata (bad magic {sb.magic:#x})")
        if sb.version not in fmt.SUPPORTED_VERSIONS:
            raise IncompatibleMetadata(f"unsupported metadata version {sb.version}")
        if sb.incompat_flags:
            raise IncompatibleMetadata(f"metadata uses unknown incompatible features {sb.incompat_flags:#x}")
        if sb.compat_ro_flags and not self.read_only:
            raise IncompatibleMetadata("metadata uses features that allow read-only use only")
        if sb.metadata_block_size != fmt.METADATA_BLOCK_SECTORS:
            raise IncompatibleMetadata(f"metadata block size {sb.metadata_block_size} sectors is not 8")
        check_data_block_size(sb.data_block_size, corrupt=True)
        msm_root = sb.metadata_sm
        if msm_root.nr_blocks > self.bm.nr_blocks:
            raise MetadataError(f"metadata space map covers {msm_root.nr_blocks} blocks but the "
                                f"device has only {self.bm.nr_blocks}")
        self.sb = sb
        self.metadata_sm, self.tm = MetadataSpaceMap.load(
            lambda sm: TransactionManager(self.bm, sm), msm_root)
        self._trees()
        self.data_sm = DataSpaceMap.load(self.tm, sb.data_sm)
        self.time = sb.time
        self.trans_id = sb.trans_id
        self.details_root = sb.device_details_root
        self.top_root = sb.data_mapping_root
        self.devices = {}
        for k, v in self.details_tree.items(self.details_root):
            self.devices[k] = Device(k, int(v["mapped_blocks"]), int(v["transaction_id"]),
                                     int(v["creation_time"]), int(v["snapshotted_time"]))
        self.roots = {k: int(v) for k, v in self.top_tree.items(self.top_root)}
        missing = sorted(set(self.roots) - set(self.devices))
        if missing:
            raise MetadataError(f"device {missing[0]} has a mapping tree but no details")
        if not self.read_only:
            bigger = min(self.bm.nr_blocks, fmt.MAX_METADATA_BLOCKS)
            if bigger > self.metadata_sm.nr_blocks:
                self.metadata_sm.extend(bigger)
        self._reset_changes()

    def _reset_changes(self) -> None:
        # Counts loads, commits, aborts and the close. A data block freed by this object can be
        # handed out again only after one of them, so a reader that saw the same generation
        # before it looked a mapping up and after it read the block read no one else's data
        # (Volume.read's lock-free path relies on it).
        self.generation += 1
        self.changes = 0
        self._committed_snap = self.sb.metadata_snap
        self._owned: set[int] = set()
        self._dirty_roots: set[int] = set()
        self._changed: set[int] = set()
        self._deleted: set[int] = set()

    def close(self) -> None:
        self.generation += 1
        self.bm.close()

    # -- change tracking ---------------------------------------------------------------------
    def _change(self) -> None:
        """Called by every mutating method at its first change, after its checks."""
        self._writable()
        self.changes += 1

    def mark(self) -> tuple[int, int]:
        """A point to compare with :meth:`intact_since`."""
        return self.commits, self.changes

    def intact_since(self, mark: tuple[int, int]) -> bool:
        """True when the transaction holds nothing half done since ``mark``: nothing changed at
        all, or a commit made since then is followed by no change (a failed step after it was
        rolled back to that commit by :meth:`abort`)."""
        commits, changes = mark
        if self.commits == commits:
            return self.changes == changes
        return self.changes == 0

    def cached_lookups(self, dev_id: int) -> dict | None:
        """The lookup cache of a device (vblock -> mapping or None), valid for this
        :attr:`generation` only; None when nothing was looked up."""
        return self._lcache.get(dev_id)

    # -- data blocks -------------------------------------------------------------------------
    def alloc_data(self, count: int, hint: int | None = None) -> np.ndarray:
        """``count`` free data blocks (count 1 each), or NoDataSpace and no change."""
        if count == 0:
            return np.zeros(0, np.int64)
        before = self.changes
        self._change()
        try:
            return self.data_sm.alloc_run(count, hint)
        except NoDataSpace:          # raised before the space map changed anything
            self.changes = before
            raise

    def release_data(self, blocks: np.ndarray, mark: tuple[int, int] | None = None) -> None:
        """Give back blocks from :meth:`alloc_data` that were never mapped. With the ``mark``
        taken just before that allocation, and nothing else changed since, the transaction is
        then exactly as it was at the mark."""
        self._change()
        self.data_sm.release_run(np.asarray(blocks, np.int64))
        if mark is not None and mark[0] == self.commits and self.changes == mark[1] + 2:
            self.changes = mark[1]

    def still_free_data(self, blocks: np.ndarray) -> np.ndarray:
        """Those of ``blocks`` that are free now and at the last commit, sorted, no repeats."""
        b = np.sort(np.asarray(blocks, np.int64))
        if len(b):
            b = b[np.concatenate(([True], b[1:] != b[:-1]))]
        return b[self.data_sm.still_free(b)]

    def data_freed_in_transaction(self) -> int:
        """Data blocks freed since the last commit: a commit makes them allocatable again."""
        return self.data_sm.nr_free() - self.data_sm.nr_allocatable()

    def data_available(self) -> int:
        """Data blocks :meth:`alloc_data` can hand out before the next commit."""
        return self.data_sm.nr_allocatable()

    # -- properties --------------------------------------------------------------------------
    @property
    def data_block_size(self) -> int:
        """Data block size in 512-byte sectors."""
        return self.sb.data_block_size

    @property
    def nr_data_blocks(self) -> int:
        return self.data_sm.nr_blocks

    @property
    def needs_check(self) -> bool:
        return bool(self.sb.flags & fmt.SB_FLAG_NEEDS_CHECK)

    def has_changes(self) -> bool:
        return bool(self.tm.dirty or self._dirty_roots or self.sb.metadata_snap != self._committed_snap or self._changed or self._deleted
                    or self.trans_id != self.sb.trans_id or self.time != self.sb.time
                    or self.data_sm.nr_blocks != self.sb.data_sm.nr_blocks
                    or self.metadata_sm.nr_blocks != self.sb.metadata_sm.nr_blocks
                    or self.data_sm.has_changes() or self.metadata_sm.has_changes())

    def _writable(self) -> None:
        if self.read_only:
            raise ReadOnlyError("pool metadata is open read-only")

    def device(self, dev_id: int) -> Device:
        d = self.devices.get(dev_id)
        if d is None or dev_id not in self.roots:
            raise NotFound(f"thin device {dev_id} does not exist")
        return d

    def device_ids(self) -> list[int]:
        return sorted(self.roots)

    # -- devices -----------------------------------------------------------------------------
    def _check_new_id(self, dev_id: int) -> None:
        if not 0 <= dev_id <= fmt.MAX_DEV_ID:
            raise InvalidArgument(f"device id {dev_id} is out of range (0..{fmt.MAX_DEV_ID})")
        if dev_id in self.devices or dev_id in self.roots:
            raise AlreadyExists(f"thin device {dev_id} already exists")

    def create_thin(self, dev_id: int) -> None:
        self._writable()
        self._check_new_id(dev_id)
        self._change()
        self.roots[dev_id] = self.mapping_tree.empty()
        self._dirty_roots.add(dev_id)
        self.devices[dev_id] = Device(dev_id, 0, self.trans_id, self.time, self.time)
        self._changed.add(dev_id)
        self._deleted.discard(dev_id)

    def create_snap(self, dev_id: int, origin_id: int) -> None:
        self._writable()
        self._check_new_id(dev_id)
        origin = self.device(origin_id)
        root = self.roots[origin_id]
        self._change()
        self.tm.inc(root)
        self.roots[dev_id] = root
        self._dirty_roots.add(dev_id)
        self.time = (self.time + 1) & fmt.TIME_MASK
        self.devices[dev_id] = Device(dev_id, origin.mapped_blocks, self.trans_id, self.time, self.time)
        origin.snapshotted_time = self.time
        self._changed.update((dev_id, origin_id))
        self._deleted.discard(dev_id)

    def delete(self, dev_id: int) -> None:
        self._writable()
        self.device(dev_id)
        self._change()
        self.top_root, _ = self.top_tree.remove(self.top_root, dev_id, callbacks=False)
        self.mapping_tree.delete(self.roots.pop(dev_id))
        self._lcache.pop(dev_id, None)
        del self.devices[dev_id]
        self._dirty_roots.discard(dev_id)
        self._changed.discard(dev_id)
        self._deleted.add(dev_id)

    def adopt_device(self, dev_id: int, root: int, mapped_blocks: int, transaction_id: int,
                     creation_time: int, snapshotted_time: int) -> None:
        """Add a device whose mapping tree was built elsewhere (bulk restore or repair); the
        tree's data-block references must already be counted by the caller."""
        self._writable()
        self._check_new_id(dev_id)
        self._change()
        self.roots[dev_id] = root
        self._dirty_roots.add(dev_id)
        self.devices[dev_id] = Device(dev_id, mapped_blocks, transaction_id, creation_time,
                                      snapshotted_time)
        self._changed.add(dev_id)
        self._deleted.discard(dev_id)

    def set_transaction_id(self, trans_id: int) -> None:
        self._change()
        self.trans_id = trans_id

    # -- mappings ----------------------------------------------------------------------------
    def _root(self, dev_id: int) -> int:
        r = self.roots.get(dev_id)
        if r is None:
            raise NotFound(f"thin device {dev_id} does not exist")
        return r

    def _own(self, dev_id: int) -> None:
        """Before a device's mapping tree changes for the first time in a transaction, make its
        path in the top-level tree exclusive (shadowing it now, as the kernel's two-level insert
        does). If a top-level node was shared, e.g. with a held metadata snapshot, the copy gives
        the device's root the extra reference it needs before that root is shadowed in turn."""
        if dev_id in self._owned:
            return
        self.top_root, _ = self.top_tree.insert(self.top_root, dev_id, self.roots[dev_id], callbacks=False)
        self._owned.add(dev_id)

    def lookup(self, dev_id: int, vblock: int) -> tuple[int, int] | None:
        """(data block, time) of one mapping, or None. Answers come from a bounded per-device
        cache that insert/remove keep exact; a miss walks the tree."""
        cache = self._lcache.get(dev_id)
        if cache is None:
            cache = self._lcache[dev_id] = {}
        elif vblock in cache:
            return cache[vblock]
        v = self.mapping_tree.lookup(self._root(dev_id), vblock)
        m = None if v is None else fmt.unpack_mapping(int(v))
        if len(cache) >= 1 << 16:
            cache.clear()
        cache[vblock] = m
        return m

    def lookup_range(self, dev_id: int, lo: int, hi: int) -> dict[int, tuple[int, int]]:
        """Mappings of virtual blocks [lo, hi] as {vblock: (data block, time)}, in one walk. For
        short ranges (up to 64 blocks) every answer, unmapped ones too, goes into the lookup cache
        as :meth:`lookup` would put it, so the next small request there needs no walk."""
        out: dict[int, tuple[int, int]] = {}
        for keys, vals in self.mappings(dev_id, lo, hi + 1):
            blocks = (vals >> np.uint64(fmt.TIME_BITS)).tolist()
            times = (vals & np.uint64(fmt.TIME_MASK)).tolist()
            out.update(zip(keys.tolist(), zip(blocks, times)))
        if hi - lo < 64:
            cache = self._lcache.get(dev_id)
            if cache is None:
                cache = self._lcache[dev_id] = {}
            elif len(cache) >= 1 << 16:
                cache.clear()
            for vb in range(lo, hi + 1):
                cache[vb] = out.get(vb)
        return out

    def mappings(self, dev_id: int, lo: int = 0, hi: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(virtual blocks, packed values) array pairs in order, for virtual blocks in [lo, hi)."""
        return self.mapping_tree.leaves(self._root(dev_id), lo, hi)

    def highest_mapped(self, dev_id: int) -> int | None:
        """The highest mapped virtual block of a device, or None: one walk down the right edge."""
        return self.mapping_tree.last_key(self._root(dev_id))

    def is_shared(self, dev_id: int, time: int) -> bool:
        return self.devices[dev_id].snapshotted_time > time

    def insert(self, dev_id: int, vblock: int, data_block: int) -> tuple[int, int] | None:
        """Map ``vblock`` to ``data_block`` (whose reference the caller hands over) at the current
        time. An overwritten mapping's old data block loses a reference. Returns the old mapping."""
        self._writable()
        dev = self.device(dev_id)
        self._change()
        self._own(dev_id)
        root = self.roots[dev_id]
        new_root, old = self.mapping_tree.insert(root, vblock, fmt.pack_mapping(data_block, self.time))
        if new_root != root:
            self.roots[dev_id] = new_root
            self._dirty_roots.add(dev_id)
        cache = self._lcache.get(dev_id)
        if cache is not None:
            cache[vblock] = (data_block, self.time)
        if old is None:
            dev.mapped_blocks += 1
            self._changed.add(dev_id)
            return None
        return fmt.unpack_mapping(int(old))

    def insert_run(self, dev_id: int, vblocks, data_blocks) -> int:
        """:meth:`insert` for many mappings at once (``vblocks`` strictly increasing): one tree
        descent per leaf touched, not per mapping. Overwritten data blocks lose a reference.
        Returns how many of the virtual blocks were unmapped before."""
        self._writable()
        dev = self.device(dev_id)
        vb = np.asarray(vblocks, fmt.U64)
        db = np.asarray(data_blocks, fmt.U64)
        if len(vb) != len(db):
            raise InvalidArgument("insert_run: vblocks and data_blocks differ in length")
        if not len(vb):
            return 0
        self._change()
        self._own(dev_id)
        root = self.roots[dev_id]
        values = (db << np.uint64(fmt.TIME_BITS)) | np.uint64(self.time & fmt.TIME_MASK)
        new_root, added, _ = self.mapping_tree.insert_run(root, vb, values)
        if new_root != root:
            self.roots[dev_id] = new_root
            self._dirty_roots.add(dev_id)
        cache = self._lcache.get(dev_id)
        if cache is not None:
            t = self.time
            cache.update(zip(vb.tolist(), [(b, t) for b in db.tolist()]))
            if len(cache) >= 1 << 16:
                cache.clear()
        if added:
            dev.mapped_blocks += added
            self._changed.add(dev_id)
        return added

    def remove(self, dev_id: int, vblock: int) -> tuple[int, int] | None:
        """Unmap ``vblock``; its data block loses a reference. Returns the old mapping or None."""
        self._writable()
        self.device(dev_id)
        self._change()
        self._own(dev_id)
        root = self.roots[dev_id]
        new_root, old = self.mapping_tree.remove(root, vblock)
        cache = self._lcache.get(dev_id)
        if cache is not None:
            cache[vblock] = None
        if old is None:
            return None
        if new_root != root:
            self.roots[dev_id] = new_root
            self._dirty_roots.add(dev_id)
        self.devices[dev_id].mapped_blocks -= 1
        self._changed.add(dev_id)
        return fmt.unpack_mapping(int(old))

    def remove_range(self, dev_id: int, lo: int, hi: int) -> int:
        """Unmap every virtual block in [lo, hi); returns how many were mapped."""
        keys = [int(k) for ks, _ in self.mappings(dev_id, lo, hi) for k in ks]
        for k in keys:
            self.remove(dev_id, k)
        return len(keys)

    # -- size --------------------------------------------------------------------------------
    def resize_data(self, nr_blocks: int) -> None:
        self._writable()
        if nr_blocks < self.data_sm.nr_blocks:
            raise InvalidArgument("the data device cannot shrink")
        self._change()
        self.data_sm.extend(nr_blocks)

    def resize_metadata(self) -> None:
        """Take in a metadata device that has grown (up to the format's limit)."""
        self._writable()
        n = min(self.bm.refresh_size(), fmt.MAX_METADATA_BLOCKS)
        if n > self.metadata_sm.nr_blocks:
            self._change()
            self.metadata_sm.extend(n)

    # -- needs_check -------------------------------------------------------------------------
    def set_needs_check(self, on: bool = True) -> None:
        """Throw away the current transaction and write the committed superblock again with
        the NEEDS_CHECK flag set (or cleared). Writes block 0 only; allocates nothing, so it
        works on a full metadata device."""
        if self.read_only:
            raise ReadOnlyError("pool metadata is open read-only")
        self.abort()
        flags = (self.sb.flags | fmt.SB_FLAG_NEEDS_CHECK) if on else (self.sb.flags & ~fmt.SB_FLAG_NEEDS_CHECK)
        if flags == self.sb.flags:
            return
        self.sb = fmt.Superblock(**{**self.sb.__dict__, "flags": flags})
        self.bm.write(fmt.SUPERBLOCK_LOCATION, self.sb.pack(), SUPERBLOCK_VALIDATOR)
        self.bm.flush()

    # -- held metadata snapshot --------------------------------------------------------------
    def reserve_metadata_snap(self) -> tuple[int, np.ndarray]:
        """Commit, then keep a copy of the superblock whose trees stay intact for readers
        (``thin_dump -m``) while the pool goes on changing. Returns the copy's block and the
        data blocks the first commit freed (see :meth:`commit`)."""
        from .block import SUPERBLOCK_VALIDATOR as SBV
        self._writable()
        if self.sb.metadata_snap:
            raise AlreadyExists(f"a metadata snapshot is already held (block {self.sb.metadata_snap})")
        freed = self.commit()
        self._change()
        held, buf = self.tm.new_block(SBV)
        copy = fmt.Superblock(**{**self.sb.__dict__, "data_sm_root": bytes(128),
                                 "metadata_sm_root": bytes(128), "metadata_snap": 0})
        buf[:] = copy.pack()
        self.tm.inc(self.sb.data_mapping_root)
        self.tm.inc(self.sb.device_details_root)
        self.sb = fmt.Superblock(**{**self.sb.__dict__, "metadata_snap": held})
        self.commit()
        return held, freed

    def release_metadata_snap(self) -> None:
        """Drop the held metadata snapshot and every block only it still used."""
        from .block import SUPERBLOCK_VALIDATOR as SBV
        self._writable()
        held = self.sb.metadata_snap
        if not held:
            raise NotFound("no metadata snapshot is held")
        copy = fmt.Superblock.unpack(self.tm.read(held, SBV))
        self._change()
        self.top_tree.delete(copy.data_mapping_root)
        self.details_tree.delete(copy.device_details_root)
        self.tm.dec(held)
        self.sb = fmt.Superblock(**{**self.sb.__dict__, "metadata_snap": 0})
        self.commit()

    # -- transactions ------------------------------------------------------------------------
    def commit(self) -> np.ndarray:
        """Make the current transaction durable. Returns the data blocks it freed (count now 0,
        in use at the previous commit): the caller may discard them once this returns.

        A failure rolls the transaction back (:meth:`abort`) and is raised; a write that failed
        may still have reached the disk, so the pool must then treat its state as unknown."""
        with self.commit_gate():
            return self._commit()

    def _commit(self) -> np.ndarray:
        self._change()
        try:
            for dev in sorted(self._dirty_roots):
                self.top_root, _ = self.top_tree.insert(self.top_root, dev, self.roots[dev], callbacks=False)
            for dev in sorted(self._deleted):
                self.details_root, _ = self.details_tree.remove(self.details_root, dev)
            for dev in sorted(self._changed):
                self.details_root, _ = self.details_tree.insert(self.details_root, dev,
                                                                self.devices[dev].record())
            data_root = self.data_sm.commit(self.tm)
            meta_root = self.metadata_sm.commit(self.tm)
            sb = fmt.Superblock(**{
                **self.sb.__dict__,
                "blocknr": 0, "magic": fmt.THIN_MAGIC,
                "time": self.time, "trans_id": self.trans_id,
                "data_sm_root": data_root.pack(), "metadata_sm_root": meta_root.pack(),
                "data_mapping_root": self.top_root, "device_details_root": self.details_root,
                "metadata_nr_blocks": self.metadata_sm.nr_blocks})
            self.tm.commit(sb.pack())
        except BaseException:
            self.abort()
            raise
        self.sb = sb
        freed = self.data_sm.freed_since_commit()
        self.data_sm.mark_committed()
        self.metadata_sm.mark_committed()
        self.commits += 1
        self._reset_changes()
        return freed

    def abort(self) -> None:
        """Forget everything since the last commit: the view is rebuilt from the superblock."""
        self.changes += 1
        self.tm.abort()
        self._load()


def check_data_block_size(sectors: int, corrupt: bool = False) -> None:
    ok = (fmt.MIN_DATA_BLOCK_SECTORS <= sectors <= fmt.MAX_DATA_BLOCK_SECTORS
          and sectors % fmt.MIN_DATA_BLOCK_SECTORS == 0)
    if not ok:
        msg = (f"data block size of {sectors} sectors is invalid: it must be a multiple of 64 KiB "
               f"between 64 KiB and 1 GiB")
        raise MetadataError(msg) if corrupt else InvalidArgument(msg)
