"""Shared helpers for the metadata tests: building pools, checking invariants, editing blocks.

Everything here reads through the library's own trees but checks the on-disk rules independently
(spec section 4.3 and 5.6/5.7): node layout per tree kind, key order, separator keys, minimum
fill, equal leaf depth, and reference counts recomputed by :func:`expected_counts`.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

from tests.tptools import assert_checks_pass
from tests.tptools import XmlDevice, XmlSuperblock, parse_xml, thin_dump
from thinpool.metadata import format as fmt
from thinpool.metadata.block import INDEX_VALIDATOR
from thinpool.metadata.btree import BTree
from thinpool.metadata.checksum import seal
from thinpool.metadata.space_map import INDEX_VT, REF_COUNT_VT
from thinpool.metadata.thin_metadata import ThinMetadata
from thinpool.metadata.walker import expected_counts

MIB = 1 << 20
BS = fmt.BLOCK_SIZE


def new_metadata_file(path: os.PathLike | str, size: int = 16 * MIB) -> pathlib.Path:
    """A zero-filled sparse file of ``size`` bytes."""
    p = pathlib.Path(path)
    with open(p, "wb") as f:
        f.truncate(size)
    return p


def format_pool(tmp_path: pathlib.Path, nr_data_blocks: int = 1 << 20, *,
                size: int = 16 * MIB, data_block_size: int = 128,
                name: str = "meta.img") -> ThinMetadata:
    """A freshly formatted pool on a sparse file under ``tmp_path``."""
    path = new_metadata_file(tmp_path / name, size)
    return ThinMetadata.format(path, data_block_size, nr_data_blocks)


# ---------------------------------------------------------------------------
# Structural invariants
# ---------------------------------------------------------------------------


def check_tree(tree: BTree, root: int, leaf_value_size: int, *, what: str = "tree",
               zero_tail: bool = True) -> tuple[int, int]:
    """Assert spec 4.3 (plus equal depth and exact separators) for the tree at ``root``.

    ``zero_tail`` also requires unused key slots to be zero, which our writer promises (spec 4.1
    says "write them as zero") but thin_restore and the kernel do not.

    Returns ``(depth, number of keys)``; depth 1 is a lone leaf. Shared subtrees are walked once
    per parent, which is what each tree's own invariants need.
    """
    leaf_max = fmt.max_entries_for(leaf_value_size)
    leaf_depths: set[int] = set()
    last_key: list[int] = [-1]
    nkeys = 0

    def visit(b: int, depth: int, is_root: bool, parent_key: int | None) -> None:
        nonlocal nkeys
        n = tree.node(b)
        where = f"{what}: node {b} at depth {depth}"
        if n.is_leaf:
            assert n.vsize == leaf_value_size, f"{where}: leaf value_size {n.vsize}"
            assert n.max == leaf_max, f"{where}: leaf max_entries {n.max}"
        else:
            assert n.flags == fmt.INTERNAL_NODE, f"{where}: flags {n.flags}"
            assert n.vsize == 8 and n.max == 252, f"{where}: internal layout {n.vsize}/{n.max}"
        assert n.nr <= n.max
        if not is_root:
            assert n.nr >= n.max // 3, f"{where}: {n.nr} entries < {n.max // 3}"
        raw = [int(k) for k in n.keys[: n.nr]]
        assert all(a < b2 for a, b2 in zip(raw, raw[1:])), f"{where}: keys not increasing"
        if parent_key is not None:
            assert raw and raw[0] == parent_key, \
                f"{where}: parent key {parent_key} != first key {raw[:1]}"
        if zero_tail:
            assert not n.keys[n.nr:].any(), f"{where}: stale keys beyond nr_entries"
        if n.is_leaf:
            leaf_depths.add(depth)
            if raw:
                assert raw[0] > last_key[0], f"{where}: leaf keys overlap the previous leaf"
                last_key[0] = raw[-1]
            nkeys += n.nr
            return
        assert n.nr >= 1, f"{where}: empty internal node"
        for k, c in zip(raw, n.values[: n.nr].tolist()):
            visit(int(c), depth + 1, False, k)

    visit(root, 1, True, None)
    assert len(leaf_depths) <= 1, f"{what}: leaves at depths {sorted(leaf_depths)}"
    return (leaf_depths.pop() if leaf_depths else 1), nkeys


def check_all_trees(meta: ThinMetadata, *, zero_tail: bool = True) -> dict[str, object]:
    """Check every tree reachable from the committed superblock.

    Returns ``{tree name: (depth, number of keys)}`` (``"devices"`` maps each device id to its
    pair)."""
    sb = meta.sb
    tm = meta.tm
    z = zero_tail
    out: dict[str, object] = {}
    out["details"] = check_tree(meta.details_tree, sb.device_details_root, 24, what="details",
                                zero_tail=z)
    out["top"] = check_tree(meta.top_tree, sb.data_mapping_root, 8, what="top level", zero_tail=z)
    out["data index"] = check_tree(BTree(tm, INDEX_VT), sb.data_sm.bitmap_root, 16,
                                   what="data index", zero_tail=z)
    out["data ref counts"] = check_tree(BTree(tm, REF_COUNT_VT), sb.data_sm.ref_count_root, 4,
                                        what="data ref counts", zero_tail=z)
    out["metadata ref counts"] = check_tree(BTree(tm, REF_COUNT_VT), sb.metadata_sm.ref_count_root,
                                            4, what="metadata ref counts", zero_tail=z)
    devs = {}
    for k, root in meta.top_tree.items(sb.data_mapping_root):
        devs[k] = check_tree(meta.mapping_tree, int(root), 8, what=f"device {k}", zero_tail=z)
    out["devices"] = devs
    # Ref-count tree entries exist exactly for counts >= 3.
    for name, sm in (("data", meta.data_sm), ("metadata", meta.metadata_sm)):
        tree = BTree(tm, REF_COUNT_VT)
        keys = [k for k, _ in tree.items(sm.ref_count_root)]
        counts = sm.all_counts()
        assert keys == np.flatnonzero(counts >= 3).tolist(), f"{name} ref-count tree entries"
        for k, v in tree.items(sm.ref_count_root):
            assert int(v) == int(counts[k])
    return out


def assert_counts_match(meta: ThinMetadata) -> None:
    """Both space maps hold exactly the reference counts recomputed from the committed trees."""
    em, ed = expected_counts(meta)
    mc, dc = meta.metadata_sm.all_counts(), meta.data_sm.all_counts()
    mdiff = np.flatnonzero(em != mc)
    assert len(mdiff) == 0, (
        f"metadata counts differ at {mdiff[:10].tolist()}: expected {em[mdiff[:10]].tolist()}, "
        f"space map {mc[mdiff[:10]].tolist()}")
    ddiff = np.flatnonzero(ed != dc)
    assert len(ddiff) == 0, (
        f"data counts differ at {ddiff[:10].tolist()}: expected {ed[ddiff[:10]].tolist()}, "
        f"space map {dc[ddiff[:10]].tolist()}")


def assert_summaries_exact(meta: ThinMetadata) -> None:
    """nr_allocated, nr_free and none_free_before on disk match the bitmaps (spec 5.3)."""
    E = fmt.ENTRIES_PER_BITMAP
    sb = meta.sb
    for name, sm, root in (("data", meta.data_sm, sb.data_sm), ("metadata", meta.metadata_sm, sb.metadata_sm)):
        assert root.nr_blocks == sm.nr_blocks, name
        assert root.nr_allocated == int(np.count_nonzero(sm.all_counts())), f"{name} nr_allocated"
    ibuf = meta.tm.read(sb.metadata_sm.bitmap_root, INDEX_VALIDATOR)
    entries = [fmt.INDEX_ENTRY.unpack_from(ibuf, 16 + 16 * i) for i in range(fmt.MAX_METADATA_BITMAPS)]
    n_md = -(-meta.metadata_sm.nr_blocks // E)
    assert all(e == (0, 0, 0) for e in entries[n_md:]), "unused metadata index entries are zero"
    data_entries = []
    for _, vals in BTree(meta.tm, INDEX_VT).leaves(sb.data_sm.bitmap_root):
        data_entries.extend((int(v["blocknr"]), int(v["nr_free"]), int(v["none_free_before"])) for v in vals)
    for name, sm, ents in (("metadata", meta.metadata_sm, entries[:n_md]), ("data", meta.data_sm, data_entries)):
        assert len(ents) == -(-sm.nr_blocks // E), f"{name}: number of index entries"
        counts = sm.all_counts()
        for i, (_, nr_free, nfb) in enumerate(ents):
            seg = counts[i * E: (i + 1) * E]
            free = np.flatnonzero(seg == 0)
            assert nr_free == len(free), f"{name} bitmap {i}: nr_free {nr_free} != {len(free)}"
            assert nfb <= (int(free[0]) if len(free) else len(seg)), f"{name} bitmap {i}: none_free_before"


def full_check(meta: ThinMetadata, *, tools: bool = True, zero_tail: bool = True) -> None:
    """Every independent check of a committed pool; ``tools`` adds the real thin_check.

    Pass ``zero_tail=False`` for pools that started as thin_restore output (stale unused slots)."""
    assert not meta.has_changes()
    check_all_trees(meta, zero_tail=zero_tail)
    assert_counts_match(meta)
    assert_summaries_exact(meta)
    if tools:
        assert_checks_pass(meta.bm.path)


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


def read_mappings(meta: ThinMetadata, dev: int) -> dict[int, tuple[int, int]]:
    """A device's mappings as ``{vblock: (data_block, time)}`` read through ``meta.mappings``."""
    out: dict[int, tuple[int, int]] = {}
    for ks, vs in meta.mappings(dev):
        assert ks.dtype == np.uint64 and vs.dtype == np.uint64
        for k, v in zip(ks.tolist(), vs.tolist()):
            assert k not in out
            out[k] = (v >> 24, v & 0xFFFFFF)
    return out


