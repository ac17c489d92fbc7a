"""``check``'s level-at-a-time walk of mapping trees against its node-by-node walk (the oracle):
on clean metadata both must leave exactly the same record (references per metadata block, nodes
visited, leaf sizes, children, data blocks mapped) and the same report; on damaged metadata the
bulk walk must step aside (the damage tests compare the reports with thin_check)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.metadata.test_bulk_read import build_deep_pool
from tests.tptools import TESTDATA_CASES, testdata_image
from thinpool.metadata.walker import MetadataReader
from thinpool.tools import check as check_mod
from thinpool.tools.check import Checker


def run(path, bulk: bool, monkeypatch):
    with monkeypatch.context() as m:
        if not bulk:
            m.setattr(Checker, "_bulk_mapping_walk", lambda self, root, nr_data: False)
        c = Checker(path)
        try:
            report = c.run()
        finally:
            c.close()
    data = np.sort(np.concatenate(c.data_parts)) if c.data_parts else np.zeros(0, np.int64)
    return report, c.refs.copy(), c.visited, c.leaf_nr, c.children, data


def assert_same(path, monkeypatch) -> None:
    a = run(path, True, monkeypatch)
    b = run(path, False, monkeypatch)
    assert a[0].as_dict() == b[0].as_dict()
    assert np.array_equal(a[1], b[1])
    assert a[2] == b[2] and a[3] == b[3] and a[4] == b[4]
    assert np.array_equal(a[5], b[5])


@pytest.mark.parametrize("case", TESTDATA_CASES)
def test_testdata_images(tmp_path, case, monkeypatch) -> None:
    assert_same(testdata_image(case, tmp_path), monkeypatch)


@pytest.mark.parametrize("chunk", [None, 7])
def test_deep_trees_shared_between_snapshots(tmp_path, monkeypatch, chunk) -> None:
    """Three levels, snapshots sharing subtrees; with chunk=7 every level is read in pieces."""
    if chunk is not None:
        monkeypatch.setattr(check_mod, "_CHUNK", chunk)
    path = build_deep_pool(tmp_path)
    assert_same(path, monkeypatch)
    report = run(path, True, monkeypatch)[0]
    with MetadataReader(path) as r:
        want = sum(len(r.device_arrays(root)[0]) for root in r.roots().values())
    assert report.clean and report.nr_mappings == want > 180_000


def test_bulk_walk_refuses_damage(tmp_path, monkeypatch) -> None:
    """A stale checksum in one leaf: the bulk walk declines and changes nothing."""
    from tests.metadata.helpers import flip_byte
    from tests.metadata.test_bulk_read import leaf_and_internal
    path = build_deep_pool(tmp_path)
    leaf, _, root = leaf_and_internal(path)
    flip_byte(path, leaf, 200)
    c = Checker(path)
    try:
        before = c.refs.copy()
        assert c._bulk_mapping_walk(root, None) is False
        assert np.array_equal(c.refs, before) and not c.visited and not c.data_parts
    finally:
        c.close()
    report = run(path, True, monkeypatch)[0]
    assert not report.clean and any(f.block == leaf for f in report.findings)
