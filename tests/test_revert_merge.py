"""Pool.revert and Pool.merge against a model of every volume's bytes; refusals change nothing;
stale handles raise NotFound; reopening agrees; both checkers pass."""

from __future__ import annotations

import pytest

from thinpool import Pool
from thinpool.errors import InvalidArgument, NotFound
from tests.tptools import assert_checks_pass

BS = 64 * 1024
SIZE = 8 * BS


def _all(pool: Pool) -> dict[str, bytes]:
    return {n: pool.volume(n).read(0, pool.volume(n).size) for n in pool.volumes()}


def _origins(pool: Pool) -> dict[str, str | None]:
    return {v.name: v.origin for v in pool.stat().volumes}


@pytest.fixture
def pool(tmp_path):
    p = Pool.create(tmp_path / "p", data_size=64 * BS, block_size=BS)
    vol = p.create_thin("vol", SIZE)
    vol.write(0, b"A" * (2 * BS + 10))
    p.snapshot("vol", "snap")
    vol.write(BS, b"B" * 300)
    vol.write(5 * BS, b"N" * BS)
    p.snapshot("vol", "other")
    yield p
    p.close()
    assert_checks_pass(tmp_path / "p" / "metadata")


def test_revert_gives_back_the_snapshot_content_and_keeps_the_snapshot(pool, tmp_path):
    before = _all(pool)
    old = pool.volume("vol")
    new = pool.revert("vol", "snap")
    assert new.dev_id > max(old.dev_id, pool.volume("other").dev_id)
    after = _all(pool)
    assert after == {**before, "vol": before["snap"]}
    assert _origins(pool) == {"vol": None, "snap": "vol", "other": "vol"}
    with pytest.raises(NotFound):
        old.read(0, 1)
    # The new device is independent: writes to it leave the snapshot alone, and back.
    new.write(0, b"X" * 5)
    pool.volume("snap").write(BS, b"Y" * 5)
    assert pool.volume("vol").read(0, 6) == b"XXXXXA"
    assert pool.volume("vol").read(BS, 5) == b"AAAAA"
    assert pool.volume("snap").read(0, 5) == b"AAAAA"
    pool.commit()
    want = _all(pool)
    pool.close()
    with Pool.open(tmp_path / "p") as p:
        assert _all(p) == want and not p.notes
    assert_checks_pass(tmp_path / "p" / "metadata")


def test_revert_frees_what_only_the_old_device_held(pool):
    used = pool.stat().data_blocks_used
    pool.delete("other")
    assert pool.stat().data_blocks_used == used
    pool.revert("vol", "snap")
    # vol's own blocks (block 1 after the write, block 5) are freed; snap's 3 blocks remain.
    assert pool.stat().data_blocks_used == 3


def test_revert_to_a_snapshot_of_a_snapshot_and_sizes(pool):
    pool.snapshot("snap", "deep").write(0, b"D")
    pool.resize_volume("deep", SIZE + 3 * BS)
    pool.volume("deep").write(SIZE + BS, b"past")
    want = pool.volume("deep").read(0, SIZE)
    v = pool.revert("vol", "deep")
    assert v.size == SIZE and v.read(0, SIZE) == want
    pool.resize_volume("vol", SIZE + 3 * BS)          # the blocks past the end were unmapped
    assert pool.volume("vol").read(SIZE, 3 * BS) == bytes(3 * BS)


def test_revert_refusals_change_nothing(pool, tmp_path):
    pool.commit()
    before, trans = _all(pool), pool.stat().transaction_id
    with pytest.raises(NotFound):
        pool.revert("vol", "nosuch")
    with pytest.raises(NotFound):
        pool.revert("nosuch", "snap")
    with pytest.raises(InvalidArgument):
        pool.revert("snap", "vol")                 # vol is snap's origin, not its snapshot
    with pytest.raises(InvalidArgument):
        pool.revert("vol", "vol")
    pool.create_thin("x", SIZE)
    pool.commit()
    trans = pool.stat().transaction_id
    with pytest.raises(InvalidArgument):
        pool.revert("vol", "x")                    # not a snapshot of vol
    pool.snapshot("vol", "small")
    pool.resize_volume("small", SIZE - 100)
    pool.commit()
    trans = pool.stat().transaction_id
    before = _all(pool)
    with pytest.raises(InvalidArgument):
        pool.revert("vol", "small")                # ends inside a block: refused
    assert _all(pool) == before and pool.stat().transaction_id == trans


def test_merge_replaces_the_origin(pool, tmp_path):
    pool.snapshot("snap", "child").write(0, b"c")
    before = _all(pool)
    old_vol, old_snap = pool.volume("vol"), pool.volume("snap")
    merged = pool.merge("snap")
    assert merged.name == "vol" and merged.dev_id == old_snap.dev_id
    assert _all(pool) == {"vol": before["snap"], "other": before["other"],
                          "child": before["child"]}
    assert _origins(pool) == {"vol": None, "other": "vol", "child": "vol"}
    for h in (old_vol, old_snap):
        with pytest.raises(NotFound):
            h.read(0, 1)
    pool.commit()
    pool.close()
    with Pool.open(tmp_path / "p") as p:
        assert _all(p) == {"vol": before["snap"], "other": before["other"],
                           "child": before["child"]}
        assert not p.notes


def test_merge_keeps_the_origin_s_origin(pool):
    pool.snapshot("snap", "grand").write(0, b"g")
    want = pool.volume("grand").read(0, SIZE)
    pool.merge("grand")
    assert _origins(pool)["snap"] == "vol" and "grand" not in pool.volumes()
    assert pool.volume("snap").read(0, SIZE) == want


def test_merge_refusals_change_nothing(pool):
    pool.commit()
    trans = pool.stat().transaction_id
    before = _all(pool)
    with pytest.raises(InvalidArgument):
        pool.merge("vol")                          # not a snapshot
    with pytest.raises(NotFound):
        pool.merge("nosuch")
    assert _all(pool) == before and pool.stat().transaction_id == trans
    pool.delete("vol")
    pool.commit()
    trans = pool.stat().transaction_id
    with pytest.raises(InvalidArgument):
        pool.merge("snap")                         # its origin is gone
    assert pool.stat().transaction_id == trans


def test_read_only_pool_refuses(pool, tmp_path):
    pool.close()
    with Pool.open(tmp_path / "p", read_only=True) as p:
        from thinpool.errors import ReadOnlyError
        with pytest.raises(ReadOnlyError):
            p.revert("vol", "snap")
        with pytest.raises(ReadOnlyError):
            p.merge("snap")


def test_pending_records_of_the_new_kinds_are_checked():
    from thinpool.registry import _check_pending
    rec = {"op": "merge", "name": "vol", "dev_id": 2, "size": 10, "transaction_id": 3,
           "origin": None}
    with pytest.raises(ValueError):
        _check_pending(rec)                        # a merge names its source
    assert _check_pending({**rec, "source": "snap"})["source"] == "snap"
    assert _check_pending({**rec, "op": "revert"})["op"] == "revert"
