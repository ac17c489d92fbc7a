"""The child side of the SIGKILL crash mode (see test_kill.py).

:func:`run` opens a pool, signals that it is ready, then runs a random library workload on it
until it is killed: create_thin, snapshot, write, discard, delete and commit, the op mix of
``run_workload`` in test_crash_points.py. Around each operation it appends one JSON line to a
journal, ``begin`` before and ``end`` after, and flushes it (no fsync: SIGKILL keeps the page
cache, so every line written before the kill is there afterwards). The line number of a record is
its sequence number. Written bytes are not journaled, only the seed they come from
(:func:`data_for`), so the parent rebuilds them.

It also runs as a script, ``python -m tests.crash.kill_workload ROOT JOURNAL SEED PREFIX``,
printing ``ready`` on stdout when it starts the workload.
"""

from __future__ import annotations

import json
import random
import sys
import traceback

BS = 64 * 1024
VOL_BLOCKS = 12
MAX_VOLUMES = 8


def data_for(seed: int, length: int) -> bytes:
    """The bytes a write with ``seed`` writes (random, so no two writes look alike)."""
    return random.Random(seed).randbytes(length)


class Journal:
    def __init__(self, path):
        self.f = open(path, "a", encoding="utf-8")

    def log(self, **rec) -> None:
        self.f.write(json.dumps(rec, separators=(",", ":")) + "\n")
        self.f.flush()


def workload(pool, journal: Journal, rng: random.Random, prefix: str, steps: int | None = None):
    """Random operations on ``pool`` (forever, or ``steps`` of them), journaled."""
    from thinpool.errors import NoDataSpace

    log = journal.log
    counter = 0
    done = 0
    while steps is None or done < steps:
        done += 1
        names = pool.volumes()
        op = rng.random()
        if (op < 0.22 or not names) and len(names) >= MAX_VOLUMES:
            op = 0.25                           # full of volumes: delete one instead
        if op < 0.12 or not names:
            counter += 1
            name = f"{prefix}v{counter}"
            log(ph="begin", op="create", name=name)
            pool.create_thin(name, VOL_BLOCKS * BS)
            log(ph="end", names=pool.volumes())
        elif op < 0.22:
            counter += 1
            name, origin = f"{prefix}v{counter}", rng.choice(names)
            log(ph="begin", op="snapshot", name=name, origin=origin)
            pool.snapshot(origin, name)
            log(ph="end", names=pool.volumes())
        elif op < 0.27 and len(names) > 1:
            name = rng.choice(names)
            log(ph="begin", op="delete", name=name)
            pool.delete(name)
            log(ph="end", names=pool.volumes())
        elif op < 0.75:
            name = rng.choice(names)
            length = rng.choice([1, 100, 4096, 5000, BS, BS + 777, 2 * BS])
            offset = rng.randrange(0, VOL_BLOCKS * BS - length + 1)
            seed = rng.randrange(1 << 62)
            data = data_for(seed, length)
            log(ph="begin", op="write", name=name, offset=offset, length=length, seed=seed)
            try:
                pool.volume(name).write(offset, data)
            except NoDataSpace:
                log(ph="end", failed="no space")
                continue
            log(ph="end")
        elif op < 0.85:
            name = rng.choice(names)
            length = rng.choice([BS, 3 * BS, 1000, BS + 5000])
            offset = rng.randrange(0, VOL_BLOCKS * BS - length + 1)
            log(ph="begin", op="discard", name=name, offset=offset, length=length)
            try:
                pool.volume(name).discard(offset, length)
            except NoDataSpace:
                log(ph="end", failed="no space")
                continue
            log(ph="end")
        else:
            log(ph="begin", op="commit")
            pool.commit()
            log(ph="end", names=pool.volumes())


def run(root: str, journal_path: str, seed: int, prefix: str, ready=None) -> None:
    """Open the pool at ``root`` and run the workload until killed. ``ready``: an Event-like
    object set once the pool is open (the parent starts its kill timer then)."""
    from thinpool import Pool

    journal = Journal(journal_path)
    try:
        pool = Pool.open(root)
        if ready is not None:
            ready.set()
        workload(pool, journal, random.Random(seed), prefix)
    except BaseException:
        journal.log(ph="error", traceback=traceback.format_exc())
        raise


class _StdoutReady:
    def set(self) -> None:
        print("ready", flush=True)


if __name__ == "__main__":
    root, journal_path, seed, prefix = sys.argv[1:5]
    run(root, journal_path, int(seed), prefix, _StdoutReady())
