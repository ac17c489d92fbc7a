"""Pool modes and what moves a pool between them: a full data device (fail at once, or wait for
space), the low-water hook, running out of metadata space, damaged metadata."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from thinpool import Pool, PoolMode
from thinpool.errors import CorruptBlock, MetadataError, NoDataSpace, NoMetadataSpace, ReadOnlyError
from thinpool.metadata.walker import MetadataReader
from thinpool.tools.check import check
from tests.tptools import assert_checks_pass
from tests.tptools import requires_tools

BS = 64 * 1024
MiB = 1 << 20


def test_error_if_no_space_fails_at_once(tmp_path):
    with Pool.create(tmp_path / "p", data_size=4 * BS, error_if_no_space=True) as p:
        v = p.create_thin("v", 16 * BS)
        v.write(0, b"x" * (4 * BS))
        assert p.mode == PoolMode.OUT_OF_DATA_SPACE
        with pytest.raises(NoDataSpace):
            v.write(5 * BS, b"y")
        assert p.stat().mode == "out_of_data_space"


def test_a_write_waits_for_space_and_finishes_after_a_resize(tmp_path):
    with Pool.create(tmp_path / "p", data_size=4 * BS, no_space_timeout=60) as p:
        v = p.create_thin("v", 16 * BS)
        v.write(0, b"x" * (4 * BS))
        p.commit()
        outcome: list = []

        def writer():
            try:
                v.write(8 * BS, b"waited for space")
                outcome.append("ok")
            except Exception as e:  # noqa: BLE001
                outcome.append(e)

        t = threading.Thread(target=writer)
        t.start()
        # The writer is queued (like dm-thin's no_space_timeout): it has not finished.
        for _ in range(50):
            if p._alloc.available() == 0 and t.is_alive():
                break
            time.sleep(0.01)
        assert t.is_alive() and outcome == []
        p.resize(data_size=8 * BS)         # another thread adds space
        t.join(30)
        assert outcome == ["ok"]
        assert v.read(8 * BS, 16) == b"waited for space"
        assert v.read(0, 4 * BS) == b"x" * (4 * BS)


def test_a_waiting_write_gives_up_after_the_timeout(tmp_path):
    with Pool.create(tmp_path / "p", data_size=2 * BS, no_space_timeout=0.3) as p:
        v = p.create_thin("v", 16 * BS)
        v.write(0, b"x" * (2 * BS))
        with pytest.raises(NoDataSpace) as e:
            v.write(4 * BS, b"y")
        assert "waited" in str(e.value)
        assert v.read(4 * BS, 1) == b"\0"


def test_low_water_hook_runs_once_per_crossing(tmp_path):
    log = tmp_path / "hook.log"
    hook = f"echo $THINPOOL_FREE_BLOCKS >> {log}"
    with Pool.create(tmp_path / "p", data_size=16 * BS, error_if_no_space=True,
                     low_water_blocks=6, low_water_hook=hook) as p:
        v = p.create_thin("v", 64 * BS)
        for i in range(14):                       # free: 15, 14, ... 2
            v.write(i * BS, b"z")
        _wait_for_lines(log, 1)
        assert log.read_text().split() == ["5"]   # fired once, at the crossing
        p.resize(data_size=64 * BS)               # back above the mark: re-armed
        for i in range(14, 62):
            v.write(i * BS, b"z")
        _wait_for_lines(log, 2)
        assert log.read_text().split() == ["5", "5"]
        assert any("low-water" in n for n in p.notes)


def _wait_for_lines(path: Path, n: int) -> None:
    for _ in range(200):
        if path.exists() and len(path.read_text().split()) >= n:
            return
        time.sleep(0.02)


def _small_metadata_pool(tmp_path, blocks: int) -> Path:
    meta = tmp_path / "meta.img"
    with open(meta, "wb") as f:
        f.truncate(blocks * 4096)
    Pool.create(tmp_path / "p", data_size=4096 * BS, metadata_path=meta, error_if_no_space=True).close()
    return tmp_path / "p"


@requires_tools
def test_out_of_metadata_space_rolls_back_goes_read_only_and_recovers(tmp_path):
    d = _small_metadata_pool(tmp_path, 24)
    with Pool.open(d) as p:
        v = p.create_thin("v", 4096 * BS)
        v.write(0, b"committed")
        p.commit()
        with pytest.raises(NoMetadataSpace) as e:
            for i in range(1, 4000):
                v.write(i * BS, b"more")
        assert "resize" in str(e.value) and "--metadata-size" in str(e.value)
        assert p.mode == PoolMode.READ_ONLY and p.stat().needs_check
        with pytest.raises(ReadOnlyError) as e2:
            v.write(0, b"refused")
        assert "thinpool check" in str(e2.value)
    # The flag is on disk; the committed data is intact; the metadata is consistent.
    assert_checks_pass(tmp_path / "meta.img")
    with Pool.open(d) as p:
        assert p.mode == PoolMode.READ_ONLY
        assert p.volume("v").read(0, 9) == b"committed"
        p.resize(metadata_size=4 * MiB)           # allowed while read-only
        assert check(tmp_path / "meta.img").clean
        p.clear_needs_check()
        assert p.mode == PoolMode.WRITE
        for i in range(1, 600):
            p.volume("v").write(i * BS, b"more")
    assert_checks_pass(tmp_path / "meta.img")
    with Pool.open(d, read_only=True) as p:
        assert p.volume("v").mapped_blocks == 600


def _flip(path: Path, block: int, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(block * 4096 + offset)
        b = f.read(1)
        f.seek(block * 4096 + offset)
        f.write(bytes([b[0] ^ 0x10]))


@requires_tools
def test_damaged_leaf_is_named_and_the_pool_stops_writing(tmp_path):
    d = tmp_path / "p"
    with Pool.create(d, data_size=4096 * BS) as p:
        v = p.create_thin("v", 4096 * BS)
        for i in range(0, 1200, 2):
            v.write(i * BS, b"x")
        w = p.create_thin("w", BS)
        w.write(0, b"other volume")
    with MetadataReader(d / "metadata") as r:
        root = r.roots()[1]
        leaf = int(r.mapping_tree.node(root).values[1])      # a leaf of v's tree
    _flip(d / "metadata", leaf, 200)
    with Pool.open(d) as p:
        with pytest.raises(CorruptBlock) as e:
            p.volume("v").read(0, 700 * BS)
        assert e.value.block == leaf and e.value.kind == "btree node"
        assert str(leaf) in str(e.value)
        assert p.mode == PoolMode.READ_ONLY
        with pytest.raises(ReadOnlyError) as e2:
            p.volume("w").write(0, b"no")
        assert "thinpool check" in str(e2.value) and "repair" in str(e2.value)
        assert p.volume("w").read(0, 12) == b"other volume"      # reads still work
    with Pool.open(d, read_only=True) as p:
        assert p.stat().needs_check and p.stat().mode == "read_only"
    assert not check(d / "metadata").clean


@pytest.mark.parametrize("where", ["superblock", "bitmap", "index"])
def test_damage_found_at_open_names_the_block(tmp_path, where):
    d = tmp_path / "p"
    with Pool.create(d, data_size=64 * BS) as p:
        p.create_thin("v", BS).write(0, b"x")
    with MetadataReader(d / "metadata") as r:
        sb = r.sb
        block = {"superblock": 0, "index": sb.metadata_sm.bitmap_root}.get(where)
        if where == "bitmap":
            import struct
            raw = r.bm.read_raw(sb.metadata_sm.bitmap_root)
            block = struct.unpack_from("<Q", raw, 16)[0]
    _flip(d / "metadata", block, 100)
    before = (d / "metadata").read_bytes()
    with pytest.raises(MetadataError) as e:
        Pool.open(d)
    assert f"block {block}" in str(e.value)
    assert (d / "metadata").read_bytes() == before       # nothing written on top of it


@requires_tools
def test_full_pool_scenario_two_volumes_and_a_snapshot(tmp_path):
    """Fill the pool to out-of-space with two volumes and a snapshot; nothing committed is lost;
    after a resize the same writes finish; thin_check is clean."""
    d = tmp_path / "p"
    with Pool.create(d, data_size=24 * BS, error_if_no_space=True) as p:
        a, b = p.create_thin("a", 64 * BS), p.create_thin("b", 64 * BS)
        a.write(0, b"A" * (8 * BS))
        b.write(0, b"B" * (8 * BS))
        snap = p.snapshot("a", "snap")
        p.commit()
        pending = []                      # (volume, offset, data) the full pool refused
        for i in range(16):
            for vol, fill in ((a, b"a"), (b, b"b"), (snap, b"s")):
                off = (i * 3 % 16) * BS + 100
                data = fill * 5000
                try:
                    vol.write(off, data)
                except NoDataSpace:
                    pending.append((vol.name, off, data))
        assert pending and p.mode == PoolMode.OUT_OF_DATA_SPACE
        p.commit()
    with Pool.open(d) as p:               # everything committed is there
        assert p.volume("snap").read(8 * BS - 10, 10) == b"A" * 10
        assert p.volume("b").read(7 * BS, 10) == b"B" * 10
        p.resize(data_size=128 * BS)
        for name, off, data in pending:
            p.volume(name).write(off, data)
        for name, off, data in pending:
            assert p.volume(name).read(off, len(data)) == data
        assert p.mode == PoolMode.WRITE
    assert_checks_pass(d / "metadata")
    assert check(d / "metadata").clean


def test_reused_blocks_never_show_their_old_contents(tmp_path):
    """Blocks freed by a delete and a discard go to another volume; its partly written blocks
    read zeros around its own bytes, never the previous owner's."""
    d = tmp_path / "p"
    secret = b"\xee" * BS
    with Pool.create(d, data_size=16 * BS, error_if_no_space=True) as p:
        a = p.create_thin("a", 16 * BS)
        c = p.create_thin("c", 16 * BS)
        for i in range(8):
            a.write(i * BS, secret)
            c.write(i * BS, secret)
        p.commit()
        p.delete("a")
        c.discard(0, 8 * BS)
        p.commit()
        b = p.create_thin("b", 64 * BS)
        for i in range(16):                # every data block, most of them reused
            b.write(i * BS + 7, b"!")
        for i in range(16):
            got = b.read(i * BS, BS)
            assert got == bytes(7) + b"!" + bytes(BS - 8)
        assert c.read(0, 8 * BS) == bytes(8 * BS)
