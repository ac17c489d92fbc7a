"""What :meth:`Pool.stat <thinpool.pool.Pool.stat>` returns, and the pool modes.

Plain data: no I/O, nothing to fail.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field


class PoolMode(enum.IntEnum):
    """The kernel's pool modes, ordered by degradation (compare with ``<``)."""

    WRITE = 0
    OUT_OF_DATA_SPACE = 1
    READ_ONLY = 2
    FAIL = 3

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass
class VolumeStat:
    name: str
    dev_id: int
    size: int
    mapped_blocks: int
    mapped_bytes: int
    origin: str | None
    creation_time: int
    snapshotted_time: int
    #: The name and size were made up because every copy of the names was lost.
    guessed: bool = False
    #: Marked read-only (``Pool.set_read_only``): its content may not change.
    read_only: bool = False


@dataclass
class PoolStat:
    name: str
    path: str | None
    data_path: str | None
    metadata_path: str
    block_size: int
    data_blocks_total: int
    data_blocks_used: int
    data_blocks_free: int
    metadata_blocks_total: int
    metadata_blocks_used: int
    metadata_blocks_free: int
    transaction_id: int
    time: int
    mode: str
    needs_check: bool
    volumes: list[VolumeStat] = field(default_factory=list)
    error_if_no_space: bool = False
    no_space_timeout: float = 60.0
    low_water_blocks: int = 0
    #: Why the pool is not in write mode because of a failure (None when it is, or when it is
    #: only out of data space).
    degraded: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)
