"""Damaged metadata: every failure is a MetadataError that names the block.

A small pool is written by ThinMetadata, then single blocks are damaged: a flipped byte (stale
checksum), or a consistent but wrong block (edited and re-checksummed). Opening the pool, or
reading the tree that holds the block, must raise :class:`~thinpool.errors.CorruptBlock` (or at
least :class:`~thinpool.errors.MetadataError`) naming the block - never ``struct.error``,
``IndexError``, ``ValueError``, ``KeyError`` or a hang. Fuzzing with hypothesis covers random
superblock fields and random re-checksummed block contents.
"""

from __future__ import annotations

import contextlib
import signal
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.metadata.helpers import (BS, edit_and_reseal, flip_byte, format_pool, read_block,
                                    write_block)
from tests.tptools import assert_checks_pass
from tests.tptools import TOOLS_AVAILABLE
from thinpool.errors import (ChecksumMismatch, CorruptBlock, IncompatibleMetadata,
                             InvalidArgument, MetadataError)
from thinpool.metadata import format as fmt
from thinpool.metadata.block import (BITMAP_VALIDATOR, INDEX_VALIDATOR, NODE_VALIDATOR,
                                     SUPERBLOCK_VALIDATOR)
from thinpool.metadata.btree import BTree
from thinpool.metadata.space_map import INDEX_VT, REF_COUNT_VT
from thinpool.metadata.thin_metadata import ThinMetadata
from thinpool.metadata.walker import expected_counts, walk_btree

META_SIZE = 2 << 20          # 512 metadata blocks: small enough to copy per example
NR_DATA = 20_000


@dataclass(repr=False)
class Layout:
    """Where things are in the pristine image."""

    image: bytes
    kinds: dict[int, object]        # block -> validator
    blocks: dict[str, int]          # name -> block
    devices: dict[int, dict[int, tuple[int, int]]]

    def __repr__(self) -> str:          # keep hypothesis' failure reports short
        return f"Layout(blocks={self.blocks})"


class _Collect:
    def __init__(self) -> None:
        self.nodes: list[int] = []

    def reference(self, block: int) -> None:
        pass

    def node(self, block: int, node, path) -> None:
        self.nodes.append(block)


def _build(path: Path) -> Layout:
    meta = format_pool(path.parent, nr_data_blocks=NR_DATA, size=META_SIZE, name=path.name)
    meta.create_thin(1)
    blocks = meta.data_sm.alloc_run(2000)
    for i, b in enumerate(blocks.tolist()):            # two levels: internal root over leaves
        meta.insert(1, 2 * i, b)
    meta.create_thin(2)
    shared = meta.data_sm.alloc()
    meta.insert(2, 5, shared)
    for dev in (3, 4):                                 # data count 3: a ref-count tree entry
        meta.create_thin(dev)
        meta.data_sm.inc(shared)
        meta.insert(dev, 5, shared)
    meta.commit()
    meta.create_snap(5, 1)                             # a shared mapping root: metadata count 2
    meta.commit()
    sb = meta.sb
    kinds: dict[int, object] = {0: SUPERBLOCK_VALIDATOR, sb.metadata_sm.bitmap_root: INDEX_VALIDATOR}
    for b in meta.metadata_sm.bitmap_blocks + meta.data_sm.bitmap_blocks:
        kinds[b] = BITMAP_VALIDATOR
    col = _Collect()
    tm = meta.tm
    for tree, root in ((BTree(tm, REF_COUNT_VT), sb.metadata_sm.ref_count_root),
                       (BTree(tm, REF_COUNT_VT), sb.data_sm.ref_count_root),
                       (BTree(tm, INDEX_VT), sb.data_sm.bitmap_root),
                       (meta.details_tree, sb.device_details_root),
                       (meta.top_tree, sb.data_mapping_root)):
        walk_btree(tree, root, col)
    for dev in meta.device_ids():
        walk_btree(meta.mapping_tree, meta.roots[dev], col)
    for b in col.nodes:
        kinds[b] = NODE_VALIDATOR
    root1 = meta.mapping_tree.node(meta.roots[1])
    assert not root1.is_leaf
    names = {
        "superblock": 0,
        "metadata index": sb.metadata_sm.bitmap_root,
        "metadata bitmap": meta.metadata_sm.bitmap_blocks[0],
        "metadata ref-count root": sb.metadata_sm.ref_count_root,
        "data index root": sb.data_sm.bitmap_root,
        "data bitmap": meta.data_sm.bitmap_blocks[0],
        "data ref-count root": sb.data_sm.ref_count_root,
        "details root": sb.device_details_root,
        "top-level root": sb.data_mapping_root,
        "device 1 internal root": meta.roots[1],
        "device 1 leaf": int(root1.values[3]),
        "device 2 leaf": meta.roots[2],
    }
    assert len(set(names.values())) == len(names)
    devices = {}
    for dev in meta.device_ids():
        devices[dev] = {int(k): fmt.unpack_mapping(int(v))
                        for ks, vs in meta.mappings(dev) for k, v in zip(ks, vs)}
    meta.close()
    if TOOLS_AVAILABLE:
        assert_checks_pass(path)
    return Layout(path.read_bytes(), kinds, names, devices)


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Layout:
    return _build(tmp_path_factory.mktemp("corruption") / "pristine.img")


