"""The two on-disk layouts of a space map: reading a bitmap, opening the index, writing a commit.

:class:`DataSpaceMap` keeps its index in a B-tree (bitmap number -> ``INDEX_DTYPE`` entry);
:class:`MetadataSpaceMap` in one index block of up to 255 entries, and counts the blocks it
writes itself. Both keep the counts of 3 or more in a ref-count B-tree. The rules (lazy
bitmaps, allocation, summaries) are :class:`~thinpool.metadata.space_map.SpaceMap`'s; this
module only moves them to and from the disk, byte for byte in the kernel's format.

Contract:

* ``load`` reads the committed index entries (the data index tree's leaves, or the metadata
  index block), checks them (one entry per bitmap, in order; no bitmap at block 0; summaries in
  range) and that the ref-count tree has no key past the end, and reads the last bitmap when it
  is only partly inside the device. Damage raises :class:`~thinpool.errors.CorruptBlock` /
  :class:`~thinpool.errors.MetadataError`, before any object is returned.
* A bitmap is read through the transaction manager: its 2-bit entries, and for entries of 3 a
  range lookup in the ref-count tree **as of the last commit** (its blocks are never rewritten
  in a transaction, so a bitmap can be read at any point, even in the middle of a commit).
* ``commit`` writes the changed bitmaps (shadowed), the ref-count tree entries of changed blocks,
  and the index entries of the bitmaps written; bitmaps never written before are zeroed blocks
  from one allocation run (all-zero counts need no encoding), and a brand-new data index is
  built in bulk (``bulk.build``), not by one insert per bitmap. Nothing is marked committed
  here: ``mark_committed`` does that once the superblock is durable. An exception inside
  ``commit`` leaves the map half written; the caller aborts and reloads.

Costs: load O(bitmaps) index entries plus at most one bitmap; commit O(changed bitmaps) block
writes, O(new bitmaps) zeroed blocks and index entries (vectorised).
"""

from __future__ import annotations

import numpy as np

from ..errors import CorruptBlock, MetadataError
from . import format as fmt
from .block import BITMAP_VALIDATOR, INDEX_VALIDATOR
from .btree import BTree
from .bulk import build
from .space_map import (
    INDEX_VT,
    REF_COUNT_VT,
    E,
    SpaceMap,
    _bitmaps_of,
    decode_bitmap,
    encode_bitmap,
)
from .transaction import TransactionManager


