"""Pool and Volume behaviour: creation rules, I/O semantics, space, names, locking, durability."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
from pathlib import Path

import pytest

from thinpool import Pool, PoolMode
from thinpool.errors import (AlreadyExists, BusyError, InvalidArgument, NoDataSpace, NotFound,
                             OutOfRange, ReadOnlyError)
from tests.holder import pool_held_elsewhere
from tests.tptools import assert_checks_pass
from tests.tptools import (TESTDATA_CASES, parse_xml, requires_tools, testdata_image,
                           testdata_xml, thin_dump, thin_restore)

BS = 64 * 1024
MiB = 1 << 20


@pytest.fixture
def pool(tmp_path):
    p = Pool.create(tmp_path / "pool", data_size=16 * MiB)
    yield p
    p.close()


def sha(path: Path) -> str:
    import hashlib
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- creation --------------------------------------------------------------------------------
@pytest.mark.parametrize("bs", [0, 512, 100 * 1024, 32 * 1024, 2 << 30, 64 * 1024 + 512])
def test_create_refuses_bad_block_size(tmp_path, bs):
    with pytest.raises(InvalidArgument):
        Pool.create(tmp_path / "p", data_size=16 * MiB, block_size=bs)
    assert not (tmp_path / "p").exists()


def test_create_refuses_tiny_data_and_existing(tmp_path):
    with pytest.raises(InvalidArgument):
        Pool.create(tmp_path / "p", data_size=1000)
    assert not (tmp_path / "p").exists()
    Pool.create(tmp_path / "p", data_size=MiB).close()
    with pytest.raises(AlreadyExists):
        Pool.create(tmp_path / "p", data_size=MiB)


def test_create_defaults_and_sparse_files(tmp_path):
    with Pool.create(tmp_path / "p", data_size=1 << 40) as p:   # 1 TiB sparse
        st = p.stat()
        assert st.block_size == 64 * 1024
        assert st.data_blocks_total == (1 << 40) // BS
        # 48 bytes per data block, at least 2 MiB.
        assert st.metadata_blocks_total * 4096 == 48 * ((1 << 40) // BS)
    data = tmp_path / "p" / "data"
    assert data.stat().st_size == 1 << 40
    assert data.stat().st_blocks * 512 < MiB


def test_create_on_existing_files_and_refuses_live_metadata(tmp_path):
    d, m = tmp_path / "d.img", tmp_path / "m.img"
    for path, size in ((d, 8 * MiB), (m, 4 * MiB)):
        with open(path, "wb") as f:
            f.truncate(size)
    with Pool.create(tmp_path / "p", data_path=d, metadata_path=m) as p:
        assert p.stat().data_blocks_total == 8 * MiB // BS
        p.create_thin("a", MiB).write(0, b"x")
    with pytest.raises(AlreadyExists):
        Pool.create(tmp_path / "q", data_path=d, metadata_path=m)
    assert not (tmp_path / "q").exists()
    with Pool.open(tmp_path / "p") as p:
        assert p.volume("a").read(0, 1) == b"x"


# -- I/O semantics ---------------------------------------------------------------------------
def test_unwritten_reads_zero_and_partial_block_provisioning(pool):
    v = pool.create_thin("v", 10 * MiB)
    assert v.read(0, 3 * BS) == bytes(3 * BS)
    v.write(BS + 10, b"abc")
    assert v.mapped_blocks == 1
    blk = v.read(BS, BS)
    assert blk[10:13] == b"abc" and blk.count(0) == BS - 3


def test_write_past_end_fails_and_changes_nothing(pool):
    v = pool.create_thin("v", 3 * BS + 5)
    v.write(0, b"a" * 10)
    before = v.mappings()
    with pytest.raises(OutOfRange):
        v.write(3 * BS, b"z" * 6)
    with pytest.raises(OutOfRange):
        v.read(3 * BS + 5, 1)
    with pytest.raises(InvalidArgument):
        v.write(-1, b"z")
    assert v.mappings() == before
    v.write(3 * BS, b"z" * 5)     # up to the last byte is fine


def test_snapshot_copy_on_write_isolation(pool):
    v = pool.create_thin("v", 8 * BS)
    rng = random.Random(1)
    orig = bytes(rng.getrandbits(8) for _ in range(4 * BS))
    v.write(0, orig)
    s = pool.snapshot("v", "s")
    s2 = pool.snapshot("s", "s2")          # snapshot of a snapshot
    v.write(100, b"origin")
    s.write(BS + 5, b"snap")
    assert s2.read(0, 4 * BS) == orig
    assert v.read(100, 6) == b"origin" and s.read(100, 6) == orig[100:106]
    assert s.read(BS + 5, 4) == b"snap" and v.read(BS + 5, 4) == orig[BS + 5: BS + 9]
    # The sharing was broken by copying exactly the written blocks.
    vm = {vb: db for vb, db, _ in v.mappings()}
    sm = {vb: db for vb, db, _ in s.mappings()}
    s2m = {vb: db for vb, db, _ in s2.mappings()}
    assert vm[0] != s2m[0] and sm[1] != s2m[1]
    assert vm[2] == sm[2] == s2m[2]


def test_discard_unmaps_and_zeroes_edges(pool):
    v = pool.create_thin("v", 8 * BS)
    v.write(0, b"\xff" * (4 * BS))
    s = pool.snapshot("v", "s")
    v.discard(100, 2 * BS)
    assert v.read(100, 2 * BS) == bytes(2 * BS)
    assert v.read(0, 100) == b"\xff" * 100
    assert v.read(2 * BS + 100, 10) == b"\xff" * 10
    assert {vb for vb, _, _ in v.mappings()} == {0, 2, 3}   # block 1 was whole
    assert s.read(0, 4 * BS) == b"\xff" * (4 * BS)


def test_delete_frees_blocks_and_punches_holes(tmp_path):
    with Pool.create(tmp_path / "p", data_size=16 * MiB) as p:
        v = p.create_thin("v", 8 * MiB)
        v.write(0, os.urandom(4 * MiB))
        p.commit()
        used = p.stat().data_blocks_used
        assert used == 4 * MiB // BS
        data = tmp_path / "p" / "data"
        assert data.stat().st_blocks * 512 >= 4 * MiB
        p.delete("v")
        assert p.stat().data_blocks_used == 0
        assert data.stat().st_blocks * 512 < MiB
        with pytest.raises(NotFound):
            v.read(0, 1)


# -- space -----------------------------------------------------------------------------------
def test_out_of_data_space_then_resize(tmp_path):
    with Pool.create(tmp_path / "p", data_size=8 * BS, error_if_no_space=True) as p:
        a = p.create_thin("a", 64 * BS)
        b = p.create_thin("b", 64 * BS)
        a.write(0, b"a" * (6 * BS))
        p.commit()
        b.write(0, b"b" * (2 * BS))
        assert p.mode == PoolMode.OUT_OF_DATA_SPACE
        with pytest.raises(NoDataSpace):
            b.write(10 * BS, b"more" * 100)
        with pytest.raises(NoDataSpace):
            a.write(7 * BS, b"x" * (3 * BS))      # all or nothing: nothing written
        assert a.read(0, 6 * BS) == b"a" * (6 * BS)
        assert b.read(0, 2 * BS) == b"b" * (2 * BS)
        a.write(BS, b"in place")                   # exclusive blocks still take writes
        p.resize(data_size=32 * BS)
        b.write(10 * BS, b"more" * 100)
        assert p.mode == PoolMode.WRITE
    assert_checks_pass(tmp_path / "p" / "metadata")
    with Pool.open(tmp_path / "p") as p:
        assert p.volume("b").read(10 * BS, 400) == b"more" * 100
        assert p.stat().data_blocks_total == 32
    with Pool.open(tmp_path / "p") as p:
        with pytest.raises(InvalidArgument):
            p.resize(data_size=8 * BS)


@requires_tools
def test_resize_alone_is_durable(tmp_path):
    # Growing is the only change in the transaction: it must still be committed.
    with Pool.create(tmp_path / "p", data_size=8 * BS) as p:
        pass
    with Pool.open(tmp_path / "p") as p:
        p.resize(data_size=32 * BS, metadata_size=4 * MiB)
    with Pool.open(tmp_path / "p") as p:
        st = p.stat()
        assert (st.data_blocks_total, st.metadata_blocks_total) == (32, 4 * MiB // 4096)
    assert_checks_pass(tmp_path / "p" / "metadata")


def test_volume_may_exceed_pool(pool):
    v = pool.create_thin("huge", 1 << 50)
    v.write((1 << 50) - 10, b"end of it!")
    assert v.read((1 << 50) - 10, 10) == b"end of it!"


def test_resize_volume(pool):
    v = pool.create_thin("v", 4 * BS)
    v.write(0, b"q" * (4 * BS))
    pool.resize_volume("v", BS + 10)
    v = pool.volume("v")
    assert v.size == BS + 10
    assert v.mapped_blocks == 2
    pool.resize_volume("v", 4 * BS)
    v = pool.volume("v")
    assert v.read(0, BS + 10) == b"q" * (BS + 10)
    assert v.read(BS + 10, 3 * BS - 10) == bytes(3 * BS - 10)


# -- names and registry ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["", "a/b", "..", ".x", "-x", "a b", "a\0b", "x" * 129, "é"])
def test_bad_names(pool, name):
    with pytest.raises(InvalidArgument):
        pool.create_thin(name, MiB)


def test_duplicate_and_unknown_names(pool):
    pool.create_thin("a", MiB)
    with pytest.raises(AlreadyExists):
        pool.create_thin("a", MiB)
    with pytest.raises(AlreadyExists):
        pool.snapshot("a", "a")
    with pytest.raises(NotFound):
        pool.snapshot("nope", "b")
    with pytest.raises(NotFound):
        pool.delete("nope")


def test_deleting_an_origin_clears_it_durably(tmp_path):
    with Pool.create(tmp_path / "p", data_size=4 * MiB) as p:
        p.create_thin("a", MiB)
        p.snapshot("a", "b")
        p.delete("a")
        assert p.stat().volumes[0].origin is None
    with Pool.open(tmp_path / "p") as p:
        assert [(v.name, v.origin) for v in p.stat().volumes] == [("b", None)]


def test_interrupted_create_rolls_forward_or_back(tmp_path):
    d = tmp_path / "p"
    with Pool.create(d, data_size=4 * MiB) as p:
        p.create_thin("keep", MiB)
    names = d / "names.json"
    # Case 1: the registry says a create is pending but the metadata never committed it.
    doc = json.loads(names.read_text())
    doc["pending"] = {"op": "create", "name": "ghost", "dev_id": 9, "size": MiB,
                      "transaction_id": doc["transaction_id"] + 1}
    names.write_text(json.dumps(doc))
    with Pool.open(d) as p:
        assert p.volumes() == ["keep"]
        assert any("rolled back" in n for n in p.notes)
    # Case 2: metadata committed a create, the registry write after it was lost.
    with Pool.open(d) as p:
        before = json.loads(names.read_text())
        p.create_thin("new", MiB)
    after = json.loads(names.read_text())
    before["pending"] = {"op": "create", "name": "new", "dev_id": after["volumes"]["new"]["dev_id"],
                         "size": MiB, "transaction_id": after["transaction_id"]}
    names.write_text(json.dumps(before))
    with Pool.open(d) as p:
        assert p.volumes() == ["keep", "new"]
        assert any("rolled forward" in n for n in p.notes)


def _snapshot_then_die(d: str) -> None:
    """Child process: a snapshot, then death without close (the names file is left behind)."""
    p = Pool.open(d)
    p.snapshot("keep", "snap")
    with open(os.path.join(d, "names.json")) as f:
        assert json.load(f)["pending"]["name"] == "snap"     # finished in memory only
    os._exit(0)


def test_names_file_catches_up_at_close_or_at_the_next_open(tmp_path):
    """The names file is not rewritten after each operation (the pending record and the
    transaction id are enough): a clean close writes it, and after a death the next open rolls the
    operation forward. Readers holding a metadata snapshot see every name made before it."""
    d = tmp_path / "p"
    with Pool.create(d, data_size=4 * MiB) as p:
        p.create_thin("keep", MiB)
        p.snapshot("keep", "s1")
        p.reserve_metadata_snap()
        doc = json.loads((d / "names.json").read_text())
        assert doc["pending"] is None and sorted(doc["volumes"]) == ["keep", "s1"]
        p.release_metadata_snap()
        p.delete("s1")
    doc = json.loads((d / "names.json").read_text())
    assert doc["pending"] is None and sorted(doc["volumes"]) == ["keep"]
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=_snapshot_then_die, args=(str(d),))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    with Pool.open(d) as p:
        assert p.volumes() == ["keep", "snap"]
        assert p.stat().volumes[1].origin == "keep"
        assert any("rolled forward" in n for n in p.notes)
    assert json.loads((d / "names.json").read_text())["pending"] is None


# -- durability ------------------------------------------------------------------------------
def test_uncommitted_changes_are_dropped_and_committed_ones_kept(tmp_path):
    d = tmp_path / "p"
    with Pool.create(d, data_size=4 * MiB) as p:
        v = p.create_thin("v", MiB)
        v.write(0, b"committed")
        v.flush()
        v.write(2 * BS, b"never committed")
        p.close()                           # like a crash: no commit
    with Pool.open(d) as p:
        v = p.volume("v")
        assert v.read(0, 9) == b"committed"
        assert v.read(2 * BS, 15) == bytes(15)
        assert v.mapped_blocks == 1


def test_second_writer_is_busy_and_named(tmp_path):
    d = tmp_path / "p"
    Pool.create(d, data_size=MiB).close()
    with pool_held_elsewhere(d) as proc:
        with pytest.raises(BusyError) as e:
            Pool.open(d)
        assert e.value.holder_pid == proc.pid
        assert str(proc.pid) in str(e.value)
        with Pool.open(d, read_only=True) as p:         # readers go on beside a writer
            assert any(str(proc.pid) in n and "last commit" in n for n in p.notes)
    Pool.open(d).close()


def test_read_only_pool_refuses_writes(tmp_path):
    d = tmp_path / "p"
    with Pool.create(d, data_size=MiB) as p:
        p.create_thin("v", MiB)
    before = sha(d / "metadata")
    with Pool.open(d, read_only=True) as p:
        with pytest.raises(ReadOnlyError):
            p.volume("v").write(0, b"x")
        with pytest.raises(ReadOnlyError):
            p.create_thin("w", MiB)
        assert p.read_only and p.stat().mode == "write"     # the pool is fine; this handle reads
    assert sha(d / "metadata") == before


# -- stat ------------------------------------------------------------------------------------
def test_stat_keys(pool):
    pool.create_thin("a", 3 * MiB).write(0, b"x" * (BS + 1))
    pool.snapshot("a", "b")
    d = pool.stat().as_dict()
    for k in ("name", "data_path", "metadata_path", "block_size", "data_blocks_total",
              "data_blocks_used", "metadata_blocks_total", "metadata_blocks_used",
              "transaction_id", "volumes"):
        assert k in d
    assert d["data_blocks_used"] == 2
    assert d["transaction_id"] == 2
    assert [(v["name"], v["dev_id"], v["size"], v["mapped_blocks"]) for v in d["volumes"]] == \
        [("a", 1, 3 * MiB, 2), ("b", 2, 3 * MiB, 2)]
    assert d["volumes"][1]["origin"] == "a"


# -- interop: images made by the real tools --------------------------------------------------
@requires_tools
@pytest.mark.parametrize("case", TESTDATA_CASES)
def test_opens_testdata_images(tmp_path, case):
    img = testdata_image(case, tmp_path)
    xml = parse_xml(testdata_xml(case))
    data = tmp_path / "data"
    with open(data, "wb") as f:
        f.truncate(xml.nr_data_blocks * xml.data_block_size * 512)
    before = sha(img)
    with Pool.open_files(img, data, read_only=True) as p:
        assert p.block_size == xml.data_block_size * 512
        assert p.stat().transaction_id == xml.transaction
        assert sorted(p.metadata.device_ids()) == sorted(xml.devices)
        for dev, xd in xml.devices.items():
            v = p.volume(str(dev))
            assert {vb: (db, t) for vb, db, t in v.mappings()} == xd.mappings
            assert v.mapped_blocks == xd.mapped_blocks
            if xd.mappings:
                vb = min(xd.mappings)
                assert v.read(vb * p.block_size, 16) == bytes(16)   # sparse data file
    assert sha(img) == before


@requires_tools
@pytest.mark.parametrize("seed", range(8))
def test_opens_random_thin_restore_metadata_and_writes_to_it(tmp_path, seed):
    from tests.tptools import random_superblock, to_xml
    sb = random_superblock(random.Random(seed), max_mappings=2000)
    img = thin_restore(to_xml(sb), tmp_path / "meta.img")
    data = tmp_path / "data"
    size = sb.nr_data_blocks * sb.data_block_size * 512
    if size > 1 << 43:          # beyond what the file system under /tmp allows: metadata only
        data = None
    else:
        with open(data, "wb") as f:
            f.truncate(size)
    with Pool.open_files(img, data, read_only=data is None) as p:
        for dev, xd in sb.devices.items():
            got = {vb: (db, t) for vb, db, t in p.volume(str(dev)).mappings()}
            assert got == xd.mappings
        if data is not None and sb.devices and p.stat().data_blocks_free > 4:
            dev = min(sb.devices)
            v = p.volume(str(dev))
            p.resize_volume(str(dev), max(v.size, 8 * p.block_size))
            v = p.volume(str(dev))
            v.write(3, b"written by thinpool")
            p.snapshot(str(dev), "snapshot")
    assert_checks_pass(img)
    if data is None:
        return
    again = parse_xml(thin_dump(img))
    for dev, xd in sb.devices.items():
        if dev != (min(sb.devices) if sb.devices else None):
            assert again.devices[dev].mappings == xd.mappings


def test_small_writes_leave_their_blocks_on_the_fast_path(tmp_path):
    """A small write into a new block maps it (and its neighbour) in the metadata's lookup cache,
    so the next small request there is served without a tree walk or the pool's lock: the
    cache must hold exactly what the tree says, mapped and unmapped alike."""
    with Pool.create(tmp_path / "p", data_size=16 * MiB) as p:
        vol = p.create_thin("v", 8 * MiB)
        bs = p.block_size
        for vb in (3, 9, 10):
            vol.write(vb * bs + 100, b"x" * 4096)
        cache = p._meta._lcache[vol.dev_id]
        truth = {v: (d, t) for v, d, t in vol.mappings()}
        for vb in (2, 3, 8, 9, 10):
            assert vb in cache and cache[vb] == truth.get(vb)
            assert vol._fast_block(vb * bs + 100, 4096) is not None
        vol.write(9 * bs + 100, b"y" * 10)            # in place, through the fast path
        assert vol.read(9 * bs + 100, 12) == b"y" * 10 + b"xx"


def test_reserving_a_metadata_snapshot_gives_back_the_space_it_commits_free(tmp_path):
    """The reservation commits what is pending; blocks that commit frees are punched like any
    commit's (they were left allocated in the data file before)."""
    with Pool.create(tmp_path / "p", data_size=16 * MiB) as p:
        v = p.create_thin("v", 8 * MiB)
        v.write(0, b"x" * (4 * MiB))
        p.commit()
        before = p._data.allocated_bytes()
        v.discard(0, 4 * MiB)                   # frees every block, not committed yet
        p.reserve_metadata_snap()
        assert p._data.allocated_bytes() <= before - 4 * MiB + 64 * 1024
        assert v.read(0, 16) == bytes(16)
        p.release_metadata_snap()
