"""Check pool metadata: walk every structure, report every problem, change nothing.

Stricter than ``thin_check`` 0.9.0. Each problem is a :class:`Finding` with the block, the
structure it belongs to, the path of blocks from that structure's root and the key range the block
was reached for. Findings of severity ``error`` make the metadata unclean (CLI exit 3); ``info``
findings (space-map summaries that disagree with the bitmaps, which ``thin_restore`` itself leaves
behind and which the kernel only uses as hints) are reported but do not.

What is verified:

* the superblock: checksum, location, magic, version, feature flags, block sizes;
* every B-tree node of every tree (device details, top-level and per-device mapping trees, the
  data space map's index tree, both ref-count trees): checksum, location, flags, value size,
  ``max_entries``, entry count, the one-third minimum for non-root nodes, keys strictly increasing
  and inside the range the parent gave, all leaves at one depth;
* the space maps: index block, every bitmap (checksum, location), bitmap value 3 if and only if
  the ref-count tree has an entry of at least 3;
* metadata reference counts against the references found (too low is damage, too high a leak);
* data reference counts against the mapping leaves (one reference per value per distinct leaf),
  mappings past the end of the data device, ``mapped_blocks`` against the mapping trees, devices
  present in only one of the two trees;
* with a held metadata snapshot, its superblock copy and trees as well.

Costs: one read of every reachable metadata block; O(mappings) numpy work; memory O(metadata
blocks + data blocks). Mapping trees, the bulk of the metadata, are walked a level at a time with
vectorised checks; a tree in which that finds anything is walked again node by node, which is
what reports it (so findings never depend on the fast path).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from ..errors import CorruptBlock, MetadataError
from ..metadata import format as fmt
from ..metadata.block import (BITMAP_VALIDATOR, INDEX_VALIDATOR, NODE_VALIDATOR,
                              SUPERBLOCK_VALIDATOR, BlockManager)
from ..metadata.btree import Node
from ..metadata.space_map import decode_bitmap
from ..metadata.walker import child_ranges, parse_nodes

E = fmt.ENTRIES_PER_BITMAP


@dataclass
class Finding:
    kind: str
    message: str
    block: int | None = None
    structure: str = ""
    path: tuple = ()
    key_range: tuple | None = None
    severity: str = "error"

    def __str__(self) -> str:
        where = []
        if self.block is not None:
            where.append(f"block {self.block}")
        if self.structure:
            where.append(self.structure)
        if self.path:
            where.append("path " + "->".join(str(b) for b in self.path))
        if self.key_range is not None:
            lo, hi = self.key_range
            where.append(f"keys [{lo}..{'' if hi is None else hi})")
        return f"{self.message} ({', '.join(where)})" if where else self.message

    def as_dict(self) -> dict:
        d = asdict(self)
        d["path"] = list(self.path)
        d["key_range"] = None if self.key_range is None else list(self.key_range)
        return d


@dataclass
class CheckReport:
    findings: list[Finding] = field(default_factory=list)
    transaction_id: int | None = None
    nr_devices: int = 0
    nr_mappings: int = 0
    metadata_blocks_used: int = 0
    data_blocks_used: int = 0

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def clean(self) -> bool:
        return not self.errors

    def as_dict(self) -> dict:
        return {"clean": self.clean, "transaction_id": self.transaction_id,
                "nr_devices": self.nr_devices, "nr_mappings": self.nr_mappings,
                "metadata_blocks_used": self.metadata_blocks_used,
                "data_blocks_used": self.data_blocks_used,
                "findings": [f.as_dict() for f in self.findings]}


#: Nodes read at a time by the bulk walk (8 MiB of buffer).
_CHUNK = 2048

_TREES = {  # structure name -> leaf value size
    "device details": 24, "top-level mapping tree": 8, "mapping tree": 8,
    "data space map index": 16, "metadata ref-count tree": 4, "data ref-count tree": 4,
}


class Checker:
    def __init__(self, path, progress: Callable[[int], None] | None = None):
        self.bm = BlockManager(path, read_only=True, cache_blocks=64)
        self.report = CheckReport()
        self.progress = progress or (lambda n: None)
        self.nr_meta = self.bm.nr_blocks
        self.refs = np.zeros(self.nr_meta, np.int64)
        self.visited: set[int] = set()
        self.children: dict[int, list[int]] = {}
        self.leaf_nr: dict[int, int] = {}
        self.data_parts: list[np.ndarray] = []
        self.leaf_values: dict[int, np.ndarray] = {}

    def close(self) -> None:
        self.bm.close()

    # -- helpers -----------------------------------------------------------------------------
    def add(self, kind: str, message: str, **kw) -> None:
        self.report.findings.append(Finding(kind, message, **kw))

    def ref(self, b: int, structure: str, path: tuple = ()) -> bool:
        if b >= self.nr_meta:
            self.add("out of range", f"reference to block {b} past the end of the metadata device "
                     f"({self.nr_meta} blocks)", block=b, structure=structure, path=path)
            return False
        self.refs[b] += 1
        return True

    def read(self, b: int, validator, structure: str, path: tuple = (), key_range=None) -> bytes | None:
        try:
            return self.bm.read(b, validator)
        except CorruptBlock as e:
            self.add(e.check.replace(" ", "_"), f"{e.kind}: {e.check}" + (f": {e.detail}" if e.detail else ""),
                     block=b, structure=structure, path=path, key_range=key_range)
        except MetadataError as e:
            self.add("unreadable", str(e), block=b, structure=structure, path=path, key_range=key_range)
        return None

    # -- B-trees -----------------------------------------------------------------------------
    def walk(self, structure: str, root: int, on_leaf=None) -> None:
        vsize = _TREES[structure]
        dtype = {8: fmt.U64, 24: fmt.DETAILS_DTYPE, 16: fmt.INDEX_DTYPE, 4: fmt.U32}[vsize]
        leaf_depths: set[int] = set()
        stack = [(root, 0, None, 0, (root,))]
        while stack:
            b, lo, hi, depth, path = stack.pop()
            if not self.ref(b, structure, path[:-1]):
                continue
            if b in self.visited:
                continue
            self.visited.add(b)
            raw = self.read(b, NODE_VALIDATOR, structure, path, (lo, hi))
            if raw is None:
                continue
            try:
                n = Node(b, raw, dtype)
            except CorruptBlock as e:
                self.add("value_size", f"btree node: {e.check}: {e.detail}", block=b,
                         structure=structure, path=path, key_range=(lo, hi))
                continue
            rng = (lo, hi)
            if n.max != fmt.max_entries_for(n.vsize):
                self.add("max_entries", f"max_entries {n.max} is not {fmt.max_entries_for(n.vsize)} "
                         f"for value size {n.vsize}", block=b, structure=structure, path=path, key_range=rng)
            if depth > 0 and n.nr < n.max // 3:
                self.add("underfull", f"non-root node has {n.nr} entries, fewer than {n.max // 3}",
                         block=b, structure=structure, path=path, key_range=rng)
            if n.nr:
                if n.nr > 1 and not (n.keys[1: n.nr] > n.keys[: n.nr - 1]).all():
                    self.add("keys_unsorted", "keys are not strictly increasing", block=b,
                             structure=structure, path=path, key_range=rng)
                first, last = int(n.keys[0]), int(n.keys[n.nr - 1])
                if first < lo or (hi is not None and last >= hi):
                    self.add("key_out_of_range", f"keys {first}..{last} fall outside the range "
                             f"the parent gives", block=b, structure=structure, path=path, key_range=rng)
            if n.is_leaf:
                leaf_depths.add(depth)
                self.leaf_nr[b] = n.nr
                if on_leaf is not None and n.nr:
                    on_leaf(b, n, path)
            else:
                kids = [int(c) for c in n.values[: n.nr]]
                self.children[b] = kids
                ks = [int(k) for k in n.keys[: n.nr]]
                for i in range(len(kids) - 1, -1, -1):
                    clo = ks[i]
                    chi = ks[i + 1] if i + 1 < len(ks) else hi
                    stack.append((kids[i], clo, chi, depth + 1, path + (kids[i],)))
        if len(leaf_depths) > 1:
            self.add("unbalanced", f"leaves at different depths {sorted(leaf_depths)}", block=root,
                     structure=structure)

    def walk_mapping_tree(self, root: int, nr_data: int | None) -> None:
        """:meth:`walk` of one mapping tree, with the leaves' data blocks added to ``data_parts``
        (and, given ``nr_data``, mappings past the data device reported). Tries
        :meth:`_bulk_mapping_walk` first; if that finds anything to report, the node-by-node walk
        does the whole tree again and says what it is."""
        if self._bulk_mapping_walk(root, nr_data):
            return
        s = "mapping tree"

        def leaf(b, n, path):
            blocks = (n.values[: n.nr] >> np.uint64(fmt.TIME_BITS)).astype(np.int64)
            self.data_parts.append(blocks)
            past = blocks >= nr_data if nr_data is not None else None
            if past is not None and past.any():
                i = int(np.flatnonzero(past)[0])
                self.add("mapping_past_end", f"virtual block {int(n.keys[i])} maps to data block "
                         f"{int(blocks[i])}, past the data device ({nr_data} blocks)"
                         + (f" and {int(past.sum()) - 1} more" if past.sum() > 1 else ""),
                         block=b, structure=s, path=path)

        self.walk(s, root, leaf)

    def _bulk_mapping_walk(self, root: int, nr_data: int | None) -> bool:
        """The same walk a level at a time (``BlockManager.read_nodes`` and numpy over all the
        new nodes of a level), for a tree with nothing to report. Returns False, having changed
        nothing, at the first sign of trouble: a node that fails its validator or any check of
        :meth:`walk`, a block reached twice within this tree (the node-by-node walk's order then
        decides which arrival is checked), a mapping past the data device."""
        arrivals: list[np.ndarray] = []
        seen: set[int] = set()                    # nodes first reached by this walk
        leaf_nr: dict[int, int] = {}
        children: dict[int, list[int]] = {}
        parts: list[np.ndarray] = []
        level = np.array([root], np.int64)        # this level's arrivals, in the walk's order
        lo = np.zeros(1, np.uint64)               # the key range each arrival is given: [lo, hi)
        hi = np.zeros(1, np.uint64)
        no_hi = np.ones(1, bool)                  # (no upper bound: the right edge)
        depth = 0
        while len(level):
            if int(level.max()) >= self.nr_meta or int(level.min()) < 0:
                return False
            arrivals.append(level)
            first = []
            for i, b in enumerate(level.tolist()):
                if b in seen:
                    return False
                if b not in self.visited:         # else: an earlier tree's node, only counted
                    seen.add(b)
                    first.append(i)
            if not first:
                break
            idx = np.array(first, np.int64)
            new = level[idx]
            got = [self._bulk_nodes(new[c:c + _CHUNK], lo[idx][c:c + _CHUNK], hi[idx][c:c + _CHUNK],
                                    no_hi[idx][c:c + _CHUNK], depth, nr_data)
                   for c in range(0, len(new), _CHUNK)]
            if any(g is None for g in got) or len({g[0] for g in got}) != 1:
                return False
            nr = np.concatenate([g[1] for g in got])
            if got[0][0]:
                parts.extend(g[3] for g in got)
                leaf_nr.update(zip(new.tolist(), nr.tolist()))
                break
            keys = np.concatenate([g[2] for g in got])
            kids = np.concatenate([g[3] for g in got]).astype(np.int64)
            ends = np.cumsum(nr)
            for b, a, z in zip(new.tolist(), (ends - nr).tolist(), ends.tolist()):
                children[b] = kids[a:z].tolist()
            level = kids
            lo, hi, no_hi = child_ranges(keys, nr, hi[idx], no_hi[idx])
            depth += 1
        # Nothing to report: record what the node-by-node walk would have recorded.
        for a in arrivals:
            np.add.at(self.refs, a, 1)
        self.visited |= seen
        self.leaf_nr.update(leaf_nr)
        self.children.update(children)
        self.data_parts.extend(parts)
        return True

    def _bulk_nodes(self, blocks, lo, hi, no_hi, depth: int, nr_data: int | None):
        """Read and check one chunk of a level's new nodes for :meth:`_bulk_mapping_walk`
        (:func:`~thinpool.metadata.walker.parse_nodes`, plus the one-third minimum and the data
        device's end). Returns None on any trouble, else (is_leaf, entry counts, keys, values),
        where a leaf's values are its data blocks and its keys are not kept."""
        nodes = self.bm.read_nodes(blocks)
        got = None if nodes is None else parse_nodes(nodes, fmt.U64, lo, hi, no_hi)
        if got is None:
            return None
        is_leaf, nr, _, vals = got
        if depth > 0 and (nr < fmt.max_entries_for(_TREES["mapping tree"]) // 3).any():
            return None
        if not is_leaf:
            return got
        data = (vals >> np.uint64(fmt.TIME_BITS)).astype(np.int64)
        if nr_data is not None and len(data) and int(data.max()) >= nr_data:
            return None
        return True, nr, None, data

    def count_below(self, b: int, memo: dict[int, int]) -> int:
        if b in memo:
            return memo[b]
        memo[b] = 0             # a pointer cycle back to ``b`` adds nothing (and ends here)
        if b in self.leaf_nr:
            c = self.leaf_nr[b]
        else:
            c = sum(self.count_below(k, memo) for k in self.children.get(b, ()))
        memo[b] = c
        return c

    # -- the whole check ---------------------------------------------------------------------
    def run(self) -> CheckReport:
        raw = self.read(0, SUPERBLOCK_VALIDATOR, "superblock")
        if raw is None:
            return self.report
        sb = fmt.Superblock.unpack(raw)
        self.report.transaction_id = sb.trans_id
        if not self._check_superblock(sb, "superblock"):
            return self.report
        self.ref(0, "superblock")
        msm, dsm = sb.metadata_sm, sb.data_sm
        if msm.nr_blocks > self.nr_meta:
            self.add("sm_size", f"metadata space map covers {msm.nr_blocks} blocks, the device has "
                     f"{self.nr_meta}", block=0, structure="superblock")
        # Space maps.
        meta_counts = self._metadata_space_map(msm)
        data_counts = self._data_space_map(dsm)
        # Trees.
        details = self._details(sb.device_details_root)
        roots: dict[int, int] = {}

        def top_leaf(b, n, path):
            for k, v in zip(n.keys[: n.nr].tolist(), n.values[: n.nr].tolist()):
                roots[k] = v

        self.walk("top-level mapping tree", sb.data_mapping_root, top_leaf)
        self._mappings(roots, details, dsm.nr_blocks)
        if sb.metadata_snap:
            self._held_root(sb.metadata_snap)
        # Reference counts.
        self._compare_metadata(meta_counts, msm.nr_blocks)
        self._compare_data(data_counts, dsm.nr_blocks)
        self.report.nr_devices = len(roots)
        return self.report

    def _check_superblock(self, sb: fmt.Superblock, structure: str) -> bool:
        ok = True
        if sb.magic != fmt.THIN_MAGIC:
            self.add("magic", f"bad magic {sb.magic:#x}", block=0, structure=structure)
            return False
        if sb.version not in fmt.SUPPORTED_VERSIONS:
            self.add("version", f"unsupported version {sb.version}", block=0, structure=structure)
        if sb.incompat_flags or sb.compat_ro_flags:
            self.add("features", f"unknown feature flags incompat={sb.incompat_flags:#x} "
                     f"compat_ro={sb.compat_ro_flags:#x}", block=0, structure=structure)
        if sb.metadata_block_size != fmt.METADATA_BLOCK_SECTORS:
            self.add("block_size", f"metadata block size {sb.metadata_block_size} is not 8 sectors",
                     block=0, structure=structure)
            ok = False
        dbs = sb.data_block_size
        if not (fmt.MIN_DATA_BLOCK_SECTORS <= dbs <= fmt.MAX_DATA_BLOCK_SECTORS and dbs % 128 == 0):
            self.add("block_size", f"data block size {dbs} sectors is invalid", block=0, structure=structure)
        return ok

    def _metadata_space_map(self, root: fmt.SpaceMapRoot) -> np.ndarray | None:
        s = "metadata space map"
        nr = min(root.nr_blocks, fmt.MAX_METADATA_BLOCKS)
        counts = np.zeros(nr, np.int64)
        if not self.ref(root.bitmap_root, s):
            return None
        ibuf = self.read(root.bitmap_root, INDEX_VALIDATOR, s)
        if ibuf is None:
            return None
        for i in range((nr + E - 1) // E):
            loc, nr_free, nfb = fmt.INDEX_ENTRY.unpack_from(ibuf, 16 + 16 * i)
            self._bitmap(i, loc, nr_free, nfb, counts, s, (root.bitmap_root,))
        self._overflow(root.ref_count_root, counts, "metadata ref-count tree")
        self._summary(root, counts, s)
        return counts

    def _data_space_map(self, root: fmt.SpaceMapRoot) -> np.ndarray | None:
        s = "data space map"
        counts = np.zeros(root.nr_blocks, np.int64)
        entries: dict[int, tuple] = {}

        def index_leaf(b, n, path):
            for k, v in zip(n.keys[: n.nr].tolist(), n.values[: n.nr]):
                entries[k] = (int(v["blocknr"]), int(v["nr_free"]), int(v["none_free_before"]), path)

        self.walk("data space map index", root.bitmap_root, index_leaf)
        want = (root.nr_blocks + E - 1) // E
        for i in range(want):
            if i not in entries:
                self.add("missing_bitmap", f"the index has no entry for bitmap {i}",
                         block=root.bitmap_root, structure=s)
                continue
            loc, nr_free, nfb, path = entries[i]
            self._bitmap(i, loc, nr_free, nfb, counts, s, path)
        extra = sorted(set(entries) - set(range(want)))
        if extra:
            self.add("extra_bitmap", f"index entries past the end: bitmaps {extra[:5]}",
                     block=root.bitmap_root, structure=s)
        self._overflow(root.ref_count_root, counts, "data ref-count tree")
        self._summary(root, counts, s)
        return counts

    def _bitmap(self, i, loc, nr_free, nfb, counts, s, path) -> None:
        if not self.ref(loc, s, path):
            return
        raw = self.read(loc, BITMAP_VALIDATOR, s, path + (loc,), (i * E, (i + 1) * E))
        if raw is None:
            return
        vals = decode_bitmap(raw)
        seg = counts[i * E: (i + 1) * E]
        seg[:] = vals[: len(seg)]
        free = np.flatnonzero(seg == 0)
        if nr_free not in (len(free), E - (len(seg) - len(free)) if len(seg) < E else len(free)):
            self.add("summary", f"bitmap {i}: index says {nr_free} free, the bitmap has {len(free)}",
                     block=loc, structure=s, severity="info")
        if len(free) and nfb > int(free[0]):
            self.add("summary", f"bitmap {i}: none_free_before {nfb} is past free entry {int(free[0])}",
                     block=loc, structure=s, severity="info")

    def _overflow(self, root: int, counts: np.ndarray, s: str) -> None:
        seen: dict[int, int] = {}

        def leaf(b, n, path):
            for k, v in zip(n.keys[: n.nr].tolist(), n.values[: n.nr].tolist()):
                if k >= len(counts):
                    self.add("out of range", f"ref count for block {k} past the end of the space map",
                             block=b, structure=s, path=path)
                    continue
                if v < 3:
                    self.add("ref_count", f"ref-count tree holds count {v} (< 3) for block {k}",
                             block=b, structure=s, path=path)
                if counts[k] != 3:
                    self.add("ref_count", f"ref-count tree has block {k} but its bitmap entry is "
                             f"{int(counts[k])}, not 3", block=b, structure=s, path=path)
                seen[k] = v

        self.walk(s, root, leaf)
        threes = np.flatnonzero(counts == 3)
        for k in threes.tolist():
            if k in seen:
                counts[k] = seen[k]
            else:
                self.add("ref_count", f"block {k} has bitmap value 3 but no ref-count tree entry",
                         block=root, structure=s)

    def _summary(self, root: fmt.SpaceMapRoot, counts: np.ndarray, s: str) -> None:
        used = int(np.count_nonzero(counts))
        if s.startswith("metadata"):
            self.report.metadata_blocks_used = used
        else:
            self.report.data_blocks_used = used
        if root.nr_allocated != used:
            self.add("summary", f"nr_allocated says {root.nr_allocated}, the bitmaps have {used}",
                     block=0, structure=s, severity="info")

    def _details(self, root: int) -> dict[int, tuple]:
        details: dict[int, tuple] = {}

        def leaf(b, n, path):
            for k, v in zip(n.keys[: n.nr].tolist(), n.values[: n.nr]):
                details[k] = (int(v["mapped_blocks"]), b, path)

        self.walk("device details", root, leaf)
        return details

    def _mappings(self, roots: dict[int, int], details: dict[int, tuple], nr_data: int) -> None:
        s = "mapping tree"
        memo: dict[int, int] = {}
        for n_done, (dev, root) in enumerate(sorted(roots.items())):
            self.walk_mapping_tree(root, nr_data)
            mapped = self.count_below(root, memo)
            self.report.nr_mappings += mapped
            d = details.get(dev)
            if d is None:
                self.add("missing_details", f"device {dev} has a mapping tree but no details",
                         block=root, structure=s)
            elif d[0] != mapped:
                self.add("mapped_blocks", f"device {dev}: details say {d[0]} mapped blocks, "
                         f"its tree has {mapped}", block=d[1], structure="device details", path=d[2])
            self.progress(n_done + 1)
        for dev in sorted(set(details) - set(roots)):
            self.add("missing_tree", f"device {dev} has details but no mapping tree",
                     block=details[dev][1], structure="device details")

    def _held_root(self, b: int) -> None:
        s = "held metadata snapshot"
        if not self.ref(b, s):
            return
        raw = self.read(b, SUPERBLOCK_VALIDATOR, s)
        if raw is None:
            return
        held = fmt.Superblock.unpack(raw)
        if held.magic != fmt.THIN_MAGIC:
            self.add("magic", "held snapshot superblock has a bad magic", block=b, structure=s)
            return
        # Its trees share nodes with the live ones: walk them for references, descending only
        # into nodes the live walk has not seen (the walker skips those by itself).
        self.walk("device details", held.device_details_root)
        subtrees: list[int] = []

        def top_leaf(blk, n, path):
            subtrees.extend(int(v) for v in n.values[: n.nr])

        self.walk("top-level mapping tree", held.data_mapping_root, top_leaf)

        for r in subtrees:
            self.walk_mapping_tree(r, None)

    def _compare_metadata(self, counts: np.ndarray | None, nr_blocks: int) -> None:
        if counts is None:
            return
        n = min(len(counts), len(self.refs))
        exp, got = self.refs[:n], counts[:n]
        for b in np.flatnonzero(got < exp)[:100].tolist():
            self.add("metadata_count", f"metadata block {b}: reference count {int(got[b])}, "
                     f"but {int(exp[b])} references found", block=b, structure="metadata space map")
        for b in np.flatnonzero(got > exp)[:100].tolist():
            self.add("leak", f"metadata block {b}: reference count {int(got[b])}, but "
                     f"{int(exp[b])} references found (leaked)", block=b, structure="metadata space map")
        if len(self.refs) > n and self.refs[n:].any():
            b = n + int(np.flatnonzero(self.refs[n:])[0])
            self.add("out of range", f"block {b} is in use but outside the metadata space map",
                     block=b, structure="metadata space map")

    def _compare_data(self, counts: np.ndarray | None, nr_blocks: int) -> None:
        if counts is None:
            return
        exp = np.zeros(len(counts), np.int64)
        if self.data_parts:
            blocks = np.concatenate(self.data_parts)
            blocks = blocks[blocks < len(counts)]
            exp += np.bincount(blocks, minlength=len(counts))[: len(counts)]
        for b in np.flatnonzero(counts < exp)[:100].tolist():
            self.add("data_count", f"data block {b}: reference count {int(counts[b])}, but mapped "
                     f"{int(exp[b])} time(s)", block=None, structure="data space map")
        for b in np.flatnonzero(counts > exp)[:100].tolist():
            self.add("data_leak", f"data block {b}: reference count {int(counts[b])}, but mapped "
                     f"{int(exp[b])} time(s)", block=None, structure="data space map")


def check(path, progress=None) -> CheckReport:
    """Check the metadata at ``path`` (file or block device), including a held metadata
    snapshot if there is one. Never writes."""
    c = Checker(path, progress)
    try:
        return c.run()
    finally:
        c.close()