@pytest.fixture
def image(tmp_path, layout) -> Path:
    p = tmp_path / "meta.img"
    p.write_bytes(layout.image)
    return p


def read_everything(path: Path, *, counts: bool = True) -> None:
    """Open read-only and read every structure (each device's mappings, the recomputed counts)."""
    meta = ThinMetadata.open(path, read_only=True)
    try:
        for dev in meta.device_ids():
            for _ in meta.mappings(dev):
                pass
            meta.lookup(dev, 5)
        if counts:
            expected_counts(meta)
    finally:
        meta.close()


# ---------------------------------------------------------------------------
# One flipped byte
# ---------------------------------------------------------------------------

BLOCK_NAMES = ["superblock", "metadata index", "metadata bitmap", "metadata ref-count root",
               "data index root", "data bitmap", "data ref-count root", "details root",
               "top-level root", "device 1 internal root", "device 1 leaf", "device 2 leaf"]


@pytest.mark.parametrize("name", BLOCK_NAMES)
@pytest.mark.parametrize("offset", [0, 5, 40, 300, 4095])
def test_flipped_byte_names_the_block(image, layout, name: str, offset: int) -> None:
    b = layout.blocks[name]
    flip_byte(image, b, offset, 0x04)
    with pytest.raises(CorruptBlock) as exc:
        read_everything(image)
    e = exc.value
    assert e.block == b, f"{name}: error names block {e.block}: {e}"
    assert str(b) in str(e)
    assert isinstance(e, ChecksumMismatch)
    assert e.expected != e.got


@pytest.mark.parametrize("name", ["device 1 leaf", "device 2 leaf", "device 1 internal root"])
def test_damaged_mapping_tree_fails_only_when_read(image, layout, name: str) -> None:
    """Opening reads the top level only; the damaged device fails, the others still read."""
    b = layout.blocks[name]
    flip_byte(image, b, 1000)
    meta = ThinMetadata.open(image, read_only=True)
    dev = 1 if "device 1" in name else 2
    with pytest.raises(CorruptBlock) as exc:
        list(meta.mappings(dev))
    assert exc.value.block == b
    other = 3
    got = {int(k): fmt.unpack_mapping(int(v)) for ks, vs in meta.mappings(other) for k, v in zip(ks, vs)}
    assert got == layout.devices[other]
    meta.close()


# ---------------------------------------------------------------------------
# Consistent (re-checksummed) but wrong blocks
# ---------------------------------------------------------------------------


def _node_edit(field: str, value: int):
    offsets = {"flags": 4, "nr_entries": 16, "max_entries": 20, "value_size": 24}

    def fn(buf: bytearray) -> None:
        struct.pack_into("<I", buf, offsets[field], value)
    return fn


@pytest.mark.parametrize("name", ["device 1 leaf", "device 1 internal root", "details root",
                                  "data index root", "top-level root"])
