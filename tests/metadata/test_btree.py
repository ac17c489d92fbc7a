"""The generic B-tree (btree.py) against a dict, through ThinMetadata's mapping trees.

A hypothesis state machine drives several devices' mapping trees (u64 values ``block << 24 |
time``) with batches of inserts, overwrites, removals (absent keys included), range removals,
snapshots and deletes, against a model ``{dev: {vblock: (block, time)}}``. After every commit the
real ``thin_check`` must pass, every tree must satisfy the structural rules checked independently
by :func:`tests.metadata.helpers.check_tree` (minimum fill, increasing keys, separator key equals
the child's first key, equal leaf depth), and the space maps must hold exactly the counts
recomputed from the trees. Fixed tests add the shapes random runs reach rarely: three levels,
merges of internal nodes, the root collapsing, and the 126-entry details tree.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule, run_state_machine_as_test)

from tests.metadata.helpers import (check_all_trees, check_tree, dump, format_pool, full_check,
                                    read_mappings)
from tests.tptools import TOOLS_AVAILABLE, requires_tools
from thinpool.errors import NotFound
from thinpool.metadata import format as fmt
from thinpool.metadata.thin_metadata import ThinMetadata

#: Removals per rule, so one step stays well under a second (a removal costs ~0.3 ms).
MAX_REMOVALS = 2500

KEY_SPACES = {
    "dense": 30_000,          # many neighbours: full leaves, long runs
    "sparse": 1 << 40,        # scattered
    "clustered": 200_000,
}


def tree_depth(meta: ThinMetadata, dev: int) -> int:
    depth, _ = check_tree(meta.mapping_tree, meta.roots[dev], 8, what=f"device {dev}")
    return depth


# ---------------------------------------------------------------------------
# State machine
# ---------------------------------------------------------------------------


class MappingTrees(RuleBasedStateMachine):
    """Mapping trees of up to four devices against a dict model, with commits, aborts, reopens."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="thinpool-btree-"))
        self.meta: ThinMetadata | None = None
        self.model: dict[int, dict[int, tuple[int, int]]] = {}
        self.committed: dict[int, dict[int, tuple[int, int]]] = {}
        self.committed_time = 0
        self.next_dev = 1
        self.commits = 0

    @initialize(seed=st.integers(0, 2**32 - 1), n=st.sampled_from([0, 400, 6000, 20_000]),
                layout=st.sampled_from(sorted(KEY_SPACES)))
    def start(self, seed: int, n: int, layout: str) -> None:
        """Start from a committed device 0 that already holds ``n`` mappings (up to 3 levels
        would need far more; 20k random keys give a root over ~100 leaves)."""
        self.rng = random.Random(seed)
        self.meta = format_pool(self.dir, nr_data_blocks=1 << 20, size=64 << 20)
        self.meta.create_thin(0)
        self.model = {0: {}}
        for key in self.fresh_keys(n, layout, 0):
            self.do_insert(0, key)
        self.meta.commit()
        self.committed = {0: dict(self.model[0])}

    # -- helpers -----------------------------------------------------------------------------
    def pick_dev(self, which: int) -> int:
        devs = sorted(self.model)
        return devs[which % len(devs)]

    def fresh_keys(self, n: int, layout: str, dev: int) -> list[int]:
        space = KEY_SPACES[layout]
        if layout == "clustered":
            base = self.rng.randrange(space)
            return [base + self.rng.randrange(3 * n + 1) for _ in range(n)]
        if layout == "dense" and self.rng.random() < 0.5:
            start = self.rng.randrange(space)
            return list(range(start, start + n))      # sequential run
        return [self.rng.randrange(space) for _ in range(n)]

    def do_insert(self, dev: int, key: int) -> None:
        m = self.meta
        block = m.data_sm.alloc()
        old = m.insert(dev, key, block)
        assert old == self.model[dev].get(key)
        self.model[dev][key] = (block, m.time)

    # -- rules -------------------------------------------------------------------------------
    @rule(which=st.integers(0, 3), n=st.sampled_from([1, 10, 300, 1500, 4000]),
          layout=st.sampled_from(sorted(KEY_SPACES)))
    def insert_batch(self, which: int, n: int, layout: str) -> None:
        dev = self.pick_dev(which)
        for key in self.fresh_keys(n, layout, dev):
            self.do_insert(dev, key)

    @rule(which=st.integers(0, 3), n=st.sampled_from([2, 40, 300, 1500]),
          layout=st.sampled_from(sorted(KEY_SPACES)), overwrite=st.floats(0.0, 1.0))
    def insert_run(self, which: int, n: int, layout: str, overwrite: float) -> None:
        """The batched insert: new keys mixed with mapped ones (overwrites), in one call."""
        dev = self.pick_dev(which)
        keys = set(self.fresh_keys(n, layout, dev))
        mapped = sorted(self.model[dev])
        keys.update(self.rng.sample(mapped, int(len(mapped) * overwrite) // 4))
        keys = sorted(keys)
        m = self.meta
        blocks = [m.data_sm.alloc() for _ in keys]
        before = m.device(dev).mapped_blocks
        added = m.insert_run(dev, keys, blocks)
        assert added == sum(k not in self.model[dev] for k in keys)
        assert m.device(dev).mapped_blocks == before + added
        for k, b in zip(keys, blocks):
            self.model[dev][k] = (b, m.time)

    @rule(which=st.integers(0, 3), frac=st.floats(0.0, 1.0))
    def overwrite_some(self, which: int, frac: float) -> None:
        dev = self.pick_dev(which)
        keys = sorted(self.model[dev])
        for key in self.rng.sample(keys, int(len(keys) * frac) // 4):
            self.do_insert(dev, key)

    @rule(which=st.integers(0, 3), frac=st.sampled_from([0.01, 0.1, 0.5, 1.0]),
          absent=st.integers(0, 50))
    def remove_some(self, which: int, frac: float, absent: int) -> None:
        dev = self.pick_dev(which)
        m = self.meta
        keys = sorted(self.model[dev])
        victims = self.rng.sample(keys, min(MAX_REMOVALS, int(len(keys) * frac)))
        victims += [self.rng.randrange(1 << 41) for _ in range(absent)]
        self.rng.shuffle(victims)
        for key in victims:
            old = m.remove(dev, key)
            assert old == self.model[dev].pop(key, None)
        assert m.remove(dev, (1 << 64) - 1) is None

    @rule(which=st.integers(0, 3), lo=st.floats(0.0, 1.0), width=st.floats(0.0, 0.6))
    def remove_range(self, which: int, lo: float, width: float) -> None:
        dev = self.pick_dev(which)
        keys = sorted(self.model[dev])
        if not keys:
            assert self.meta.remove_range(dev, 0, 1 << 63) == 0
            return
        first = int(lo * (len(keys) - 1))
        a = keys[first]
        b = a + int(width * (keys[-1] - keys[0] + 1)) + 1
        if first + MAX_REMOVALS < len(keys):
            b = min(b, keys[first + MAX_REMOVALS])
        gone = [k for k in keys if a <= k < b]
        assert self.meta.remove_range(dev, a, b) == len(gone)
        for k in gone:
            del self.model[dev][k]

    @precondition(lambda self: len(self.model) < 4)
    @rule(which=st.integers(0, 3))
    def snapshot(self, which: int) -> None:
        origin = self.pick_dev(which)
        dev = self.next_dev
        self.next_dev += 1
        before = self.meta.time
        self.meta.create_snap(dev, origin)
        assert self.meta.time == before + 1
        self.model[dev] = dict(self.model[origin])

    @precondition(lambda self: len(self.model) < 4)
    @rule()
    def create_thin(self) -> None:
        dev = self.next_dev
        self.next_dev += 1
        self.meta.create_thin(dev)
        self.model[dev] = {}

    @precondition(lambda self: len(self.model) > 1)
    @rule(which=st.integers(0, 3))
    def delete(self, which: int) -> None:
        dev = self.pick_dev(which)
        self.meta.delete(dev)
        del self.model[dev]
        with pytest.raises(NotFound):
            self.meta.device(dev)

    @rule(which=st.integers(0, 3))
    def check_lookup(self, which: int) -> None:
        dev = self.pick_dev(which)
        keys = sorted(self.model[dev])
        probe = self.rng.sample(keys, min(50, len(keys)))
        probe += [k + 1 for k in probe[:10]] + [0, (1 << 64) - 1]
        for k in probe:
            assert self.meta.lookup(dev, k) == self.model[dev].get(k)
            v = self.meta.mapping_tree.lookup(self.meta.roots[dev], k)
            assert (v is None) == (k not in self.model[dev])

    @rule(which=st.integers(0, 3), lo=st.floats(0.0, 1.0), width=st.floats(0.0, 1.0),
          shift=st.sampled_from([-1, 0, 1]))
    def check_range(self, which: int, lo: float, width: float, shift: int) -> None:
        dev = self.pick_dev(which)
        keys = sorted(self.model[dev])
        if keys:
            a = max(0, keys[int(lo * (len(keys) - 1))] + shift)
            b = a + int(width * (keys[-1] - a + 2))
        else:
            a, b = 0, 10
        got_k: list[int] = []
        got_v: list[int] = []
        for ks, vs in self.meta.mappings(dev, a, b):
            assert len(ks) == len(vs) > 0
            got_k.extend(ks.tolist())
            got_v.extend(vs.tolist())
        want = [k for k in keys if a <= k < b]
        assert got_k == want
        assert got_v == [fmt.pack_mapping(*self.model[dev][k]) for k in want]
        # Open-ended ranges.
        tail = [k for ks, _ in self.meta.mappings(dev, a) for k in ks.tolist()]
        assert tail == [k for k in keys if k >= a]

    @rule()
    def commit(self) -> None:
        m = self.meta
        m.commit()
        self.commits += 1
        self.committed = {d: dict(v) for d, v in self.model.items()}
        self.committed_time = m.time
        full_check(m, tools=TOOLS_AVAILABLE)
        for dev, maps in self.model.items():
            assert m.device(dev).mapped_blocks == len(maps)
            assert m.mapping_tree.count(m.roots[dev]) == len(maps)

    @rule(how=st.sampled_from(["abort", "reopen", "commit and reopen"]))
    def abort_or_reopen(self, how: str) -> None:
        """One rule for the three ways of dropping in-memory state (so they stay rare)."""
        if how == "abort":
            self.meta.abort()
            self.model = {d: dict(v) for d, v in self.committed.items()}
            assert self.meta.time == self.committed_time
            assert self.meta.device_ids() == sorted(self.model)
            return
        if how == "commit and reopen":
            self.commit()
        path = self.meta.bm.path
        self.meta.close()
        self.meta = ThinMetadata.open(path)
        self.model = {d: dict(v) for d, v in self.committed.items()}
        for dev in self.model:
            assert read_mappings(self.meta, dev) == self.model[dev]

    @invariant()
    def sizes_agree(self) -> None:
        if self.meta is None:
            return
        assert self.meta.device_ids() == sorted(self.model)
        for dev, maps in self.model.items():
            assert self.meta.device(dev).mapped_blocks == len(maps)

    def teardown(self) -> None:
        try:
            if self.meta is not None and self.meta.bm._fd >= 0:
                self.meta.commit()
                full_check(self.meta, tools=TOOLS_AVAILABLE)
                if TOOLS_AVAILABLE:
                    xml = dump(self.meta.bm.path)
                    assert {d: x.mappings for d, x in xml.devices.items()} == self.model
                for dev in self.model:
                    assert read_mappings(self.meta, dev) == self.model[dev]
                self.meta.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def test_mapping_trees_against_a_dict() -> None:
    run_state_machine_as_test(
        MappingTrees,
        settings=settings(derandomize=True, max_examples=10, stateful_step_count=30,
                          deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]),
    )


# ---------------------------------------------------------------------------
# Shapes that random runs reach rarely
# ---------------------------------------------------------------------------


@requires_tools
def test_three_levels_then_internal_merge_and_root_collapse(tmp_path) -> None:
    """Sequential inserts fill leaves to 126: ~32k keys give a root over two internal nodes.
    Removing a prefix merges leaves, then the two internal nodes, then the root absorbs its child."""
    meta = format_pool(tmp_path, nr_data_blocks=1 << 16, size=32 << 20)
    meta.create_thin(7)
    n = 33_000
    blocks = meta.data_sm.alloc_run(n)
    for i, b in enumerate(blocks.tolist()):
        meta.insert(7, i, b)
    meta.commit()
    full_check(meta)
    assert tree_depth(meta, 7) == 3
    depth = 3
    start = 0
    while depth == 3:
        for k in range(start, start + 1000):
            assert meta.remove(7, k) == (int(blocks[k]), 0)
        start += 1000
        assert start < n
        meta.commit()
        check_all_trees(meta)
        depth = tree_depth(meta, 7)
    assert depth == 2
    full_check(meta)
    assert read_mappings(meta, 7) == {k: (int(blocks[k]), 0) for k in range(start, n)}
    meta.close()


@requires_tools
def test_random_grow_then_shrink_to_an_empty_leaf(tmp_path) -> None:
    rng = random.Random(20)
    meta = format_pool(tmp_path, nr_data_blocks=1 << 16)
    meta.create_thin(1)
    keys = rng.sample(range(1 << 34), 14_000)
    model = {}
    for k in keys:
        b = meta.data_sm.alloc()
        meta.insert(1, k, b)
        model[k] = b
    meta.commit()
    full_check(meta)
    assert tree_depth(meta, 1) == 2
    rng.shuffle(keys)
    for step, k in enumerate(keys, 1):
        assert meta.remove(1, k) == (model.pop(k), 0)
        if step % 4000 == 0 or len(model) in (300, 252, 251, 100):
            meta.commit()
            full_check(meta, tools=step % 4000 == 0)
            assert {k: v[0] for k, v in read_mappings(meta, 1).items()} == model
    assert tree_depth(meta, 1) == 1
    meta.commit()
    full_check(meta)
    root = meta.mapping_tree.node(meta.roots[1])
    assert root.is_leaf and root.nr == 0 and root.max == 252
    assert not meta.data_sm.all_counts().any()
    meta.close()


@requires_tools
def test_many_devices_details_and_top_level_trees(tmp_path) -> None:
    """Details leaves hold 126 entries: 700 devices give both device trees internal roots."""
    rng = random.Random(3)
    meta = format_pool(tmp_path, nr_data_blocks=10_000)
    ids = rng.sample(range(fmt.MAX_DEV_ID + 1), 700)
    for i, dev in enumerate(ids):
        meta.create_thin(dev)
        if i % 50 == 0:
            meta.insert(dev, i, meta.data_sm.alloc())
    meta.commit()
    depths = check_all_trees(meta)
    assert depths["details"][0] == 2 and depths["top"][0] == 2
    assert depths["details"][1] == depths["top"][1] == 700
    full_check(meta)
    assert sorted(dump(meta.bm.path).devices) == sorted(ids)
    rng.shuffle(ids)
    for dev in ids[:690]:
        meta.delete(dev)
    meta.commit()
    full_check(meta)
    depths = check_all_trees(meta)
    assert depths["details"] == (1, 10) and depths["top"] == (1, 10)
    assert meta.device_ids() == sorted(ids[690:])
    meta.close()


@requires_tools
def test_snapshot_of_a_deep_tree_then_cow_everywhere(tmp_path) -> None:
    """Shared internal nodes and leaves are copied on write; their children gain a reference."""
    meta = format_pool(tmp_path, nr_data_blocks=1 << 16)
    meta.create_thin(0)
    blocks = meta.data_sm.alloc_run(6000)
    for i, b in enumerate(blocks.tolist()):
        meta.insert(0, 3 * i, b)
    meta.commit()
    meta.create_snap(1, 0)
    meta.commit()
    full_check(meta)
    assert meta.roots[0] == meta.roots[1]
    assert (meta.data_sm.all_counts()[blocks] == 1).all()      # sharing is by tree node, not by block
    # One write into the snapshot copies the root and one leaf: that leaf's blocks gain a ref.
    meta.insert(1, 1, meta.data_sm.alloc())
    meta.commit()
    full_check(meta)
    assert (meta.data_sm.all_counts()[blocks] == 2).sum() > 80
    # Removals in the origin rebalance next to shared siblings.
    for i in range(0, 6000, 2):
        meta.remove(0, 3 * i)
    meta.commit()
    full_check(meta)
    assert read_mappings(meta, 1) == {**{3 * i: (int(b), 0) for i, b in enumerate(blocks.tolist())},
                                      1: read_mappings(meta, 1)[1]}
    meta.delete(1)
    meta.commit()
    full_check(meta)
    assert (meta.data_sm.all_counts()[blocks[1::2]] == 1).all()
    assert not meta.data_sm.all_counts()[blocks[0::2]].any()
    meta.close()


def test_overwrite_with_the_same_block_keeps_its_count(tmp_path) -> None:
    """Mapping values compare equal by data block (spec 4.4): no dec, only the time changes."""
    meta = format_pool(tmp_path, nr_data_blocks=100)
    meta.create_thin(0)
    b = meta.data_sm.alloc()
    meta.insert(0, 5, b)
    meta.commit()
    meta.create_snap(1, 0)          # time 1
    assert meta.insert(0, 5, b) == (b, 0)
    assert meta.lookup(0, 5) == (b, 1)
    meta.commit()
    full_check(meta, tools=TOOLS_AVAILABLE)
    assert meta.data_sm.get(b) == 2   # leaf copied for device 0 while shared: +1, no dec
    meta.close()


def test_range_iteration_edges(tmp_path) -> None:
    meta = format_pool(tmp_path, nr_data_blocks=1 << 16)
    meta.create_thin(0)
    keys = list(range(100, 100 + 3 * 2000, 3))          # several leaves, gaps between keys
    for k in keys:
        meta.insert(0, k, meta.data_sm.alloc())
    meta.commit()
    tree, root = meta.mapping_tree, meta.roots[0]
    assert tree_depth(meta, 0) == 2

    def ks(lo, hi=None):
        return [k for a, _ in tree.leaves(root, lo, hi) for k in a.tolist()]

    assert ks(0) == keys
    assert ks(0, 0) == [] and ks(50, 50) == [] and ks(200, 100) == []
    assert ks(0, 100) == [] and ks(0, 101) == [100]
    assert ks(keys[-1]) == [keys[-1]] and ks(keys[-1] + 1) == []
    # Boundaries at leaf edges: find the first key of the second leaf.
    leaves = [a for a, _ in tree.leaves(root)]
    second = int(leaves[1][0])
    assert ks(second, second + 1) == [second]
    assert ks(second - 3, second) == [second - 3]
    assert ks(second - 1, second + 1) == [second]
    assert ks(second - 2, second) == []
    assert ks(second - 2) == [k for k in keys if k >= second]
    assert tree.count(root) == len(keys)
    assert [k for k, _ in tree.items(root, 101, 110)] == [103, 106, 109]
    meta.close()


def test_absent_device_is_not_found(tmp_path) -> None:
    """Regression: insert/remove/lookup/mappings on an unknown device raised KeyError."""
    meta = format_pool(tmp_path, nr_data_blocks=10)
    for call in (lambda: meta.insert(3, 0, 0), lambda: meta.remove(3, 0),
                 lambda: meta.lookup(3, 0), lambda: list(meta.mappings(3)),
                 lambda: meta.remove_range(3, 0, 10), lambda: meta.delete(3)):
        with pytest.raises(NotFound):
            call()
    assert not meta.data_sm.all_counts().any()
    meta.close()


def test_separator_keys_follow_removed_first_keys(tmp_path) -> None:
    """Regression: removing a leaf's first key left the parent's key below the child's first key."""
    meta = format_pool(tmp_path, nr_data_blocks=1 << 12)
    meta.create_thin(0)
    for k in range(1000):
        meta.insert(0, k, meta.data_sm.alloc())
    leaves = [a for a, _ in meta.mapping_tree.leaves(meta.roots[0])]
    firsts = [int(a[0]) for a in leaves]
    for k in firsts:
        meta.remove(0, k)
    meta.commit()
    check_all_trees(meta)
    root = meta.mapping_tree.node(meta.roots[0])
    children = [meta.mapping_tree.node(int(c)) for c in root.values[: root.nr]]
    assert root.keys[: root.nr].tolist() == [int(c.keys[0]) for c in children]
    meta.close()



@pytest.mark.parametrize("pattern", ["append", "interleave", "overwrite", "shared"])
def test_insert_run_matches_one_by_one(tmp_path, pattern) -> None:
    """insert_run against a dict, with a snapshot sharing the tree in the "shared" case: runs that
    span many leaves, fill full leaves (the split fallback) and overwrite mapped keys."""
    rng = random.Random(pattern)
    meta = format_pool(tmp_path, 1 << 20, size=64 * (1 << 20))
    meta.create_thin(0)
    model: dict[int, tuple[int, int]] = {}
    if pattern == "interleave":                     # every other key first: runs land between them
        keys = list(range(0, 40_000, 2))
        meta.insert_run(0, keys, [meta.data_sm.alloc() for _ in keys])
        model.update({k: (v >> 24, 0) for k, v in read_raw(meta, 0).items()})
    for step in range(60):
        if pattern == "append":
            start, n = step * 700, 700
            keys = list(range(start, start + n))
        elif pattern == "interleave":
            start = rng.randrange(0, 39_000) | 1
            keys = list(range(start, start + rng.choice([3, 300, 1500]), 2))
        else:
            start = rng.randrange(0, 20_000)
            keys = sorted(set(start + rng.randrange(3000) for _ in range(rng.choice([2, 50, 800]))))
        if pattern == "shared" and step % 15 == 0:
            meta.create_snap(100 + step, 0)
        blocks = [meta.data_sm.alloc() for _ in keys]
        added = meta.insert_run(0, keys, blocks)
        assert added == sum(k not in model for k in keys)
        model.update({k: (b, meta.time) for k, b in zip(keys, blocks)})
        if step % 20 == 19:
            meta.commit()
            full_check(meta, tools=TOOLS_AVAILABLE)
        assert meta.device(0).mapped_blocks == len(model)
    assert read_mappings(meta, 0) == model
    for k in rng.sample(sorted(model), 200):
        assert meta.lookup(0, k) == model[k]
    meta.commit()
    full_check(meta, tools=TOOLS_AVAILABLE)
    meta.close()


def read_raw(meta: ThinMetadata, dev: int) -> dict[int, int]:
    return {k: v for ks, vs in meta.mappings(dev) for k, v in zip(ks.tolist(), vs.tolist())}


def test_insert_run_refuses_unsorted_keys(tmp_path) -> None:
    meta = format_pool(tmp_path)
    meta.create_thin(0)
    with pytest.raises(ValueError):
        meta.insert_run(0, [5, 3], [1, 2])
    with pytest.raises(ValueError):
        meta.insert_run(0, [5, 5], [1, 2])
    assert meta.device(0).mapped_blocks == 0
    meta.close()
