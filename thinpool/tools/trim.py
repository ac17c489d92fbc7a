"""Trim: give the host back the space of every free data block (``thin_trim``).

Free means a reference count of 0 both now and at the last commit, so nothing a crash could bring
back is touched. On a file the blocks become holes (``fallocate`` punch); on a block device they
are discarded. Runs of consecutive free blocks go out as one call each.
Cost: one read of every data bitmap (vectorised), plus one system call per free run.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..pool import Pool


@dataclass
class TrimResult:
    free_blocks: int          # free data blocks offered to the device
    runs: int                 # calls made
    supported: bool           # False when the device could not release space
    bytes_released: int | None  # host allocation before minus after (files only)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def trim(pool: Pool) -> TrimResult:
    pool._check_writable()
    pool.commit()
    dev = pool._data
    before = dev.allocated_bytes()
    runs = free = 0
    ok = True
    for start, n in pool.metadata.data_sm.free_runs():
        ok = dev.punch_blocks(start, n) and ok
        runs += 1
        free += n
    dev.sync()
    after = dev.allocated_bytes()
    released = None if before is None else max(0, before - after)
    return TrimResult(free, runs, ok, released)
