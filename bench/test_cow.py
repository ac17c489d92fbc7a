"""Copy-on-write: the first write into a block shared with a snapshot against a write into an
exclusive block (workload 4).

A pool holds volume ``vol`` of 2,048 blocks of 64 KiB (128 MiB), filled and committed. Each round
writes 4 KiB at a random 4 KiB-aligned offset in *every one* of its blocks, in random order
(2,048 writes, the same list for both sides):

* **thinpool, shared**: before each round (untimed) a new snapshot of ``vol`` is taken (and the
  previous round's snapshot deleted), so every block of ``vol`` is shared again and every write
  is a first write into a shared block: a new data block is allocated, the 64 KiB original copied
  to it (``copy_file_range``), the 4 KiB written, the mapping replaced;
* **baseline, exclusive**: the same writes into the same volume with no snapshot: in place.

The loop is timed without a flush (the flush's fsync would time the disk, not the copy-on-write
path); each round starts from a commit. There is no target: the ratio is the price of breaking
sharing, block by block.
"""

from __future__ import annotations

import itertools
import random

import pytest

from thinpool import Pool

from ._util import MiB, remove, tag

BLOCK = 64 * 1024
NR_BLOCKS = 2048
ROUNDS = 5
WORKLOAD = "4. first 4 KiB writes into blocks shared with a snapshot (CoW) vs exclusive blocks"


def _offsets() -> list[int]:
    rng = random.Random(5)
    blocks = list(range(NR_BLOCKS))
    rng.shuffle(blocks)
    return [b * BLOCK + rng.randrange(BLOCK // 4096) * 4096 for b in blocks]


OFFSETS = _offsets()
PAYLOAD = b"\xab" * 4096


def _filled_pool(path) -> Pool:
    remove(path)
    # Room for the volume, one snapshot's worth of copies and the copies of the round under way.
    pool = Pool.create(path, data_size=3 * NR_BLOCKS * BLOCK, block_size=BLOCK,
                       error_if_no_space=True)
    vol = pool.create_thin("vol", NR_BLOCKS * BLOCK)
    fill = b"\xcd" * MiB
    for off in range(0, NR_BLOCKS * BLOCK, MiB):
        vol.write(off, fill)
    vol.flush()
    return pool


def _cow(benchmark, tmp_path, shared: bool) -> None:
    pool = _filled_pool(tmp_path / "pool")
    vol = pool.volume("vol")
    counter = itertools.count()
    snaps: list[str] = []

    def setup():
        if shared:
            if snaps:
                pool.delete(snaps.pop())       # frees the previous round's originals
            snaps.append(f"snap{next(counter)}")
            pool.snapshot("vol", snaps[-1])    # every block of vol is shared again
        vol.flush()
        return (), {}

    def loop():
        for off in OFFSETS:
            vol.write(off, PAYLOAD)

    def teardown():
        if shared:   # every block was copied: vol and the snapshot now share none
            st = {v.name: v for v in pool.stat().volumes}
            assert pool.stat().data_blocks_used == 2 * NR_BLOCKS, st

    try:
        benchmark.pedantic(loop, setup=setup, teardown=teardown, rounds=ROUNDS, warmup_rounds=1)
    finally:
        pool.close()
        remove(tmp_path / "pool")


@pytest.mark.benchmark(group="4 copy-on-write")
def test_cow_shared_thinpool(benchmark, tmp_path):
    tag(benchmark, WORKLOAD, "thinpool", "us/op", label="Volume.write, shared blocks",
        amount=NR_BLOCKS)
    _cow(benchmark, tmp_path, shared=True)


@pytest.mark.benchmark(group="4 copy-on-write")
def test_cow_exclusive_thinpool(benchmark, tmp_path):
    tag(benchmark, WORKLOAD, "baseline", "us/op", label="Volume.write, exclusive blocks",
        amount=NR_BLOCKS)
    _cow(benchmark, tmp_path, shared=False)
