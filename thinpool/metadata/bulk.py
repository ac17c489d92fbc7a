"""Bulk B-tree building: sorted (key, value) arrays straight into nodes, bottom up.

Used by restore and repair instead of one insert per key. Leaves are filled to ``max_entries``;
when the last node of a level would fall under the one-third minimum it shares the entries of its
left neighbour evenly, so every non-root node holds at least ``max_entries // 3`` entries. Each
internal level is built the same way over the first keys of the level below. All nodes are new
blocks (count 1) allocated through the transaction manager.

Cost: O(n) numpy copies plus one Python step per node (n / 252 for mapping trees).
"""

from __future__ import annotations

import numpy as np

from . import format as fmt
from .btree import BTree, Node, init_node
from .block import NODE_VALIDATOR


def _chunks(n: int, cap: int) -> list[tuple[int, int]]:
    """Split n entries into nodes of at most ``cap``, none (except a lone root) under cap // 3."""
    if n <= cap:
        return [(0, n)]
    bounds = list(range(0, n, cap)) + [n]
    spans = [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
    a, z = spans[-1]
    if z - a < cap // 3:
        pa, _ = spans[-2]
        mid = pa + (z - pa) // 2
        spans[-2:] = [(pa, mid), (mid, z)]
    return spans


def build(tree: BTree, keys: np.ndarray, values: np.ndarray) -> int:
    """Build a new tree holding ``keys`` (sorted, unique) -> ``values``; returns its root."""
    if len(keys) == 0:
        return tree.empty()
    tm = tree.tm
    level_keys = np.asarray(keys, dtype=fmt.U64)
    level_vals = np.asarray(values, dtype=tree.vt.dtype)
    flags, vsize, dtype = fmt.LEAF_NODE, tree.vt.size, tree.vt.dtype
    while True:
        cap = fmt.max_entries_for(vsize)
        spans = _chunks(len(level_keys), cap)
        firsts = np.empty(len(spans), fmt.U64)
        blocks = np.empty(len(spans), fmt.U64)
        for i, (a, z) in enumerate(spans):
            b, buf = tm.new_block(NODE_VALIDATOR)
            init_node(buf, flags, vsize)
            n = Node(b, buf, dtype if flags == fmt.LEAF_NODE else fmt.U64)
            n.keys[: z - a] = level_keys[a:z]
            n.values[: z - a] = level_vals[a:z]
            n.set_nr(z - a)
            firsts[i] = level_keys[a]
            blocks[i] = b
        if len(spans) == 1:
            return int(blocks[0])
        level_keys, level_vals = firsts, blocks
        flags, vsize, dtype = fmt.INTERNAL_NODE, 8, fmt.U64
