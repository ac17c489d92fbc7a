"""The transaction manager: copy-on-write (shadowing) of metadata blocks within one transaction.

Contract, following the kernel's ``dm-transaction-manager``:

* Every change to a metadata block goes through :meth:`shadow` or :meth:`new_block`. A block that
  was allocated or shadowed in this transaction and has reference count 1 is changed in place;
  any other block is copied to a newly allocated block and its own count drops by one. The caller
  re-points the parent at the returned location; when the original was shared (count > 1 before
  the shadow, reported as ``shared=True``) the caller must increment the copy's children.
* Allocation comes from the metadata space map, which never hands out a block that was in use at
  the last commit (so nothing reachable from the committed superblock is ever overwritten).
* Changed blocks stay in memory (``dirty``) until :meth:`commit` writes them all, flushes, and only
  then writes the superblock and flushes again: the superblock write is the single commit point.
* :meth:`abort` forgets every change; the caller re-reads the superblock.

Costs: ``read`` is a dict lookup for a dirty block, else a cached block-manager read; ``shadow``
of an unshared dirty block is O(1); a copy is one 4 KiB memcpy plus one allocation.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ..errors import MetadataError
from . import format as fmt
from .block import SUPERBLOCK_VALIDATOR, BlockManager, Validator


class RefCounts(Protocol):
    """What the transaction manager needs from the metadata space map."""

    def get(self, b: int) -> int: ...

    def inc(self, b: int) -> None: ...

    def dec(self, b: int) -> int: ...

    def alloc(self) -> int: ...

    def alloc_run(self, count: int) -> np.ndarray: ...


class TransactionManager:
    def __init__(self, bm: BlockManager, sm: RefCounts):
        self.bm = bm
        self.sm = sm
        self.dirty: dict[int, tuple[bytearray, Validator]] = {}

    # -- reading -----------------------------------------------------------------------------
    def read(self, b: int, validator: Validator) -> bytes | bytearray:
        d = self.dirty.get(b)
        if d is not None:
            return d[0]
        return self.bm.read(b, validator)

    def is_dirty(self, b: int) -> bool:
        return b in self.dirty

    # -- changing ----------------------------------------------------------------------------
    def new_block(self, validator: Validator) -> tuple[int, bytearray]:
        """Allocate a zeroed block (count 1) that will be written at commit."""
        if self.bm.read_only:
            raise MetadataError("metadata is open read-only")
        b = self.sm.alloc()
        buf = bytearray(fmt.BLOCK_SIZE)
        self.dirty[b] = (buf, validator)
        return b, buf

    def new_blocks(self, count: int, validator: Validator) -> np.ndarray:
        """Allocate ``count`` zeroed blocks (count 1 each) in one run; returns their numbers."""
        if self.bm.read_only:
            raise MetadataError("metadata is open read-only")
        blocks = self.sm.alloc_run(count)
        for b in blocks.tolist():
            self.dirty[b] = (bytearray(fmt.BLOCK_SIZE), validator)
        return blocks

    def shadow(self, b: int, validator: Validator) -> tuple[int, bytearray, bool]:
        """Make ``b`` writable: returns (location, buffer, shared_before)."""
        d = self.dirty.get(b)
        count = self.sm.get(b)
        if d is not None and count == 1:
            return b, d[0], False
        if self.bm.read_only:
            raise MetadataError("metadata is open read-only")
        src = d[0] if d is not None else self.bm.read(b, validator)
        nb = self.sm.alloc()
        buf = bytearray(src)
        self.dirty[nb] = (buf, validator)
        self.dec(b)
        return nb, buf, count > 1

    def inc(self, b: int) -> None:
        self.sm.inc(b)

    def dec(self, b: int) -> None:
        if self.sm.dec(b) == 0:
            self.dirty.pop(b, None)

    # -- commit ------------------------------------------------------------------------------
    def commit(self, superblock: bytearray) -> None:
        """Write every dirty block, flush, write the superblock (block 0), flush."""
        self.bm.write_many((b, buf, v) for b, (buf, v) in self.dirty.items())
        self.bm.flush()
        self.bm.write(fmt.SUPERBLOCK_LOCATION, superblock, SUPERBLOCK_VALIDATOR)
        self.bm.flush()
        self.dirty.clear()

    def abort(self) -> None:
        self.dirty.clear()
