"""The bulk, level-at-a-time tree reader (``walker.level_arrays`` over ``BlockManager.read_nodes``)
against the node-by-node reader (``walker.checked_leaves``), which is the oracle here: the same
keys and values on every test image and on deep trees built with snapshots and copy-on-write, and
None (the signal to fall back) on every kind of damage the node-by-node reader refuses.
"""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest

from tests.metadata.helpers import edit_and_reseal, flip_byte, format_pool
from tests.tptools import TESTDATA_CASES, testdata_image
from thinpool.errors import CorruptBlock
from thinpool.metadata import format as fmt
from thinpool.metadata.block import BlockManager
from thinpool.metadata.walker import MetadataReader, checked_leaves, level_arrays


def node_by_node(reader: MetadataReader, root: int) -> tuple[np.ndarray, np.ndarray]:
    parts = list(checked_leaves(reader.mapping_tree, root))
    if not parts:
        return np.zeros(0, fmt.U64), np.zeros(0, fmt.U64)
    return np.concatenate([k for k, _ in parts]), np.concatenate([v for _, v in parts])


def assert_same_as_node_by_node(path) -> int:
    with MetadataReader(path) as r:
        total = 0
        for dev, root in r.roots().items():
            got = level_arrays(r.bm, root, fmt.U64)
            assert got is not None, f"device {dev}"
            want = node_by_node(r, root)
            assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]), f"device {dev}"
            total += len(want[0])
        return total


@pytest.mark.parametrize("case", TESTDATA_CASES)
def test_testdata_images(tmp_path, case) -> None:
    assert_same_as_node_by_node(testdata_image(case, tmp_path))


def build_deep_pool(tmp_path):
    """Device 0: 60,000 mappings (three levels); 1 and 2 snapshots of it that then diverge; 3
    sparse, 4 empty."""
    rng = random.Random(5)
    meta = format_pool(tmp_path, 1 << 20, size=64 << 20)
    meta.create_thin(0)
    keys = list(range(0, 120_000, 2))
    meta.insert_run(0, keys, [meta.data_sm.alloc() for _ in keys])
    meta.create_snap(1, 0)
    meta.create_snap(2, 0)
    for dev in (1, 2):
        keys = sorted(rng.sample(range(130_000), 3000))
        meta.insert_run(dev, keys, [meta.data_sm.alloc() for _ in keys])
    meta.create_thin(3)
    for k in rng.sample(range(1 << 40), 500):
        meta.insert(3, k, meta.data_sm.alloc())
    meta.create_thin(4)
    meta.commit()
    path = meta.bm.path
    meta.close()
    return path


def test_deep_trees_with_shared_subtrees(tmp_path) -> None:
    assert assert_same_as_node_by_node(build_deep_pool(tmp_path)) > 60_000 * 3


def leaf_and_internal(path) -> tuple[int, int, int]:
    """(a leaf of device 0, an internal node of device 0, the device's root)."""
    with MetadataReader(path) as r:
        root = r.roots()[0]
        n = r.mapping_tree.node_ro(root)
        assert not n.is_leaf
        child = int(n.values[1])
        c = r.mapping_tree.node_ro(child)
        leaf = int(c.values[2]) if not c.is_leaf else child
        internal = child if not c.is_leaf else root
        return leaf, internal, root


def _swap_first_keys(buf: bytearray) -> None:
    a, b = struct.unpack_from("<QQ", buf, 32)
    struct.pack_into("<QQ", buf, 32, b, a)


def _lower_first_key(buf: bytearray) -> None:
    struct.pack_into("<Q", buf, 32, 0)


def _bad_flags(buf: bytearray) -> None:
    struct.pack_into("<I", buf, 4, 7)


@pytest.mark.parametrize("damage", ["stale checksum", "keys out of order", "key below parent",
                                    "bad flags", "wrong location"])
@pytest.mark.parametrize("where", ["leaf", "internal"])
def test_damage_gives_none_and_the_node_reader_names_it(tmp_path, damage, where) -> None:
    path = build_deep_pool(tmp_path)
    leaf, internal, _ = leaf_and_internal(path)
    b = leaf if where == "leaf" else internal
    if damage == "stale checksum":
        flip_byte(path, b, 100)
    elif damage == "wrong location":
        edit_and_reseal(path, b, fmt.BTREE_CSUM_XOR, lambda buf: struct.pack_into("<Q", buf, 8, b + 1))
    else:
        fn = {"keys out of order": _swap_first_keys, "key below parent": _lower_first_key,
              "bad flags": _bad_flags}[damage]
        edit_and_reseal(path, b, fmt.BTREE_CSUM_XOR, fn)
    with MetadataReader(path) as r:
        root = r.roots()[0]
        assert level_arrays(r.bm, root, fmt.U64) is None
        with pytest.raises(CorruptBlock):
            r.device_arrays(root)          # falls back, and the fallback names the block


def test_read_nodes_rows_follow_the_request(tmp_path) -> None:
    """Any order, repeats, neighbours and gaps: row i is block blocks[i]; past the end is None."""
    path = build_deep_pool(tmp_path)
    bm = BlockManager(path, read_only=True)
    try:
        with MetadataReader(path) as r:
            top = r.mapping_tree.node_ro(r.roots()[0])
            mid = r.mapping_tree.node_ro(int(top.values[0]))
            nodes = [int(v) for v in mid.values[: mid.nr]][:5]
        assert len(nodes) == 5
        ask = np.array([nodes[3], nodes[0], nodes[0], nodes[1], nodes[2], nodes[4], nodes[3]])
        got = bm.read_nodes(ask)
        for row, b in zip(got, ask.tolist()):
            assert row.tobytes() == bm.read_raw(b)
        assert bm.read_nodes(np.array([bm.nr_blocks])) is None
        assert bm.read_nodes(np.array([0])) is None        # the superblock is not a node
        assert bm.read_nodes(np.zeros(0, np.int64)).shape == (0, fmt.BLOCK_SIZE)
    finally:
        bm.close()
