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

Against qemu (workload 5 of issue 6): ``qemu-img snapshot -c`` on a qcow2 image with 1,000,000
allocated clusters, of 64 KiB (the same amount of data as the 1,000,000-block volume) and of
4 KiB (the issue's own figure), as a whole process; thinpool's side is ``Pool.snapshot`` in
process. Each qemu round deletes the previous round's snapshot first (untimed), so every round is
the image's first snapshot, like ``first``.
"""

from __future__ import annotations

import itertools

import pytest

from thinpool import Pool

from ._util import need_tool, run, tag

#: Mapped blocks of the origin volume; the first is the baseline.
SIZES = (10, 1_000, 100_000, 1_000_000)
#: Rounds per size. ``first`` copies a 64 MiB metadata image and opens it per round (about 0.5 s
#: for the largest size), so it takes fewer.
FIRST_ROUNDS = 25
REPEATED_ROUNDS = 100

ORIGIN = "1"   # Pool.open_files names devices by their id

#: Rows of ``python -m bench`` (see ``_util.tag``).
VS_SMALL = "5a. snapshot of 1M mapped blocks vs of 1K (first snapshot)"
VS_QEMU = "5b. snapshot, 1M blocks vs qemu-img snapshot -c, 1M 64 KiB clusters"
VS_QEMU_4K = "5c. snapshot, 1M blocks vs qemu-img snapshot -c, 1M 4 KiB clusters"
QEMU_ROUNDS = 10


def _tag_first(benchmark, mapped_blocks: int) -> None:
    if mapped_blocks == 1_000:
        tag(benchmark, VS_SMALL, "baseline", "ms", label="Pool.snapshot, 1K blocks")
    elif mapped_blocks == 1_000_000:
        tag(benchmark, VS_SMALL, "thinpool", "ms", label="Pool.snapshot, 1M blocks",
            target="1M within 1.5x of 1K", target_ratio=1 / 1.5)
        for row in (VS_QEMU, VS_QEMU_4K):
            tag(benchmark, row, "thinpool", "ms", label="Pool.snapshot, 1M blocks (in process)",
                target=">= 100x faster than qemu-img snapshot -c", target_ratio=100.0)


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
    _tag_first(benchmark, mapped_blocks)
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


@pytest.mark.benchmark(group="snapshot: qemu-img snapshot -c, 1M allocated clusters")
@pytest.mark.parametrize("cluster_size", (65536, 4096), ids=("64K", "4K"))
def test_snapshot_qemu_img(benchmark, qcow2_1m, cluster_size):
    tag(benchmark, VS_QEMU if cluster_size == 65536 else VS_QEMU_4K, "baseline", "ms",
        label=f"qemu-img snapshot -c, {cluster_size // 1024} KiB clusters")
    qemu_img = need_tool("qemu-img", "qemu-utils")
    image = qcow2_1m(cluster_size)
    taken: list[str] = []
    counter = itertools.count()

    def setup():
        if taken:
            run([qemu_img, "snapshot", "-d", taken.pop(), str(image)])
        taken.append(f"s{next(counter)}")
        return ([qemu_img, "snapshot", "-c", taken[-1], str(image)],), {}

    try:
        benchmark.pedantic(run, setup=setup, rounds=QEMU_ROUNDS, warmup_rounds=1)
    finally:
        for name in taken:
            run([qemu_img, "snapshot", "-d", name, str(image)])
