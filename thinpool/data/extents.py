"""Where a data file holds host space: runs of data blocks with data in them (``SEEK_DATA``).

Read-only; opens the file itself and closes it. A block device, a file system without
``SEEK_DATA`` or a file that cannot be opened yields nothing (nothing can be said), never an
error. Cost: two ``lseek`` calls per allocated extent of the file.
"""

from __future__ import annotations

import os
import stat
from typing import Iterator


def allocated_runs(path: str, block_size: int, nr_blocks: int) -> Iterator[tuple[int, int]]:
    """``(first block, count)`` runs of the first ``nr_blocks`` blocks of the file at ``path``
    that hold host space (any byte of a block counts it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return
        end = nr_blocks * block_size
        pos = 0
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
                stop = os.lseek(fd, start, os.SEEK_HOLE)
            except OSError:      # ENXIO: no data after pos; EINVAL and the like: no SEEK_DATA
                return
            if start >= end:
                return
            first, last = start // block_size, min(-(-stop // block_size), nr_blocks)
            yield first, last - first
            pos = last * block_size
    finally:
        os.close(fd)
