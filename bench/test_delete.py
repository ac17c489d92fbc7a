"""Deleting a volume with 1,000,000 mapped blocks (workload 6).

* **thinpool**: ``Pool.delete`` of device 1 of the ``single_1m`` metadata (thin_restore; 1M
  exclusive mappings, 40 % single blocks and 60 % runs of 2-64 blocks laid out out of order on
  the data device). Every data block's count drops to zero, so this is the worst case: the
  whole mapping tree is walked, every block is freed, the commit fsyncs the metadata and punches
  a hole in the (sparse) data file for every run of freed blocks. Each round opens a fresh,
  fsynced copy of the image (untimed).
* **baseline**: ``qemu-img snapshot -d`` of an internal snapshot of a qcow2 image with 1,000,000
  allocated 64 KiB clusters: the closest qemu operation, one reference dropped from each of 1M
  clusters (their counts go from 2 to 1; nothing is freed). There is no target.
"""

from __future__ import annotations

import subprocess

import pytest

from thinpool import Pool

from ._util import need_tool, remove, run, tag

ROUNDS = 5
WORKLOAD = "6. delete a volume with 1M mapped blocks vs qemu-img snapshot -d (1M clusters)"


@pytest.mark.benchmark(group="6 delete")
def test_delete_thinpool(benchmark, single_1m, tmp_path):
    tag(benchmark, WORKLOAD, "thinpool", "ms", label="Pool.delete (commit included)")
    copy = tmp_path / "metadata"
    opened: list[Pool] = []

    def setup():
        while opened:
            opened.pop().close()
        pool = Pool.open_files(single_1m.copy(copy), single_1m.data, read_only=False)
        assert pool.stat().volumes[0].mapped_blocks == single_1m.nr_mappings
        opened.append(pool)
        return (pool, "1"), {}

    def teardown(pool, name):
        st = pool.stat()
        assert not st.volumes and st.data_blocks_used == 0
        opened.pop().close()

    try:
        benchmark.pedantic(Pool.delete, setup=setup, teardown=teardown, rounds=ROUNDS,
                           warmup_rounds=1)
    finally:
        for pool in opened:
            pool.close()
        remove(copy)


@pytest.mark.benchmark(group="6 delete")
def test_delete_qemu_img(benchmark, qcow2_1m):
    tag(benchmark, WORKLOAD, "baseline", "ms", label="qemu-img snapshot -d, 64 KiB clusters")
    qemu_img = need_tool("qemu-img", "qemu-utils")
    image = str(qcow2_1m(65536))
    pending: list[str] = []

    def setup():
        run([qemu_img, "snapshot", "-c", "del", image])
        pending.append("del")
        return ([qemu_img, "snapshot", "-d", "del", image],), {}

    def teardown(argv):
        pending.pop()

    try:
        benchmark.pedantic(run, setup=setup, teardown=teardown, rounds=ROUNDS, warmup_rounds=1)
    finally:
        if pending:      # --benchmark-disable runs no teardown: the snapshot may be gone
            subprocess.run([qemu_img, "snapshot", "-d", "del", image], capture_output=True,
                           check=False)
