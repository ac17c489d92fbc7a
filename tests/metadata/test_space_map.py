"""Space maps (space_map.py): bitmap codec, allocation rules, extension, overflow counts, commit.

Spec sections 5.1-5.8. The allocator's central rule - never hand out a block that is in use now
or was in use at the last commit - is checked both on bare ``SpaceMap`` objects (hypothesis) and
end to end, by making a commit fail at the superblock write and reopening the old state.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.metadata.helpers import (assert_counts_match, assert_summaries_exact, check_all_trees,
                                    dump, format_pool, full_check, read_block, read_mappings)
from tests.tptools import assert_checks_pass
from tests.tptools import (TESTDATA_CASES, TOOLS_AVAILABLE, requires_tools, testdata_image)
from thinpool.errors import InvalidArgument, MetadataError, NoDataSpace, NoMetadataSpace
from thinpool.metadata import format as fmt
from thinpool.metadata.block import BITMAP_VALIDATOR
from thinpool.metadata.btree import BTree
from thinpool.metadata.space_map import REF_COUNT_VT, SpaceMap, decode_bitmap, encode_bitmap
from thinpool.metadata.space_map_disk import DataSpaceMap, MetadataSpaceMap
from thinpool.metadata.thin_metadata import ThinMetadata

E = fmt.ENTRIES_PER_BITMAP
needs_vectors = pytest.mark.skipif("01-single" not in TESTDATA_CASES, reason="test vectors missing")
DETERMINISTIC = settings(derandomize=True, deadline=None, max_examples=60)


# ---------------------------------------------------------------------------
# Bitmap codec
# ---------------------------------------------------------------------------


def reference_decode(buf: bytes, n: int) -> list[int]:
    """Spec 5.1 literally: bit 2e (little-endian bit order) is the high bit, bit 2e+1 the low."""
    area = buf[16:]
    out = []
    for e in range(n):
        hi = (area[(2 * e) // 8] >> ((2 * e) % 8)) & 1
        lo = (area[(2 * e + 1) // 8] >> ((2 * e + 1) % 8)) & 1
        out.append(2 * hi + lo)
    return out


@needs_vectors
def test_spec_example_metadata_bitmap(tmp_path) -> None:
    img = testdata_image("01-single", tmp_path)
    block = read_block(img, 3)
    assert bytes(block[16:20]) == bytes.fromhex("aaaa2800")
    vals = decode_bitmap(bytes(block))
    assert vals.dtype == np.uint8 and vals.shape == (E,)
    assert vals[:11].tolist() == [1] * 8 + [0] + [1, 1]
    assert not vals[11:].any()
    # Encoding the same counts gives the file's bytes back (header untouched).
    out = bytearray(block)
    out[16:] = b"\xff" * (fmt.BLOCK_SIZE - 16)
    encode_bitmap(np.array([1] * 8 + [0, 1, 1], np.uint32), out)
    assert out == block


@needs_vectors
def test_spec_example_data_bitmap(tmp_path) -> None:
    img = testdata_image("01-single", tmp_path)
    block = read_block(img, 9)
    assert bytes(block[16:22]) == bytes.fromhex("0000a0020002")
    vals = decode_bitmap(bytes(block))
    assert np.flatnonzero(vals).tolist() == [10, 11, 12, 20]
    assert vals[[10, 11, 12, 20]].tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize("count,mask", [(1, 0x02), (2, 0x01), (3, 0x03)])
@pytest.mark.parametrize("slot", [0, 1, 2, 3])
def test_bit_layout(count: int, mask: int, slot: int) -> None:
    vals = np.zeros(8, np.uint32)
    vals[4 + slot] = count            # entry 4+slot lives in byte 17
    buf = bytearray(fmt.BLOCK_SIZE)
    encode_bitmap(vals, buf)
    assert buf[17] == mask << (2 * slot)
    assert not any(buf[:17]) and not any(buf[18:])
    assert decode_bitmap(bytes(buf))[4 + slot] == count


@given(st.lists(st.integers(0, 3), max_size=100))
@DETERMINISTIC
def test_bitmap_round_trip_small(values: list[int]) -> None:
    buf = bytearray(b"\xab" * fmt.BLOCK_SIZE)
    encode_bitmap(np.array(values, np.uint32), buf)
    assert bytes(buf[:16]) == b"\xab" * 16             # header not touched
    got = decode_bitmap(bytes(buf))
    assert got[: len(values)].tolist() == values
    assert not got[len(values):].any()
    assert reference_decode(bytes(buf), len(values) + 4) == values + [0, 0, 0, 0][: min(4, E)]


@given(st.integers(0, 2**32 - 1), st.integers(0, E), st.floats(0, 1))
@DETERMINISTIC
def test_bitmap_round_trip_large(seed: int, length: int, density: float) -> None:
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 10, length).astype(np.uint32)
    counts[rng.random(length) > density] = 0
    buf = bytearray(fmt.BLOCK_SIZE)
    encode_bitmap(counts, buf)
    got = decode_bitmap(bytes(buf))
    assert np.array_equal(got[:length], np.minimum(counts, 3))   # >= 3 is stored as 3
    assert not got[length:].any()
    # decode . encode . decode is the identity on bitmap blocks.
    again = bytearray(fmt.BLOCK_SIZE)
    encode_bitmap(got, again)
    assert again == buf
    sample = rng.integers(0, max(length, 1), 20).tolist() if length else []
    ref = reference_decode(bytes(buf), E)
    for e in sample:
        assert ref[e] == got[e]


# ---------------------------------------------------------------------------
# Allocation on bare space maps
# ---------------------------------------------------------------------------


def _space_map(kind: str, nr: int, committed: np.ndarray, current: np.ndarray) -> SpaceMap:
    sm = DataSpaceMap(nr) if kind == "data" else MetadataSpaceMap(nr)
    sm.assign(committed, current)
    return sm


@st.composite
def space_map_states(draw):
    nr = draw(st.integers(1, 3 * E // 2 + 7))
    seed = draw(st.integers(0, 2**32 - 1))
    p_used = draw(st.sampled_from([0.0, 0.1, 0.5, 0.95, 1.0]))
    p_freed = draw(st.sampled_from([0.0, 0.3, 1.0]))
    p_new = draw(st.sampled_from([0.0, 0.1, 0.5]))
    rng = np.random.default_rng(seed)
    committed = (rng.random(nr) < p_used).astype(np.uint32) * rng.integers(1, 5, nr).astype(np.uint32)
    current = committed.copy()
    current[(rng.random(nr) < p_freed) & (committed > 0)] = 0        # freed in this transaction
    current[(rng.random(nr) < p_new) & (committed == 0)] = 1         # allocated in this transaction
    kind = draw(st.sampled_from(["data", "metadata"]))
    return kind, nr, committed, current


@given(space_map_states(), st.booleans())
@settings(derandomize=True, deadline=None, max_examples=40)
def test_alloc_never_returns_a_block_in_use_now_or_at_commit(state, interleave_dec) -> None:
    kind, nr, committed, current = state
    sm = _space_map(kind, nr, committed, current)
    allocatable = set(np.flatnonzero((committed == 0) & (current == 0)).tolist())
    assert sm.nr_allocatable() == len(allocatable)
    got: set[int] = set()
    held: set[int] = set()
    err = NoDataSpace if kind == "data" else NoMetadataSpace
    calls = 0
    while True:
        calls += 1
        try:
            b = sm.alloc()
        except err as e:
            assert str(nr) in str(e)
            break
        assert b in allocatable and b not in got
        assert sm.get(b) == 1
        got.add(b)
        if interleave_dec and calls % 7 == 0:
            assert sm.dec(b) == 0
            got.discard(b)
            if kind == "data":
                # Data blocks freed in this transaction wait for the commit, even one allocated
                # in it (a lock-free reader may still hold its mapping).
                allocatable.discard(b)
                held.add(b)
            # Metadata: allocatable again at once (it was never committed).
    assert got == allocatable
    assert sm.nr_allocatable() == 0
    # A block freed in this transaction (count 0 now, >0 at commit) never came back.
    freed = np.flatnonzero((committed > 0) & (current == 0))
    assert not set(freed.tolist()) & set(got)
    # After a commit those blocks are allocatable.
    sm.mark_committed()
    again = []
    while True:
        try:
            again.append(sm.alloc())
        except err:
            break
    assert sorted(again) == sorted(freed.tolist() + sorted(held))


@given(space_map_states(), st.integers(0, 3 * E), st.one_of(st.none(), st.integers(0, 3 * E)))
@settings(derandomize=True, deadline=None, max_examples=40)
def test_alloc_run_is_all_or_nothing(state, want, hint) -> None:
    kind, nr, committed, current = state
    sm = _space_map(kind, nr, committed, current)
    before = sm.all_counts().copy()
    allocatable = np.flatnonzero((committed == 0) & (current == 0))
    err = NoDataSpace if kind == "data" else NoMetadataSpace
    if want > len(allocatable):
        with pytest.raises(err) as exc:
            sm.alloc_run(want, hint)
        assert f"{want} needed" in str(exc.value)
        assert np.array_equal(sm.all_counts(), before), "a failed alloc_run must not allocate anything"
        return
    blocks = sm.alloc_run(want, hint)
    assert len(blocks) == want and len(set(blocks.tolist())) == want
    assert set(blocks.tolist()) <= set(allocatable.tolist())
    assert (sm.all_counts()[blocks] == 1).all()
    changed = np.flatnonzero(sm.all_counts() != before)
    assert sorted(changed.tolist()) == sorted(blocks.tolist())
    # Single allocations afterwards still respect the rule.
    rest = set(allocatable.tolist()) - set(blocks.tolist())
    for _ in range(min(5, len(rest))):
        assert sm.alloc() in rest


def test_alloc_run_prefers_contiguous_first_fit() -> None:
    sm = DataSpaceMap(1000)
    used = np.zeros(1000, np.uint32)
    used[[0, 1, 5]] = 1
    sm.assign(used, used)
    run = sm.alloc_run(3, hint=0)
    assert run.tolist() == [2, 3, 4]
    run = sm.alloc_run(10, hint=100)
    assert run.tolist() == list(range(100, 110))


def test_alloc_run_zero_blocks() -> None:
    """Regression: alloc_run(0) raised IndexError (empty run) or ValueError (full map)."""
    sm = DataSpaceMap(10)
    assert len(sm.alloc_run(0)) == 0
    sm.alloc_run(10)
    assert len(sm.alloc_run(0)) == 0
    with pytest.raises(NoDataSpace):
        sm.alloc_run(1)
    with pytest.raises(InvalidArgument):
        sm.alloc_run(-1)


def test_alloc_on_empty_space_map() -> None:
    with pytest.raises(NoDataSpace):
        DataSpaceMap(0).alloc()
    with pytest.raises(NoDataSpace):
        DataSpaceMap(0).alloc_run(1)


def test_dec_below_zero_raises() -> None:
    sm = DataSpaceMap(10)
    with pytest.raises(MetadataError):
        sm.dec(3)
    with pytest.raises(MetadataError):
        sm.dec_many(np.array([4, 4], np.uint64))


def test_extend() -> None:
    sm = DataSpaceMap(10)
    blocks = sm.alloc_run(10)
    with pytest.raises(NoDataSpace):
        sm.alloc()
    sm.extend(E + 5)
    assert sm.nr_blocks == E + 5 and sm.nr_bitmaps == 2
    assert np.array_equal(sm.all_counts()[blocks], np.ones(10))
    got = sm.alloc_run(E - 5)
    assert set(got.tolist()) == set(range(10, E + 5))
    with pytest.raises(NoDataSpace):
        sm.alloc()
    with pytest.raises(MetadataError):
        sm.extend(5)
    md = MetadataSpaceMap(100)
    md.extend(10 * fmt.MAX_METADATA_BLOCKS)
    assert md.nr_blocks == fmt.MAX_METADATA_BLOCKS


# ---------------------------------------------------------------------------
# Through ThinMetadata: commit, reload, the on-disk summaries
# ---------------------------------------------------------------------------


def _map_run(meta: ThinMetadata, dev: int, vblocks, *, blocks=None) -> dict[int, int]:
    out = {}
    for i, v in enumerate(vblocks):
        b = meta.data_sm.alloc() if blocks is None else int(blocks[i])
        meta.insert(dev, v, b)
        out[v] = b
    return out


def test_freed_data_blocks_are_not_reused_before_commit(tmp_path) -> None:
    meta = format_pool(tmp_path, nr_data_blocks=64)
    meta.create_thin(1)
    mapped = _map_run(meta, 1, range(64))
    meta.commit()
    with pytest.raises(NoDataSpace):
        meta.data_sm.alloc()
    for v in range(0, 64, 2):
        meta.remove(1, v)
    # Freed, but still in use at the last commit: not allocatable yet.
    with pytest.raises(NoDataSpace):
        meta.data_sm.alloc()
    freed = meta.commit()
    assert sorted(freed.tolist()) == sorted(mapped[v] for v in range(0, 64, 2))
    again = sorted(meta.data_sm.alloc() for _ in range(32))
    assert again == sorted(freed.tolist())
    meta.close()


def test_uncommitted_metadata_never_overwrites_committed_blocks(tmp_path) -> None:
    meta = format_pool(tmp_path, nr_data_blocks=1 << 16)
    meta.create_thin(1)
    _map_run(meta, 1, range(0, 3000, 3))
    meta.commit()
    for v in range(0, 3000, 6):
        meta.remove(1, v)
    _map_run(meta, 1, range(5000, 6000))
    meta.create_snap(2, 1)
    meta.delete(1)
    live = set(np.flatnonzero(meta.metadata_sm.all_committed()).tolist())
    assert live and not live & set(meta.tm.dirty), "a committed block is being rewritten"
    meta.abort()
    meta.close()


@requires_tools
def test_failed_superblock_write_leaves_the_previous_commit(tmp_path) -> None:
    """Everything but the superblock reaches the disk; the old transaction must still be whole."""
    meta = format_pool(tmp_path, nr_data_blocks=1 << 16)
    meta.create_thin(1)
    _map_run(meta, 1, range(2000))
    meta.commit()
    before = dump(meta.bm.path)
    for v in range(0, 2000, 2):
        meta.remove(1, v)
    _map_run(meta, 1, range(10_000, 11_000))
    meta.create_snap(2, 1)

    def fail(*args, **kwargs):
        raise OSError("simulated crash before the superblock write")

    meta.bm.write = fail            # only TransactionManager.commit's superblock write uses it
    with pytest.raises(OSError):
        meta.commit()
    meta.close()
    assert_checks_pass(meta.bm.path)
    assert dump(meta.bm.path) == before
    meta = ThinMetadata.open(meta.bm.path)
    full_check(meta)
    meta.close()


@requires_tools
def test_resize_data_across_bitmaps(tmp_path) -> None:
    meta = format_pool(tmp_path, nr_data_blocks=0)
    full_check(meta)
    assert dump(meta.bm.path).nr_data_blocks == 0
    meta.create_thin(5)
    with pytest.raises(NoDataSpace):
        meta.data_sm.alloc()
    prev = 0
    for size in (100, E - 1, E, E + 1, 3 * E + 17):
        meta.resize_data(size)
        blocks = meta.data_sm.alloc_run(min(3, size - prev), hint=prev)
        assert blocks.tolist() == list(range(prev, prev + len(blocks)))
        prev = size
        for i, b in enumerate(blocks.tolist()):
            meta.insert(5, size * 4 + i, b)
        meta.commit()
        full_check(meta)
        assert meta.data_sm.nr_bitmaps == -(-size // E)
        assert dump(meta.bm.path).nr_data_blocks == size
        with pytest.raises(InvalidArgument):
            meta.resize_data(size - 1)
    counts = meta.data_sm.all_counts().copy()
    path = meta.bm.path
    meta.close()
    meta = ThinMetadata.open(path, read_only=True)
    assert np.array_equal(meta.data_sm.all_counts(), counts)
    assert meta.nr_data_blocks == 3 * E + 17
    meta.close()


def test_resize_alone_is_a_change(tmp_path) -> None:
    """Regression: has_changes() was False after resize_data/resize_metadata with nothing else."""
    meta = format_pool(tmp_path, nr_data_blocks=100, size=4 << 20)
    assert not meta.has_changes()
    meta.resize_data(200)
    assert meta.has_changes()
    meta.commit()
    assert not meta.has_changes() and meta.sb.data_sm.nr_blocks == 200
    meta.bm.grow(2048)
    meta.resize_metadata()
    assert meta.has_changes()
    meta.commit()
    assert not meta.has_changes() and meta.sb.metadata_sm.nr_blocks == 2048
    full_check(meta, tools=TOOLS_AVAILABLE)
    meta.close()


@requires_tools
def test_data_overflow_counts_go_to_the_ref_count_tree(tmp_path) -> None:
    """Counts >= 3 are bitmap value 3 plus a ref-count tree entry; back to <= 2 removes it."""
    meta = format_pool(tmp_path, nr_data_blocks=10_000)
    n = 1000   # enough entries (336 per leaf) for the data ref-count tree to get an internal root
    blocks = meta.data_sm.alloc_run(n)
    for dev in (1, 2, 3, 4):
        meta.create_thin(dev)
        if dev > 1:
            meta.data_sm.inc_many(blocks)   # each extra mapping holds its own reference
        for i, b in enumerate(blocks.tolist()):
            meta.insert(dev, i, b)
    meta.commit()
    full_check(meta)
    assert (meta.data_sm.all_counts()[blocks] == 4).all()
    rc = BTree(meta.tm, REF_COUNT_VT)
    assert [k for k, _ in rc.items(meta.data_sm.ref_count_root)] == blocks.tolist()
    assert not rc.node(meta.data_sm.ref_count_root).is_leaf
    # Bitmap entries say 3.
    bitmap = decode_bitmap(meta.tm.read(meta.data_sm.bitmap_blocks[0], BITMAP_VALIDATOR))
    assert (bitmap[blocks] == 3).all()
    # Drop every other block to count 2 (two devices unmap it), the rest to 3.
    meta.remove_range(1, 0, n)
    for i in range(0, n, 2):
        meta.remove(2, i)
    meta.commit()
    full_check(meta)
    want = [b for i, b in enumerate(blocks.tolist()) if i % 2]
    assert [k for k, _ in rc.items(meta.data_sm.ref_count_root)] == want
    meta.delete(3)
    meta.commit()
    full_check(meta)
    assert list(rc.items(meta.data_sm.ref_count_root)) == []
    path = meta.bm.path
    counts = meta.data_sm.all_counts().copy()
    meta.close()
    meta = ThinMetadata.open(path)
    assert np.array_equal(meta.data_sm.all_counts(), counts)
    meta.close()


@requires_tools
def test_metadata_overflow_counts(tmp_path) -> None:
    """Several snapshots of one device share its root: metadata count >= 3 in the ref-count tree."""
    meta = format_pool(tmp_path, nr_data_blocks=10_000)
    meta.create_thin(0)
    _map_run(meta, 0, range(100))
    meta.commit()
    for s in range(1, 6):
        meta.create_snap(s, 0)
    meta.commit()
    full_check(meta)
    root = meta.roots[0]
    assert all(meta.roots[s] == root for s in range(6))
    assert meta.metadata_sm.get(root) == 6
    rc = BTree(meta.tm, REF_COUNT_VT)
    assert dict(rc.items(meta.metadata_sm.ref_count_root)) == {root: 6}
    # Writing to each snapshot breaks the sharing one by one.
    for s in range(1, 6):
        meta.insert(s, 0, meta.data_sm.alloc())
        meta.commit()
        full_check(meta)
    assert list(rc.items(meta.metadata_sm.ref_count_root)) == []
    assert meta.metadata_sm.get(meta.roots[0]) == 1
    meta.close()


def test_commit_summaries_are_exact(tmp_path) -> None:
    meta = format_pool(tmp_path, nr_data_blocks=2 * E + 100, size=80 << 20)  # 2 metadata bitmaps
    assert meta.metadata_sm.nr_bitmaps == 2
    assert_summaries_exact(meta)
    meta.create_thin(1)
    blocks = meta.data_sm.alloc_run(3000, hint=E - 1500)      # spans the bitmap boundary
    assert blocks.tolist() == list(range(E - 1500, E + 1500))
    for i, b in enumerate(blocks.tolist()):
        meta.insert(1, i, b)
    meta.commit()
    assert_summaries_exact(meta)
    assert_counts_match(meta)
    check_all_trees(meta)
    meta.close()


@pytest.mark.parametrize("case", TESTDATA_CASES)
def test_rewrite_fixes_thin_restore_summary_quirk(tmp_path, case: str) -> None:
    """thin_restore leaves nr_allocated one too high (README quirk); our commit writes exact ones."""
    img = testdata_image(case, tmp_path)
    meta = ThinMetadata.open(img)
    before = {d: read_mappings(meta, d) for d in meta.device_ids()}
    meta.create_thin(99)
    meta.commit()
    assert_summaries_exact(meta)
    assert_counts_match(meta)
    assert {d: read_mappings(meta, d) for d in meta.device_ids() if d != 99} == before
    meta.close()
