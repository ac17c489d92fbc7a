"""Damaged metadata: ``check`` finds it, ``thin_check`` agrees, ``repair`` recovers what is left.

One pool is built through the Pool API so that every kind of block exists: device 1 has an
internal mapping root over several leaves; snapshots 2, 3 and 4 (4 is a snapshot of 3) share its
leaves, so some leaves and roots have metadata counts of 3 (a metadata ref-count tree entry) and,
after copy-on-write in two devices, some data blocks have counts of 3 (a data ref-count tree
entry); device 5 is empty.

Each case damages one thing: a flipped bit (stale checksum) in each kind of block, or a
consistent but wrong block (edited and re-checksummed): a metadata or data reference count, a
leaked metadata block, keys out of order in a leaf, a leaf key below its parent's key, a pointer
cycle, a mapping past the end of the data device, a wrong ``mapped_blocks``, a device missing
from one of the two top trees. For every case:

* ``check`` is not clean (a leak is reported as kind ``leak``) and names the damaged block (the
  data block or the device, in its message, when the damage is not in a metadata block);
* ``thin_check`` 0.9.0 fails as well, except where spec sections 5.7 and 8 say it does not look
  (data reference counts, ``mapped_blocks``, mappings past the data device, a device with a
  mapping tree but no details);
* ``repair`` writes metadata that ``check`` and ``thin_check`` both pass, keeping every mapping
  that is still readable: for each device, the mappings of the subtrees the damage did not touch
  are all there and nothing else is invented; when only a space map, the superblock's padding or
  the details were damaged, every mapping of the original is there;
* our dump, ls and delta fail where ``thin_dump``, ``thin_ls`` and ``thin_delta`` fail, and print
  the same text where they do not (with two deliberate differences, listed in DELIBERATE).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from tests.tools.helpers import (copy_file, data_bitmaps, device_details, device_mappings,
                                 device_roots, flip_bit, get_count, metadata_bitmaps,
                                 node_value_offset, our_delta, our_dump, our_ls, raw_node,
                                 read_block, reseal_edit, set_count, superblock, tools_delta,
                                 tools_ls, tree_leaves)
from tests.tptools import assert_checks_pass
from tests.tptools import requires_tools, thin_check, thin_dump
from thinpool import Pool
from thinpool.metadata import format as fmt
from thinpool.tools.check import check
from thinpool.tools.repair import repair

pytestmark = requires_tools

MiB = 1 << 20


@dataclass
class Layout:
    path: Path                      # the pristine image (never changed)
    blocks: dict[str, int]          # what lives where
    mappings: dict[int, dict[int, int]]
    details: dict[int, tuple]
    nr_data_blocks: int


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Layout:
    d = tmp_path_factory.mktemp("damage")
    pool = Pool.create(d / "pool", data_size=64 * MiB)
    bs = pool.block_size
    v1 = pool.create_thin("v1", 1 << 30)
    for i in range(700):
        v1.write(3 * i * bs + i % 100, b"a")
    pool.snapshot("v1", "s2")
    pool.snapshot("v1", "s3")
    pool.snapshot("s3", "s4")
    for name, byte in (("v1", b"b"), ("s2", b"c")):
        for i in range(0, 30, 3):
            pool.volume(name).write(i * bs, byte)
    for i in range(690, 700):                  # copy-on-write of device 1's last leaf too
        v1.write(3 * i * bs, b"d")
    pool.create_thin("v5", 1 << 30)
    pool.close()
    path = d / "pool" / "metadata"
    sb = superblock(path)
    roots = device_roots(path)
    root1 = raw_node(path, roots[1])
    assert not root1.is_leaf, "device 1 needs an internal root"
    leaves1 = tree_leaves(path, roots[1])
    mbitmaps, dbitmaps = metadata_bitmaps(path), data_bitmaps(path)
    mrc, drc = sb.metadata_sm.ref_count_root, sb.data_sm.ref_count_root
    assert raw_node(path, mrc).keys and raw_node(path, drc).keys, "ref-count trees are empty"
    # A leaf only device 1 uses (count 1) and one that devices 1-4 share (through the roots).
    own = [b for b in leaves1 if get_count(path, mbitmaps, b) == 1]
    shared = [b for b in leaves1 if b in tree_leaves(path, roots[3]) and
              b in tree_leaves(path, roots[2])]
    shared_root = roots[3]
    assert roots[4] == shared_root and get_count(path, mbitmaps, shared_root) == 2
    unused = [b for b in range(sb.metadata_sm.nr_blocks - 1, 0, -1)
              if get_count(path, mbitmaps, b) == 0]
    blocks = {
        "superblock": 0,
        "details node": sb.device_details_root,
        "top-level node": sb.data_mapping_root,
        "mapping internal node": roots[1],
        "mapping leaf": own[-1],              # not the first leaf: its first key is > 0
        "shared mapping leaf": shared[0],
        "shared mapping root": shared_root,
        "metadata bitmap": mbitmaps[0],
        "data bitmap": dbitmaps[0],
        "metadata index block": sb.metadata_sm.bitmap_root,
        "data sm index node": sb.data_sm.bitmap_root,
        "metadata ref-count tree node": mrc,
        "data ref-count tree node": drc,
        "unused block": unused[0],
    }
    assert thin_check(path).returncode == 0 and check(path).clean
    return Layout(path, blocks, device_mappings(path), device_details(path),
                  sb.data_sm.nr_blocks)


# ---------------------------------------------------------------------------
# The damage
# ---------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    damage: Callable[[Path, Layout], int | None]     # returns the block check must name
    lost: str | None = None     # block whose subtree a repair may lose (None: nothing may be lost)
    thin_check_passes: bool = False   # 0.9.0 does not look at this (spec 5.7, 8)
    finding: str | None = None        # kind of finding expected, when it is a specific one
    details_lost: bool = False        # repair rebuilds every device's details


def flip(block_name: str, offset: int = 1000) -> Callable:
    def fn(path: Path, lay: Layout) -> int:
        b = lay.blocks[block_name]
        flip_bit(path, b, offset)
        return b
    return fn


def metadata_count(block_name: str, delta: int) -> Callable:
    def fn(path: Path, lay: Layout) -> int:
        b = lay.blocks[block_name]
        bitmaps = metadata_bitmaps(path)
        set_count(path, bitmaps, b, get_count(path, bitmaps, b) + delta)
        return b
    return fn


def data_count(value: int) -> Callable:
    def fn(path: Path, lay: Layout) -> None:
        # A data block mapped only by device 1's own leaf (copied on write): count 1.
        leaf = raw_node(path, lay.blocks["mapping leaf"])
        bitmaps = data_bitmaps(path)
        data = next(b for b in (struct.unpack("<Q", v)[0] >> 24 for v in leaf.values)
                    if get_count(path, bitmaps, b) == 1)
        set_count(path, bitmaps, data, value)
        fn.data_block = data
        return None
    return fn


def unsort_leaf(path: Path, lay: Layout) -> int:
    b = lay.blocks["mapping leaf"]

    def swap(buf: bytearray) -> None:
        nr, mx = struct.unpack_from("<II", buf, 16)
        assert nr > 10
        k = 32 + 8 * 5
        buf[k: k + 16] = buf[k + 8: k + 16] + buf[k: k + 8]          # keys 5 and 6
        v = 32 + 8 * mx + 8 * 5
        buf[v: v + 16] = buf[v + 8: v + 16] + buf[v: v + 8]          # and their values
    reseal_edit(path, b, fmt.BTREE_CSUM_XOR, swap)
    return b


def past_end(path: Path, lay: Layout) -> int:
    b = lay.blocks["mapping leaf"]
    off = node_value_offset(path, b, 2)

    def edit(buf: bytearray) -> None:
        (v,) = struct.unpack_from("<Q", buf, off)
        struct.pack_into("<Q", buf, off, ((lay.nr_data_blocks + 7) << 24) | (v & fmt.TIME_MASK))
    reseal_edit(path, b, fmt.BTREE_CSUM_XOR, edit)
    return b


def key_below_parent(path: Path, lay: Layout) -> int:
    """A leaf's first key moved below the key its parent gives it (keys still sorted)."""
    b = lay.blocks["mapping leaf"]
    first = raw_node(path, b).keys[0]
    assert first > 0
    reseal_edit(path, b, fmt.BTREE_CSUM_XOR, lambda buf: struct.pack_into("<Q", buf, 32, first - 1))
    return b


