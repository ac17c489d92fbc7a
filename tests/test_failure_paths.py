"""The eight failure-path findings of issue 10, one test (or a few) each.

Each test drives the library as a careful user would, lets a failure happen (an abort, a refused
device change, an I/O error, an interrupt, a race, a stale handle, a failed punch, an unclosed
pool) and then checks the promise: nothing committed is lost, no volume reads another volume's
bytes, and the metadata passes ``thinpool check`` (which counts data references) and the real
``thin_check``.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import shutil
import threading
import warnings

import pytest

from thinpool import Pool, PoolMode
from thinpool.errors import (AlreadyExists, BusyError, DeviceIOError, MetadataIOError,
                             NoDataSpace, NoMetadataSpace, NotFound)
from tests.crash.harness import Faults, Interrupt, settle
from tests.test_concurrent_reads import read_in_the_window
from tests.tptools import assert_checks_pass, requires_tools

BS = 64 * 1024


def checks_pass(pool_dir) -> None:
    """Both oracles: thinpool check (data reference counts too) and the real thin_check."""
    assert_checks_pass(pool_dir / "metadata")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- 1. after an abort, new blocks are counted ----------------------------------------------
@requires_tools
@pytest.mark.parametrize("abort", ["clear_needs_check", "refused_change", "failed_commit"])
def test_blocks_allocated_after_an_abort_are_counted(tmp_path, abort):
    d = tmp_path / "p"
    with Pool.create(d, data_size=64 * BS) as p:
        a = p.create_thin("a", 16 * BS)
        a.write(0, b"a" * BS)
        p.commit()
        if abort == "clear_needs_check":
            p.clear_needs_check()
        elif abort == "refused_change":
            with pytest.raises(AlreadyExists):
                p.snapshot("a", "a")
            with pytest.raises(AlreadyExists):
                p.metadata.create_thin(p.volume("a").dev_id)
            p.metadata.abort()                   # what a refused change used to end in
        else:
            a.write(BS, b"pending")
            with Faults(d, "metadata", "write", nth=1), pytest.raises(MetadataIOError):
                p.commit()
            p.clear_needs_check()
        c = p.create_thin("c", 16 * BS)
        c.write(0, b"C" * (4 * BS))
    checks_pass(d)
    with Pool.open(d) as p:
        b = p.create_thin("b", 16 * BS)
        b.write(0, b"B" * (4 * BS))
        p.commit()
        assert p.volume("c").read(0, 4 * BS) == b"C" * (4 * BS)
        assert p.volume("a").read(0, BS) == b"a" * BS
    checks_pass(d)


# -- 2. a refused device change keeps other volumes' acknowledged writes --------------------
@requires_tools
def test_shrink_in_a_full_pool_keeps_other_volumes_writes(tmp_path):
    d = tmp_path / "p"
    with Pool.create(d, data_size=8 * BS, error_if_no_space=True) as p:
        a = p.create_thin("a", 8 * BS)
        a.write(0, b"A" * (4 * BS))
        p.snapshot("a", "s")                       # a's blocks are shared now
        other = p.create_thin("o", 8 * BS)
        other.write(0, b"O" * (4 * BS))            # the pool is full, o's writes not committed
        assert p.mode == PoolMode.OUT_OF_DATA_SPACE
        p.resize_volume("a", 2 * BS + 100)         # its new last block is shared
        assert p.mode == PoolMode.OUT_OF_DATA_SPACE
        assert other.read(0, 4 * BS) == b"O" * (4 * BS)
        assert p.volume("a").read(0, 2 * BS + 100) == b"A" * (2 * BS + 100)
    checks_pass(d)
    with Pool.open(d) as p:
        assert p.volume("o").read(0, 4 * BS) == b"O" * (4 * BS)
        assert p.volume("s").read(0, 4 * BS) == b"A" * (4 * BS)
        assert p.volume("a").size == 2 * BS + 100


@requires_tools
def test_refused_grow_changes_nothing(tmp_path):
    """Growing past a shrunk volume's stale tail needs a copy of a shared block: in a full pool
    that is refused, and nothing changes (other volumes' uncommitted writes neither)."""
    d = tmp_path / "p"
    with Pool.create(d, data_size=6 * BS, error_if_no_space=True) as p:
        a = p.create_thin("a", 4 * BS)
        a.write(0, b"A" * (4 * BS))
        p.resize_volume("a", BS + 10)              # block 1's tail keeps its bytes, hidden
        p.snapshot("a", "s")
        o = p.create_thin("o", 8 * BS)
        o.write(0, b"O" * (4 * BS))                # full now, uncommitted
        before = p.stat()
        with pytest.raises(NoDataSpace) as e:
            p.resize_volume("a", 4 * BS)
        assert "nothing was changed" in str(e.value)
        after = p.stat()
        assert (after.transaction_id, after.data_blocks_used) == (before.transaction_id,
                                                                  before.data_blocks_used)
        assert p.volume("a").size == BS + 10 and p.mode == PoolMode.OUT_OF_DATA_SPACE
        assert o.read(0, 4 * BS) == b"O" * (4 * BS)
        p.delete("o")                              # room again: the grow goes through
        p.resize_volume("a", 4 * BS)
        assert p.volume("a").read(BS, 3 * BS) == b"A" * 10 + bytes(3 * BS - 10)
        assert p.volume("s").read(BS, 10) == b"A" * 10
    checks_pass(d)


def test_shrink_then_grow_reads_zeros(tmp_path):
    with Pool.create(tmp_path / "p", data_size=16 * BS) as p:
        a = p.create_thin("a", 4 * BS)
        a.write(0, b"x" * (4 * BS))
        p.resize_volume("a", BS + 7)
        p.resize_volume("a", 4 * BS)
        assert p.volume("a").read(0, 4 * BS) == b"x" * (BS + 7) + bytes(3 * BS - 7)


@requires_tools
def test_a_failing_device_change_keeps_the_acknowledged_writes(tmp_path):
    """The change itself fails (an interrupt inside it): the writes before it were committed
    first and stay; the change is rolled back and the pool goes on."""
    d = tmp_path / "p"
    with Pool.create(d, data_size=64 * BS) as p:
        a = p.create_thin("a", 16 * BS)
        a.write(0, b"before the snapshot")
        meta = p.metadata
        real = meta.create_snap

        def failing(dev, origin):
            real(dev, origin)
            raise KeyboardInterrupt("inside the change")

        meta.create_snap = failing
        with pytest.raises(KeyboardInterrupt):
            p.snapshot("a", "s")
        del meta.create_snap
        assert p.mode == PoolMode.WRITE and p.volumes() == ["a"]
        assert a.read(0, 19) == b"before the snapshot"
    checks_pass(d)
    with Pool.open(d) as p:
        assert p.volumes() == ["a"]
        assert p.volume("a").read(0, 19) == b"before the snapshot"


# -- 3. exceptions other than metadata errors ------------------------------------------------
def _big_pool(d, mapped=600):
    p = Pool.create(d, data_size=4096 * BS)
    v = p.create_thin("v", 4096 * BS)
    for i in range(0, 2 * mapped, 2):
        v.write(i * BS, b"v")
    p.commit()
    p.close()


@requires_tools
def test_eio_on_a_metadata_read_inside_a_write_is_typed_and_degrades(tmp_path):
    d = tmp_path / "p"
    _big_pool(d)

    def write(p):
        p.volume("v").write(3001 * BS, b"new block")       # an unmapped block: a new mapping

    p = Pool.open(d)
    with Faults(d, "metadata", "read") as f:
        write(p)
    p.close()                                              # (not committed)
    reads = f.count
    assert reads > 1
    for nth in range(1, reads + 1):
        p = Pool.open(d)
        try:
            with Faults(d, "metadata", "read", nth=nth) as f:
                with pytest.raises(MetadataIOError) as e:
                    write(p)
            assert f.fired
            assert e.value.operation == "read" and e.value.block is not None
            assert e.value.errno == errno.EIO
            assert "MetadataIOError" in p.stat().degraded
        except BaseException:
            p.close()
            raise
        with settle(p, d) as p:
            assert p.volume("v").mapped_blocks == 600
            assert p.volume("v").read(3001 * BS, 9) == bytes(9)
            assert p.volume("v").read(0, 1) == b"v"


@requires_tools
def test_an_interrupt_inside_a_btree_change_never_commits_half_of_it(tmp_path):
    d = tmp_path / "p"
    _big_pool(d)
    p = Pool.open(d)
    p.volume("v").write(1, b"in place")
    with Interrupt() as count:
        p.volume("v").write(3001 * BS, b"x" * (300 * BS))
    p.close()
    assert count.count > 100
    for nth in (60, count.count // 2, count.count - 3):     # (tests/crash sweeps every one)
        p = Pool.open(d)
        try:
            p.volume("v").write(1, b"in place")              # acknowledged, exclusive block
            with pytest.raises(KeyboardInterrupt), Interrupt(nth):
                p.volume("v").write(3001 * BS, b"x" * (300 * BS))    # an insert_run
        except BaseException:
            p.close()
            raise
        with settle(p, d) as p:                 # it had begun changing the tree: degraded
            assert p.volume("v").mapped_blocks == 600


@requires_tools
def test_enospc_writing_metadata_at_commit_is_out_of_metadata_space(tmp_path):
    d = tmp_path / "p"
    with Pool.create(d, data_size=256 * BS) as p:
        v = p.create_thin("v", 64 * BS)
        v.write(0, b"committed")
        p.commit()
        v.write(BS, b"lost with the transaction")
        with Faults(d, "metadata", "write", nth=1, err=errno.ENOSPC):
            with pytest.raises(NoMetadataSpace) as e:
                p.commit()
        assert e.value.exit_code == 4 and "--metadata-size" in str(e.value)
        assert p.mode == PoolMode.READ_ONLY
        assert "metadata space" in p.stat().degraded
    checks_pass(d)
    with Pool.open(d) as p:
        assert p.mode == PoolMode.READ_ONLY
        assert p.volume("v").read(0, 9) == b"committed"
        assert p.volume("v").mapped_blocks == 1


def test_cli_reports_enospc_on_metadata_as_out_of_space(tmp_path):
    """The CLI, with ENOSPC injected into its metadata writes: one line, exit 4."""
    import subprocess
    import sys
    home = tmp_path / "home"
    env = {**os.environ, "THINPOOL_HOME": str(home)}
    run = [sys.executable, "-m", "thinpool"]
    subprocess.run(run + ["create", "p", "--size", "16M"], env=env, check=True, capture_output=True)
    subprocess.run(run + ["create", "p/v", "--size", "1M"], env=env, check=True, capture_output=True)
    code = (
        "import errno, sys\n"
        "from tests.crash.harness import Faults\n"
        "from thinpool.cli import main\n"
        f"with Faults({str(home / 'p')!r}, 'metadata', 'write', nth=1, err=errno.ENOSPC):\n"
        "    code = main(['write', 'p/v'])\n"
        "sys.exit(code)\n")
    r = subprocess.run([sys.executable, "-c", code], env=env, input=b"data", capture_output=True,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    err = r.stderr.decode()
    assert r.returncode == 4, err
    assert "unexpected" not in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "metadata space" in err


def test_eio_on_a_data_read_is_typed(tmp_path):
    d = tmp_path / "p"
    with Pool.create(d, data_size=64 * BS) as p:
        v = p.create_thin("v", 4 * BS)
        v.write(0, b"x" * (2 * BS))
        p.commit()
        with Faults(d, "data", "read", nth=1), pytest.raises(DeviceIOError) as e:
            v.read(0, 2 * BS)
        assert e.value.operation == "read" and e.value.block is not None
        assert p.mode == PoolMode.WRITE              # a data read error degrades nothing
        assert v.read(0, 2 * BS) == b"x" * (2 * BS)


# -- 4. the lock-free read path --------------------------------------------------------------
def test_a_block_freed_in_this_transaction_is_not_reused_before_the_commit(tmp_path):
    """A's block, allocated and freed in one transaction, must not become B's before a commit
    (which moves the generation): a lock-free reader of A that looked it up before the discard
    would read B's bytes. Here B's write needs it and so commits first."""
    pool = Pool.create(tmp_path / "p", data_size=BS, block_size=BS, error_if_no_space=True)
    a = pool.create_thin("a", BS)
    b = pool.create_thin("b", BS)
    a.write(0, b"A" * BS)                            # not committed
    assert a.read(0, 16) == b"A" * 16                # the mapping is in the lookup cache now

    def work(block):
        a.discard(0, BS)                             # A's block is free, in this transaction
        gen = pool.metadata.generation
        b.write(0, b"B" * BS)                        # the only block there is: B gets it ...
        return pool.metadata.generation != gen       # ... after a commit

    got, committed_first = read_in_the_window(a, 0, 16, work)
    assert committed_first is True
    assert got in (b"A" * 16, bytes(16))             # never B's bytes
    assert b.read(0, 16) == b"B" * 16 and a.read(0, 16) == bytes(16)
    pool.close()


def test_a_full_pool_commits_to_reuse_what_this_transaction_freed(tmp_path):
    """Blocks freed in this transaction wait for a commit; a write that needs them commits
    first, as dm-thin's alloc_data_block does, instead of failing or waiting."""
    with Pool.create(tmp_path / "p", data_size=4 * BS, error_if_no_space=True) as p:
        a = p.create_thin("a", 8 * BS)
        a.write(0, b"a" * (2 * BS))
        p.commit()
        a.write(2 * BS, b"A" * (2 * BS))             # the pool is full now, not committed
        a.discard(0, 4 * BS)                         # two committed blocks, two of this one
        tid = p.stat().transaction_id
        a.write(4 * BS, b"b" * (4 * BS))             # needs all four
        assert a.read(4 * BS, 4 * BS) == b"b" * (4 * BS)
        assert a.read(0, 4 * BS) == bytes(4 * BS)
        assert p.stat().transaction_id == tid


def test_close_moves_the_generation_before_the_data_file_is_closed(tmp_path):
    pool = Pool.create(tmp_path / "p", data_size=16 * BS)
    a = pool.create_thin("a", BS)
    a.write(0, b"A" * BS)
    assert a.read(0, 4) == b"AAAA"
    meta, dev = pool.metadata, pool._data
    gen = meta.generation
    seen = []
    real = dev.close

    def close():
        seen.append(meta.generation)
        real()

    dev.close = close
    pool.close()
    assert seen and seen[0] != gen


# -- 5. device changes from two threads ------------------------------------------------------
@requires_tools
def test_two_threads_creating_volumes_get_distinct_ids(tmp_path):
    d = tmp_path / "p"
    pool = Pool.create(d, data_size=64 * BS)
    real = pool._new_id
    gate = threading.Barrier(2)

    def slow_new_id():
        dev = real()
        try:
            gate.wait(0.3)              # let the other thread choose too (it cannot, now)
        except threading.BrokenBarrierError:
            pass
        return dev

    pool._new_id = slow_new_id
    errors, made = [], []

    def creator(name):
        try:
            made.append(pool.create_thin(name, BS))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=creator, args=(f"v{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert len({v.dev_id for v in made}) == 2
    for v in made:
        v.write(0, v.name.encode())
    for v in made:
        assert v.read(0, 2) == v.name.encode()
    pool.close()
    checks_pass(d)


# -- 6. stale handles ------------------------------------------------------------------------
def test_a_handle_outliving_its_device_raises_not_found(tmp_path):
    with Pool.create(tmp_path / "p", data_size=64 * BS) as p:
        old = p.create_thin("a", 4 * BS)
        old.write(0, b"old")
        p.delete("a")
        new = p.create_thin("b", 4 * BS)
        assert new.dev_id > old.dev_id                # ids only ever increase
        # Even a device that gets the same id (the metadata allows it; thinpool does so only
        # when the 24-bit id space is used up) is not the old handle's: the epoch tells.
        p.delete("b")
        p._registry.next_id = old.dev_id
        new = p.create_thin("b", 4 * BS)
        assert new.dev_id == old.dev_id
        new.write(0, b"new volume's bytes")
        for call in (lambda: old.read(0, 3), lambda: old.write(0, b"x"),
                     lambda: old.discard(0, BS), lambda: old.flush(),
                     lambda: old.mapped_blocks, lambda: old.mappings()):
            with pytest.raises(NotFound):
                call()
        assert new.read(0, 18) == b"new volume's bytes"
        again = p.create_thin("a", 4 * BS)            # the old name, a new device
        with pytest.raises(NotFound):
            old.read(0, 3)
        assert again.read(0, 3) == bytes(3)


def test_device_ids_only_increase_across_reopens(tmp_path):
    d = tmp_path / "p"
    with Pool.create(d, data_size=64 * BS) as p:
        ids = [p.create_thin(n, BS).dev_id for n in ("a", "b", "c")]
        p.delete("c")
        p.delete("b")
    with Pool.open(d) as p:                           # the counter is in the names file
        ids.append(p.create_thin("d", BS).dev_id)
        ids.append(p.snapshot("a", "e").dev_id)
    assert ids == [1, 2, 3, 4, 5]
    with Pool.open_files(d / "metadata") as p:        # no names file: after the highest id
        assert p.metadata.device_ids() == [1, 4, 5]


# -- 7. post-commit work ---------------------------------------------------------------------
@requires_tools
def test_a_failed_punch_after_delete_is_a_note_not_a_failure(tmp_path):
    d = tmp_path / "p"
    with Pool.create(d, data_size=64 * BS) as p:
        a = p.create_thin("a", 8 * BS)
        a.write(0, b"a" * (8 * BS))
        p.create_thin("b", BS)
        p.commit()
        with Faults(d, "data", "punch", nth=1) as f:
            p.delete("a")                             # committed: no error
        assert f.fired
        assert p.volumes() == ["b"]
        assert any("could not be given back" in n for n in p.notes)
        allocated = (d / "data").stat().st_blocks * 512
        assert allocated >= 8 * BS
        p.volume("b").write(0, b"b")
        p.commit()                                    # retried after the next commit
        assert (d / "data").stat().st_blocks * 512 < allocated
    with Pool.open(d) as p:
        assert p.volumes() == ["b"]
    checks_pass(d)


def test_names_catch_up_failing_at_close_is_a_note(tmp_path, monkeypatch):
    from thinpool.registry import Registry
    d = tmp_path / "p"
    p = Pool.create(d, data_size=16 * BS)
    p.create_thin("a", BS)                      # finished in memory; the file catches up later

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Registry, "_save", full)
    p.close()                                   # no exception: the change was durable
    assert any("names file could not catch up" in n for n in p.notes)
    monkeypatch.undo()
    with Pool.open(d) as p:                     # the pending record + trans id settle it
        assert p.volumes() == ["a"]


def test_stat_says_why_the_pool_is_degraded(tmp_path):
    import subprocess
    import sys
    home = tmp_path / "home"
    p = Pool.create(home / "p", data_size=16 * BS)
    p.create_thin("v", BS)
    with Faults(home / "p", "metadata", "read", nth=1):
        p.metadata.bm.clear_cache()
        with pytest.raises(MetadataIOError):
            p.volume("v").write(0, b"x")
    assert "I/O error" in p.stat().degraded and p.stat().mode == "read_only"
    p.close()
    env = {**os.environ, "THINPOOL_HOME": str(home)}
    r = subprocess.run([sys.executable, "-m", "thinpool", "stat", "p", "--json"], env=env,
                       capture_output=True, text=True)
    st = json.loads(r.stdout)
    assert st["mode"] == "read_only" and "NEEDS_CHECK" in st["degraded"]
    r = subprocess.run([sys.executable, "-m", "thinpool", "stat", "p"], env=env,
                       capture_output=True, text=True)
    assert "degraded" in r.stdout and "NEEDS_CHECK" in r.stdout


# -- 8. resources ----------------------------------------------------------------------------
def test_an_unclosed_pool_is_released_by_its_finalizer(tmp_path):
    d = tmp_path / "p"
    Pool.create(d, data_size=16 * BS).close()
    before = open_fds()
    p = Pool.open(d)
    v = p.create_thin("v", BS)
    v.write(0, b"x")
    assert open_fds() == before + 4        # lock, readers' lock, metadata, data
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        del p, v
        gc.collect()
    assert any(issubclass(x.category, ResourceWarning) for x in w)
    assert open_fds() == before
    with Pool.open(d) as p:                           # the lock is free again
        assert p.volumes() == ["v"]


def test_busy_in_the_same_process_names_the_holder(tmp_path):
    d = tmp_path / "p"
    holder = Pool.create(d, data_size=16 * BS)
    try:
        with pytest.raises(BusyError) as e:
            Pool.open(d)
        assert e.value.holder_pid == os.getpid()
        assert "this process" in str(e.value)
    finally:
        holder.close()


@pytest.mark.parametrize("pending", [{"op": "create"}, {"op": "create", "name": "x", "dev_id": 1},
                                     "garbage", {"op": "explode", "name": "x", "dev_id": 1,
                                                 "size": 1, "transaction_id": 1}])
def test_a_malformed_pending_record_damages_only_its_copy(tmp_path, pending):
    """A malformed pending record makes its copy of the names damaged (never a raw KeyError):
    the other copy is used, with a note naming the damaged file, and the writer's open moves
    the damaged file aside and rewrites it. In both copies: the names are lost, loudly."""
    d = tmp_path / "p"
    with Pool.create(d, data_size=16 * BS) as p:
        p.create_thin("keep", BS)
    for damaged in (["names.json"], ["names.json", "names.copy.json"]):
        for f in damaged:
            doc = json.loads((d / f).read_text())
            doc["pending"] = pending
            (d / f).write_text(json.dumps(doc))
        with Pool.open(d) as p:
            note = " ".join(p.notes)
            assert "pending" in note and "names.json is damaged" in note, p.notes
            assert (d / "names.json.damaged").exists()
            if len(damaged) == 1:
                assert p.volumes() == ["keep"] and not p.guessed_names()
            else:
                assert "every copy of the names is gone" in note
                assert p.volumes() == p.guessed_names() == ["1"]
        with Pool.open(d) as p:
            assert not p.notes
        for f in d.glob("*.damaged"):
            f.unlink()
        assert_checks_pass(d / "metadata")
    shutil.rmtree(d)
