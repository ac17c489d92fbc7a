"""A generic persistent B-tree in the kernel's on-disk node format (dm-btree).

One :class:`BTree` object serves one kind of tree; what the values mean is supplied by a
:class:`ValueType` (numpy dtype plus ``inc``/``dec``/``equal`` callbacks, the kernel's
``dm_btree_value_type``). Reference-count side effects happen only in those callbacks:

* ``inc(values)`` runs when a shared leaf is copied (every value gains a parent);
* ``dec(values)`` runs when values leave the tree: an overwritten value (unless ``equal``), a
  removed key, every value of a leaf freed by :meth:`BTree.delete`.

A tree is named by its root block. Every mutating call returns the new root (the root moves when
it is shadowed for the first time in a transaction) and never touches the caller's other trees.

Invariants kept (what ``thin_check`` enforces): keys strictly increasing in a node and across
leaves; internal key ``i`` equals the first key below child ``i``; all leaves at one depth;
every non-root node holds at least ``max_entries // 3`` entries; an empty tree is an empty leaf.

Algorithms, all top-down with a shadow spine like the kernel's:

* insert: a full node on the path is split before it is entered (a full root is split beneath
  itself, so the root block never moves because of a split); O(depth) node copies at most.
  ``insert_run`` makes the same descent once per leaf a sorted run of keys lands in, then merges
  (or, past the leaf's last key, appends) as many of them as fit.
* remove: before entering a child that holds only the minimum it is rebalanced with its
  siblings so it holds more than the minimum; two siblings merge when they fit in one node with room to spare, three become two
  when they fit, otherwise entries are spread evenly. A root with a single child absorbs it.
* delete: depth first; a node shared with another tree is only decremented.

Values are numpy scalars of the value type's dtype: ``np.uint64`` for 8-byte values, structured
records for details and index entries. Costs: lookup O(depth) node reads (cached below);
insert/remove O(depth) plus O(max_entries) shifting per node.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from ..errors import CorruptBlock, InvalidArgument
from . import format as fmt
from .block import NODE_VALIDATOR
from .transaction import TransactionManager

_HDR = fmt.NODE_HEADER


#: No valid tree is this deep (even 1/3-full nodes of u64 keys stay under 12 levels); a longer
#: path means damaged metadata with a cycle, which must not make a reader loop forever.
MAX_DEPTH = 64


def _too_deep(root: int, b: int) -> CorruptBlock:
    return CorruptBlock(b, "btree node", "tree deeper than any valid tree (a cycle?)",
                        f"more than {MAX_DEPTH} levels below root {root}")


def _noop(values: np.ndarray) -> None:
    return None


@dataclass
class ValueType:
    """How a tree's values are stored and what holding one means for reference counts."""

    name: str
    dtype: np.dtype
    inc: Callable[[np.ndarray], None] = _noop
    dec: Callable[[np.ndarray], None] = _noop
    equal: Callable[[object, object], bool] | None = None

    @property
    def size(self) -> int:
        return self.dtype.itemsize

    @property
    def max_entries(self) -> int:
        return fmt.max_entries_for(self.size)


class Node:
    """numpy views over one node's buffer. Writable when the buffer is a ``bytearray``."""

    __slots__ = ("block", "buf", "flags", "nr", "max", "vsize", "keys", "values", "_klist")

    def __init__(self, block: int, buf, leaf_dtype: np.dtype):
        self.block = block
        self.buf = buf
        self._klist = None
        _, flags, _, nr, mx, vs, _ = _HDR.unpack_from(buf, 0)
        self.flags = flags
        self.nr = nr
        self.max = mx
        self.vsize = vs
        leaf = flags == fmt.LEAF_NODE
        dt = leaf_dtype if leaf else fmt.U64
        if vs != dt.itemsize:
            kind = "leaf" if leaf else "internal node"
            raise CorruptBlock(block, "btree node", "wrong value size",
                               f"{kind} has value_size {vs}, expected {dt.itemsize}")
        self.keys = np.frombuffer(buf, fmt.U64, mx, 32)
        self.values = np.frombuffer(buf, dt, mx, 32 + 8 * mx)

    @property
    def is_leaf(self) -> bool:
        return self.flags == fmt.LEAF_NODE

    def set_nr(self, n: int) -> None:
        old = self.nr
        if n < old:  # keep unused slots zero
            self.keys[n:old] = 0
            self.values[n:old] = np.zeros(old - n, self.values.dtype)
        self.nr = n
        _HDR.pack_into(self.buf, 0, 0, self.flags, 0, n, self.max, self.vsize, 0)

    def key_list(self) -> list[int]:
        """The keys as a Python list, computed once: only for nodes that never change (clean)."""
        k = self._klist
        if k is None:
            k = self._klist = self.keys[: self.nr].tolist()
        return k

    def lower(self, key: int) -> int:
        """Index of the largest key <= ``key``, or -1."""
        return int(np.searchsorted(self.keys[: self.nr], np.uint64(key), side="right")) - 1