def cycle(path: Path, lay: Layout) -> int:
    """The internal root's pointer to its leaf becomes a pointer to the root itself."""
    b = lay.blocks["mapping internal node"]
    i = raw_node(path, b).values.index(struct.pack("<Q", lay.blocks["mapping leaf"]))
    off = node_value_offset(path, b, i)
    reseal_edit(path, b, fmt.BTREE_CSUM_XOR, lambda buf: struct.pack_into("<Q", buf, off, b))
    return b


def drop_last_entry(tree: str) -> Callable:
    """Remove device 5 (the last key) from the details or the top-level leaf."""
    def fn(path: Path, lay: Layout) -> None:
        b = lay.blocks[tree]
        assert raw_node(path, b).keys[-1] == 5

        def edit(buf: bytearray) -> None:
            (nr,) = struct.unpack_from("<I", buf, 16)
            struct.pack_into("<I", buf, 16, nr - 1)
            struct.pack_into("<Q", buf, 32 + 8 * (nr - 1), 0)
        reseal_edit(path, b, fmt.BTREE_CSUM_XOR, edit)
        return None
    return fn


def wrong_mapped_blocks(path: Path, lay: Layout) -> int:
    b = lay.blocks["details node"]
    off = node_value_offset(path, b, raw_node(path, b).keys.index(1))

    def edit(buf: bytearray) -> None:
        (n,) = struct.unpack_from("<Q", buf, off)
        struct.pack_into("<Q", buf, off, n + 1)
    reseal_edit(path, b, fmt.BTREE_CSUM_XOR, edit)
    return b


