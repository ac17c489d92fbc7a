"""snapshot/map.py on a small pool whose extents are written out by hand."""

from __future__ import annotations

import pytest

from thinpool import Pool
from thinpool.errors import NotFound
from thinpool.metadata.walker import MetadataReader
from thinpool.snapshot.map import DiffRange, Extent, volume_diff, volume_map

BS = 64 * 1024


def test_extents_and_diff_by_hand(tmp_path):
    with Pool.create(tmp_path / "p", data_size=4 << 20, block_size=BS) as pool:
        o = pool.create_thin("o", 10 * BS - 1000)
        o.write(2 * BS, b"a" * (2 * BS))             # blocks 2, 3
        pool.snapshot("o", "s")
        o.write(3 * BS, b"b")                        # block 3 copied: o's own now
        o.write(7 * BS, b"c")
        ids = {n: pool.volume(n).dev_id for n in ("o", "s")}
        maps = {n: {vb: db for vb, db, _ in pool.volume(n).mappings()} for n in ("o", "s")}
    size = 10 * BS - 1000
    o = maps["o"]
    with MetadataReader(tmp_path / "p" / "metadata") as r:
        got = volume_map(r, ids["o"], size, BS)
        want = [Extent(0, 2 * BS, False), Extent(2 * BS, BS, True, o[2] * BS, True),
                 Extent(3 * BS, BS, True, o[3] * BS, False), Extent(4 * BS, 3 * BS, False),
                 Extent(7 * BS, BS, True, o[7] * BS, False), Extent(8 * BS, size - 8 * BS, False)]
        assert got == want
        assert volume_map(r, ids["s"], size, BS) == [
            Extent(0, 2 * BS, False),
            Extent(2 * BS, BS, True, maps["s"][2] * BS, True),
            Extent(3 * BS, BS, True, maps["s"][3] * BS, False),
            Extent(4 * BS, size - 4 * BS, False)]
        assert volume_diff(r, ids["s"], ids["o"], size, BS) == [
            DiffRange(3 * BS, BS, True), DiffRange(7 * BS, BS, True)]
        assert volume_diff(r, ids["o"], ids["s"], size, BS) == [
            DiffRange(3 * BS, BS, True), DiffRange(7 * BS, BS, False)]
        assert volume_map(r, ids["o"], 0, BS) == []
        with pytest.raises(NotFound):
            volume_map(r, 99, size, BS)
        with pytest.raises(NotFound):
            volume_diff(r, ids["o"], 99, size, BS)
