"""A snapshot is O(1) in the origin's size: one reference-count increment of the origin's
mapping-tree root, then a commit.

Claim: a snapshot of a volume with a million mapped blocks takes about as long as a snapshot of a
volume with ten. Each group below times ``Pool.snapshot`` for volumes of 10 (the baseline), 1,000,
100,000 and 1,000,000 mapped blocks in one run; the "ratios against the baseline" section after
the table divides each size's mean, median and min by the 10-block one. Every pool has the same
number of data blocks and the same metadata size, so the volume's mapped blocks are the only
difference. (The commit's cost does grow with the pool's data blocks; that is not measured here.)

* ``first``: the first snapshot of the origin in a freshly opened pool (each round copies the
  pristine metadata image and opens it outside the timed region). The claim as a user meets it.
* ``repeated``: successive snapshots of the same origin in one open pool (each round takes a new
  one; the root's count then lives in the metadata space map's overflow tree).
"""

from __future__ import annotations

import itertools

import pytest

from thinpool import Pool

#: Mapped blocks of the origin volume; the first is the baseline.
SIZES = (10, 1_000, 100_000, 1_000_000)
#: Rounds per size. ``first`` copies a 64 MiB metadata image and opens it per round (about 0.5 s
#: for the largest size), so it takes fewer.
FIRST_ROUNDS = 25
REPEATED_ROUNDS = 100

ORIGIN = "1"   # Pool.open_files names devices by their id


@pytest.fixture(scope="module", autouse=True)
def _prepared(origins):
    origins.prepare(SIZES, warm_up=lambda pool: pool.snapshot(ORIGIN, "warm-up"))


def _ids(n: int) -> str:
    return f"{n:_}"


def _metadata_io(pool: Pool, action) -> dict[str, int]:
    """Run ``action()`` (untimed) counting the metadata blocks it reads from the device (cache
    misses) and writes: the I/O part of the claim, exact where the timings are noisy."""
    bm = pool.metadata.bm
    read_raw, write_many = bm.read_raw, bm.write_many
    io = {"metadata_blocks_read": 0, "metadata_blocks_written": 0}

    def counting_read_raw(b):
        io["metadata_blocks_read"] += 1
        return read_raw(b)

    def counting_write_many(blocks):
        blocks = list(blocks)
        io["metadata_blocks_written"] += len(blocks)
        return write_many(blocks)

    bm.read_raw, bm.write_many = counting_read_raw, counting_write_many
    try:
        action()
    finally:
        del bm.read_raw, bm.write_many
    return io


def _check_snapshot(pool: Pool, name: str, mapped_blocks: int) -> None:
    """Not a timing check: the benchmark must have snapshotted the volume we think it did."""
    vols = {v.name: v for v in pool.stat().volumes}
    snap = vols[name]
    assert snap.mapped_blocks == mapped_blocks == vols[ORIGIN].mapped_blocks
    assert pool.metadata.lookup(snap.dev_id, mapped_blocks - 1) == (mapped_blocks - 1, 0)


@pytest.mark.benchmark(group="snapshot: first of a freshly opened origin")
@pytest.mark.parametrize("mapped_blocks", SIZES, ids=_ids)
def test_snapshot_first(benchmark, origins, mapped_blocks):
    benchmark.extra_info["mapped_blocks"] = mapped_blocks
    opened: list[Pool] = []

    def setup():
        if opened:               # the previous round's pool (teardown closed it already)
            opened.pop().close()
        opened.append(origins.open_copy(mapped_blocks))
        return (opened[-1], ORIGIN, "snap"), {}

    def teardown(pool, origin, name):
        _check_snapshot(pool, name, mapped_blocks)
        pool.close()

    try:
        # One warm-up round: the first commit in a process imports numpy.ma (via np.unique).
        benchmark.pedantic(Pool.snapshot, setup=setup, teardown=teardown,
                           rounds=FIRST_ROUNDS, warmup_rounds=1)
        if opened and not benchmark.enabled:     # --benchmark-disable: one call, no teardown
            _check_snapshot(opened[-1], "snap", mapped_blocks)
        (pool, origin, name), _ = setup()
        benchmark.extra_info.update(_metadata_io(pool, lambda: pool.snapshot(origin, name)))
    finally:
        for pool in opened:
            pool.close()


@pytest.mark.benchmark(group="snapshot: repeated, same origin, one open pool")
@pytest.mark.parametrize("mapped_blocks", SIZES, ids=_ids)
def test_snapshot_repeated(benchmark, origins, mapped_blocks):
    benchmark.extra_info["mapped_blocks"] = mapped_blocks
    pool = origins.open_copy(mapped_blocks)
    counter = itertools.count()
    last: list[str] = []

    def setup():
        name = f"snap{next(counter)}"
        last[:] = [name]
        return (pool, ORIGIN, name), {}

    try:
        benchmark.pedantic(Pool.snapshot, setup=setup, rounds=REPEATED_ROUNDS, warmup_rounds=3)
        _check_snapshot(pool, last[0], mapped_blocks)
        (_, origin, name), _ = setup()
        benchmark.extra_info.update(_metadata_io(pool, lambda: pool.snapshot(origin, name)))
    finally:
        pool.close()