def init_node(buf: bytearray, flags: int, value_size: int) -> None:
    mx = fmt.max_entries_for(value_size)
    buf[:] = bytes(fmt.BLOCK_SIZE)
    _HDR.pack_into(buf, 0, 0, flags, 0, 0, mx, value_size, 0)


class BTree:
    """Operations on trees of one value type inside one transaction manager."""

    def __init__(self, tm: TransactionManager, vt: ValueType):
        self.tm = tm
        self.vt = vt
        self._clean: dict[int, Node] = {}     # parsed clean nodes, checked by buffer identity

    # -- node access -------------------------------------------------------------------------
    def node(self, b: int) -> Node:
        return Node(b, self.tm.read(b, NODE_VALIDATOR), self.vt.dtype)

    def node_ro(self, b: int) -> Node:
        """A node to read, not to change. Clean nodes (immutable ``bytes`` from the block cache)
        are parsed once and reused while the block cache holds the same buffer."""
        buf = self.tm.read(b, NODE_VALIDATOR)
        if type(buf) is not bytes:
            return Node(b, buf, self.vt.dtype)
        cache = self._clean
        n = cache.get(b)
        if n is not None and n.buf is buf:
            return n
        n = Node(b, buf, self.vt.dtype)
        if len(cache) >= 8192:
            cache.clear()
        cache[b] = n
        return n

    def _new_node(self, flags: int) -> Node:
        b, buf = self.tm.new_block(NODE_VALIDATOR)
        vs = self.vt.size if flags == fmt.LEAF_NODE else 8
        init_node(buf, flags, vs)
        return Node(b, buf, self.vt.dtype)

    def _shadow(self, b: int) -> Node:
        nb, buf, shared = self.tm.shadow(b, NODE_VALIDATOR)
        n = Node(nb, buf, self.vt.dtype)
        if shared:
            self._inc_children(n)
        return n

    def _inc_children(self, n: Node) -> None:
        """A copy of a shared node is one more parent for each of its children."""
        if not n.nr:
            return
        if n.is_leaf:
            self.vt.inc(n.values[: n.nr].copy())
        else:
            for c in n.values[: n.nr].tolist():
                self.tm.inc(c)

    def empty(self) -> int:
        """Allocate an empty tree (one empty leaf) and return its root."""
        return self._new_node(fmt.LEAF_NODE).block

    # -- reading -----------------------------------------------------------------------------
    def lookup(self, root: int, key: int):
        b = root
        for _ in range(MAX_DEPTH):
            n = self.node_ro(b)
            i = bisect_right(n.key_list(), key) - 1 if type(n.buf) is bytes else n.lower(key)
            if i < 0:
                return None
            if n.is_leaf:
                return n.values[i] if int(n.keys[i]) == key else None
            b = int(n.values[i])
        raise _too_deep(root, b)

    def leaves(self, root: int, lo: int = 0, hi: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (keys, values) array pairs, leaf by leaf, for keys in [lo, hi), in key order."""
        stack = [(root, 1)]
        while stack:
            b, depth = stack.pop()
            if depth > MAX_DEPTH:
                raise _too_deep(root, b)
            n = self.node_ro(b)
            if type(n.buf) is bytes:
                kl = n.key_list()
                a = bisect_left(kl, lo) if lo else 0
                z = n.nr if hi is None else bisect_left(kl, hi)
                if not n.is_leaf and lo:
                    a = max(bisect_right(kl, lo) - 1, 0)
            else:
                keys = n.keys[: n.nr]
                a = int(np.searchsorted(keys, np.uint64(lo), side="left")) if lo else 0
                z = n.nr if hi is None else int(np.searchsorted(keys, np.uint64(hi), side="left"))
                if not n.is_leaf and lo:
                    a = max(n.lower(lo), 0)
            if n.is_leaf:
                if a < z:
                    yield n.keys[a:z].copy(), n.values[a:z].copy()
                continue
            stack.extend((c, depth + 1) for c in reversed(n.values[a:z].tolist()))

    def last_key(self, root: int) -> int | None:
        """The largest key in the tree, or None when it is empty: O(depth) node reads."""
        b = root
        for _ in range(MAX_DEPTH):
            n = self.node_ro(b)
            if not n.nr:
                return None
            if n.is_leaf:
                return int(n.keys[n.nr - 1])
            b = int(n.values[n.nr - 1])
        raise _too_deep(root, b)

    def items(self, root: int, lo: int = 0, hi: int | None = None) -> Iterator[tuple[int, object]]:
        for keys, values in self.leaves(root, lo, hi):
            yield from zip(keys.tolist(), values.tolist() if values.dtype.names is None else values)

    def count(self, root: int) -> int:
        return sum(len(k) for k, _ in self.leaves(root))

    # -- insert ------------------------------------------------------------------------------
    def _full(self, n: Node, key: int) -> bool:
        if n.nr < n.max:
            return False
        if n.is_leaf:
            i = n.lower(key)
            return not (i >= 0 and int(n.keys[i]) == key)
        return True

    def insert(self, root: int, key: int, value, *, callbacks: bool = True):
        """Insert or overwrite ``key``. Returns (new_root, old_value or None)."""
        n = self._shadow_root(root, key)
        root = n.block
        hi = None
        while not n.is_leaf:
            n, hi = self._step_down(n, key, hi)
        i = int(np.searchsorted(n.keys[: n.nr], np.uint64(key), side="left"))
        if i < n.nr and int(n.keys[i]) == key:
            old = n.values[i].copy()
            n.values[i] = value
            if callbacks and not (self.vt.equal and self.vt.equal(old, value)):
                self.vt.dec(np.atleast_1d(old))
            return root, old
        self._insert_at(n, i, key, value)
        return root, None

    def insert_run(self, root: int, keys: np.ndarray, values: np.ndarray, *, callbacks: bool = True):
        """Insert or overwrite many keys (strictly increasing) with one descent per leaf they
        land in, instead of one per key. Returns (new_root, number of keys that were new, the
        overwritten old values as an array).

        The same tree results as from inserting the keys one by one in order, except for where
        splits fall: each descent splits full nodes on its path exactly as :meth:`insert` does,
        then merges as many of the following keys into the leaf as belong below it and fit."""
        keys = np.asarray(keys, fmt.U64)
        values = np.asarray(values, self.vt.dtype)
        total = len(keys)
        if total > 1 and not bool(np.all(keys[1:] > keys[:-1])):
            raise InvalidArgument("insert_run needs strictly increasing keys")
        added = 0
        olds = []
        i = 0
        while i < total:
            key = int(keys[i])
            n = self._shadow_root(root, key)
            root = n.block
            hi = None                            # keys below this bound belong in this subtree
            while not n.is_leaf:
                n, hi = self._step_down(n, key, hi)
            # The keys of this run that go into leaf n: below hi, and as many new ones as fit.
            z = total if hi is None else i + int(np.searchsorted(keys[i:], np.uint64(hi), side="left"))
            nr = n.nr
            if (nr == 0 or key > int(n.keys[nr - 1])) and nr < n.max:
                # All of them after the leaf's last key (sequential writes): append, no merge.
                take = min(z - i, n.max - nr)
                n.keys[nr: nr + take] = keys[i: i + take]
                n.values[nr: nr + take] = values[i: i + take]
                n.set_nr(nr + take)
                added += take
                i += take
                continue
            lk = n.keys[:nr]
            chunk = keys[i:z]
            pos = np.searchsorted(lk, chunk, side="left")
            exists = pos < nr
            exists[exists] = lk[pos[exists]] == chunk[exists]
            room = n.max - nr
            fresh_seen = np.cumsum(~exists)
            if room < int(fresh_seen[-1]):       # take the longest prefix whose new keys fit
                z = i + int(np.searchsorted(fresh_seen, room, side="right"))
                if z == i:                       # leaf full and the first key new: split first
                    root, old = self.insert(root, key, values[i], callbacks=callbacks)
                    if old is None:
                        added += 1
                    else:
                        olds.append(np.atleast_1d(old))
                    i += 1
                    continue
                chunk, pos, exists = chunk[: z - i], pos[: z - i], exists[: z - i]
            vals = values[i:z]
            if exists.any():
                at = pos[exists]
                old = n.values[at].copy()
                n.values[at] = vals[exists]
                if callbacks:
                    if self.vt.equal is not None:
                        keep = np.array([not self.vt.equal(a, b) for a, b in zip(old, vals[exists])], bool)
                        self.vt.dec(old[keep])
                    else:
                        self.vt.dec(old)
                olds.append(old)
            new = ~exists
            k = int(new.sum())
            if k:
                merged_k = np.concatenate([lk, chunk[new]])
                merged_v = np.concatenate([n.values[:nr], vals[new]])
                order = np.argsort(merged_k, kind="stable")
                n.keys[: nr + k] = merged_k[order]
                n.values[: nr + k] = merged_v[order]
                n.set_nr(nr + k)
                added += k
            i = z
        old_all = np.concatenate(olds) if olds else np.zeros(0, self.vt.dtype)
        return root, added, old_all

    def _shadow_root(self, root: int, key: int) -> Node:
        """The first step of an insert: the root shadowed, and split beneath itself if full."""
        n = self._shadow(root)
        if self._full(n, key):
            self._split_beneath(n)
        return n

    def _step_down(self, n: Node, key: int, hi: int | None) -> tuple[Node, int | None]:
        """One step of an insert's descent from internal node ``n`` towards ``key``: the child is
        shadowed (and split first if full) and returned with the bound below which keys belong
        in it (``hi`` is the bound of ``n``; None: no bound)."""
        i = n.lower(key)
        if i < 0:
            i = 0
            n.keys[0] = key
        child = self._shadow(int(n.values[i]))
        n.values[i] = child.block
        if i + 1 < n.nr:
            hi = int(n.keys[i + 1])
        if self._full(child, key):
            right = self._split(child)
            sep = int(right.keys[0])
            self._insert_at(n, i + 1, sep, right.block)
            if key >= sep:
                child = right
            else:
                hi = sep
        return child, hi

    @staticmethod
    def _insert_at(n: Node, i: int, key: int, value) -> None:
        nr = n.nr
        if i < nr:
            n.keys[i + 1: nr + 1] = n.keys[i:nr].copy()
            n.values[i + 1: nr + 1] = n.values[i:nr].copy()
        n.keys[i] = key
        n.values[i] = value
        n.set_nr(nr + 1)

    def _split_beneath(self, n: Node) -> None:
        """Split a full root into two new children; the root stays in place as an internal node."""
        left = self._new_node(n.flags)
        right = self._new_node(n.flags)
        nr = n.nr
        h = nr // 2
        left.keys[:h] = n.keys[:h]
        left.values[:h] = n.values[:h]
        left.set_nr(h)
        right.keys[: nr - h] = n.keys[h:nr]
        right.values[: nr - h] = n.values[h:nr]
        right.set_nr(nr - h)
        init_node(n.buf, fmt.INTERNAL_NODE, 8)
        root = Node(n.block, n.buf, self.vt.dtype)
        root.keys[0] = left.keys[0]
        root.values[0] = left.block
        root.keys[1] = right.keys[0]
        root.values[1] = right.block
        root.set_nr(2)
        # Let the caller's node object become the new internal root.
        for slot in Node.__slots__:
            setattr(n, slot, getattr(root, slot))

    def _split(self, n: Node) -> Node:
        """Move the upper half of ``n`` into a new right sibling, which is returned."""
        right = self._new_node(n.flags)
        nr = n.nr
        h = nr // 2
        right.keys[: nr - h] = n.keys[h:nr]
        right.values[: nr - h] = n.values[h:nr]
        right.set_nr(nr - h)
        n.set_nr(h)
        return right

    # -- remove ------------------------------------------------------------------------------
    def remove(self, root: int, key: int, *, callbacks: bool = True):
        """Remove ``key``. Returns (new_root, old_value or None); an absent key changes nothing."""
        if self.lookup(root, key) is None:
            return root, None
        n = self._shadow(root)
        root = n.block
        path: list[tuple[Node, int]] = []    # (shadowed parent, index of the child taken)
        while not n.is_leaf:
            if n.nr == 1:
                self._absorb_child(n)
                continue
            i = n.lower(key)
            probe = self.node(int(n.values[i]))
            if probe.nr <= probe.max // 3:
                # Only a child at the minimum could fall under it: rebalance that one first.
                self._rebalance(n, i)
                i = n.lower(key)
            child = self._shadow(int(n.values[i]))
            n.values[i] = child.block
            path.append((n, i))
            n = child
        i = n.lower(key)
        old = n.values[i].copy()
        nr = n.nr
        n.keys[i: nr - 1] = n.keys[i + 1: nr].copy()
        n.values[i: nr - 1] = n.values[i + 1: nr].copy()
        n.set_nr(nr - 1)
        if i == 0 and n.nr:
            # The leaf's first key changed: keep each separator above it equal to it.
            first = n.keys[0]
            for parent, j in reversed(path):
                parent.keys[j] = first
                if j:
                    break
        if callbacks:
            self.vt.dec(np.atleast_1d(old))
        return root, old

    def _absorb_child(self, n: Node) -> None:
        """A root with one child takes the child's contents; the tree gets one level shorter."""
        cb = int(n.values[0])
        shared = self.tm.sm.get(cb) > 1
        child = self.node(cb)
        n.buf[:] = child.buf
        fresh = Node(n.block, n.buf, self.vt.dtype)
        for slot in Node.__slots__:
            setattr(n, slot, getattr(fresh, slot))
        if shared:
            self._inc_children(n)
        self.tm.dec(cb)

    def _rebalance(self, parent: Node, i: int) -> None:
        """Give child ``i`` more than the minimum before a removal descends into it."""
        if i == 0:
            self._rebalance2(parent, 0)
        elif i == parent.nr - 1:
            self._rebalance2(parent, i - 1)
        else:
            self._rebalance3(parent, i - 1)

    def _children(self, parent: Node, first: int, count: int) -> list[Node]:
        out = []
        for j in range(first, first + count):
            c = self._shadow(int(parent.values[j]))
            parent.values[j] = c.block
            out.append(c)
        return out

    @staticmethod
    def _spread(nodes: list[Node], sizes: list[int]) -> None:
        keys = np.concatenate([n.keys[: n.nr] for n in nodes])
        vals = np.concatenate([n.values[: n.nr] for n in nodes])
        off = 0
        for n, s in zip(nodes, sizes):
            if s < n.nr:
                n.set_nr(s)
            n.keys[:s] = keys[off: off + s]
            n.values[:s] = vals[off: off + s]
            n.set_nr(s)
            off += s

    def _drop_child(self, parent: Node, j: int, child: Node) -> None:
        nr = parent.nr
        parent.keys[j: nr - 1] = parent.keys[j + 1: nr].copy()
        parent.values[j: nr - 1] = parent.values[j + 1: nr].copy()
        parent.set_nr(nr - 1)
        child.set_nr(0)
        self.tm.dec(child.block)

    def _rebalance2(self, parent: Node, j: int) -> None:
        left, right = self._children(parent, j, 2)
        total = left.nr + right.nr
        third = left.max // 3
        if total < 2 * (third + 1):
            self._spread([left, right], [total, 0])
            self._drop_child(parent, j + 1, right)
        else:
            h = total // 2
            self._spread([left, right], [h, total - h])
            parent.keys[j + 1] = right.keys[0]

    def _rebalance3(self, parent: Node, j: int) -> None:
        left, centre, right = self._children(parent, j, 3)
        total = left.nr + centre.nr + right.nr
        third = left.max // 3
        if total <= 4 * third:
            h = total // 2
            self._spread([left, centre, right], [h, 0, total - h])
            parent.keys[j + 2] = right.keys[0]
            self._drop_child(parent, j + 1, centre)
        else:
            a = total // 3
            b = (total - a) // 2
            self._spread([left, centre, right], [a, b, total - a - b])
            parent.keys[j + 1] = centre.keys[0]
            parent.keys[j + 2] = right.keys[0]

    # -- delete ------------------------------------------------------------------------------
    def delete(self, root: int) -> None:
        """Drop a whole tree: shared nodes are decremented, unshared ones freed with their values."""
        sm = self.tm.sm
        stack = [root]
        while stack:
            b = stack.pop()
            if sm.get(b) > 1:
                self.tm.dec(b)
                continue
            n = self.node(b)
            if n.is_leaf:
                if n.nr:
                    self.vt.dec(n.values[: n.nr].copy())
            else:
                stack.extend(n.values[: n.nr].tolist())
            self.tm.dec(b)
