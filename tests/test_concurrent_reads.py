"""Reads racing with discards, commits and new writes in other threads (Volume.read takes no lock
on its fast path: it trusts the metadata's generation instead).

One thread reads volume A's blocks over and over; another keeps discarding A's blocks, committing
(which lets their data blocks be reused), and writing volume B into whatever blocks it gets, then
rewriting A. Every read of A must return A's bytes or zeros (a discarded block), never B's.

The race itself is rare in a run, so a second test makes it happen every time: the other
"thread"'s work runs inside the reader's window, between its mapping lookup and its pread.
"""

from __future__ import annotations

import threading

from thinpool import Pool

BS = 64 * 1024
BLOCKS = 16


def test_reads_never_see_another_volumes_reused_blocks(tmp_path) -> None:
    pool = Pool.create(tmp_path / "p", data_size=(2 * BLOCKS + 4) * BS, block_size=BS)
    a = pool.create_thin("a", BLOCKS * BS)
    b = pool.create_thin("b", BLOCKS * BS)
    mine = b"A" * 512
    for i in range(BLOCKS):
        a.write(i * BS, b"A" * BS)
    pool.commit()
    stop = threading.Event()
    bad: list[bytes] = []
    reads = [0]

    def reader() -> None:
        while not stop.is_set():
            for i in range(BLOCKS):
                got = a.read(i * BS + 1024, 512)
                reads[0] += 1
                if got != mine and got != bytes(512):
                    bad.append(got[:16])

    t = threading.Thread(target=reader)
    t.start()
    try:
        for rnd in range(60):
            lo = (rnd * 5) % (BLOCKS - 3)
            a.discard(lo * BS, 4 * BS)        # frees 4 of A's blocks
            pool.commit()                    # ... which B may now be given
            for i in range(BLOCKS):
                b.write(i * BS, b"B" * BS)
            pool.commit()
            b.discard(0, BLOCKS * BS)
            pool.commit()
            for i in range(lo, lo + 4):
                a.write(i * BS, b"A" * BS)
            pool.commit()
    finally:
        stop.set()
        t.join(30)
    pool.close()
    assert reads[0] > 100
    assert not bad, f"{len(bad)} reads of A returned other bytes, e.g. {bad[0]!r}"


def read_in_the_window(vol, offset: int, length: int, work):
    """``vol.read(offset, length)`` with ``work(data block)`` run once between its mapping lookup
    and its pread, as another thread's work would; returns (bytes read, what work returned)."""
    dev = vol.pool._data
    real = dev.read_in_block
    raced = []

    def read_in_block(block, off, n):
        if not raced:                               # once: another thread's work, right now
            raced.append(work(block))
        return real(block, off, n)

    dev.read_in_block = read_in_block
    try:
        got = vol.read(offset, length)
    finally:
        del dev.read_in_block
    assert raced, "the read never reached the window"
    return got, raced[0]


def test_the_window_between_lookup_and_read(tmp_path) -> None:
    pool = Pool.create(tmp_path / "p", data_size=BS, block_size=BS)   # one data block
    a = pool.create_thin("a", BS)
    b = pool.create_thin("b", BS)
    a.write(0, b"A" * BS)
    pool.commit()
    assert a.read(0, 16) == b"A" * 16               # the mapping is in the lookup cache now

    def work(block):
        a.discard(0, BS)                            # A's block is free ...
        pool.commit()
        b.write(0, b"B" * BS)                       # ... and B's now: the only block there is
        assert pool.volume("b").mappings()[0][1] == block

    got, _ = read_in_the_window(a, 0, 16, work)
    assert got == bytes(16)                         # A was discarded: zeros, not B's bytes
    assert b.read(0, 16) == b"B" * 16
    pool.close()
