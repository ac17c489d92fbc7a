"""The snapshotter model's plain data: kinds, snapshot info, mounts, usage (containerd's terms).

No I/O, nothing to fail. These mirror containerd's ``snapshots.Info``, ``mount.Mount`` and
``snapshots.Usage`` so that the gRPC service (grpc_service.py) only converts field by field.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Kind(enum.IntEnum):
    """containerd's snapshot kinds (the numbers are the protocol's)."""

    UNKNOWN = 0
    VIEW = 1        # read-only, of a committed parent; never committed itself
    ACTIVE = 2      # writable; becomes COMMITTED by commit()
    COMMITTED = 3   # immutable; may be the parent of others

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass
class Info:
    """One snapshot as containerd sees it. ``parent`` is "" for none; times are seconds since
    the epoch (floats); ``labels`` a plain dict of strings."""

    name: str
    kind: Kind
    parent: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0


@dataclass
class Mount:
    """What to mount for a snapshot: ``mount -t TYPE -o OPTIONS SOURCE TARGET``."""

    type: str
    source: str
    options: list[str] = field(default_factory=list)
    target: str = ""


@dataclass
class Usage:
    """containerd's usage: ``size`` bytes and ``inodes``; thinpool adds the block count the
    size is made of (``size == blocks * block_size``)."""

    size: int
    inodes: int = 0
    blocks: int = 0
