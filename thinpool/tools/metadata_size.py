"""Metadata size estimate, the same figure ``thin_metadata_size`` prints.

The estimate counts 4 KiB metadata blocks: one, plus twice the mapping leaves a full pool needs
(leaves are on average half full; 252 mappings per leaf), plus one per thin device or snapshot:
``blocks = 1 + (2 * pool_size / block_size) // 252 + max_thins``. Pure arithmetic; O(1).
"""

from __future__ import annotations

from ..errors import InvalidArgument
from ..metadata import format as fmt

_LEAF_MAPPINGS = (fmt.BLOCK_SIZE - 64) // 16      # 252, as thin_metadata_size counts them


def estimate_metadata_size(block_size: int, pool_size: int, max_thins: int) -> int:
    """Bytes of metadata for a pool of ``pool_size`` bytes, ``block_size`` data blocks and up
    to ``max_thins`` thin devices and snapshots."""
    if block_size <= 0 or block_size & (block_size - 1) or block_size % fmt.SECTOR_SIZE:
        raise InvalidArgument(f"block size {block_size} must be a power of two of at least 512 bytes")
    if pool_size <= block_size:
        raise InvalidArgument("the pool size must be larger than the block size")
    if max_thins <= 0:
        raise InvalidArgument("max thins must be at least 1")
    sectors_pool, sectors_block = pool_size // fmt.SECTOR_SIZE, block_size // fmt.SECTOR_SIZE
    blocks = 1 + (2 * sectors_pool // sectors_block) // _LEAF_MAPPINGS + max_thins
    return blocks * fmt.BLOCK_SIZE
