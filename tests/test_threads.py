"""Several threads on one pool: no read ever returns another volume's block.

Worker threads create, snapshot, write, read, discard and delete volumes of their own while
reader threads read theirs (mostly through the lock-free read path) and a committer commits now
and then. The pool is small, so freed data blocks are handed to other volumes all the time.
Every block written carries its volume's name and a sequence number; a read must return a block
tagged with that volume's name (or its origin's, for a snapshot's shared blocks) or zeros.
Afterwards ``thinpool check`` and ``thin_check`` pass.
"""

from __future__ import annotations

import random
import threading

from thinpool import Pool
from thinpool.errors import NoDataSpace
from thinpool.tools.check import check
from tests.tptools import requires_tools, thin_check

BS = 64 * 1024
BLOCKS = 6


def block(name: str, seq: int) -> bytes:
    tag = f"{name:<16}{seq:08d}".encode()
    return tag * (BS // len(tag)) + tag[: BS % len(tag)]


def owner(data: bytes) -> str | None:
    """The volume name a block is tagged with (None for zeros); a torn block fails here."""
    if data == bytes(len(data)):
        return None
    head = data[:24]
    if len(data) >= BS:
        assert data == block(head[:16].decode().strip(), int(head[16:24])), "a mixed block"
    return head[:16].decode().strip()


@requires_tools
def test_threads_never_read_another_volumes_blocks(tmp_path):
    d = tmp_path / "p"
    pool = Pool.create(d, data_size=64 * BS, error_if_no_space=True)
    bad: list[str] = []
    errors: list[BaseException] = []
    done = threading.Event()
    counts = {"reads": 0, "creates": 0, "deletes": 0, "snapshots": 0}
    lock = threading.Lock()

    def note(key: str) -> None:
        with lock:
            counts[key] += 1

    def check_read(vol, allowed: set[str], vb: int, small: bool) -> None:
        if small:
            off = random.randrange(0, BS - 512, 24) // 24 * 24
            got = vol.read(vb * BS + off, 48)
            name = None if got == bytes(48) else got[:16].decode(errors="replace").strip()
        else:
            name = owner(vol.read(vb * BS, BS))
        note("reads")
        if name is not None and name not in allowed:
            bad.append(f"{vol.name} block {vb} read {name}'s data")

    def worker(w: int) -> None:
        rng = random.Random(w)
        mine: dict[str, set[str]] = {}          # volume -> names its blocks may carry
        seq = 0
        try:
            for k in range(30):
                name = f"w{w}-{k}"
                vol = pool.create_thin(name, BLOCKS * BS)
                note("creates")
                mine[name] = {name}
                for vb in range(BLOCKS):
                    seq += 1
                    try:
                        vol.write(vb * BS, block(name, seq))
                    except NoDataSpace:
                        pass
                if rng.random() < 0.5:
                    snap = pool.snapshot(name, name + "s")
                    note("snapshots")
                    mine[snap.name] = {name, snap.name}
                    seq += 1
                    try:
                        snap.write(rng.randrange(BLOCKS) * BS, block(snap.name, seq))
                    except NoDataSpace:
                        pass
                for v in list(mine):
                    h = pool.volume(v)
                    for vb in range(BLOCKS):
                        check_read(h, mine[v], vb, small=rng.random() < 0.5)
                if rng.random() < 0.5:
                    vol.discard(rng.randrange(BLOCKS - 1) * BS, 2 * BS)
                while len(mine) > 3:
                    victim = sorted(mine)[0]
                    pool.delete(victim)
                    note("deletes")
                    del mine[victim]
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    def reader(r: int) -> None:
        rng = random.Random(100 + r)
        name = f"r{r}"
        vol = pool.volume(name)
        try:
            while not done.is_set():
                check_read(vol, {name}, rng.randrange(BLOCKS), small=rng.random() < 0.8)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    def committer() -> None:
        try:
            while not done.is_set():
                pool.commit()
                st = pool.stat()                # beside the others' changes
                assert st.data_blocks_used <= st.data_blocks_total
                done.wait(0.01)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    for r in range(2):
        v = pool.create_thin(f"r{r}", BLOCKS * BS)
        for vb in range(BLOCKS):
            v.write(vb * BS, block(v.name, vb))
    pool.commit()
    workers = [threading.Thread(target=worker, args=(w,)) for w in range(3)]
    others = [threading.Thread(target=reader, args=(r,)) for r in range(2)]
    others.append(threading.Thread(target=committer))
    for t in workers + others:
        t.start()
    try:
        for t in workers:
            t.join(300)
    finally:
        done.set()
        for t in others:
            t.join(60)
    pool.close()
    assert not errors, errors[0]
    assert not bad, bad[:5]
    assert counts["creates"] == 90 and counts["deletes"] > 50 and counts["reads"] > 1000, counts
    report = check(d / "metadata")
    assert report.clean, report
    assert thin_check(d / "metadata").returncode == 0