@pytest.mark.parametrize("field,value,check", [
    ("flags", 0, "bad node flags"),
    ("flags", 3, "bad node flags"),
    ("nr_entries", 253, "too many entries"),
    ("max_entries", 125, "max_entries not a multiple of 3"),
    ("max_entries", 600, "node does not fit in a block"),
    ("value_size", 0, "node does not fit in a block"),
    ("value_size", 12, None),           # wrong for the tree: "wrong value size" or does not fit
])
def test_bad_node_header(image, layout, name, field, value, check) -> None:
    b = layout.blocks[name]
    edit_and_reseal(image, b, fmt.BTREE_CSUM_XOR, _node_edit(field, value))
    with pytest.raises(CorruptBlock) as exc:
        read_everything(image)
    assert exc.value.block == b
    assert exc.value.kind == "btree node"
    if check is not None:
        assert exc.value.check == check
    else:
        assert exc.value.check in ("wrong value size", "node does not fit in a block")


@pytest.mark.parametrize("name,salt", [
    ("device 1 leaf", fmt.BTREE_CSUM_XOR),
    ("data bitmap", fmt.BITMAP_CSUM_XOR),
    ("metadata bitmap", fmt.BITMAP_CSUM_XOR),
    ("metadata index", fmt.INDEX_CSUM_XOR),
])
def test_block_at_the_wrong_place(image, layout, name, salt) -> None:
    b = layout.blocks[name]
    edit_and_reseal(image, b, salt, lambda buf: struct.pack_into("<Q", buf, 8, b + 1))
    with pytest.raises(CorruptBlock) as exc:
        read_everything(image)
    assert exc.value.block == b and exc.value.check == "wrong location"
    assert str(b + 1) in str(exc.value)


