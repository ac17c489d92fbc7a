"""Volume.write_zeroes: the block layer's WRITE ZEROES (what a loop device over a volume's FUSE
file sends for fallocate ZERO_RANGE). The range reads as zeros; without unmap its blocks are
provisioned (shared ones copied first, so a snapshot keeps its bytes); with unmap it is a
discard. Failures change nothing. Both checkers pass afterwards."""

from __future__ import annotations

import pytest

from thinpool import Pool
from thinpool.errors import NoDataSpace, OutOfRange, VolumeReadOnly
from tests.tptools import assert_checks_pass, requires_tools

BS = 64 * 1024
MiB = 1 << 20


@pytest.fixture
def pool(tmp_path):
    p = Pool.create(tmp_path / "pool", data_size=4 * MiB, error_if_no_space=True)
    yield p
    p.close()


def _mapped(vol) -> set[int]:
    return {vb for vb, _, _ in vol.mappings()}


@requires_tools
def test_write_zeroes_provisions_zeroed_blocks_and_keeps_snapshots(tmp_path, pool):
    v = pool.create_thin("v", 16 * BS)
    v.write(0, b"\xaa" * (3 * BS))                    # blocks 0-2 mapped
    s = pool.snapshot("v", "s")                        # ... and shared with s
    v.write_zeroes(BS // 2, 5 * BS)                    # half of 0, 1-4 whole, half of 5
    assert v.read(0, BS // 2) == b"\xaa" * (BS // 2)
    assert v.read(BS // 2, 5 * BS) == bytes(5 * BS)
    assert _mapped(v) == {0, 1, 2, 3, 4, 5}            # every block of the range provisioned
    assert s.read(0, 3 * BS) == b"\xaa" * (3 * BS)     # the snapshot's blocks were copied
    # The blocks stay provisioned: writing into them takes no new data block.
    assert v.blocks_to_provision(BS, 5 * BS) == 0
    used = pool.stat().data_blocks_used
    v.write(2 * BS, b"\x55" * BS)
    assert pool.stat().data_blocks_used == used
    # Exclusive blocks are zeroed in place.
    v.write_zeroes(2 * BS, BS)
    assert v.read(2 * BS, BS) == bytes(BS) and pool.stat().data_blocks_used == used
    # unmap=True is a discard: whole blocks go, edges are zeroed.
    v.write_zeroes(BS + 10, 3 * BS, unmap=True)
    assert _mapped(v) == {0, 1, 4, 5}
    assert v.read(0, 6 * BS) == b"\xaa" * (BS // 2) + bytes(6 * BS - BS // 2)
    v.write_zeroes(0, 0)
    pool.close()
    assert_checks_pass(tmp_path / "pool" / "metadata")


def test_write_zeroes_refusals_change_nothing(pool):
    v = pool.create_thin("v", 200 * BS)
    v.write(0, b"\x11" * BS)
    before = (v.mappings(), pool.stat().data_blocks_used)
    with pytest.raises(OutOfRange):
        v.write_zeroes(199 * BS, 2 * BS)
    with pytest.raises(NoDataSpace):                   # 64 blocks in the pool
        v.write_zeroes(0, 100 * BS)
    assert (v.mappings(), pool.stat().data_blocks_used) == before
    assert v.read(0, BS) == b"\x11" * BS
    pool.set_read_only("v", True)
    for unmap in (False, True):
        with pytest.raises(VolumeReadOnly):
            v.write_zeroes(0, BS, unmap=unmap)
    assert v.read(0, BS) == b"\x11" * BS
