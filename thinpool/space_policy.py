"""A pool's space policy: allocating data blocks when the pool is (nearly) full.

A part of :class:`~thinpool.pool.Pool` (a mixin it inherits). With too few free blocks, a request
that blocks freed in this transaction would satisfy commits first (dm-thin's ``alloc_data_block``)
and starts over; otherwise it fails at once (``error_if_no_space``, a zero timeout, a nested
operation, or a pool whose user asked not to wait: ``wait_for_space``) or waits up to
``no_space_timeout`` seconds for a resize, a freeing commit or an option change. The low-water
mark fires its hook once each time free space falls below it. A failed allocation changes
nothing; a hook that does not start is a note.
"""

from __future__ import annotations

import os
import subprocess
import time

import numpy as np

from .errors import NoDataSpace


class SpacePolicy:
    """Pool methods of the space policy (see the module docstring)."""

    def _allocate(self, count: int, hint: int | None) -> np.ndarray | None:
        """``count`` new data blocks, or None when the caller must start over because it
        waited for space (other threads may have changed the pool meanwhile).

        With too few free blocks: if blocks freed in this transaction would do, commit (as
        dm-thin's ``alloc_data_block`` does: freed blocks are reusable only after a commit) and
        start over. Otherwise fail at once under ``error_if_no_space`` (or a zero timeout), or
        wait up to ``no_space_timeout`` seconds for a resize, a commit that frees blocks, or an
        option change, like dm-thin's queued I/O."""
        try:
            blocks = self._alloc.allocate(count, hint)
        except NoDataSpace as e:
            meta = self._meta
            if (not self._ops.nested
                    and self._alloc.available() + meta.data_freed_in_transaction() >= count):
                self._commit(force=False)          # (the caller has changed nothing yet)
                self._space.notify_all()
                return None
            opts = self.options
            # Only an operation of its own may wait: a nested one (a device change's write)
            # would let other threads in halfway through its caller.
            if (opts.error_if_no_space or opts.no_space_timeout <= 0 or self._ops.nested
                    or not self.wait_for_space):
                raise
            deadline = time.monotonic() + opts.no_space_timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NoDataSpace(f"{e}; waited {opts.no_space_timeout:g} s for space: grow the "
                                      f"pool with 'thinpool resize {self.name} --size SIZE'") from None
                self._ops.wait(min(left, 0.5))
                if self._meta is None or self._alloc.available() >= count:
                    return None
        self._check_low_water()
        return blocks

    def _check_low_water(self) -> None:
        mark = self.options.low_water_blocks
        if not mark:
            return
        free = self._alloc.available()
        if free >= mark:
            self._low_water_fired = False
            return
        if self._low_water_fired:
            return
        self._low_water_fired = True
        hook = self.options.low_water_hook
        self.notes.append(f"free data blocks ({free}) fell below the low-water mark ({mark})")
        if hook:
            env = {**os.environ, "THINPOOL_POOL": str(self.path or self.name),
                   "THINPOOL_FREE_BLOCKS": str(free), "THINPOOL_LOW_WATER_BLOCKS": str(mark)}
            try:
                subprocess.Popen(hook, shell=True, env=env, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
            except OSError as err:
                self.notes.append(f"low-water hook failed to start: {err}")

    def _release(self, blocks: np.ndarray, mark: tuple[int, int] | None = None) -> None:
        self._alloc.release(blocks, mark)

