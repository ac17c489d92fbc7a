"""Lazy space maps (space_map.py, space_map_disk.py): bitmaps read on first touch, agreeing with
a model, and opening or using a big pool reading O(1) of them.

* A state machine drives the data space map of a real metadata file (six bitmaps, the last one
  partial) through random inc/dec/inc_many/dec_many/alloc/alloc_run/release_run steps,
  commits, aborts and reopens, with at most two unchanged bitmaps kept in memory so bitmaps are
  dropped and read again. The model is two full arrays (counts now, counts at the last commit)
  plus the set of held blocks. After every step the summaries and sampled counts agree with it;
  after each commit the whole arrays, the on-disk index summaries (``assert_summaries_exact``)
  and the metadata space map against the counts recomputed from the trees.
* Big pools: after opening a 4 TiB pool (4,113 data bitmaps, 49 metadata bitmaps), a stat, a
  new volume, a 1-byte write, a snapshot and the commits read only a handful of bitmaps: counted
  both with the space maps' public counter and, independently, with the bitmap validator's
  checks (one per bitmap block read from disk).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tests.metadata.helpers import assert_summaries_exact, new_metadata_file
from thinpool import Pool
from thinpool.errors import NoDataSpace
from thinpool.metadata import format as fmt
from thinpool.metadata import space_map
from thinpool.metadata.block import BITMAP_VALIDATOR
from thinpool.metadata.thin_metadata import ThinMetadata
from thinpool.metadata.walker import expected_counts

E = fmt.ENTRIES_PER_BITMAP
NR = 5 * E + 321
EDGES = [0, 1, E - 1, E, E + 1, 2 * E, 3 * E - 1, 4 * E + 7, 5 * E, NR - 2, NR - 1]
blocks = st.one_of(st.integers(0, NR - 1), st.sampled_from(EDGES))


class LazySpaceMap(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        import tempfile
        self._dir = tempfile.TemporaryDirectory(prefix="lazy-sm-")
        self._cap = space_map.MAX_CLEAN_PIECES
        space_map.MAX_CLEAN_PIECES = 2         # bitmaps are dropped and read again
        path = new_metadata_file(f"{self._dir.name}/meta.img", 8 << 20)
        self.meta = ThinMetadata.format(path, 128, NR)
        self.cur = np.zeros(NR, np.int64)
        self.com = np.zeros(NR, np.int64)
        self.held: set[int] = set()
        self.fresh: list[int] = []             # allocated in this transaction, count still 1

    def teardown(self) -> None:
        space_map.MAX_CLEAN_PIECES = self._cap
        self.meta.close()
        self._dir.cleanup()

    @property
    def sm(self):
        return self.meta.data_sm

    def _allocatable(self) -> np.ndarray:
        ok = (self.cur == 0) & (self.com == 0)
        ok[list(self.held)] = False
        return np.flatnonzero(ok)

    def _allowed(self, b: int) -> bool:
        return self.cur[b] == 0 and self.com[b] == 0 and b not in self.held

    # -- counts ------------------------------------------------------------------------------
    @rule(b=blocks, n=st.integers(1, 4))
    def inc(self, b, n):
        self.sm.inc(b, n)
        self.cur[b] += n

    @rule(bs=st.lists(blocks, min_size=1, max_size=40))
    def inc_many(self, bs):
        self.sm.inc_many(np.array(bs, np.uint64))
        np.add.at(self.cur, bs, 1)

    @rule(data=st.data())
    @precondition(lambda self: self.cur.any())
    def dec(self, data):
        used = np.flatnonzero(self.cur)
        b = int(data.draw(st.sampled_from(used.tolist())))
        assert self.sm.dec(b) == self.cur[b] - 1
        self._dec(b)

    @rule(data=st.data())
    @precondition(lambda self: self.cur.any())
    def dec_many(self, data):
        used = np.flatnonzero(self.cur).tolist()
        picks = data.draw(st.lists(st.sampled_from(used), min_size=1, max_size=30))
        want = {}
        for b in picks:                          # never below 0
            if want.get(b, 0) < self.cur[b]:
                want[b] = want.get(b, 0) + 1
        bs = [b for b, k in want.items() for _ in range(k)]
        self.sm.dec_many(np.array(bs, np.uint64))
        for b in bs:
            self._dec(b)

    def _dec(self, b: int) -> None:
        self.cur[b] -= 1
        if self.cur[b] == 0 and self.com[b] == 0:
            self.held.add(b)                     # the data map holds it until the commit

    # -- allocation --------------------------------------------------------------------------
    @rule()
    def alloc(self):
        if not len(self._allocatable()):
            with pytest.raises(NoDataSpace):
                self.sm.alloc()
            return
        b = self.sm.alloc()
        assert self._allowed(b), (b, self.cur[b], self.com[b], b in self.held)
        self.cur[b] = 1
        self.fresh.append(b)

    @rule(n=st.integers(1, 3 * E), hint=st.one_of(st.none(), blocks))
    def alloc_run(self, n, hint):
        free = self._allocatable()
        if n > len(free):
            before = self.sm.nr_allocated()
            with pytest.raises(NoDataSpace):
                self.sm.alloc_run(n, hint)
            assert self.sm.nr_allocated() == before
            return
        got = self.sm.alloc_run(n, hint)
        assert len(got) == n and len(set(got.tolist())) == n
        assert all(self._allowed(b) for b in got.tolist())
        self.cur[got] = 1
        self.fresh.extend(got.tolist())

    @rule(data=st.data())
    @precondition(lambda self: self.fresh)
    def release_run(self, data):
        live = [b for b in dict.fromkeys(self.fresh) if self.cur[b] == 1 and self.com[b] == 0]
        if not live:
            return
        k = data.draw(st.integers(1, min(len(live), 50)))
        self.sm.release_run(np.array(live[:k], np.int64))
        self.cur[live[:k]] = 0                   # given back: allocatable again, not held
        self.fresh = live[k:]

    # -- transactions ------------------------------------------------------------------------
    @rule()
    def commit(self):
        want_freed = np.flatnonzero((self.com > 0) & (self.cur == 0))
        freed = self.meta.commit()
        assert sorted(freed.tolist()) == want_freed.tolist()
        self.com = self.cur.copy()
        self.held.clear()
        self.fresh = []
        assert np.array_equal(self.sm.all_counts(), self.cur)
        assert np.array_equal(self.sm.all_committed(), self.com)
        assert_summaries_exact(self.meta)
        em, _ = expected_counts(self.meta)
        assert np.array_equal(em, self.meta.metadata_sm.all_counts()), "metadata ref counts"

    @rule()
    def reopen(self):
        path = self.meta.bm.path
        self.meta.close()
        self.meta = ThinMetadata.open(path)
        assert self.sm.loaded_bitmaps <= 1      # the partial last bitmap, nothing else
        self._forget()

    @rule()
    def abort(self):
        self.meta.abort()
        self._forget()

    def _forget(self) -> None:
        self.cur = self.com.copy()
        self.held.clear()
        self.fresh = []

    # -- what must hold after every step ----------------------------------------------------
    @invariant()
    def summaries_agree(self):
        sm = self.sm
        assert sm.nr_allocated() == int(np.count_nonzero(self.cur))
        assert sm.nr_free() == NR - int(np.count_nonzero(self.cur))
        assert sm.nr_allocatable() == len(self._allocatable())
        assert sm.has_changes() == bool((self.cur != self.com).any())
        sample = np.array(EDGES + [int(b) for b in np.flatnonzero(self.cur)[:20]], np.int64)
        assert np.array_equal(sm.get_many(sample), self.cur[sample])
        assert sm.get(int(sample[-1])) == self.cur[sample[-1]]
        ok = (self.cur[sample] == 0) & (self.com[sample] == 0)
        assert np.array_equal(sm.still_free(sample), ok)


TestLazySpaceMap = LazySpaceMap.TestCase
TestLazySpaceMap.settings = settings(derandomize=True, deadline=None, max_examples=25,
                                     stateful_step_count=30)


def test_free_runs_against_the_arrays(tmp_path) -> None:
    """free_runs: every block free now and at the commit, as maximal runs across bitmaps."""
    meta = ThinMetadata.format(new_metadata_file(tmp_path / "m.img", 8 << 20), 128, NR)
    sm = meta.data_sm
    sm.alloc_run(E + 10, hint=E - 5)           # across bitmaps 0-2
    sm.inc(4 * E)
    meta.commit()
    sm.dec(4 * E)                              # freed in this transaction: not free yet
    sm.alloc_run(3, hint=NR - 3)
    ok = (sm.all_counts() == 0) & (sm.all_committed() == 0)
    want, start = [], None
    for b, f in enumerate(ok.tolist() + [False]):
        if f and start is None:
            start = b
        elif not f and start is not None:
            want.append((start, b - start))
            start = None
    assert list(sm.free_runs()) == want == [(0, E - 5), (2 * E + 5, 2 * E - 5), (4 * E + 1, NR - 3 - 4 * E - 1)]
    meta.close()


# ---------------------------------------------------------------------------
# Big pools: O(1) bitmaps read
# ---------------------------------------------------------------------------

TiB = 1 << 40


@pytest.fixture(scope="module")
def big_pool(tmp_path_factory):
    path = tmp_path_factory.mktemp("big") / "big"
    Pool.create(path, data_size=4 * TiB).close()
    return path


def test_a_big_pool_reads_o1_bitmaps(big_pool, monkeypatch) -> None:
    checked: list[int] = []
    real = BITMAP_VALIDATOR.check

    def counting(buf, blocknr):
        checked.append(blocknr)
        return real(buf, blocknr)

    monkeypatch.setattr(BITMAP_VALIDATOR, "check", counting)
    with Pool.open(big_pool) as pool:
        meta = pool.metadata
        assert meta.data_sm.nr_bitmaps == 4113 and meta.metadata_sm.nr_bitmaps == 49
        st = pool.stat()
        assert st.data_blocks_total == 4 * TiB // 65536 and st.data_blocks_used == 0
        at_open = len(checked)
        assert at_open <= 2, checked                 # the two partial last bitmaps
        vol = pool.create_thin("v", 1 << 30)
        vol.write(12345, b"x")
        pool.snapshot("v", "s")
        pool.commit()
        assert pool.stat().data_blocks_used == 1
        assert len(checked) <= 6, checked
        assert meta.data_sm.bitmaps_read <= 2 and meta.data_sm.loaded_bitmaps <= 2
        assert meta.metadata_sm.bitmaps_read <= 3 and meta.metadata_sm.loaded_bitmaps <= 3
    checked.clear()
    with Pool.open(big_pool, read_only=True) as pool:
        assert pool.volume("s").read(12345, 1) == b"x"
        assert pool.stat().data_blocks_used == 1
    assert len(checked) <= 2, checked
