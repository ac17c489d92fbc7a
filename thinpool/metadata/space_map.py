"""Space maps: reference counts of metadata blocks and of data blocks, in dm-thin's disk format.

On disk a space map is the kernel's layout: 2-bit entries in bitmap blocks of 16320 entries
(0 free, 1, 2, 3 = "look in the ref-count tree"), an index of bitmap locations with
``nr_free``/``none_free_before`` hints, and an overflow B-tree (block -> le32 count) holding
exactly the blocks whose count is 3 or more. The index of the data space map is a B-tree
(bitmap number -> entry), that of the metadata space map one block of up to 255 entries
(``DataSpaceMap`` and ``MetadataSpaceMap``, in ``space_map_disk.py``, read and write them).

In memory a space map is read **lazily, one bitmap at a time** (the kernel reads its bitmaps on
demand too). Always held: every bitmap's index entry (location, ``nr_free``, ``none_free_before``
as of the last commit: three numpy arrays, 24 bytes a bitmap). A bitmap's counts are read and
decoded only when something touches it - a get/inc/dec of one of its blocks, or an allocation
that the index says finds a free entry there - and are then kept as a *piece*: a ``uint32``
array of its counts, plus a copy as of the last commit once they change. Entries of value 3 take
their counts from the *committed* ref-count tree (one range lookup), whose blocks nothing in the
transaction can overwrite. A bitmap never touched since open is not in memory; after a commit at
most :data:`MAX_CLEAN_PIECES` unchanged pieces are kept. Opening reads the index and, when the
last bitmap is only partly inside the device, that one bitmap (writers disagree on what its
``nr_free`` counts), and checks that the ref-count tree has no key past the end: O(bitmaps)
index entries, O(1) bitmaps, nothing per block.

Guarantees:

* :meth:`SpaceMap.alloc` / :meth:`SpaceMap.alloc_run` only return blocks that are free both now
  and at the last commit: a block freed in this transaction is never reused before the commit
  (the kernel's rule; it keeps the committed trees and the committed data intact). With
  ``hold_freed`` (the data space map) that holds even for a block allocated *and* freed in this
  transaction: it is held until the commit, so a lock-free reader that found it mapped can never
  read another owner's bytes in it while the generation stands still. :meth:`release_run` gives
  back blocks that were allocated and never referenced; those are not held. An allocation
  skips, without reading them, the bitmaps whose index entry says nothing is free (for a
  bitmap unchanged since the commit that is exact) and reads the first one with free entries.
* Only the bitmap's decoded counts decide what is free: the index's hints can make an
  allocation skip free blocks (a wrong hint in a foreign pool), never hand out a used one.
  :meth:`still_free` and :meth:`free_runs` (what may be hole-punched) read the bitmaps too.
* Commit writes only what changed: changed bitmaps are shadowed and rewritten, overflow entries
  inserted or removed, index entries updated (the data index with one ``insert_run``). A bitmap
  never written before (a new pool, a grown one) is a zeroed block from one allocation run;
  its index entries go in with the same ``insert_run`` (a brand-new data index is built in bulk). The metadata space map allocates its own blocks from
  itself; its commit runs to a fixed point so the counts it writes include the blocks it used to
  write them. A bitmap whose summary on disk disagreed with its counts when it was read (a
  ``thin_restore`` quirk, the kernel's ``nr_free`` of a partial last bitmap) is rewritten exact
  at the next commit that writes anything.
* Summaries are exact: ``nr_allocated`` and ``nr_free`` come from the index entries of the
  bitmaps not in memory and from the counts of the pieces in memory. The index entries are
  exact for everything thinpool and the kernel write; ``thin_restore`` 0.9.0 counts one freed
  metadata block as used in its bitmap's entry (shared/testdata/README.md): until that bitmap is
  read (at open when it is the partial last one, else by the first allocation there, which any
  write makes) the metadata summary is one block high, and the next commit writes it exact.

What an exception midway leaves behind: a bitmap that cannot be read or is damaged (a bitmap
value 3 without a count of 3 or more in the ref-count tree) raises
:class:`~thinpool.errors.MetadataError` (``CorruptBlock`` naming the block) before the call that
touched it changed any count; so do a block number past the end, a release of referenced
blocks and a count that would drop below 0. A failed allocation (no space) changes nothing.
An exception inside :meth:`commit` leaves the in-memory map half written: the caller aborts
and reloads (``ThinMetadata`` does).

Costs: get/inc/dec O(1) once the bitmap is in memory, one bitmap read and decode (plus a
ref-count tree range lookup if it has 3s) the first time; inc_many/dec_many O(blocks) vectorised
per bitmap; alloc amortised O(1) (a vectorised scan refills a queue of candidates); summaries
O(bitmaps changed since the commit) vectorised; commit O(changed bitmaps) block writes plus
O(bitmaps) for new ones; opening O(bitmaps) index entries.
"""

