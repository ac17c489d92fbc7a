"""A pool held open for writing by another process, for tests of the single-writer lock."""

from __future__ import annotations

import multiprocessing
from contextlib import contextmanager

from thinpool import Pool


def _hold(path, ready, done, read_only, work, commit, then) -> None:
    pool = Pool.open(path, read_only=read_only)
    if work is not None:
        work(pool)
    ready.set()
    if then is not None:
        then(pool)
    else:
        done.wait(60)
    if commit:
        pool.commit()
    pool.close()


@contextmanager
def pool_held_elsewhere(path, read_only: bool = False, work=None, commit: bool = False,
                        then=None):
    """A forked process opens the pool at ``path`` (for writing unless ``read_only``), runs
    ``work(pool)`` and keeps it open for the block (committing at its end with ``commit``), or
    only while it runs ``then(pool)``; yields that process (its ``pid`` is the lock holder,
    ``release()`` lets it close early; ``exitcode`` is set after the block)."""
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(path, ready, done, read_only, work, commit, then))
    holder.release = done.set
    holder.start()
    try:
        assert ready.wait(30)
        yield holder
    finally:
        done.set()
        holder.join(30)
