"""Space maps: reference counts of metadata blocks and of data blocks, in dm-thin's disk format.

In memory a space map is a numpy ``uint32`` array of counts (``counts``) plus a copy of the counts
as of the last commit (``committed``). On disk it is the kernel's layout: 2-bit entries in bitmap
blocks of 16320 entries (0 free, 1, 2, 3 = "look in the ref-count tree"), an index of bitmap
locations with ``nr_free``/``none_free_before`` hints, and an overflow B-tree (block -> le32 count)
holding exactly the blocks whose count is 3 or more.

Guarantees:

* :meth:`SpaceMap.alloc` / :meth:`SpaceMap.alloc_run` only return blocks that are free both now
  and at the last commit: a block freed in this transaction is never reused before the commit
  (the kernel's rule; it keeps the committed trees and the committed data intact). With
  ``hold_freed`` (the data space map) that holds even for a block allocated *and* freed in this
  transaction: it is held until the commit, so a lock-free reader that found it mapped can never
  read another owner's bytes in it while the generation stands still. :meth:`release_run` gives
  back blocks that were allocated and never referenced; those are not held.
* :meth:`commit` writes only what changed (``counts != committed``, compared with numpy inside the
  bitmaps touched since the last commit, so its cost follows the change, not the device size):
  changed bitmaps are shadowed and rewritten, overflow entries inserted or removed, index entries
  updated. The metadata space map allocates its own blocks from itself; its commit runs to a fixed
  point so the counts it writes include the blocks it used to write them.
* Summaries are exact: ``nr_allocated`` is the number of non-zero counts, ``nr_free`` the number of
  zero entries inside the device, ``none_free_before`` the first free entry.

Costs: get/inc/dec O(1); alloc amortised O(1) (a vectorised scan refills a queue of candidates);
commit O(nr_blocks) vectorised plus O(changed bitmaps) block writes; load O(nr_blocks) vectorised.
"""

from __future__ import annotations

import numpy as np

from ..errors import CorruptBlock, InvalidArgument, MetadataError, NoDataSpace, NoMetadataSpace
from . import format as fmt
from .block import BITMAP_VALIDATOR, INDEX_VALIDATOR
from .btree import BTree, ValueType
from .transaction import TransactionManager

E = fmt.ENTRIES_PER_BITMAP
_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8)

REF_COUNT_VT = ValueType("ref count", fmt.U32)
INDEX_VT = ValueType("sm index", fmt.INDEX_DTYPE)


def decode_bitmap(buf) -> np.ndarray:
    """The 16320 two-bit entries of a bitmap block as a uint8 array (values 0..3)."""
    raw = np.frombuffer(buf, np.uint8, fmt.BLOCK_SIZE - 16, 16)
    parts = raw[:, None] >> _SHIFTS
    return (((parts & 1) << 1) | ((parts >> 1) & 1)).reshape(-1)


def encode_bitmap(values: np.ndarray, buf: bytearray) -> None:
    """Write up to 16320 entries (counts, clipped to 3) into bytes 16.. of a bitmap block."""
    v = np.zeros(E, np.uint8)
    v[: len(values)] = np.minimum(values, 3)
    v = v.reshape(-1, 4)
    bits = ((v >> 1) & 1) | ((v & 1) << 1)          # high bit first, then low bit
    out = (bits << _SHIFTS).sum(axis=1, dtype=np.uint8)
    buf[16:] = out.tobytes()


def _bitmaps_of(blocks: np.ndarray) -> list[int]:
    """The distinct bitmap numbers of ``blocks``, ascending. (Not ``np.unique``: numpy 2 imports
    ``numpy.ma`` on its first call, some 35 ms of a command's start-up.)"""
    if not len(blocks):
        return []
    idx = np.asarray(blocks, np.int64) // E
    lo = int(idx.min())
    return (np.flatnonzero(np.bincount(idx - lo)) + lo).tolist()


