"""Space in the data file that no mapping owns: what an interrupted or killed writer leaves.

A write puts its bytes into newly allocated blocks before the commit that maps them; a crash or a
kill before that commit leaves the bytes (and the host space under them) in blocks the metadata
calls free. They are harmless (a free block is zeroed or fully overwritten before anyone maps it)
but they use host space until ``thinpool trim`` (or a later reuse) gives it back. This module
finds them: read-only, O(allocated extents of the data file) plus O(their blocks) numpy work.
When a writer is at work its own uncommitted writes count too.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

import numpy as np

from ..data.extents import allocated_runs
from ..pool import Pool


@dataclass
class Unmapped:
    blocks: int                # free data blocks whose space the data file still holds
    bytes: int


def unmapped_allocated(pool: Pool) -> Unmapped | None:
    """Free data blocks of ``pool`` that hold host space; None when the data is not a file."""
    st = pool.stat()
    if st.data_path is None or not _is_file(st.data_path):
        return None
    meta = pool.metadata
    blocks = 0
    for first, count in allocated_runs(st.data_path, st.block_size, st.data_blocks_total):
        for lo in range(first, first + count, 1 << 20):
            hi = min(first + count, lo + (1 << 20))
            blocks += len(meta.still_free_data(np.arange(lo, hi, dtype=np.int64)))
    return Unmapped(blocks, blocks * st.block_size)


def _is_file(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False
