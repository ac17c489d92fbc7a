"""Read-only traversal of pool metadata: one walker, many visitors.

The walker owns traversal, I/O and the skipping of nodes already visited (a node shared by several
trees is visited once, and every extra arrival is still reported as a reference, which is what
reference counting needs). Visitors only look: they never write, so a walk leaves the metadata
file byte-for-byte unchanged.

* :func:`walk_btree` visits every node of one tree (depth first, key order) and calls
  ``visitor.node(block, node, path)`` the first time a block is reached and
  ``visitor.reference(block)`` on every arrival, first included. ``path`` is the tuple of
  ``(block, key range)`` steps from the root.
* :class:`RefCountVisitor` plus :func:`expected_counts` recompute what both space maps must say,
  by the rules ``thin_check`` uses for metadata (one reference per parent pointer, shared nodes
  descended once) and the kernel's rule for data (one reference per value in each distinct mapping
  leaf).

Costs: O(distinct nodes) block reads; memory O(nr metadata blocks + nr data blocks) for the counts.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ..errors import CorruptBlock
from . import format as fmt
from .block import BITMAP_VALIDATOR, INDEX_VALIDATOR
from .btree import MAX_DEPTH, BTree, Node
from .space_map import INDEX_VT, REF_COUNT_VT
from .thin_metadata import ThinMetadata


class NodeVisitor(Protocol):
    def reference(self, block: int) -> None: ...

    def node(self, block: int, node: Node, path: tuple) -> None: ...


def walk_btree(tree: BTree, root: int, visitor: NodeVisitor, seen: set[int] | None = None,
               path: tuple = ()) -> None:
    """Visit every node below ``root`` once; report every reference."""
    seen = set() if seen is None else seen
    stack = [(root, path)]
    while stack:
        b, p = stack.pop()
        visitor.reference(b)
        if b in seen:
            continue
        seen.add(b)
        n = tree.node(b)
        here = p + (b,)
        visitor.node(b, n, here)
        if not n.is_leaf:
            stack.extend(reversed([(int(c), here) for c in n.values[: n.nr]]))


class RefCountVisitor:
    """Counts references to metadata blocks and to data blocks (from mapping leaves)."""

    def __init__(self, nr_metadata_blocks: int, nr_data_blocks: int):
        self.metadata = np.zeros(nr_metadata_blocks, np.int64)
        self.data = np.zeros(nr_data_blocks, np.int64)
        self.data_leaves = False
        self.top_leaves: list[np.ndarray] | None = None

    def reference(self, block: int) -> None:
        if block < len(self.metadata):
            self.metadata[block] += 1

    def node(self, block: int, node: Node, path: tuple) -> None:
        if self.top_leaves is not None and node.is_leaf:
            self.top_leaves.append(node.values[: node.nr].copy())
        if self.data_leaves and node.is_leaf and node.nr:
            blocks = (node.values[: node.nr] >> np.uint64(24)).astype(np.int64)
            blocks = blocks[blocks < len(self.data)]
            np.add.at(self.data, blocks, 1)


def expected_counts(meta: ThinMetadata) -> tuple[np.ndarray, np.ndarray]:
    """What the metadata and data space maps must hold for the committed state of ``meta``.

    Walks the superblock's trees (not in-memory changes), so commit first."""
    sb = meta.sb
    v = RefCountVisitor(meta.metadata_sm.nr_blocks, meta.data_sm.nr_blocks)
    v.reference(0)
    seen: set[int] = set()
    tm = meta.tm
    msm, dsm = sb.metadata_sm, sb.data_sm
    # Metadata space map: index block, bitmaps, ref-count tree.
    v.reference(msm.bitmap_root)
    ibuf = tm.read(msm.bitmap_root, INDEX_VALIDATOR)
    for i in range((msm.nr_blocks + fmt.ENTRIES_PER_BITMAP - 1) // fmt.ENTRIES_PER_BITMAP):
        loc = fmt.INDEX_ENTRY.unpack_from(ibuf, 16 + 16 * i)[0]
        tm.read(loc, BITMAP_VALIDATOR)
        v.reference(loc)
    walk_btree(BTree(tm, REF_COUNT_VT), msm.ref_count_root, v, seen)
    # Data space map: index tree (and the bitmaps it points at), ref-count tree.
    index = BTree(tm, INDEX_VT)
    walk_btree(index, dsm.bitmap_root, v, seen)
    for _, entries in index.leaves(dsm.bitmap_root):
        for loc in entries["blocknr"].tolist():
            tm.read(loc, BITMAP_VALIDATOR)
            v.reference(loc)
    walk_btree(BTree(tm, REF_COUNT_VT), dsm.ref_count_root, v, seen)
    # Device details and the two-level mapping tree.
    views = [sb]
    if sb.metadata_snap:
        from .block import SUPERBLOCK_VALIDATOR
        v.reference(sb.metadata_snap)
        views.append(fmt.Superblock.unpack(tm.read(sb.metadata_snap, SUPERBLOCK_VALIDATOR)))
    for view in views:
        walk_btree(meta.details_tree, view.device_details_root, v, seen)
        # Subtree roots are referenced once per distinct top-level leaf holding them.
        v.top_leaves = []
        walk_btree(meta.top_tree, view.data_mapping_root, v, seen)
        subtrees = [r for leaf in v.top_leaves for r in leaf.tolist()]
        v.top_leaves = None
        v.data_leaves = True
        for r in subtrees:
            walk_btree(meta.mapping_tree, r, v, seen)
        v.data_leaves = False
    return v.metadata, v.data


def checked_leaves(tree: BTree, root: int, sorted_by_caller: bool = False):
    """(keys, values) of every leaf below ``root`` in key order, like ``BTree.leaves`` but
    refusing what ``thin_dump`` refuses: keys that do not strictly increase inside a node, or
    that fall outside the range the parent node gives. Raises CorruptBlock naming the node.

    ``sorted_by_caller``: skip the per-leaf order check because the caller checks that all the
    leaves' keys together strictly increase (one vectorised pass) and calls again without the
    flag to name the node if they do not."""
    stack = [(root, 0, None, 1)]
    while stack:
        b, lo, hi, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise CorruptBlock(b, "btree node", "tree deeper than any valid tree (a cycle?)",
                               f"more than {MAX_DEPTH} levels below root {root}")
        n = tree.node_ro(b)
        keys = n.keys[: n.nr]
        if n.nr > 1 and not (sorted_by_caller and n.is_leaf) and not (keys[1:] > keys[:-1]).all():
            raise CorruptBlock(b, "btree node", "keys out of order")
        if n.nr and (int(keys[0]) < lo or (hi is not None and int(keys[-1]) >= hi)):
            end = "" if hi is None else hi
            raise CorruptBlock(b, "btree node", "keys outside the parent's range",
                               f"keys {int(keys[0])}..{int(keys[-1])}, range [{lo}..{end})")
        if n.is_leaf:
            yield keys.copy(), n.values[: n.nr].copy()
            continue
        ks = keys.tolist()
        kids = n.values[: n.nr].tolist()
        for i in range(len(kids) - 1, -1, -1):
            stack.append((int(kids[i]), ks[i], ks[i + 1] if i + 1 < len(ks) else hi, depth + 1))


#: Nodes per bulk read of :func:`level_arrays` (8 MiB of buffer at most).
LEVEL_CHUNK = 2048


def parse_nodes(nodes: np.ndarray, leaf_dtype: np.dtype, lo: np.ndarray, hi: np.ndarray,
                no_hi: np.ndarray):
    """Check a batch of nodes from one level of a tree (``(k, 4096)`` bytes that passed the node
    validator) and take their entries out: ``(is_leaf, nr_entries, keys, values)``, the keys and
    values of all the nodes one after another. Node i's keys must lie in ``[lo[i], hi[i])``
    (no upper bound where ``no_hi[i]``).

    None when the nodes are not all of one kind (internal, or leaves of ``leaf_dtype``), have
    another value size or ``max_entries``, an internal node is empty, or keys do not strictly
    increase inside a node or leave their range: the node-by-node walkers say which and why."""
    h = nodes.reshape(-1).view(fmt.NODE_BLOCK_DTYPE)
    flags = h["flags"]
    is_leaf = bool(flags[0] == fmt.LEAF_NODE)
    if not (flags == flags[0]).all():
        return None
    dtype = leaf_dtype if is_leaf else fmt.U64
    mx = fmt.max_entries_for(dtype.itemsize)
    nr = h["nr_entries"].astype(np.int64)
    if not ((h["value_size"] == dtype.itemsize).all() and (h["max_entries"] == mx).all()):
        return None
    if not is_leaf and not (nr > 0).all():
        return None
    present = np.arange(mx) < nr[:, None]
    keys = nodes[:, 32:32 + 8 * mx].view(fmt.U64)[present]
    values = nodes[:, 32 + 8 * mx: 32 + (8 + dtype.itemsize) * mx].view(dtype)[present]
    ends = np.cumsum(nr)
    starts = ends - nr
    if len(keys) > 1:
        within = np.ones(len(keys) - 1, bool)     # pairs of neighbours in the same node
        within[starts[starts > 0] - 1] = False
        if not (keys[1:] > keys[:-1])[within].all():
            return None
    full = nr > 0
    if not ((keys[starts[full]] >= lo[full]).all()
            and (no_hi[full] | (keys[(ends - 1)[full]] < hi[full])).all()):
        return None
    return is_leaf, nr, keys, values


def child_ranges(keys: np.ndarray, nr: np.ndarray, hi: np.ndarray, no_hi: np.ndarray):
    """The key ranges of the children of a level of internal nodes (their ``keys``, ``nr``
    entries each, node i bounded above by ``hi[i]`` unless ``no_hi[i]``): ``(lo, hi, no_hi)``
    per child, in order. A child's range runs from its key to the next key of its node, the
    last child's to its node's own bound."""
    ends = np.cumsum(nr)
    owner = np.repeat(np.arange(len(nr)), nr)
    last = np.zeros(len(keys), bool)
    last[ends - 1] = True
    nxt = np.empty(len(keys), np.uint64)
    nxt[:-1] = keys[1:]
    nxt[last] = hi[owner[last]]
    return keys, nxt, last & no_hi[owner]


def level_arrays(bm, root: int, leaf_dtype: np.dtype) -> tuple[np.ndarray, np.ndarray] | None:
    """Every (key, value) of the tree at ``root`` as two arrays in key order, read a level at a
    time with :meth:`BlockManager.read_nodes` (LEVEL_CHUNK nodes at a time) and checked with
    :func:`parse_nodes`; all leaves at one depth.

    Returns None when any of that fails, or a node fails its validator: then nothing is said
    about what is wrong (:func:`checked_leaves` says it). Costs O(nodes) in a few numpy passes
    plus one CRC call per node; memory: one level's keys and values, and LEVEL_CHUNK nodes."""
    blocks = np.array([root], np.int64)
    lo = np.zeros(1, np.uint64)           # node i's keys must lie in [lo[i], hi[i])
    hi = np.zeros(1, np.uint64)
    no_hi = np.ones(1, bool)              # hi[i] is no bound (rightmost spine)
    for _ in range(MAX_DEPTH):
        parts = []
        for c in range(0, len(blocks), LEVEL_CHUNK):
            z = c + LEVEL_CHUNK
            nodes = bm.read_nodes(blocks[c:z])
            got = None if nodes is None else parse_nodes(nodes, leaf_dtype, lo[c:z], hi[c:z], no_hi[c:z])
            if got is None or (parts and got[0] != parts[0][0]):
                return None
            parts.append(got)
        nr, keys, vals = (np.concatenate([p[i] for p in parts]) for i in (1, 2, 3))
        if parts[0][0]:
            return keys, vals
        blocks = vals.astype(np.int64)
        lo, hi, no_hi = child_ranges(keys, nr, hi, no_hi)
    return None


class MetadataReader:
    """Read-only access to the trees of a metadata device, live or through the held snapshot.

    Loads no space maps (cheap to open); never writes. ``metadata_snap=True`` reads the trees of
    the held metadata snapshot (``reserve_metadata_snap``), which a writer leaves intact.
    Every tree is read with :func:`checked_leaves`: keys out of order or outside their parent's
    range raise CorruptBlock, as ``thin_dump`` 0.9.0 refuses them."""

    def __init__(self, path, metadata_snap: bool = False):
        from ..errors import MetadataError, NotFound
        from .block import SUPERBLOCK_VALIDATOR, BlockManager
        from .btree import ValueType
        from .transaction import TransactionManager

        self.bm = BlockManager(path, read_only=True)
        try:
            raw = self.bm.read(0, SUPERBLOCK_VALIDATOR)
            self.sb = fmt.Superblock.unpack(raw)
            if self.sb.magic != fmt.THIN_MAGIC:
                raise MetadataError(f"{path} is not dm-thin pool metadata (bad magic {self.sb.magic:#x})")
            self.view = self.sb
            if metadata_snap:
                if not self.sb.metadata_snap:
                    raise NotFound(f"{path} has no held metadata snapshot")
                self.view = fmt.Superblock.unpack(self.bm.read(self.sb.metadata_snap, SUPERBLOCK_VALIDATOR))
        except BaseException:
            self.bm.close()
            raise
        self.tm = TransactionManager(self.bm, None)
        self.mapping_tree = BTree(self.tm, ValueType("mapping", fmt.U64))
        self.top_tree = BTree(self.tm, ValueType("top level", fmt.U64))
        self.details_tree = BTree(self.tm, ValueType("device details", fmt.DETAILS_DTYPE))
        self.metadata_snap = metadata_snap

    def close(self) -> None:
        self.bm.close()

    def __enter__(self) -> "MetadataReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def nr_data_blocks(self) -> int:
        return self.view.data_sm.nr_blocks     # a held snapshot's copy has it zeroed

    def details(self) -> dict[int, fmt.DeviceDetails]:
        out = {}
        for keys, vals in checked_leaves(self.details_tree, self.view.device_details_root):
            for k, v in zip(keys.tolist(), vals):
                out[k] = fmt.DeviceDetails(int(v["mapped_blocks"]), int(v["transaction_id"]),
                                           int(v["creation_time"]), int(v["snapshotted_time"]))
        return out

    def roots(self) -> dict[int, int]:
        leaves = checked_leaves(self.top_tree, self.view.data_mapping_root)
        return {k: int(v) for keys, vals in leaves for k, v in zip(keys.tolist(), vals.tolist())}

    def mappings(self, root: int, lo: int = 0, hi: int | None = None):
        """(virtual blocks, packed values) per leaf of the mapping tree at ``root``."""
        return self.mapping_tree.leaves(root, lo, hi)

    def device_arrays(self, root: int) -> tuple[np.ndarray, np.ndarray]:
        """All of a device's mappings as two arrays (virtual blocks, packed values).

        Read a level of the tree at a time (:func:`level_arrays`); if anything there looks wrong,
        read again node by node with :func:`checked_leaves`, which names what is wrong."""
        got = level_arrays(self.bm, root, fmt.U64)
        if got is not None:
            return got
        parts = list(checked_leaves(self.mapping_tree, root, sorted_by_caller=True))
        if not parts:
            return np.zeros(0, fmt.U64), np.zeros(0, fmt.U64)
        keys = np.concatenate([k for k, _ in parts])
        if len(keys) > 1 and not (keys[1:] > keys[:-1]).all():
            for _ in checked_leaves(self.mapping_tree, root):   # names the bad node
                pass
        return keys, np.concatenate([v for _, v in parts])
