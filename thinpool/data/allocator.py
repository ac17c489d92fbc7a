"""Data-block allocation over the pool metadata's data space map.

The allocator hands out runs of data blocks for new and copied-on-write data. It prefers
contiguity: a request is served first-fit from a hint (the block after the one that precedes the
write in the volume, or after the last allocation), so sequential writes land in sequential data
blocks and reads of them become one large ``pread``.

It keeps no state of its own and no reference to a space map: every call goes to the metadata's
current view (:meth:`ThinMetadata.alloc_data` and friends), so an abort, which rebuilds that view,
can never leave the allocator counting in a space map nobody commits.

Guarantees: all or nothing (a request that cannot be met raises
:class:`~thinpool.errors.NoDataSpace` and changes nothing); never a block that was in use at the
last commit, nor one freed since it (so a crash can never expose a reallocated block to the volume
that owned it at the last commit, and a lock-free reader never sees a block change hands without
a commit); every returned block has reference count 1.
Cost: O(blocks scanned / vectorised) per request.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class DataBlocks(Protocol):
    """What the allocator needs from the metadata (``ThinMetadata`` provides it)."""

    def alloc_data(self, count: int, hint: int | None = None) -> np.ndarray: ...

    def release_data(self, blocks: np.ndarray, mark: tuple[int, int] | None = None) -> None: ...

    def data_available(self) -> int: ...


class DataAllocator:
    def __init__(self, meta: DataBlocks):
        self.meta = meta

    def allocate(self, count: int, hint: int | None = None) -> np.ndarray:
        return self.meta.alloc_data(count, hint)

    def release(self, blocks: np.ndarray, mark: tuple[int, int] | None = None) -> None:
        """Give back blocks allocated in this transaction that ended up unused; with the mark
        taken before :meth:`allocate`, the transaction is as it was then."""
        self.meta.release_data(np.asarray(blocks, np.int64), mark)

    def available(self) -> int:
        """Blocks that can be allocated before the next commit."""
        return self.meta.data_available()