def test_pointer_past_the_end(image, layout) -> None:
    b = layout.blocks["device 1 internal root"]
    far = 10 ** 9

    def fn(buf: bytearray) -> None:
        mx = struct.unpack_from("<I", buf, 20)[0]
        struct.pack_into("<Q", buf, 32 + 8 * mx + 8 * 2, far)       # value (child) 2
    edit_and_reseal(image, b, fmt.BTREE_CSUM_XOR, fn)
    with pytest.raises(CorruptBlock) as exc:
        read_everything(image)
    assert exc.value.block == far


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging forever."""
    def alarm(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("child", [0, 2, 7])
def test_cycle_in_a_tree_is_an_error_not_a_hang(image, layout, child: int) -> None:
    """Regression: an internal node pointing back at itself made readers loop forever."""
    b = layout.blocks["device 1 internal root"]

    def fn(buf: bytearray) -> None:
        mx = struct.unpack_from("<I", buf, 20)[0]
        struct.pack_into("<Q", buf, 32 + 8 * mx + 8 * child, b)
    edit_and_reseal(image, b, fmt.BTREE_CSUM_XOR, fn)
    meta = ThinMetadata.open(image, read_only=True)
    with deadline(30):
        with pytest.raises(CorruptBlock, match="cycle"):
            list(meta.mappings(1))
        first = int(struct.unpack_from("<Q", read_block(image, b), 32 + 8 * child)[0])
        with pytest.raises(CorruptBlock, match="cycle"):
            meta.lookup(1, first)
    meta.close()


def _first_use_of_bitmap_0_fails(image: Path) -> None:
    """Bitmaps are read when first used (the kernel's way too), so the damage in data bitmap 0
    (block 2000 has count 3) is found then: by a count, an allocation, a change there."""
    for use in (lambda sm: sm.get(2000), lambda sm: sm.get(7), lambda sm: sm.alloc(),
                lambda sm: sm.inc(2000), lambda sm: sm.all_counts()):
        meta = ThinMetadata.open(image, read_only=True)
        try:
            with pytest.raises(MetadataError, match="bitmap value 3"):
                use(meta.data_sm)
            assert not meta.data_sm.has_changes()
        finally:
            meta.close()


def test_ref_count_tree_entry_missing_for_bitmap_3(image, layout) -> None:
    """The data block with count 3 loses its ref-count entry: bitmap 3 without a count."""
    b = layout.blocks["data ref-count root"]
    edit_and_reseal(image, b, fmt.BTREE_CSUM_XOR, _node_edit("nr_entries", 0))
    _first_use_of_bitmap_0_fails(image)


def test_ref_count_tree_count_below_3(image, layout) -> None:
    """A tree entry of 2 under bitmap value 3 is inconsistent too."""
    b = layout.blocks["data ref-count root"]
    edit_and_reseal(image, b, fmt.BTREE_CSUM_XOR,
                    lambda buf: struct.pack_into("<I", buf, 32 + 8 * 336, 2))   # value 0 (u32)
    _first_use_of_bitmap_0_fails(image)


def test_ref_count_tree_entry_without_bitmap_3_is_ignored(image, layout) -> None:
    """The kernel reads the tree only where the bitmap says 3; a stray entry changes nothing."""
    b = layout.blocks["data ref-count root"]

    def fn(buf: bytearray) -> None:
        # Add a second entry (block 1999, count 7); block 1999's bitmap value is 1.
        struct.pack_into("<I", buf, 16, 2)
        k0 = struct.unpack_from("<Q", buf, 32)[0]
        assert k0 == 2000
        struct.pack_into("<QQ", buf, 32, 1999, 2000)
        v0 = struct.unpack_from("<I", buf, 32 + 8 * 336)[0]
        struct.pack_into("<II", buf, 32 + 8 * 336, 7, v0)
    edit_and_reseal(image, b, fmt.BTREE_CSUM_XOR, fn)
    meta = ThinMetadata.open(image, read_only=True)
    assert meta.data_sm.get(1999) == 1 and meta.data_sm.get(2000) == 3
    meta.close()


# ---------------------------------------------------------------------------
# Superblock
# ---------------------------------------------------------------------------

def _sb_edit(offset: int, fmt_char: str, value: int):
    def fn(buf: bytearray) -> None:
        struct.pack_into("<" + fmt_char, buf, offset, value)
    return fn


@pytest.mark.parametrize("offset,code,value,error,match", [
    (0x20, "Q", 12345, MetadataError, "magic"),
    (0x28, "I", 3, IncompatibleMetadata, "version"),
    (0x168, "I", 1, IncompatibleMetadata, "incompatible"),
    (0x154, "I", 16, IncompatibleMetadata, "block size"),
    (0x150, "I", 100, MetadataError, "data block size"),
    (0x150, "I", 0, MetadataError, "data block size"),
    (0xC0, "Q", 1 << 40, MetadataError, None),        # metadata sm nr_blocks > device
    (0x40, "Q", 1 << 62, MetadataError, None),        # data sm nr_blocks absurd
    (0x40, "Q", 10, MetadataError, None),             # data sm nr_blocks vs. bitmaps
    (0x140, "Q", 1 << 50, MetadataError, None),       # mapping root past the end
    (0x148, "Q", 0, MetadataError, None),             # details root is the superblock
])
def test_bad_superblock_field(image, offset, code, value, error, match) -> None:
    edit_and_reseal(image, 0, fmt.SUPERBLOCK_CSUM_XOR, _sb_edit(offset, code, value))
    with pytest.raises(error, match=match) as exc:
        read_everything(image)
    assert isinstance(exc.value, MetadataError)


def test_compat_ro_flag_allows_read_only_only(image) -> None:
    edit_and_reseal(image, 0, fmt.SUPERBLOCK_CSUM_XOR, _sb_edit(0x164, "I", 1))
    read_everything(image)
    with pytest.raises(IncompatibleMetadata):
        ThinMetadata.open(image)


@pytest.mark.parametrize("content", ["zeros", "random", "empty", "short", "truncated"])
def test_not_metadata_at_all(tmp_path, layout, content: str) -> None:
    p = tmp_path / "x.img"
    rng = np.random.default_rng(1)
    if content == "zeros":
        p.write_bytes(bytes(4 << 20))
    elif content == "random":
        p.write_bytes(rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes())
    elif content == "empty":
        p.write_bytes(b"")
    elif content == "short":
        p.write_bytes(layout.image[:100])
    else:
        p.write_bytes(layout.image[: 8 * BS])           # the superblock survives, the rest does not
    for ro in (True, False):
        with pytest.raises(MetadataError):
            m = ThinMetadata.open(p, read_only=ro)
            m.close()


def test_not_a_file(tmp_path) -> None:
    with pytest.raises(InvalidArgument):
        ThinMetadata.open(tmp_path / "missing.img")
    with pytest.raises(InvalidArgument):
        ThinMetadata.open(tmp_path)


# ---------------------------------------------------------------------------
# Fuzzing
# ---------------------------------------------------------------------------

_SMALL = st.one_of(st.integers(0, 600), st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**63]))

SB_FIELDS = {                # offset -> struct code
    0x004: "I", 0x008: "Q", 0x028: "I", 0x02C: "I", 0x030: "Q", 0x038: "Q",
    0x040: "Q", 0x048: "Q", 0x050: "Q", 0x058: "Q",          # data sm root
    0x0C0: "Q", 0x0C8: "Q", 0x0D0: "Q", 0x0D8: "Q",          # metadata sm root
    0x140: "Q", 0x148: "Q", 0x150: "I", 0x158: "Q", 0x160: "I", 0x164: "I",
}


@given(st.lists(st.tuples(st.sampled_from(sorted(SB_FIELDS)), _SMALL), min_size=1, max_size=3))
@settings(derandomize=True, max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzz_superblock_fields(image, layout, edits) -> None:
    write_block(image, 0, layout.image[:BS])

    def fn(buf: bytearray) -> None:
        for off, value in edits:
            code = SB_FIELDS[off]
            struct.pack_into("<" + code, buf, off, value & (0xFFFFFFFF if code == "I" else 2**64 - 1))
    edit_and_reseal(image, 0, fmt.SUPERBLOCK_CSUM_XOR, fn)
    try:
        read_everything(image)
    except MetadataError:
        pass


@st.composite
def block_damage(draw, layout_blocks):
    b = draw(st.sampled_from(layout_blocks))
    kind = draw(st.sampled_from(["bytes", "u64", "u32"]))
    if kind == "bytes":
        off = draw(st.integers(16, BS - 1))
        data = draw(st.binary(min_size=1, max_size=64))
        return b, kind, off, data
    width = 8 if kind == "u64" else 4
    off = draw(st.integers(16 // width, BS // width - 1)) * width
    value = draw(st.one_of(st.integers(0, 600), st.integers(0, 2 ** (8 * width) - 1)))
    return b, kind, off, value


def test_fuzz_consistent_blocks(tmp_path, layout) -> None:
    """Random contents written into used blocks, checksums and block numbers made right again."""
    image = tmp_path / "meta.img"
    blocks = sorted(b for b in layout.kinds if b != 0)

    @given(st.lists(block_damage(blocks), min_size=1, max_size=3))
    @settings(derandomize=True, max_examples=300, deadline=None)
    def run(damage) -> None:
        image.write_bytes(layout.image)
        for b, kind, off, payload in damage:
            v = layout.kinds[b]

            def fn(buf: bytearray, off=off, payload=payload, kind=kind) -> None:
                if kind == "bytes":
                    end = min(BS, off + len(payload))
                    buf[off:end] = payload[: end - off]
                elif kind == "u64":
                    struct.pack_into("<Q", buf, off, payload)
                else:
                    struct.pack_into("<I", buf, off, payload)
                struct.pack_into("<Q", buf, 8, b)
            edit_and_reseal(image, b, v.salt, fn)
        try:
            read_everything(image)
        except MetadataError:
            pass

    run()


def test_hypothesis_layout_sanity(layout) -> None:
    """The fuzz targets cover every kind of block."""
    kinds = {v.kind for v in layout.kinds.values()}
    assert kinds == {"superblock", "btree node", "space map bitmap", "metadata space map index"}
    assert len(layout.kinds) > 20
