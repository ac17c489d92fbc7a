"""The order of a commit's flushes, on the recorded system calls: no superblock may reach the
metadata file while a write of the data file is not yet followed by a flush of it (the data
that the new mappings point to would not be durable). ``Pool.commit`` syncs the data first
without the pool's mutex (writers go on meanwhile), then again under it; these tests make a
writer provision a block during that first sync and check the order, then crash the recorded
run at every event and read the volume back.
"""

from __future__ import annotations

import os
import random
import threading

from thinpool import Pool
from tests.crash.harness import Recorder, crash_image, file_of, snapshot_files, write_files
from tests.crash.test_crash_points import run_workload

BS = 64 * 1024
STALE = b"\xee"          # what the data file holds where nothing of ours was written


def superblocks_before_data_flush(events) -> list[int]:
    """Indices of superblock writes (block 0 of the metadata) made while some data write had
    not been followed by a data flush yet."""
    pending, bad = False, []
    for i, e in enumerate(events):
        if e.file == "data" and e.kind == "write":
            pending = True
        elif e.file == "data" and e.kind == "flush":
            pending = False
        elif e.file == "metadata" and e.kind == "write" and e.offset == 0 and pending:
            bad.append(i)
    return bad


def test_a_random_workload_flushes_data_before_every_superblock(tmp_path):
    _, events, _ = run_workload(tmp_path / "w", random.Random("order"), steps=60)
    assert any(e.file == "metadata" and e.offset == 0 for e in events)
    assert superblocks_before_data_flush(events) == []


def test_a_block_provisioned_during_the_commits_data_sync_is_synced_before_the_superblock(
        tmp_path):
    root = tmp_path / "p"
    Pool.create(root, data_size=32 * BS, block_size=BS).close()
    with open(root / "data", "r+b") as f:       # stale bytes everywhere: a dropped write shows
        f.write(STALE * (32 * BS))
        os.fsync(f.fileno())
    with Pool.open(root) as pool:
        vol = pool.create_thin("v", 8 * BS)
        vol.write(0, b"a" * BS)
        pool.commit()
    initial = snapshot_files(root)
    during = threading.Event()
    with Recorder(root) as rec:
        pool = Pool.open(root)
        vol = pool.volume("v")
        vol.write(BS, b"b" * BS)                # before the commit: synced by its first sync
        recorded = os.fdatasync

        def fdatasync(fd):
            recorded(fd)
            if file_of(rec.root, fd) == "data" and not during.is_set():
                # A writer provisions block 2 after this (the first, mutex-free) sync began:
                # its bytes are not covered by it.
                t = threading.Thread(target=vol.write, args=(2 * BS, b"c" * 100))
                t.start()
                t.join(5)
                if not t.is_alive():
                    during.set()

        os.fdatasync = fdatasync
        try:
            pool.commit()
        finally:
            os.fdatasync = recorded
        assert during.is_set(), "the write could not run during the commit's data sync"
        pool.close()
    events = rec.events
    assert superblocks_before_data_flush(events) == []
    want = {0: [b"a" * BS], 1: [b"b" * BS, bytes(BS)],
            2: [b"c" * 100 + bytes(BS - 100), bytes(BS)]}
    for k in range(len(events) + 1):
        files = crash_image(initial, events, k, "drop", random.Random(k))
        crashed = tmp_path / f"crash{k}"
        write_files(files, crashed)
        with Pool.open(crashed) as p:
            v = p.volume("v")
            for vb, ok in want.items():
                got = v.read(vb * BS, BS)
                assert got in ok, (f"crash before event {k}: block {vb} holds "
                                   f"{got[:8]!r}... (stale: {got.count(STALE)} bytes)")
            assert v.read(3 * BS, 5 * BS) == bytes(5 * BS)