class _OnDisk(SpaceMap):
    """What both layouts share: bitmaps read from disk, the ref-count tree, the index's check."""

    def __init__(self, nr_blocks: int, *, kind: str):
        super().__init__(nr_blocks, kind=kind)
        self._tm: TransactionManager | None = None
        self.ref_count_root = 0
        self._committed_ref_root = 0

    def _read_bitmap(self, i: int, counts: bool) -> np.ndarray:
        n = self._length(i)
        raw = self._tm.read(int(self._loc[i]), BITMAP_VALIDATOR)
        self.bitmaps_read += 1
        entries = decode_bitmap(raw)[:n]
        if not counts:
            return entries
        out = entries.astype(np.uint32)
        three = entries == 3
        if three.any():
            base = i * E
            found = np.zeros(n, bool)
            tree = BTree(self._tm, REF_COUNT_VT)
            for keys, vals in tree.leaves(self._committed_ref_root, base, base + n):
                k = keys.astype(np.int64) - base
                use = three[k]
                out[k[use]] = vals[use]
                found[k[use]] = True
            wrong = three & (~found | (out < 3))
            if wrong.any():
                b = base + int(np.flatnonzero(wrong)[0])
                raise MetadataError(f"{self.kind} space map: block {b} has bitmap value 3 "
                                    f"but no count of 3 or more in the ref-count tree")
        return out

    def _open(self, tm: TransactionManager, ref_count_root: int, where: int, entries: np.ndarray) -> None:
        """Take the committed index entries (``INDEX_DTYPE``, one per bitmap, in order)."""
        self._tm = tm
        self.ref_count_root = self._committed_ref_root = ref_count_root
        locs = entries["blocknr"].astype(np.int64)
        free = entries["nr_free"].astype(np.int64)
        nfb = entries["none_free_before"].astype(np.int64)
        lens = self._lengths(0, self.nr_bitmaps)
        bad = (locs == 0) | ((free > lens) & (lens == E)) | (nfb > E)
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            raise CorruptBlock(where, f"{self.kind} space map index", "bad index entry",
                               f"bitmap {j}: block {int(locs[j])}, nr_free {int(free[j])}, "
                               f"none_free_before {int(nfb[j])}")
        self._loc, self._free, self._nfb = locs, np.minimum(free, lens), nfb
        self._allocated_at_commit = int((lens - self._free).sum())
        last = BTree(tm, REF_COUNT_VT).last_key(ref_count_root)
        if last is not None and last >= self.nr_blocks:
            raise CorruptBlock(ref_count_root, "ref count tree", "key past the end of the space map",
                               f"block {last}")
        if self.nr_blocks % E:
            self._piece(self.nr_bitmaps - 1)     # its nr_free is not the same from every writer

    def _create(self, tm: TransactionManager) -> None:
        self._tm = tm
        self.ref_count_root = self._committed_ref_root = BTree(tm, REF_COUNT_VT).empty()

    def _update_overflow(self, tm: TransactionManager, applied: dict[int, int]) -> bool:
        """Make the ref-count tree match the counts of the changed blocks; True if it changed.
        ``applied``: what earlier rounds of this commit put in the tree (block -> count or 0)."""
        tree = BTree(tm, REF_COUNT_VT)
        did = False
        # Only blocks at or above 3, now or at the commit, or already put in the tree in this
        # commit, can need a tree change: pick them with numpy, not one Python step per block.
        candidates = set(applied)
        for i, c, k in self._segments():
            hot = (c != k) & ((c >= 3) | (k >= 3))
            if hot.any():
                candidates.update((np.flatnonzero(hot) + i * E).tolist())
        for b in sorted(candidates):
            want = self.get(b)
            want = want if want >= 3 else 0
            have = applied.get(b)
            if have is None:
                c = self._committed_of(b)
                have = c if c >= 3 else 0
            if want == have:
                continue
            if want:
                self.ref_count_root, _ = tree.insert(self.ref_count_root, b, want)
            else:
                self.ref_count_root, _ = tree.remove(self.ref_count_root, b)
            applied[b] = want
            did = True
        return did

    def mark_committed(self) -> None:
        super().mark_committed()
        self._committed_ref_root = self.ref_count_root

    def root(self, bitmap_root: int) -> fmt.SpaceMapRoot:
        return fmt.SpaceMapRoot(self.nr_blocks, self.nr_allocated(), bitmap_root, self.ref_count_root)


class DataSpaceMap(_OnDisk):
    """The data space map: bitmaps reached through an index B-tree (bitmap number -> entry)."""

    def __init__(self, nr_blocks: int):
        super().__init__(nr_blocks, kind="data")
        self.index_root = 0          # 0 until the first commit of a new map builds it
        self.hold_freed = True

    @classmethod
    def load(cls, tm: TransactionManager, root: fmt.SpaceMapRoot) -> DataSpaceMap:
        tree = BTree(tm, INDEX_VT)
        keys, vals = [], []
        for k, v in tree.leaves(root.bitmap_root):
            keys.append(k)
            vals.append(v)
        keys = np.concatenate(keys) if keys else np.zeros(0, fmt.U64)
        entries = np.concatenate(vals) if vals else np.zeros(0, fmt.INDEX_DTYPE)
        wrong = np.flatnonzero(keys != np.arange(len(keys), dtype=np.uint64))
        if len(wrong):
            j = int(wrong[0])
            raise CorruptBlock(root.bitmap_root, "data space map index", "missing bitmap",
                               f"expected bitmap {j}, found {int(keys[j])}")
        # Check the size against the index before anything is sized by it (a damaged
        # nr_blocks must not ask numpy for petabytes).
        if len(keys) != (root.nr_blocks + E - 1) // E:
            raise MetadataError(f"data space map: {len(keys)} bitmaps for {root.nr_blocks} blocks")
        sm = cls(root.nr_blocks)
        sm.index_root = root.bitmap_root
        sm._open(tm, root.ref_count_root, root.bitmap_root, entries)
        return sm

    def create_on_disk(self, tm: TransactionManager) -> None:
        self._create(tm)

    def commit(self, tm: TransactionManager) -> fmt.SpaceMapRoot:
        self._update_overflow(tm, {})
        changed = self.changed_blocks()
        dirty = set(_bitmaps_of(changed)) | self.force_dirty | self._fix
        written = []
        for i in sorted(dirty):
            old = int(self._loc[i])
            if not old:
                continue                       # written below with the other new ones
            p = self._piece(i)
            loc, buf, _ = tm.shadow(old, BITMAP_VALIDATOR)
            encode_bitmap(p.counts, buf)
            self._loc[i] = loc
            written.append(i)
        new = np.flatnonzero(self._loc == 0)
        if len(new):
            self._loc[new] = tm.new_blocks(len(new), BITMAP_VALIDATOR)
            for i in sorted(set(new.tolist()) & self._pieces.keys()):
                encode_bitmap(self._pieces[i].counts, tm.dirty[int(self._loc[i])][0])
            written.extend(new.tolist())
        if written or not self.index_root:
            keys = np.array(sorted(written), np.int64)
            entries = np.zeros(len(keys), fmt.INDEX_DTYPE)
            entries["blocknr"] = self._loc[keys]
            entries["nr_free"], entries["none_free_before"] = self._summaries(keys)
            index = BTree(tm, INDEX_VT)
            if not self.index_root:
                self.index_root = build(index, keys, entries)
            else:
                self.index_root, _, _ = index.insert_run(self.index_root, keys, entries)
        return self.root(self.index_root)


