"""A volume as a block device: ``dd`` through a loop device over the volume's FUSE file
(``thinpool.export.fuse``) against ``dd`` through a loop device over a plain sparse file on the
same file system (workloads 12a/12b of the table).

Both loop devices use ``--direct-io=on``. Each side's round:

* **12a write**: ``dd if=SRC of=/dev/loopN bs=1M count=256 oflag=direct conv=fsync``: 256 MiB
  of random bytes (a file read from the page cache) into an empty device, then one flush. On
  thinpool's side the flush reaches the volume as ``fsync``, a commit (data fsync, metadata);
  on the baseline's side it is the sparse file's fsync. Before each round (not timed)
  ``blkdiscard`` empties both devices: the volume's blocks are unmapped, the file's punched, so
  every round provisions its blocks again.
* **12b read**: ``dd if=/dev/loopN of=/dev/null bs=1M count=256 iflag=direct`` of what 12a wrote.

The sides run in alternation, one baseline round before each thinpool round
(``_util.alternate``). Needs root, ``/dev/fuse``, ``/dev/loop-control``, ``losetup``,
``blkdiscard`` and the ``fuse`` extra; otherwise skipped with the reason. Run it pinned:
``python -m bench -k fuse`` (pins itself to CPU 0; the FUSE threads live in the benchmark's own
process and ``dd`` is its child, so all of it is pinned), or
``taskset -c 0 python -m pytest bench/test_fuse_loop.py --benchmark-only``.
"""

from __future__ import annotations

import os
import time

import pytest

from thinpool import Pool

from ._util import MiB, alternate, need_tool, remove, run, sparse_file, tag

SIZE = 256 * MiB                 # bytes per round
DEVICE = 320 * MiB               # the volume's and the sparse file's size
ROUNDS = 5

WRITE = "12a. FUSE + loop: dd 256 MiB bs=1M oflag=direct + fsync vs loop over a sparse file"
READ = "12b. FUSE + loop: dd 256 MiB bs=1M iflag=direct vs loop over a sparse file"


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "not root: FUSE mounts and loop devices need root"
    for dev in ("/dev/fuse", "/dev/loop-control"):
        if not os.path.exists(dev):
            return f"{dev} is missing"
    try:
        import thinpool.export.fuse  # noqa: F401
    except ImportError as e:          # MissingDependency is an ImportError
        return str(e)
    return None


@pytest.fixture(scope="module")
def devices(tmp_path_factory):
    """(thinpool's loop device, the baseline's loop device, the source file); torn down in the
    safe order at the end."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    need_tool("losetup", "util-linux")
    need_tool("blkdiscard", "util-linux")
    from thinpool.export import loop
    from thinpool.export.fuse import attach

    tmp = tmp_path_factory.mktemp("fuse_loop")
    src = tmp / "src"
    with open(src, "wb") as f:
        f.write(os.urandom(SIZE))
    raw = sparse_file(tmp / "raw", DEVICE)
    pool = Pool.create(tmp / "pool", data_size=DEVICE + 64 * MiB)
    att = raw_dev = None
    try:
        pool.create_thin("vol", DEVICE)
        att = attach(pool, "vol", read_only=False, run_dir=tmp / "run")
        raw_dev = loop.attach_loop(raw, read_only=False)
        yield att.loop_device, raw_dev, src
    finally:
        try:
            if raw_dev is not None:
                loop.detach_loop(raw_dev)
                loop.wait_detached(raw, 10)
        finally:
            try:
                if att is not None:
                    att.close()
            finally:
                pool.close()
                remove(tmp)


def _dd(*args: str) -> float:
    t0 = time.perf_counter()
    run([need_tool("dd", "coreutils"), *args, "status=none"])
    return time.perf_counter() - t0


def _write_argv(src, dev) -> list[str]:
    return [f"if={src}", f"of={dev}", "bs=1M", f"count={SIZE // MiB}", "oflag=direct",
            "conv=fsync"]


def _read_argv(dev) -> list[str]:
    return [f"if={dev}", "of=/dev/null", "bs=1M", f"count={SIZE // MiB}", "iflag=direct"]


def _discard(dev: str) -> None:
    run([need_tool("blkdiscard", "util-linux"), dev])


@pytest.mark.benchmark(group="12 FUSE + loop")
def test_fuse_loop_write(benchmark, devices):
    tp_dev, raw_dev, src = devices

    def raw_round() -> float:
        _discard(raw_dev)
        return _dd(*_write_argv(src, raw_dev))

    setup, raw_times = alternate(raw_round, lambda: _discard(tp_dev))
    benchmark.pedantic(_dd, args=tuple(_write_argv(src, tp_dev)), setup=setup, rounds=ROUNDS,
                       warmup_rounds=1)
    tag(benchmark, WRITE, "thinpool", "MiB/s", label="loop over the volume's FUSE file",
        amount=SIZE / MiB)
    tag(benchmark, WRITE, "baseline", "MiB/s", label="loop over a sparse file",
        amount=SIZE / MiB, times=raw_times[1:])


@pytest.mark.benchmark(group="12 FUSE + loop")
def test_fuse_loop_read(benchmark, devices):
    tp_dev, raw_dev, src = devices
    for dev in (tp_dev, raw_dev):                 # (what 12a left, written once more)
        run([need_tool("dd", "coreutils"), *_write_argv(src, dev), "status=none"])
    setup, raw_times = alternate(lambda: _dd(*_read_argv(raw_dev)))
    benchmark.pedantic(_dd, args=tuple(_read_argv(tp_dev)), setup=setup, rounds=ROUNDS,
                       warmup_rounds=1)
    tag(benchmark, READ, "thinpool", "MiB/s", label="loop over the volume's FUSE file",
        amount=SIZE / MiB)
    tag(benchmark, READ, "baseline", "MiB/s", label="loop over a sparse file",
        amount=SIZE / MiB, times=raw_times[1:])