def metadata_as_xml(meta: ThinMetadata) -> XmlSuperblock:
    """What thin_dump should print for ``meta``, built from the library's reading of it."""
    sb = XmlSuperblock(uuid="", time=meta.time, transaction=meta.trans_id, flags=meta.sb.flags,
                       version=meta.sb.version, data_block_size=meta.data_block_size,
                       nr_data_blocks=meta.nr_data_blocks)
    for dev in meta.device_ids():
        d = meta.device(dev)
        sb.devices[dev] = XmlDevice(dev, d.mapped_blocks, d.transaction_id, d.creation_time,
                                    d.snapshotted_time, read_mappings(meta, dev))
    return sb


def dump(path: os.PathLike | str) -> XmlSuperblock:
    """thin_dump's view of a metadata file."""
    return parse_xml(thin_dump(path))


# ---------------------------------------------------------------------------
# Editing blocks in a file
# ---------------------------------------------------------------------------


def read_block(path: os.PathLike | str, b: int) -> bytearray:
    with open(path, "rb") as f:
        f.seek(b * BS)
        return bytearray(f.read(BS))


def write_block(path: os.PathLike | str, b: int, data: bytes) -> None:
    assert len(data) == BS
    with open(path, "r+b") as f:
        f.seek(b * BS)
        f.write(data)


def flip_byte(path: os.PathLike | str, b: int, offset: int, mask: int = 0xFF) -> None:
    """XOR one byte of block ``b`` with ``mask`` (leaves the checksum stale)."""
    buf = read_block(path, b)
    buf[offset] ^= mask
    write_block(path, b, bytes(buf))


def edit_and_reseal(path: os.PathLike | str, b: int, salt: int, fn) -> None:
    """Apply ``fn(buf)`` to block ``b`` and recompute its checksum (a consistent, wrong block)."""
    buf = read_block(path, b)
    fn(buf)
    seal(buf, salt)
    write_block(path, b, bytes(buf))


