"""Data-block allocation over the data space map.

The allocator hands out runs of data blocks for new and copied-on-write data. It prefers
contiguity: a request is served first-fit from a hint (the block after the one that precedes the
write in the volume, or after the last allocation), so sequential writes land in sequential data
blocks and reads of them become one large ``pread``.

Guarantees: all or nothing (a request that cannot be met raises
:class:`~thinpool.errors.NoDataSpace` and changes nothing); never a block that was in use at the
last commit, even if it was freed since (so a crash can never expose a reallocated block to the
volume that owned it at the last commit); every returned block has reference count 1.
Cost: O(blocks scanned / vectorised) per request.
"""

from __future__ import annotations

import numpy as np

from ..metadata.space_map import SpaceMap


class DataAllocator:
    def __init__(self, sm: SpaceMap):
        self.sm = sm

    def allocate(self, count: int, hint: int | None = None) -> np.ndarray:
        if count == 0:
            return np.zeros(0, np.int64)
        return self.sm.alloc_run(count, hint)

    def release(self, blocks: np.ndarray) -> None:
        """Give back blocks allocated in this transaction that ended up unused."""
        self.sm.dec_many(np.asarray(blocks, np.int64))

    def available(self) -> int:
        """Blocks that can be allocated before the next commit."""
        return self.sm.nr_allocatable()