CASES = [
    # A flipped bit in each kind of block (stale checksum).
    Case("superblock", flip("superblock", 2000)),      # padding: the fields survive
    Case("details node", flip("details node"), details_lost=True),
    Case("top-level node", flip("top-level node"), lost="top-level node"),
    Case("mapping internal node", flip("mapping internal node"), lost="mapping internal node"),
    Case("mapping leaf", flip("mapping leaf"), lost="mapping leaf"),
    Case("shared mapping leaf", flip("shared mapping leaf"), lost="shared mapping leaf"),
    Case("metadata bitmap", flip("metadata bitmap")),
    Case("data bitmap", flip("data bitmap")),
    Case("metadata index block", flip("metadata index block")),
    Case("data sm index node", flip("data sm index node")),
    Case("metadata ref-count tree node", flip("metadata ref-count tree node")),
    Case("data ref-count tree node", flip("data ref-count tree node")),
    # Consistent but wrong.
    Case("metadata count too low", metadata_count("mapping leaf", -1), finding="metadata_count"),
    Case("shared metadata count too low", metadata_count("shared mapping root", -1),
         finding="metadata_count"),
    Case("metadata leak", metadata_count("unused block", +1), finding="leak"),
    Case("data count too low", data_count(0), thin_check_passes=True, finding="data_count"),
    Case("data count too high", data_count(2), thin_check_passes=True, finding="data_leak"),
    Case("unsorted leaf", unsort_leaf, lost="mapping leaf", finding="keys_unsorted"),
    Case("mapping past the data device", past_end, lost="mapping leaf", thin_check_passes=True,
         finding="mapping_past_end"),
    Case("leaf key below its parent's", key_below_parent, lost="mapping leaf",
         finding="key_out_of_range"),
    Case("pointer cycle", cycle, lost="mapping leaf"),   # regression: check recursed forever
    Case("device missing from the details", drop_last_entry("details node"),
         thin_check_passes=True, finding="missing_details", details_lost=True),
    Case("device missing from the top level", drop_last_entry("top-level node"),
         finding="missing_tree"),
    Case("wrong mapped_blocks", wrong_mapped_blocks, thin_check_passes=True,
         finding="mapped_blocks"),
]


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
def damaged(request, layout, tmp_path):
    case: Case = request.param
    path = copy_file(layout.path, tmp_path / "damaged.img")
    block = case.damage(path, layout)
    return case, path, block


def test_check_reports_the_damage(damaged):
    case, path, block = damaged
    report = check(path)
    if case.finding == "leak":
        leaks = [f for f in report.findings if f.kind == "leak"]
        assert [f.block for f in leaks] == [block], [str(f) for f in report.findings]
        assert not report.clean
        return
    assert not report.clean, f"{case.name}: check found nothing"
    kinds = {f.kind for f in report.errors}
    if case.finding:
        assert case.finding in kinds, [str(f) for f in report.findings]
    if block is not None:
        named = [f for f in report.errors if f.block == block]
        assert named, f"no finding names block {block}: {[str(f) for f in report.errors]}"
        if case.finding:
            assert any(f.kind == case.finding for f in named)
    elif case.finding in ("data_count", "data_leak"):     # a data block: named in the message
        data = case.damage.data_block
        assert any(f"data block {data}:" in f.message for f in report.errors)
    else:                                                  # a device: named in the message
        assert any("device 5 " in f.message for f in report.errors if f.kind == case.finding)


def test_thin_check_disagrees_only_where_it_does_not_look(damaged):
    case, path, _ = damaged
    r = thin_check(path)
    if case.thin_check_passes:
        assert r.returncode == 0, r.stderr
    else:
        assert r.returncode != 0, f"{case.name}: thin_check passed"
    if case.finding == "leak":          # non-fatal in 0.9.0
        assert thin_check(path, "--ignore-non-fatal-errors").returncode == 0