class SpaceMap:
    """In-memory reference counts with the kernel's allocation rules."""

    def __init__(self, nr_blocks: int, *, kind: str):
        self.kind = kind
        self.counts = np.zeros(nr_blocks, np.uint32)
        self.committed = np.zeros(nr_blocks, np.uint32)
        self._queue: list[int] = []
        self._cursor = 0
        # On-disk state (filled by load / commit).
        self.bitmap_blocks: list[int] = [0] * self.nr_bitmaps
        self.ref_count_root = 0
        self.force_dirty: set[int] = set()   # bitmaps whose summary changed without a count change
        self.touched: set[int] = set()       # bitmaps with a count changed since the last commit
        self._allocated_at_commit = 0
        self.hold_freed = False
        self._held: set[int] = set()         # freed in this transaction, not reusable before commit
        self._held_arr: np.ndarray | None = None

    @property
    def nr_blocks(self) -> int:
        return len(self.counts)

    @property
    def nr_bitmaps(self) -> int:
        return (self.nr_blocks + E - 1) // E

    # -- counts ------------------------------------------------------------------------------
    def get(self, b: int) -> int:
        return int(self.counts[b])

    def _touch_many(self, idx: np.ndarray) -> None:
        if len(idx) < 64:
            self.touched.update(i // E for i in idx.tolist())
        else:
            self.touched.update(_bitmaps_of(idx))

    def inc(self, b: int, n: int = 1) -> None:
        self.counts[b] += n
        self.touched.add(b // E)

    def dec(self, b: int) -> int:
        c = int(self.counts[b])
        if c == 0:
            raise MetadataError(f"{self.kind} space map: reference count of block {b} would drop below 0")
        self.counts[b] = c - 1
        self.touched.add(b // E)
        if c == 1 and self.hold_freed and not self.committed[b]:
            self._hold(np.array([b], np.int64))
        return c - 1

    def _hold(self, blocks: np.ndarray) -> None:
        self._held.update(blocks.tolist())
        self._held_arr = None

    def _held_in(self, lo: int, hi: int) -> np.ndarray:
        """Held blocks in [lo, hi), relative to lo."""
        if self._held_arr is None:
            self._held_arr = np.array(sorted(self._held), np.int64)
        h = self._held_arr
        return h[(h >= lo) & (h < hi)] - lo

    def release_run(self, blocks: np.ndarray) -> None:
        """Undo an allocation whose blocks nobody references: counts back to 0, not held."""
        idx = np.asarray(blocks, np.int64)
        if len(idx) and int(self.counts[idx].max()) != 1:
            raise MetadataError(f"{self.kind} space map: released blocks are referenced")
        self.counts[idx] = 0
        self._touch_many(idx)

    def inc_many(self, blocks: np.ndarray) -> None:
        idx = blocks.astype(np.int64)
        np.add.at(self.counts, idx, 1)
        self._touch_many(idx)

    def dec_many(self, blocks: np.ndarray) -> None:
        idx = blocks.astype(np.int64)
        np.subtract.at(self.counts, idx, 1)
        self._touch_many(idx)
        # uint32 wraps on underflow: a wrapped count is a bug in the caller, never valid.
        if len(idx) and int(self.counts[idx].max()) > 0x7FFFFFFF:
            raise MetadataError(f"{self.kind} space map: a reference count dropped below 0")
        if self.hold_freed and len(idx):
            gone = idx[(self.counts[idx] == 0) & (self.committed[idx] == 0)]
            if len(gone):
                self._hold(gone)

    def recount(self) -> None:
        """Re-derive the change tracking after ``counts``/``committed`` were assigned wholesale."""
        self._allocated_at_commit = int(np.count_nonzero(self.committed))
        self.touched = set(range(self.nr_bitmaps))
        self._queue = []

    def _segments(self):
        for i in sorted(self.touched):
            yield i, self.counts[i * E: (i + 1) * E], self.committed[i * E: (i + 1) * E]

    def changed_blocks(self) -> np.ndarray:
        """Blocks whose count differs from the last commit (only touched bitmaps are compared)."""
        parts = [np.flatnonzero(c != k) + i * E for i, c, k in self._segments()]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def has_changes(self) -> bool:
        return any(bool((c != k).any()) for _, c, k in self._segments()) or bool(self.force_dirty)

    def nr_allocated(self) -> int:
        delta = sum(int(np.count_nonzero(c)) - int(np.count_nonzero(k)) for _, c, k in self._segments())
        return self._allocated_at_commit + delta

    def nr_free(self) -> int:
        return self.nr_blocks - self.nr_allocated()

    def nr_allocatable(self) -> int:
        """Blocks free now and at the last commit (what alloc can hand out before commit)."""
        freed = sum(int(np.count_nonzero((c == 0) & (k > 0))) for _, c, k in self._segments())
        return self.nr_blocks - self.nr_allocated() - freed - len(self._held)

    # -- allocation --------------------------------------------------------------------------
    def _free_chunks(self, start: int, chunk: int):
        """Arrays of allocatable blocks, scanning from ``start`` to the end, then from 0 to ``start``,
        in windows that start small (a request for one block near a free one looks at 512 blocks,
        not ``chunk``) and grow fourfold up to ``chunk``."""
        n = self.nr_blocks
        start = start if 0 <= start < n else 0
        for lo, hi in ((start, n), (0, start)):
            pos = lo
            step = min(chunk, 512)
            while pos < hi:
                end = min(hi, pos + step)
                ok = (self.counts[pos:end] == 0) & (self.committed[pos:end] == 0)
                if self._held:
                    ok[self._held_in(pos, end)] = False
                free = np.flatnonzero(ok)
                if len(free):
                    yield free + pos
                pos = end
                step = min(chunk, step * 4)

    def _no_space(self, detail: str):
        err = NoMetadataSpace if self.kind == "metadata" else NoDataSpace
        return err(f"no free {self.kind} blocks left{detail} ({self.nr_blocks} blocks in all)")

    def alloc(self) -> int:
        """One free block, count set to 1."""
        q = self._queue
        while True:
            while q:
                b = q.pop()
                if self.counts[b] == 0:
                    self.counts[b] = 1
                    self.touched.add(b // E)
                    self._cursor = b + 1
                    return b
            for free in self._free_chunks(self._cursor, E):
                q.extend(free[:256][::-1].tolist())
                break
            if not q:
                raise self._no_space("")

    def alloc_run(self, count: int, hint: int | None = None) -> np.ndarray:
        """``count`` free blocks, first fit from ``hint`` (contiguous where space allows); all or nothing."""
        if count < 0:
            raise InvalidArgument(f"cannot allocate {count} {self.kind} blocks")
        if count == 0:
            return np.zeros(0, np.int64)
        start = self._cursor if hint is None else hint
        parts: list[np.ndarray] = []
        got = 0
        for free in self._free_chunks(start, max(E, 2 * count)):
            parts.append(free[: count - got])
            got += len(parts[-1])
            if got == count:
                break
        if got < count:
            raise self._no_space(f": {count} needed, {got} available")
        blocks = np.concatenate(parts).astype(np.int64)
        self.counts[blocks] = 1
        self._touch_many(blocks)
        self._cursor = int(blocks[-1]) + 1
        self._queue = []
        return blocks

    # -- size --------------------------------------------------------------------------------
    def extend(self, nr_blocks: int) -> None:
        if nr_blocks < self.nr_blocks:
            raise MetadataError(f"{self.kind} space map cannot shrink")
        extra = nr_blocks - self.nr_blocks
        if extra and self.nr_blocks % E:
            self.force_dirty.add(self.nr_bitmaps - 1)
        self.counts = np.concatenate([self.counts, np.zeros(extra, np.uint32)])
        self.committed = np.concatenate([self.committed, np.zeros(extra, np.uint32)])
        self.bitmap_blocks += [0] * (self.nr_bitmaps - len(self.bitmap_blocks))

    # -- disk --------------------------------------------------------------------------------
    def _summary(self, i: int) -> tuple[int, int]:
        seg = self.counts[i * E: (i + 1) * E]
        free = np.flatnonzero(seg == 0)
        nr_free = len(free)
        nfb = int(free[0]) if nr_free else len(seg)
        return nr_free, nfb

    def _load_bitmaps(self, tm: TransactionManager, entries: list[int]) -> None:
        if len(entries) != self.nr_bitmaps:
            raise MetadataError(f"{self.kind} space map: {len(entries)} bitmaps for {self.nr_blocks} blocks")
        for i, loc in enumerate(entries):
            vals = decode_bitmap(tm.read(loc, BITMAP_VALIDATOR))
            seg = self.counts[i * E: (i + 1) * E]
            seg[:] = vals[: len(seg)]
        self.bitmap_blocks = list(entries)
        # As the kernel reads them: the tree's count is used only where the bitmap says 3.
        three = self.counts == 3
        found = np.zeros(self.nr_blocks, bool)
        tree = BTree(tm, REF_COUNT_VT)
        for keys, vals in tree.leaves(self.ref_count_root):
            bad = keys >= self.nr_blocks
            if bad.any():
                raise CorruptBlock(self.ref_count_root, "ref count tree", "key past the end of the space map",
                                   f"block {int(keys[bad][0])}")
            k = keys.astype(np.int64)
            use = three[k]
            self.counts[k[use]] = vals[use]
            found[k[use]] = True
        # Every bitmap 3 must have a tree entry with a count of at least 3.
        wrong = three & (~found | (self.counts < 3))
        if wrong.any():
            b = int(np.flatnonzero(wrong)[0])
            raise MetadataError(f"{self.kind} space map: block {b} has bitmap value 3 "
                                f"but no count of 3 or more in the ref-count tree")
        self.committed = self.counts.copy()
        self.touched.clear()
        self._allocated_at_commit = int(np.count_nonzero(self.counts))

    def _update_overflow(self, tm: TransactionManager, changed: np.ndarray, applied: dict[int, int]) -> bool:
        """Make the ref-count tree match ``counts`` for the changed blocks; True if it changed."""
        tree = BTree(tm, REF_COUNT_VT)
        did = False
        # Only blocks at or above 3, now or at the commit, or already put in the tree in this
        # commit, can need a tree change: pick them with numpy, not one Python step per block.
        hot = (self.counts[changed] >= 3) | (self.committed[changed] >= 3)
        candidates = set(changed[hot].tolist())
        candidates.update(applied)
        for b in sorted(candidates):
            want = int(self.counts[b])
            want = want if want >= 3 else 0
            have = applied.get(b)
            if have is None:
                c = int(self.committed[b])
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
        self._allocated_at_commit = self.nr_allocated()
        for i, c, k in self._segments():
            k[:] = c
        self.touched.clear()
        self._queue = []
        self.force_dirty.clear()
        self._held.clear()
        self._held_arr = None

    def freed_since_commit(self) -> np.ndarray:
        parts = [np.flatnonzero((k > 0) & (c == 0)) + i * E for i, c, k in self._segments()]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def root(self, bitmap_root: int) -> fmt.SpaceMapRoot:
        return fmt.SpaceMapRoot(self.nr_blocks, self.nr_allocated(), bitmap_root, self.ref_count_root)


class DataSpaceMap(SpaceMap):
    """The data space map: bitmaps reached through an index B-tree (bitmap number -> entry)."""

    def __init__(self, nr_blocks: int):
        super().__init__(nr_blocks, kind="data")
        self.index_root = 0
        self.hold_freed = True

    @classmethod
    def load(cls, tm: TransactionManager, root: fmt.SpaceMapRoot) -> "DataSpaceMap":
        tree = BTree(tm, INDEX_VT)
        entries: list[int] = []
        for keys, vals in tree.leaves(root.bitmap_root):
            for k, v in zip(keys.tolist(), vals["blocknr"].tolist()):
                if k != len(entries):
                    raise CorruptBlock(root.bitmap_root, "data space map index", "missing bitmap",
                                       f"expected bitmap {len(entries)}, found {k}")
                entries.append(v)
        # Check the size against the index before allocating counts for it (a damaged nr_blocks
        # must not ask numpy for petabytes).
        if len(entries) != (root.nr_blocks + E - 1) // E:
            raise MetadataError(f"data space map: {len(entries)} bitmaps for {root.nr_blocks} blocks")
        sm = cls(root.nr_blocks)
        sm.index_root = root.bitmap_root
        sm.ref_count_root = root.ref_count_root
        sm._load_bitmaps(tm, entries)
        return sm

    def create_on_disk(self, tm: TransactionManager) -> None:
        self.index_root = BTree(tm, INDEX_VT).empty()
        self.ref_count_root = BTree(tm, REF_COUNT_VT).empty()

    def commit(self, tm: TransactionManager) -> fmt.SpaceMapRoot:
        changed = self.changed_blocks()
        self._update_overflow(tm, changed, {})
        dirty = set(_bitmaps_of(changed)) | self.force_dirty
        dirty.update(i for i, b in enumerate(self.bitmap_blocks) if b == 0)
        index = BTree(tm, INDEX_VT)
        for i in sorted(dirty):
            old = self.bitmap_blocks[i]
            if old:
                loc, buf, _ = tm.shadow(old, BITMAP_VALIDATOR)
            else:
                loc, buf = tm.new_block(BITMAP_VALIDATOR)
            encode_bitmap(self.counts[i * E: (i + 1) * E], buf)
            self.bitmap_blocks[i] = loc
            nr_free, nfb = self._summary(i)
            entry = np.array((loc, nr_free, nfb), dtype=fmt.INDEX_DTYPE)
            self.index_root, _ = index.insert(self.index_root, i, entry)
        return self.root(self.index_root)


class MetadataSpaceMap(SpaceMap):
    """The metadata space map: one index block of up to 255 entries; counts its own blocks."""

    def __init__(self, nr_blocks: int):
        super().__init__(min(nr_blocks, fmt.MAX_METADATA_BLOCKS), kind="metadata")
        self.index_block = 0

    @classmethod
    def load(cls, tm_factory, root: fmt.SpaceMapRoot):
        """Returns (space map, transaction manager built over it by ``tm_factory(sm)``)."""
        sm = cls(root.nr_blocks)
        sm.index_block = root.bitmap_root
        sm.ref_count_root = root.ref_count_root
        tm = tm_factory(sm)
        buf = tm.read(sm.index_block, INDEX_VALIDATOR)
        entries = [fmt.INDEX_ENTRY.unpack_from(buf, 16 + 16 * i)[0] for i in range(sm.nr_bitmaps)]
        sm._load_bitmaps(tm, entries)
        return sm, tm

    def extend(self, nr_blocks: int) -> None:
        super().extend(min(nr_blocks, fmt.MAX_METADATA_BLOCKS))

    def create_on_disk(self, tm: TransactionManager) -> None:
        self.ref_count_root = BTree(tm, REF_COUNT_VT).empty()

    def commit(self, tm: TransactionManager) -> fmt.SpaceMapRoot:
        applied: dict[int, int] = {}
        done: set[int] = set()
        index_buf = None
        while True:
            progress = False
            changed = self.changed_blocks()
            if self._update_overflow(tm, changed, applied):
                progress = True
            want = set(_bitmaps_of(changed)) | self.force_dirty
            want.update(i for i, b in enumerate(self.bitmap_blocks) if b == 0)
            for i in sorted(want - done):
                old = self.bitmap_blocks[i]
                if old:
                    loc, _, _ = tm.shadow(old, BITMAP_VALIDATOR)
                else:
                    loc, _ = tm.new_block(BITMAP_VALIDATOR)
                self.bitmap_blocks[i] = loc
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
        # Counts are final now: write the bitmaps and the index.
        for i in sorted(done):
            buf = tm.dirty[self.bitmap_blocks[i]][0]
            encode_bitmap(self.counts[i * E: (i + 1) * E], buf)
        index_buf[16:] = bytes(fmt.BLOCK_SIZE - 16)
        for i, loc in enumerate(self.bitmap_blocks):
            nr_free, nfb = self._summary(i)
            fmt.INDEX_ENTRY.pack_into(index_buf, 16 + 16 * i, loc, nr_free, nfb)
        return self.root(self.index_block)