from __future__ import annotations

import numpy as np

from ..errors import InvalidArgument, MetadataError, NoDataSpace, NoMetadataSpace
from . import format as fmt
from .btree import ValueType

E = fmt.ENTRIES_PER_BITMAP
_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8)

REF_COUNT_VT = ValueType("ref count", fmt.U32)
INDEX_VT = ValueType("sm index", fmt.INDEX_DTYPE)

#: Unchanged bitmaps kept in memory after a commit (64 KiB each): the most recently read ones.
MAX_CLEAN_PIECES = 256


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


def _multiplicities(offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values of ``offsets``, ascending, and how often each occurs."""
    if len(offsets) == 1:
        return offsets, np.ones(1, np.uint32)
    s = np.sort(offsets)
    starts = np.concatenate(([0], np.flatnonzero(s[1:] != s[:-1]) + 1))
    mult = np.diff(np.concatenate((starts, [len(s)])))
    return s[starts], mult.astype(np.uint32)


def _summary(counts: np.ndarray) -> tuple[int, int]:
    """(nr_free, none_free_before) of one bitmap's counts, as written in its index entry."""
    free = np.flatnonzero(counts == 0)
    return len(free), (int(free[0]) if len(free) else len(counts))


class _Piece:
    """One bitmap in memory: its counts, and (once they change) a copy as of the last commit."""

    __slots__ = ("committed", "counts")

    def __init__(self, counts: np.ndarray):
        self.counts = counts
        self.committed: np.ndarray | None = None     # None: unchanged since the last commit


class SpaceMap:
    """Reference counts with the kernel's allocation rules, read a bitmap at a time."""

    def __init__(self, nr_blocks: int, *, kind: str):
        self.kind = kind
        self.nr_blocks = nr_blocks
        nb = self.nr_bitmaps
        # Per bitmap, as of the last commit: location (0: never written, all zero), summary.
        self._loc = np.zeros(nb, np.int64)
        self._free = self._lengths(0, nb)
        self._nfb = np.zeros(nb, np.int64)
        self._allocated_at_commit = 0
        self._pieces: dict[int, _Piece] = {}
        self._touched: set[int] = set()      # pieces with a committed copy (changed or about to)
        self.force_dirty: set[int] = set()   # bitmaps whose summary changed without a count change
        self._fix: set[int] = set()          # bitmaps whose summary on disk was not exact
        self._queue: list[int] = []
        self._cursor = 0
        self.hold_freed = False
        self._held: set[int] = set()         # freed in this transaction, not reusable before commit
        self._held_arr: np.ndarray | None = None
        #: Bitmap blocks read and decoded since this object was made (a test's probe).
        self.bitmaps_read = 0

    @property
    def nr_bitmaps(self) -> int:
        return (self.nr_blocks + E - 1) // E

    @property
    def loaded_bitmaps(self) -> int:
        """How many bitmaps are in memory now."""
        return len(self._pieces)

    @property
    def bitmap_blocks(self) -> list[int]:
        """Where each bitmap is on disk (0 for one not written yet)."""
        return self._loc.tolist()

    def _lengths(self, a: int, z: int) -> np.ndarray:
        """Entries inside the device of bitmaps a..z-1 (E, but less for a partial last one)."""
        return np.minimum(E, self.nr_blocks - np.arange(a, z, dtype=np.int64) * E)

    def _length(self, i: int) -> int:
        return min(E, self.nr_blocks - i * E)

    # -- reading bitmaps ---------------------------------------------------------------------
    def _read(self, i: int) -> np.ndarray:
        """The committed counts of bitmap ``i`` (not kept): zeros for one never written."""
        if not self._loc[i]:
            return np.zeros(self._length(i), np.uint32)
        return self._read_bitmap(i, counts=True)

    def _read_bitmap(self, i: int, counts: bool) -> np.ndarray:
        """Bitmap ``i`` from disk: its committed counts (``uint32``) or, with ``counts=False``,
        only its 2-bit entries (``uint8``). The on-disk layouts (space_map_disk.py) read it."""
        raise MetadataError(f"{self.kind} space map: bitmap {i} has no disk to be read from")

    def _piece(self, i: int) -> _Piece:
        """Bitmap ``i`` in memory, read on first use. Its summary replaces the index's."""
        p = self._pieces.get(i)
        if p is None:
            p = _Piece(self._read(i))
            free, nfb = _summary(p.counts)
            if free != self._free[i] or nfb < self._nfb[i]:
                self._allocated_at_commit += int(self._free[i]) - free
                self._free[i] = free
                self._nfb[i] = nfb
                if self._loc[i]:
                    self._fix.add(i)
            self._pieces[i] = p
        return p

    def _writable(self, i: int) -> _Piece:
        p = self._pieces.get(i)
        if p is None:
            p = self._piece(i)
        if p.committed is None:
            p.committed = p.counts.copy()
            self._touched.add(i)
        return p

    def _check_block(self, b: int) -> None:
        if not 0 <= b < self.nr_blocks:
            raise MetadataError(f"{self.kind} space map: block {b} is past the end "
                                f"({self.nr_blocks} blocks)")

    def _groups(self, blocks: np.ndarray):
        """``[(bitmap, offsets)]`` of ``blocks`` (int64) grouped by bitmap, ascending; checks bounds."""
        if int(blocks.min()) < 0 or int(blocks.max()) >= self.nr_blocks:
            bad = blocks[(blocks < 0) | (blocks >= self.nr_blocks)]
            self._check_block(int(bad[0]))
        idx = blocks // E
        lo, hi = int(idx.min()), int(idx.max())
        if lo == hi:
            return [(lo, blocks - lo * E)]
        order = np.argsort(idx, kind="stable")
        s, b = idx[order], blocks[order]
        starts = np.concatenate(([0], np.flatnonzero(s[1:] != s[:-1]) + 1))
        ends = np.concatenate((starts[1:], [len(s)]))
        return [(int(s[a]), b[a:z] - int(s[a]) * E) for a, z in zip(starts.tolist(), ends.tolist())]

    # -- counts ------------------------------------------------------------------------------
    def get(self, b: int) -> int:
        self._check_block(b)
        i = b // E
        p = self._pieces.get(i)
        if p is None:
            p = self._piece(i)
        return int(p.counts[b - i * E])

    def get_many(self, blocks) -> np.ndarray:
        """The counts of ``blocks`` (reads the bitmaps they are in)."""
        idx = np.asarray(blocks, np.int64)
        out = np.zeros(len(idx), np.int64)
        if len(idx):
            pos = np.argsort(idx // E, kind="stable")
            at = 0
            for i, off in self._groups(idx):
                out[pos[at: at + len(off)]] = self._piece(i).counts[off]
                at += len(off)
        return out

    def inc(self, b: int, n: int = 1) -> None:
        self._check_block(b)
        i = b // E
        self._writable(i).counts[b - i * E] += n
        if self._held and b in self._held:    # referenced again: in use, no longer held
            self._held.discard(b)
            self._held_arr = None

    def dec(self, b: int) -> int:
        self._check_block(b)
        i = b // E
        p = self._writable(i)
        o = b - i * E
        c = int(p.counts[o])
        if c == 0:
            raise MetadataError(f"{self.kind} space map: reference count of block {b} would drop below 0")
        p.counts[o] = c - 1
        if c == 1 and self.hold_freed and not p.committed[o]:
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
        if not len(idx):
            return
        parts = [(self._writable(i), off) for i, off in self._groups(idx)]
        if any(int(p.counts[off].max()) != 1 for p, off in parts):
            raise MetadataError(f"{self.kind} space map: released blocks are referenced")
        for p, off in parts:
            p.counts[off] = 0

    def inc_many(self, blocks: np.ndarray) -> None:
        idx = np.asarray(blocks).astype(np.int64)
        if not len(idx):
            return
        parts = [(self._writable(i), _multiplicities(off)) for i, off in self._groups(idx)]
        for p, (u, m) in parts:
            p.counts[u] += m
        if self._held:
            self._held.difference_update(idx.tolist())
            self._held_arr = None

    def dec_many(self, blocks: np.ndarray) -> None:
        idx = np.asarray(blocks).astype(np.int64)
        if not len(idx):
            return
        parts = [(i, self._writable(i), *_multiplicities(off)) for i, off in self._groups(idx)]
        if any(bool((p.counts[u] < m).any()) for _, p, u, m in parts):
            raise MetadataError(f"{self.kind} space map: a reference count dropped below 0")
        for i, p, u, m in parts:
            p.counts[u] -= m
            if self.hold_freed:
                gone = u[(p.counts[u] == 0) & (p.committed[u] == 0)]
                if len(gone):
                    self._hold(gone + i * E)

    # -- change tracking and summaries -------------------------------------------------------
    def _segments(self):
        for i in sorted(self._touched):
            p = self._pieces[i]
            yield i, p.counts, p.committed

    def changed_blocks(self) -> np.ndarray:
        """Blocks whose count differs from the last commit (only touched bitmaps are compared)."""
        parts = [np.flatnonzero(c != k) + i * E for i, c, k in self._segments()]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def _committed_of(self, b: int) -> int:
        """The count of ``b`` at the last commit (its bitmap is in memory)."""
        i = b // E
        p = self._pieces[i]
        k = p.counts if p.committed is None else p.committed
        return int(k[b - i * E])

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

    def freed_since_commit(self) -> np.ndarray:
        parts = [np.flatnonzero((k > 0) & (c == 0)) + i * E for i, c, k in self._segments()]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    # -- free blocks (for punching holes) ----------------------------------------------------
    def _free_mask(self, i: int) -> np.ndarray:
        """Entries of bitmap ``i`` free now and at the last commit. A bitmap not in memory is
        read (not kept): whether a count is 0 needs no ref-count tree."""
        p = self._pieces.get(i)
        if p is None:
            if not self._loc[i]:
                return np.ones(self._length(i), bool)
            return self._read_bitmap(i, counts=False) == 0
        ok = p.counts == 0
        if p.committed is not None:
            ok &= p.committed == 0
        return ok

    def still_free(self, blocks) -> np.ndarray:
        """For each of ``blocks``: free now and at the last commit."""
        idx = np.asarray(blocks, np.int64)
        out = np.zeros(len(idx), bool)
        if len(idx):
            pos = np.argsort(idx // E, kind="stable")
            at = 0
            for i, off in self._groups(idx):
                out[pos[at: at + len(off)]] = self._free_mask(i)[off]
                at += len(off)
        return out

    def free_runs(self):
        """(start, length) of every run of blocks free now and at the last commit, ascending.
        Reads every bitmap not in memory (one at a time, none kept): O(bitmaps)."""
        start = length = 0
        for i in range(self.nr_bitmaps):
            free = np.flatnonzero(self._free_mask(i)) + i * E
            if not len(free):
                continue
            brk = np.flatnonzero(np.diff(free) != 1) + 1
            starts = np.concatenate(([0], brk)).tolist()
            ends = np.concatenate((brk, [len(free)])).tolist()
            for a, z in zip(starts, ends):
                s = int(free[a])
                if length and start + length == s:
                    length += z - a
                    continue
                if length:
                    yield start, length
                start, length = s, z - a
        if length:
            yield start, length

    # -- allocation --------------------------------------------------------------------------
    def _free_chunks(self, start: int, chunk: int):
        """Arrays of allocatable blocks, scanning from ``start`` to the end, then from 0 to ``start``,
        in windows that start small (a request for one block near a free one looks at 512 blocks,
        not ``chunk``) and grow fourfold up to ``chunk``. A bitmap not in memory whose index entry
        says nothing is free is skipped unread; otherwise the scan starts at its
        ``none_free_before``."""
        n = self.nr_blocks
        start = start if 0 <= start < n else 0
        for lo, hi in ((start, n), (0, start)):
            pos = lo
            step = min(chunk, 512)
            while pos < hi:
                i = pos // E
                base = i * E
                bend = min(base + E, hi)
                p = self._pieces.get(i)
                if p is None:
                    first = base + int(self._nfb[i])
                    if self._free[i] == 0 or first >= bend:
                        pos = bend
                        continue
                    pos = max(pos, first)
                    p = self._piece(i)
                end = min(bend, pos + step)
                ok = p.counts[pos - base: end - base] == 0
                if p.committed is not None:
                    ok &= p.committed[pos - base: end - base] == 0
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
                i = b // E
                p = self._pieces.get(i)
                if p is not None and p.counts[b - i * E] == 0 and b not in self._held:
                    self._writable(i).counts[b - i * E] = 1
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
        for i, off in self._groups(blocks):
            self._writable(i).counts[off] = 1
        self._cursor = int(blocks[-1]) + 1
        self._queue = []
        return blocks

    # -- size --------------------------------------------------------------------------------
    def extend(self, nr_blocks: int) -> None:
        if nr_blocks < self.nr_blocks:
            raise MetadataError(f"{self.kind} space map cannot shrink")
        if nr_blocks == self.nr_blocks:
            return
        old, old_nb = self.nr_blocks, self.nr_bitmaps
        if old % E:
            last = old_nb - 1
            grow = min(nr_blocks, (last + 1) * E) - old
            self.force_dirty.add(last)
            self._free[last] += grow
            p = self._pieces.get(last)
            if p is not None:
                p.counts = np.concatenate([p.counts, np.zeros(grow, np.uint32)])
                if p.committed is not None:
                    p.committed = np.concatenate([p.committed, np.zeros(grow, np.uint32)])
        self.nr_blocks = nr_blocks
        nb = self.nr_bitmaps
        self._loc = np.concatenate([self._loc, np.zeros(nb - old_nb, np.int64)])
        self._free = np.concatenate([self._free, self._lengths(old_nb, nb)])
        self._nfb = np.concatenate([self._nfb, np.zeros(nb - old_nb, np.int64)])

    # -- commit (the layouts write; these are the shared steps) ---------------------------
    def _summaries(self, bitmaps) -> tuple[np.ndarray, np.ndarray]:
        """(nr_free, none_free_before) of ``bitmaps`` as they are now."""
        free = self._free[bitmaps].copy()
        nfb = self._nfb[bitmaps].copy()
        for j, i in enumerate(np.asarray(bitmaps).tolist()):
            p = self._pieces.get(i)
            if p is not None:
                free[j], nfb[j] = _summary(p.counts)
        return free, nfb

    def mark_committed(self) -> None:
        """The commit is durable: its counts are the committed ones now."""
        for i in self._touched:
            p = self._pieces[i]
            p.committed = None
            self._free[i], self._nfb[i] = _summary(p.counts)
        self._allocated_at_commit = int((self._lengths(0, self.nr_bitmaps) - self._free).sum())
        self._touched.clear()
        self._queue = []
        self.force_dirty.clear()
        self._fix.clear()
        self._held.clear()
        self._held_arr = None
        extra = len(self._pieces) - MAX_CLEAN_PIECES
        if extra > 0:              # the oldest ones that can be read again (never a map's only copy)
            for i in [i for i in self._pieces if self._loc[i]][:extra]:
                del self._pieces[i]

    # -- whole arrays (tests and offline tools: O(nr_blocks)) --------------------------------
    def all_counts(self) -> np.ndarray:
        """Every block's count now, as one array. Reads every bitmap not in memory (not kept)."""
        parts = [self._pieces[i].counts if i in self._pieces else self._read(i)
                 for i in range(self.nr_bitmaps)]
        return np.concatenate(parts) if parts else np.zeros(0, np.uint32)

    def all_committed(self) -> np.ndarray:
        """Every block's count at the last commit, as one array (reads as :meth:`all_counts`)."""
        parts = []
        for i in range(self.nr_bitmaps):
            p = self._pieces.get(i)
            parts.append(self._read(i) if p is None else
                         p.counts if p.committed is None else p.committed)
        return np.concatenate(parts) if parts else np.zeros(0, np.uint32)

    def assign(self, committed: np.ndarray, current: np.ndarray) -> None:
        """Set every count at once, as of the last commit and now (for tests of the rules on a
        map that has no disk: every bitmap goes into memory)."""
        self._pieces, self._touched = {}, set()
        for i in range(self.nr_bitmaps):
            a, z = i * E, min((i + 1) * E, self.nr_blocks)
            p = _Piece(np.array(current[a:z], np.uint32))
            k = np.array(committed[a:z], np.uint32)
            self._free[i], self._nfb[i] = _summary(k)
            if not np.array_equal(k, p.counts):
                p.committed = k
                self._touched.add(i)
            self._pieces[i] = p
        self._allocated_at_commit = int(np.count_nonzero(committed))
        self._queue = []