def test_repair_recovers_every_readable_mapping(damaged, layout, tmp_path):
    case, path, _ = damaged
    out = tmp_path / "repaired.img"
    report = repair(path, out)
    assert_checks_pass(out)
    rep = check(out)
    assert rep.clean, [str(f) for f in rep.errors]
    assert not [f for f in rep.findings if f.kind == "leak"]
    got = device_mappings(out)
    assert set(got) == set(layout.mappings), "devices lost or invented"
    skip = None if case.lost is None else layout.blocks[case.lost]
    readable = device_mappings(layout.path, skip)
    for dev, original in layout.mappings.items():
        kept = readable.get(dev, {})
        assert got[dev].items() >= kept.items(), f"device {dev}: readable mappings lost"
        assert got[dev].items() <= original.items(), f"device {dev}: mappings invented"
        if case.lost is None:
            assert got[dev] == original
    assert report.mappings == sum(len(m) for m in got.values())
    # mapped_blocks matches the trees again; undamaged details are kept.
    details = device_details(out)
    for dev, (mapped, trans, ctime, stime) in details.items():
        assert mapped == len(got[dev])
        if not case.details_lost:
            assert (trans, ctime, stime) == layout.details[dev][1:]
    assert our_dump(out) == thin_dump(out)
    if case.lost is None and not case.details_lost:
        assert thin_dump(out) == thin_dump(layout.path)


def test_repair_loses_exactly_the_damaged_mapping_past_the_end(layout, tmp_path):
    path = copy_file(layout.path, tmp_path / "damaged.img")
    past_end(path, layout)
    lost_vblock = raw_node(layout.path, layout.blocks["mapping leaf"]).keys[2]
    repair(path, tmp_path / "out.img")
    expected = {dev: dict(m) for dev, m in layout.mappings.items()}
    del expected[1][lost_vblock]            # the leaf is device 1's alone
    assert device_mappings(tmp_path / "out.img") == expected


def test_pristine_image_reads_as_built(layout):
    """The damage fixture really holds every kind of block named above."""
    b = layout.blocks
    assert len(set(b.values())) == len(b)
    assert read_block(layout.path, b["metadata index block"])[:4] != bytes(4)
    assert not raw_node(layout.path, b["data sm index node"]).keys == []
    assert set(layout.mappings) == {1, 2, 3, 4, 5} and layout.mappings[5] == {}


# ---------------------------------------------------------------------------
# dump, ls and delta on damaged metadata
# ---------------------------------------------------------------------------

#: Where our readers differ from 0.9.0 on purpose: thin_dump follows a pointer cycle and prints
#: a device's mappings over and over, ours stops with "a cycle?"; thin_ls and thin_delta open the
#: metadata space map first and fail on a bad index block, ours never read the space maps.
DELIBERATE = {("pointer cycle", "dump"), ("pointer cycle", "ls"), ("pointer cycle", "delta 1 2"),
              ("metadata index block", "ls"), ("metadata index block", "delta 1 2"),
              ("metadata index block", "delta 3 5")}


def test_dump_ls_delta_fail_where_the_tools_fail_and_agree_elsewhere(damaged):
    """Where 0.9.0's thin_dump, thin_ls or thin_delta refuse damaged metadata, ours refuse it
    too (naming the block); where they accept it, ours print the same text.

    Regressions: keys out of order, or outside the parent's range, used to be dumped, listed and
    compared as they were (MetadataReader now refuses them); ls listed a device whose mapping
    tree is gone as an empty device (device_usage now refuses it)."""
    from thinpool.errors import ThinpoolError

    case, path, block = damaged
    ops = {"dump": (lambda: our_dump(path), lambda: thin_dump(path)),
           "ls": (lambda: our_ls(path), lambda: tools_ls(path)),
           "delta 1 2": (lambda: our_delta(path, 1, 2, True), lambda: tools_delta(path, 1, 2, True)),
           "delta 3 5": (lambda: our_delta(path, 3, 5), lambda: tools_delta(path, 3, 5))}
    for name, (ours, theirs) in ops.items():
        try:
            expected = theirs()
        except AssertionError:            # the tool exited non-zero
            expected = None
        try:
            got = ours()
        except ThinpoolError as e:
            got = e
        if (case.name, name) in DELIBERATE:
            assert (expected is None) != isinstance(got, ThinpoolError), (case.name, name)
            continue
        if expected is None:
            assert isinstance(got, ThinpoolError), f"{name}: the tool refuses, ours printed"
            if block is not None and hasattr(got, "block"):
                assert got.block == block, f"{name}: {got}"
        else:
            assert got == expected, f"{name}: {got}"
