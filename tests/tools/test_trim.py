"""trim: free data blocks go back to the host; live data stays.

The data file is sparse and every write is one byte per block, so each written block holds one
file-system page: ``st_blocks`` moves measurably when blocks are released. Deleting volumes frees
their blocks; ``trim`` must leave the data file smaller than before the deletes, and every byte
written to a volume that still exists must read back (also after reopening the pool). Stale bytes
in free blocks (written behind the pool's back, as an old pool or a crash would leave them) must
be released too, and nothing a live mapping uses may be punched.
"""

from __future__ import annotations

import os
import random

from tests.tools.helpers import random_pool
from tests.tptools import assert_checks_pass
from tests.tptools import TOOLS_AVAILABLE
from thinpool import Pool
from thinpool.tools.check import check
from thinpool.tools.trim import trim


def allocated(path) -> int:
    return os.stat(path).st_blocks * 512


def test_trim_after_deletes_releases_space_and_keeps_live_data(tmp_path):
    pool, model = random_pool(tmp_path / "pool", 5, steps=20, max_writes=400)
    data = tmp_path / "pool" / "data"
    bs = pool.block_size
    # Make sure there is something to delete that no other volume shares.
    fresh = pool.create_thin("scratch", 1 << 30)
    for i in range(300):
        fresh.write(i * bs + 17, b"s")
    pool.commit()
    before = allocated(data)
    doomed = ["scratch"] + [n for n in sorted(model.volumes) if n != sorted(model.volumes)[0]][:2]
    for name in doomed:
        pool.delete(name)
        model.volumes.pop(name, None)
    result = trim(pool)
    after = allocated(data)
    assert after < before, (before, after)
    assert result.supported
    assert result.free_blocks == pool.metadata.nr_data_blocks - pool.metadata.data_sm.nr_allocated()
    model.verify(pool, random.Random(1), samples=400)
    pool.close()
    with Pool.open(tmp_path / "pool", read_only=True) as again:
        model.verify(again, random.Random(2), samples=400)
    mpath = tmp_path / "pool" / "metadata"
    assert check(mpath).clean
    if TOOLS_AVAILABLE:
        assert_checks_pass(mpath)


def test_trim_releases_stale_bytes_in_free_blocks_only(tmp_path):
    pool, model = random_pool(tmp_path / "pool", 9, steps=15, max_writes=300)
    data = tmp_path / "pool" / "data"
    bs = pool.block_size
    counts = pool.metadata.data_sm.all_counts()
    free = [int(b) for b in (counts == 0).nonzero()[0][:: 97][:200]]
    used = [int(b) for b in (counts > 0).nonzero()[0]]
    assert free and used
    with open(data, "r+b") as f:             # stale contents, as an old pool would leave
        for b in free:
            f.seek(b * bs + 5)
            f.write(b"stale")
    before = allocated(data)
    result = trim(pool)
    assert result.free_blocks >= len(free) and result.runs >= 1
    # Each stale page goes back; the file system may spend a few blocks of its own on the
    # extent tree when holes split fully written neighbours, so allow a little slack.
    slack = 16 * 4096
    assert allocated(data) <= before - len(free) * 4096 + slack
    assert result.bytes_released is not None and result.bytes_released >= len(free) * 4096 - slack
    with open(data, "rb") as f:
        for b in free:
            f.seek(b * bs)
            assert f.read(bs).count(0) == bs, f"free block {b} still holds data"
    model.verify(pool, random.Random(3), samples=1000)
    # A second trim finds nothing more to give back.
    again = trim(pool)
    assert again.bytes_released == 0
    pool.close()


def test_trim_keeps_blocks_a_held_metadata_snapshot_maps(tmp_path):
    """A volume deleted while a metadata snapshot is held still has its data in the snapshot."""
    from thinpool.metadata import format as fmt
    from thinpool.metadata.walker import MetadataReader

    pool, model = random_pool(tmp_path / "pool", 21, steps=12, max_writes=300)
    bs = pool.block_size
    victim = max(model.volumes, key=lambda n: len(model.volumes[n]))
    content = dict(model.volumes[victim])
    dev_id = pool.volume(victim).dev_id
    assert content
    pool.metadata.reserve_metadata_snap()
    pool.delete(victim)
    for name in list(model.volumes):
        if name != victim:
            pool.volume(name).discard(0, min(pool.volume(name).size, 1 << 30))
    pool.commit()
    trim(pool)
    with MetadataReader(tmp_path / "pool" / "metadata", metadata_snap=True) as r:
        keys, values = r.device_arrays(r.roots()[dev_id])
    held = dict(zip(keys.tolist(), (values >> fmt.TIME_BITS).tolist()))
    with open(tmp_path / "pool" / "data", "rb") as f:
        for off, byte in content.items():
            f.seek(held[off // bs] * bs + off % bs)
            assert f.read(1) == bytes([byte]), f"byte {off} of the deleted volume was released"
    pool.close()
