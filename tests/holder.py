"""A pool held open for writing by another process, for tests of the single-writer lock."""

from __future__ import annotations

import multiprocessing
from contextlib import contextmanager

from thinpool import Pool


def _hold(path, ready, done) -> None:
    pool = Pool.open(path)
    ready.set()
    done.wait(60)
    pool.close()


@contextmanager
def pool_held_elsewhere(path):
    """A forked process opens the pool at ``path`` for writing and keeps it open for the block;
    yields that process (its ``pid`` is the lock holder; ``exitcode`` is set after the block)."""
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(path, ready, done))
    holder.start()
    try:
        assert ready.wait(30)
        yield holder
    finally:
        done.set()
        holder.join(30)
