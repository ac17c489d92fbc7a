"""Readers beside a writer (locking.py): a reader reads the last commit, a commit waits for the
readers of the previous one, writers wait for each other only when asked."""

from __future__ import annotations

import os
import threading
import time

import pytest

from thinpool import Pool
from thinpool.errors import BusyError
from tests.holder import pool_held_elsewhere
from tests.tptools import assert_checks_pass

BS = 64 * 1024
MiB = 1 << 20


def _pool(tmp_path):
    d = tmp_path / "p"
    with Pool.create(d, data_size=64 * BS) as p:
        p.create_thin("a", 8 * BS).write(0, b"A" * BS)
        p.create_thin("b", 8 * BS).write(0, b"B" * BS)
    return d


def test_reader_reads_the_last_commit_while_a_writer_works(tmp_path):
    d = _pool(tmp_path)
    with pool_held_elsewhere(d, work=lambda p: p.volume("b").write(2 * BS, b"new" * 10)) as w:
        with Pool.open(d, read_only=True) as r:
            assert r.volumes() == ["a", "b"]
            assert r.volume("a").read(0, BS) == b"A" * BS
            assert r.volume("b").read(2 * BS, 30) == bytes(30)     # not committed yet
            assert any(str(w.pid) in n for n in r.notes)
    assert w.exitcode == 0


def test_a_commit_waits_for_the_readers_of_the_last_one(tmp_path):
    d = _pool(tmp_path)
    with pool_held_elsewhere(d, read_only=True) as reader:
        w = Pool.open(d)
        try:
            heard = []
            w.reader_wait_hook = heard.append
            w.volume("b").write(BS, b"1" * BS)
            assert w.commit(wait=False) is False              # skipped: a reader holds on
            assert heard == []
            t = threading.Thread(target=w.commit)
            t.start()
            while not heard:                                  # the commit is waiting...
                t.join(0.05)
                assert t.is_alive(), "the commit did not wait for the reader"
            assert heard[0] == [reader.pid]
            reader.release()                                  # ...until the reader closes
            t.join(30)
            assert not t.is_alive()
        finally:
            w.close()
    with Pool.open(d, read_only=True) as r:
        assert r.volume("b").read(BS, BS) == b"1" * BS
    assert_checks_pass(d / "metadata")


def _read_c_for_a_while(pool):
    v = pool.volume("c")
    for _ in range(300):
        if v.read(0, BS) != b"C" * BS:
            os._exit(7)                                     # read another volume's bytes
        time.sleep(0.002)


def test_a_reader_in_another_process_never_reads_reused_blocks(tmp_path):
    """The writer deletes c and writes e while a reader of the commit that still maps c's block
    reads it: e must not get that block (and write into it) before the reader is gone."""
    d = tmp_path / "p"
    with Pool.create(d, data_size=2 * BS) as p:               # two blocks: e must reuse c's
        p.create_thin("c", 8 * BS).write(0, b"C" * BS)
        p.create_thin("f", 8 * BS).write(0, b"F" * BS)
    with pool_held_elsewhere(d, read_only=True, then=_read_c_for_a_while) as reader:
        with Pool.open(d) as w:
            w.delete("c")
            w.create_thin("e", 8 * BS).write(0, b"E" * BS)
    assert reader.exitcode == 0
    with Pool.open(d, read_only=True) as r:
        assert r.volume("e").read(0, BS) == b"E" * BS and r.volume("f").read(0, 1) == b"F"
    assert_checks_pass(d / "metadata")


def test_reader_and_writer_in_one_process_are_refused(tmp_path):
    d = _pool(tmp_path)
    with Pool.open(d) as w:
        with pytest.raises(BusyError) as e:
            Pool.open(d, read_only=True)
        assert "this process" in str(e.value) and e.value.holder_pid == os.getpid()
        w.volume("a").write(0, b"still fine")
    with Pool.open(d, read_only=True):
        with pytest.raises(BusyError) as e:
            Pool.open(d)
        assert "this process" in str(e.value)
    with Pool.open(d) as w:
        assert w.volume("a").read(0, 10) == b"still fine"


def test_a_writer_waits_for_another_when_asked(tmp_path):
    d = _pool(tmp_path)
    with pool_held_elsewhere(d, work=lambda p: p.volume("a").write(0, b"first"), commit=True) as w:
        with pytest.raises(BusyError) as e:
            Pool.open(d, wait=0.2)
        assert e.value.holder_pid == w.pid and "waited" in str(e.value)
        opened = []

        def second():
            with Pool.open(d, wait=None) as p:        # queues behind the holder
                opened.append(p.volume("a").read(0, 5))

        t = threading.Thread(target=second)
        t.start()
        t.join(0.3)
        assert t.is_alive() and not opened
    t.join(30)
    assert opened == [b"first"]