class MetadataSpaceMap(_OnDisk):
    """The metadata space map: one index block of up to 255 entries; counts its own blocks."""

    def __init__(self, nr_blocks: int):
        super().__init__(min(nr_blocks, fmt.MAX_METADATA_BLOCKS), kind="metadata")
        self.index_block = 0

    @classmethod
    def load(cls, tm_factory, root: fmt.SpaceMapRoot):
        """Returns (space map, transaction manager built over it by ``tm_factory(sm)``)."""
        sm = cls(root.nr_blocks)
        sm.index_block = root.bitmap_root
        tm = tm_factory(sm)
        buf = tm.read(sm.index_block, INDEX_VALIDATOR)
        entries = np.frombuffer(buf, fmt.INDEX_DTYPE, sm.nr_bitmaps, 16)
        sm._open(tm, root.ref_count_root, sm.index_block, entries)
        return sm, tm

    def extend(self, nr_blocks: int) -> None:
        super().extend(min(nr_blocks, fmt.MAX_METADATA_BLOCKS))

    def create_on_disk(self, tm: TransactionManager) -> None:
        self._create(tm)

    def commit(self, tm: TransactionManager) -> fmt.SpaceMapRoot:
        applied: dict[int, int] = {}
        done: set[int] = set()
        index_buf = None
        while True:
            progress = self._update_overflow(tm, applied)
            want = set(_bitmaps_of(self.changed_blocks())) | self.force_dirty | self._fix
            want.update(np.flatnonzero(self._loc == 0).tolist())
            for i in sorted(want - done):
                old = int(self._loc[i])
                if old:
                    self._piece(i)               # its counts are written below: read them first
                    loc, _, _ = tm.shadow(old, BITMAP_VALIDATOR)
                else:
                    loc, _ = tm.new_block(BITMAP_VALIDATOR)
                self._loc[i] = loc
                done.add(i)
                progress = True
            if index_buf is None:
                if self.index_block:
                    self.index_block, index_buf, _ = tm.shadow(self.index_block, INDEX_VALIDATOR)
                else:
                    self.index_block, index_buf = tm.new_block(INDEX_VALIDATOR)
                progress = True
            if not progress:
                break
        # Counts are final now: write the bitmaps (a new one nothing touched stays zeroed).
        for i in sorted(done & self._pieces.keys()):
            encode_bitmap(self._pieces[i].counts, tm.dirty[int(self._loc[i])][0])
        entries = np.zeros(fmt.MAX_METADATA_BITMAPS, fmt.INDEX_DTYPE)
        nb = self.nr_bitmaps
        entries["blocknr"][:nb] = self._loc
        free, nfb = self._free.copy(), self._nfb.copy()
        if done:
            at = np.array(sorted(done), np.int64)
            free[at], nfb[at] = self._summaries(at)
        entries["nr_free"][:nb], entries["none_free_before"][:nb] = free, nfb
        index_buf[16:] = entries.tobytes()
        return self.root(self.index_block)
