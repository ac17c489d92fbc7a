"""Reading the shared test vectors (made by thin_restore 0.9.0 or edited the kernel's way).

Every case must open read-only without changing a byte, list exactly the devices, details,
superblock fields and mappings of its XML, and load space-map counts equal to the counts
recomputed from its trees. Rewriting a case (open read-write, commit) must keep thin_check and
thin_dump happy, and replaying the kernel's copy-on-write on 06 must give 08's dump.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from tests.metadata.helpers import (assert_counts_match, check_all_trees,
                                    check_tree, dump, full_check, metadata_as_xml, read_mappings)
from tests.tptools import assert_checks_pass
from tests.tptools import (TESTDATA_CASES, parse_xml, requires_tools, testdata_image, testdata_xml,
                           thin_dump)
from thinpool.errors import ReadOnlyError
from thinpool.metadata import format as fmt
from thinpool.metadata.btree import BTree
from thinpool.metadata.space_map import INDEX_VT
from thinpool.metadata.thin_metadata import ThinMetadata
from thinpool.metadata.walker import expected_counts

pytestmark = pytest.mark.skipif(not TESTDATA_CASES, reason="test vectors missing")

#: The testdata README's layout table: mapping root, details root,
#: metadata sm (nr_blocks, nr_allocated, index block, ref-count root),
#: data sm (nr_blocks, nr_allocated, index root, ref-count root).
LAYOUT = {
    "01-single": (7, 6, (1024, 11, 1, 2), (1024, 4, 4, 5)),
    "02-snapshot": (7, 6, (1024, 12, 1, 2), (1024, 13, 4, 5)),
    "03-large": (8, 7, (17408, 29, 1, 2), (40000, 2000, 5, 6)),
    "04-multi": (7, 6, (1024, 13, 1, 2), (4096, 51, 4, 5)),
    "05-metadata-snap": (7, 6, (1024, 11, 1, 2), (1024, 4, 4, 5)),
    "06-shared-snapshot": (7, 6, (1024, 11, 1, 2), (1024, 4, 4, 5)),
    "07-big-data-dev": (7, 6, (1024, 212, 1, 2), (3264000, 3, 4, 5)),
    "08-cow-after-snapshot": (8, 12, (1024, 11, 1, 2), (1024, 5, 4, 5)),
}


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("case", TESTDATA_CASES)
def test_open_read_only_lists_exactly_the_xml(tmp_path, case: str) -> None:
    img = testdata_image(case, tmp_path)
    digest = sha256(img)
    xml = parse_xml(testdata_xml(case))
    meta = ThinMetadata.open(img, read_only=True)
    try:
        assert meta.time == meta.sb.time == xml.time
        assert meta.trans_id == meta.sb.trans_id == xml.transaction
        assert meta.sb.flags == xml.flags and meta.sb.version == xml.version
        assert meta.data_block_size == xml.data_block_size
        assert meta.nr_data_blocks == xml.nr_data_blocks
        assert meta.device_ids() == sorted(xml.devices)
        for dev_id, x in xml.devices.items():
            d = meta.device(dev_id)
            assert (d.mapped_blocks, d.transaction_id, d.creation_time, d.snapshotted_time) == \
                (x.mapped_blocks, x.transaction, x.creation_time, x.snap_time)
            assert read_mappings(meta, dev_id) == x.mappings
            # Packed values: data_block << 24 | time.
            for ks, vs in meta.mappings(dev_id):
                for k, v in zip(ks.tolist(), vs.tolist()):
                    assert v == (x.mappings[k][0] << 24) | x.mappings[k][1]
            for k, (block, time) in list(x.mappings.items())[:50]:
                assert meta.lookup(dev_id, k) == (block, time)
        assert metadata_as_xml(meta) == xml
        assert not meta.has_changes()
        with pytest.raises(ReadOnlyError):
            meta.create_thin(12345)
        with pytest.raises(ReadOnlyError):
            meta.commit()
    finally:
        meta.close()
    assert sha256(img) == digest, "a read-only open changed the file"


@pytest.mark.parametrize("case", TESTDATA_CASES)
def test_layout_facts(tmp_path, case: str) -> None:
    if case not in LAYOUT:
        pytest.skip("no layout facts for this case")
    meta = ThinMetadata.open(testdata_image(case, tmp_path), read_only=True)
    mapping_root, details_root, msm, dsm = LAYOUT[case]
    sb = meta.sb
    assert sb.magic == fmt.THIN_MAGIC and sb.blocknr == 0 and sb.metadata_block_size == 8
    assert (sb.data_mapping_root, sb.device_details_root) == (mapping_root, details_root)
    m, d = sb.metadata_sm, sb.data_sm
    assert (m.nr_blocks, m.nr_allocated, m.bitmap_root, m.ref_count_root) == msm
    assert (d.nr_blocks, d.nr_allocated, d.bitmap_root, d.ref_count_root) == dsm
    assert meta.metadata_sm.nr_blocks == msm[0] and meta.data_sm.nr_blocks == dsm[0]
    meta.close()


@pytest.mark.parametrize("case", TESTDATA_CASES)
def test_loaded_counts_equal_the_trees(tmp_path, case: str) -> None:
    """Space-map counts as loaded (bitmaps plus ref-count trees) equal the recomputed ones.

    For 05 the walker also follows the held snapshot's superblock (block 100 counted once, the
    shared details and mapping roots once more), as spec 5.6 item 6 says."""
    meta = ThinMetadata.open(testdata_image(case, tmp_path), read_only=True)
    assert_counts_match(meta)
    check_all_trees(meta, zero_tail=False)      # thin_restore leaves stale bytes in unused slots
    if case == "05-metadata-snap":
        em, _ = expected_counts(meta)
        assert meta.sb.metadata_snap == 100
        assert (em[100], em[6], em[7]) == (1, 2, 2)
    meta.close()


def test_specific_counts(tmp_path) -> None:
    cases = set(TESTDATA_CASES)
    if "04-multi" in cases:
        meta = ThinMetadata.open(testdata_image("04-multi", tmp_path), read_only=True)
        empty = {meta.roots[d] for d in (2, 3, 4)}
        assert len(empty) == 1
        assert meta.metadata_sm.get(empty.pop()) == 3          # from the ref-count tree
        assert meta.data_sm.all_counts()[5:8].tolist() == [3, 3, 3]
        meta.close()
    if "03-large" in cases:
        meta = ThinMetadata.open(testdata_image("03-large", tmp_path), read_only=True)
        assert check_tree(meta.mapping_tree, meta.roots[0], 8, zero_tail=False) == (2, 2000)
        assert len(list(meta.mappings(0))) == 15
        assert meta.data_sm.nr_bitmaps == 3 and meta.metadata_sm.nr_bitmaps == 2
        meta.close()
    if "07-big-data-dev" in cases:
        meta = ThinMetadata.open(testdata_image("07-big-data-dev", tmp_path), read_only=True)
        index = BTree(meta.tm, INDEX_VT)
        assert not index.node(meta.sb.data_sm.bitmap_root).is_leaf
        assert len(list(index.leaves(meta.sb.data_sm.bitmap_root))) == 2
        assert meta.data_sm.nr_bitmaps == 200
        last = max(b for _, (b, _) in read_mappings(meta, 0).items())
        assert last == 3_264_000 - 1 and meta.data_sm.get(last) == 1
        meta.close()
    if "06-shared-snapshot" in cases:
        meta = ThinMetadata.open(testdata_image("06-shared-snapshot", tmp_path), read_only=True)
        assert meta.roots[1] == meta.roots[2] == 10
        assert meta.metadata_sm.get(10) == 2
        assert meta.is_shared(2, 0) and meta.is_shared(1, 1) and not meta.is_shared(1, 2)
        meta.close()


@requires_tools
@pytest.mark.parametrize("case", TESTDATA_CASES)
def test_rewrite_keeps_the_pool(tmp_path, case: str) -> None:
    """Open read-write, commit one small change: the tools see the same pool plus that change."""
    img = testdata_image(case, tmp_path)
    text = testdata_xml(case)
    meta = ThinMetadata.open(img)
    new_id = max(meta.device_ids(), default=0) + 1
    meta.create_thin(new_id)
    meta.commit()
    full_check(meta, tools=False, zero_tail=False)
    meta.close()
    assert_checks_pass(img)
    want = parse_xml(text)
    got = dump(img)
    assert new_id in got.devices and not got.devices[new_id].mappings
    del got.devices[new_id]
    assert got == want
    if case == "05-metadata-snap":
        assert_checks_pass(img, "-m")
        assert thin_dump(img, "-m") == text.replace('nr_data_blocks="1024"', 'nr_data_blocks="0"')


@requires_tools
def test_replay_cow_after_snapshot_gives_08(tmp_path) -> None:
    """README/spec 6.6: from 06, write device 2's vblock 0 to new data block 30 in one transaction."""
    if not {"06-shared-snapshot", "08-cow-after-snapshot"} <= set(TESTDATA_CASES):
        pytest.skip("test vectors missing")
    img = testdata_image("06-shared-snapshot", tmp_path)
    meta = ThinMetadata.open(img)
    assert meta.lookup(2, 0) == (10, 0)
    assert meta.is_shared(2, 0)                 # snapshotted_time 2 > time 0: copy the data
    assert meta.data_sm.get(30) == 0
    meta.data_sm.inc(30)                        # the new data block, written by the caller
    assert meta.insert(2, 0, 30) == (10, 0)
    meta.set_transaction_id(6)
    meta.commit()
    full_check(meta, zero_tail=False)
    counts = meta.data_sm.all_counts()
    assert {b: int(counts[b]) for b in (10, 11, 12, 20, 30)} == {10: 1, 11: 2, 12: 2, 20: 2, 30: 1}
    assert np.count_nonzero(counts) == 5
    assert meta.roots[1] == 10 and meta.roots[2] != 10
    assert meta.metadata_sm.get(10) == 1 and meta.metadata_sm.get(meta.roots[2]) == 1
    meta.close()
    assert thin_dump(img) == testdata_xml("08-cow-after-snapshot")
