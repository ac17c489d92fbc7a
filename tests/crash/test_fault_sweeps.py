"""Sweeps, not samples: a fault at every point of one operation.

* An interrupt (``KeyboardInterrupt``) at every Python call inside ``thinpool.metadata`` made by
  one large write whose new mappings go in with ``insert_run`` (hundreds of points), and at every
  call from the start of one ``insert_run`` of 1500 keys on (hundreds more).
* EIO at every metadata read, write and sync of one commit (and ENOSPC at every write).

After each fault the pool either goes on with the transaction exactly as it was (acknowledged
writes kept) or it is degraded (read-only, NEEDS_CHECK) and a reopen shows the last committed
state (or, when the fault hit after the superblock had been written, the new one: a write that
failed may still have landed). Both ``thinpool check`` (data reference counts too) and the real
``thin_check`` pass after every point.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import numpy as np
import pytest

from thinpool import Pool, PoolMode
from thinpool.errors import MetadataIOError, NoMetadataSpace
from thinpool.tools.check import check
from tests.crash.harness import Faults, Interrupt, settle
from tests.tptools import requires_tools, thin_check

BS = 64 * 1024
# An interrupt that lands in a generator being closed is reported by Python, not raised.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def checks_pass(pool_dir: Path) -> None:
    report = check(pool_dir / "metadata")
    assert report.clean, report
    r = thin_check(pool_dir / "metadata")
    assert r.returncode == 0, r.stderr


# -- interrupts inside one insert_run --------------------------------------------------------
def _base_for_interrupts(d: Path) -> None:
    with Pool.create(d, data_size=2048 * BS, metadata_size=2 << 20) as p:
        v = p.create_thin("v", 4096 * BS)
        for i in range(0, 1200, 2):                 # 600 mappings: a tree with internal nodes
            v.write(i * BS, b"v")


def _interrupted_write(p: Pool) -> None:
    # Blocks 0..159: the even ones are mapped and exclusive (written in place), the 80 odd
    # ones are new and merge into the existing leaves in one insert_run.
    p.volume("v").write(0, b"x" * (160 * BS))


@requires_tools
def test_an_interrupt_at_every_call_of_a_large_write(tmp_path):
    d = tmp_path / "p"
    _base_for_interrupts(d)
    p = Pool.open(d)
    p.volume("v").write(2001 * BS, b"acknowledged")
    with Interrupt() as counted:
        _interrupted_write(p)
    p.close()                                        # not committed: the disk stays at the base
    total = counted.count
    assert total > 120, total
    outcomes = {"intact": 0, "degraded": 0, "completed": 0}
    for nth in range(1, total + 1):
        p = Pool.open(d)
        try:
            v = p.volume("v")
            v.write(2001 * BS, b"acknowledged")      # a new mapping, not committed
            escaped = False
            with Interrupt(nth) as it:
                try:
                    _interrupted_write(p)
                except KeyboardInterrupt:
                    escaped = True
            assert it.fired, nth
            if not escaped:
                # It landed in a generator being closed, where Python ignores exceptions (as it
                # would a real Ctrl-C there): the write went through.
                outcomes["completed"] += 1
                assert p.mode == PoolMode.WRITE and v.mapped_blocks == 681
            elif p.mode == PoolMode.WRITE:
                # Nothing had changed yet: the transaction is as it was before the write.
                outcomes["intact"] += 1
                assert v.read(2001 * BS, 12) == b"acknowledged"
                assert v.mapped_blocks == 601
                assert v.read(BS, 1) == b"\0"
                assert v.read(0, 1) in (b"v", b"x")  # a failed write may land in place
            else:
                outcomes["degraded"] += 1
                assert p.mode == PoolMode.READ_ONLY and p.stat().needs_check, nth
                p.commit()                           # commits nothing half done
        finally:
            p.close()
        checks_pass(d)
        with Pool.open(d) as p:                      # the base, committed state
            if p.mode == PoolMode.READ_ONLY:
                p.clear_needs_check()
            v = p.volume("v")
            assert v.mapped_blocks == 600, nth
            assert v.read(2001 * BS, 12) == bytes(12)
            assert v.read(BS, 1) == b"\0"
            assert v.read(0, 1) in (b"v", b"x")      # in-place data is not transactional
    assert outcomes["intact"] > 50 and outcomes["degraded"] > 20, outcomes


@requires_tools
def test_an_interrupt_at_every_call_inside_insert_run(tmp_path):
    """The mapping step of a write of 1500 new blocks between 1500 mapped ones, without the
    192 MiB of data: the blocks are allocated and mapped with one ``insert_run`` under the
    pool's guard, as ``Volume.write`` does. Every call from the start of ``insert_run`` on is
    interrupted in turn; each leaves a degraded pool whose reopen is the committed state."""
    d = tmp_path / "p"
    with Pool.create(d, data_size=4096 * BS, metadata_size=2 << 20) as p:
        v = p.create_thin("v", 8192 * BS)
        for i in range(0, 3000, 2):
            v.write(i * BS, b"v")
    keys = np.arange(1, 3000, 2)

    def run(p):
        with p._guard():
            blocks = p._alloc.allocate(len(keys))
            p.metadata.insert_run(p.volume("v").dev_id, keys, blocks)

    p = Pool.open(d)
    with Interrupt(after="insert_run") as counted:
        run(p)
    assert p.volume("v").mapped_blocks == 3000
    p.close()
    assert counted.count > 250, counted.count
    completed = 0
    for nth in range(1, counted.count + 1):
        p = Pool.open(d)
        try:
            with Interrupt(nth, after="insert_run"):
                try:
                    run(p)
                    completed += 1      # it hit a generator being closed (see above)
                    assert p.mode == PoolMode.WRITE and p.volume("v").mapped_blocks == 3000
                    p.close()           # (without a commit)
                    continue
                except KeyboardInterrupt:
                    pass
        except BaseException:
            p.close()
            raise
        with settle(p, d) as p:
            assert p.volume("v").mapped_blocks == 1500, nth
            assert p.volume("v").read(BS, 1) == b"\0"
    assert completed < 5


# -- EIO / ENOSPC inside one commit ----------------------------------------------------------
def _base_for_commit(d: Path) -> None:
    with Pool.create(d, data_size=1024 * BS, metadata_size=2 << 20) as p:
        a = p.create_thin("a", 64 * BS)
        b = p.create_thin("b", 64 * BS)
        for i in range(0, 64, 2):
            a.write(i * BS, bytes([65 + i % 26]) * 100)
        b.write(0, b"b" * (8 * BS))
        p.snapshot("a", "s")


def _pending(p: Pool) -> None:
    """A transaction with new mappings, copies-on-write and unmaps, never an in-place write."""
    a, b, s = p.volume("a"), p.volume("b"), p.volume("s")
    for i in range(1, 64, 4):
        a.write(i * BS, b"new in a" * 10)          # new blocks
    s.write(2 * BS, b"copy on write")              # shared with a: copied
    s.write(10 * BS + 7, b"another copy")
    b.discard(2 * BS, 3 * BS)                      # unmapped
    b.write(20 * BS, b"b" * (3 * BS))


def _contents(p: Pool) -> dict[str, bytes]:
    return {n: p.volume(n).read(0, p.volume(n).size) for n in p.volumes()}


def _restore(d: Path, saved: Path) -> None:
    for name in ("metadata", "names.json"):
        shutil.copyfile(saved / name, d / name)


@requires_tools
@pytest.mark.parametrize("kind,err", [("read", errno.EIO), ("write", errno.EIO),
                                      ("sync", errno.EIO), ("write", errno.ENOSPC)])
def test_a_fault_at_every_metadata_io_of_a_commit(tmp_path, kind, err):
    d = tmp_path / "p"
    _base_for_commit(d)
    saved = tmp_path / "saved"
    saved.mkdir()
    for name in ("metadata", "names.json", "data"):
        shutil.copyfile(d / name, saved / name)
    with Pool.open(d, read_only=True) as p:
        before = _contents(p)
    p = Pool.open(d)
    _pending(p)
    after = _contents(p)
    p.metadata.bm.clear_cache()        # as in a large pool: the commit reads what it changes
    with Faults(d, "metadata", kind) as counted:
        p.commit()
    p.close()
    shutil.copyfile(saved / "data", d / "data")    # that commit punched what it freed
    (saved / "data").unlink()                      # (no failed commit below punches anything)
    total = counted.count
    assert total >= (1 if kind != "sync" else 2), total
    landed = 0
    for nth in range(1, total + 1):
        _restore(d, saved)
        p = Pool.open(d)
        try:
            _pending(p)
            p.metadata.bm.clear_cache()
            with Faults(d, "metadata", kind, nth=nth, err=err) as f:
                with pytest.raises(NoMetadataSpace if err == errno.ENOSPC else MetadataIOError):
                    p.commit()
            assert f.fired
        except BaseException:
            p.close()
            raise
        with settle(p, d) as p:
            got = _contents(p)
        assert got in (before, after), nth
        landed += got == after and got != before
    # Only a failed flush after the superblock write can leave the new commit in place.
    assert landed <= (1 if kind == "sync" else 0)
