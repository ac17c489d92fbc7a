"""Device changes of a pool: create, snapshot, delete, resize, rename, revert and merge volumes.

A part of :class:`~thinpool.pool.Pool` (a mixin it inherits; it uses the pool's registry, metadata,
guard and checks, and nothing else may call these private helpers). The contract is the pool's,
"Device changes" in pool.py: every check passes before anything changes; the writes acknowledged
so far are committed first; then the change is made and committed on its own, with the names
registry's pending record written before it, so an exception midway rolls back to exactly the state
before the change (the registry record cancelled, or rolled forward if its transaction landed) and
a crash is settled by the next open. Device ids only ever increase.

Revert and merge replace a name's device in one metadata transaction and one pending record, so
after an exception or a crash at any point the name holds either its old device (old content) or
the new one, never neither, and the names agree with the metadata. Both are O(1) in the data
(a snapshot and a delete); the delete's freed blocks are punched after the commit. Handles of a
replaced device (and, for merge, of the snapshot under its old name) raise NotFound afterwards.
Refusals (InvalidArgument, NotFound) come before anything changes.

Read-only volumes (:meth:`DeviceChanges.set_read_only`, as ``lvchange -p r``): the flag lives in
the names registry only, written at once in both copies (a crash leaves the old flag or the new).
Resizing a read-only volume, or reverting or merging onto it, raises
:class:`~thinpool.errors.VolumeReadOnly` before anything changes; snapshots of it (writable unless
asked), renaming and deleting it are allowed.
"""

from __future__ import annotations

from .errors import AlreadyExists, InvalidArgument, NoDataSpace, ThinpoolError, VolumeReadOnly
from .metadata import format as fmt
from .registry import check_name
from .creation import check_volume_size
from .volume import Volume


class DeviceChanges:
    """Pool methods that make, remove and rename thin devices (see the module docstring)."""

    def rename(self, old: str, new: str) -> Volume:
        """Give volume ``old`` the name ``new`` (the names registry only: the device, its id and
        its data stay). Snapshots of it follow the new name. Written at once, atomically."""
        check_name(new)
        with self._guard():
            self._check_writable()
            self._entry(old)
            self._check_new_name(new)
            self._registry.rename(old, new)
            self._volumes.pop(old, None)
            return self.volume(new)

    def _new_id(self) -> int:
        """The next device id (ids only ever increase, from the names registry's counter); call
        it holding the mutex, in the operation that uses it. Only when the 24-bit id space is
        used up does it go back to the lowest free id (handles still tell devices apart by
        their epoch)."""
        used = set(self._meta.device_ids()) | set(self._meta.devices)
        dev = max(self._registry.next_id, max(used, default=0) + 1)
        if dev <= fmt.MAX_DEV_ID:
            return dev
        dev = 1
        while dev in used:
            dev += 1
        if dev > fmt.MAX_DEV_ID:
            raise ThinpoolError("no free thin device ids left")
        return dev

    def _device_change(self, op: str, name: str, dev_id: int, size: int, action, origin=None,
                       source=None, read_only: bool = False) -> None:
        """Make one device change; call it inside ``_guard`` after every check passed.

        The writes acknowledged so far are committed first, so a failure of the change itself
        rolls back to exactly that state. The change is durable when this returns; the work
        after its commit (punching freed blocks) never turns it into a reported failure."""
        self._commit(force=False)
        trans = self._meta.trans_id + 1
        self._registry.begin(op, name, dev_id, size, trans, origin, source, read_only)
        try:
            action()
            self._meta.set_transaction_id(trans)
            if self._data is not None:
                self._data.sync()
            freed = self._meta.commit()
            self._registry.finish(durable=False)     # the begin record + trans id already tell
        except BaseException:
            # If the abort itself fails, the pending record stays: the next open settles it.
            self._meta.abort()
            if self._meta.trans_id >= trans:
                # The superblock was written before the failure (a flush after it failed, or an
                # interrupt landed in the names' finish): the change is in the metadata, so it
                # is in the names too (applying a record again is harmless).
                if self._registry.pending is not None:
                    self._registry.finish(durable=False)
            else:
                try:
                    self._registry.cancel()
                except ThinpoolError as e:      # the file keeps the record; reconcile settles it
                    self.notes.append(f"the names file could not record the rollback ({e})")
            raise
        self._after_commit(freed)

    def _check_new_name(self, name: str) -> None:
        if name in self._registry.volumes:
            raise AlreadyExists(f"volume {name!r} exists already in pool {self.name}")

    def create_thin(self, name: str, size: int) -> Volume:
        """A new, empty thin volume of ``size`` bytes (may exceed the pool)."""
        check_name(name)
        check_volume_size(size)
        with self._guard():
            self._check_writable()
            self._check_new_name(name)
            dev = self._new_id()
            self._device_change("create", name, dev, size, lambda: self._meta.create_thin(dev))
            return self.volume(name)

    def snapshot(self, origin: str, name: str, read_only: bool = False) -> Volume:
        """A snapshot of ``origin`` named ``name``: O(1), shares every block. Writable (also of a
        read-only origin) unless ``read_only``; the flag is in the same pending record as the
        snapshot, so a crash never leaves a read-only snapshot writable."""
        check_name(name)
        if type(read_only) is not bool:
            raise InvalidArgument(f"read_only must be True or False, not {read_only!r}")
        with self._guard():
            self._check_writable()
            src = self._entry(origin)
            self._check_new_name(name)
            dev = self._new_id()
            self._device_change("snapshot", name, dev, src.size,
                                lambda: self._meta.create_snap(dev, src.dev_id), origin=origin,
                                read_only=read_only)
            return self.volume(name)

    def set_read_only(self, name: str, on: bool) -> Volume:
        """Mark volume ``name`` read-only (``on``) or writable again, as ``lvchange -p r|rw``.

        Only the names registry changes (both copies, atomically; no metadata transaction), so
        the writes acknowledged so far stay uncommitted as they were. Returns the handle."""
        if type(on) is not bool:
            raise InvalidArgument(f"read-only must be True or False, not {on!r}")
        with self._guard():
            self._check_writable()
            e = self._entry(name)
            if e.read_only != on:
                self._registry.set_read_only(name, on)
            return self.volume(name)

    def _refuse_read_only(self, name: str, what: str) -> None:
        e = self._registry.volumes.get(name)
        if e is not None and e.read_only:
            raise VolumeReadOnly(self.name, name, what)

    def delete(self, name: str) -> None:
        with self._guard():
            self._check_writable()
            e = self._entry(name)
            self._device_change("delete", name, e.dev_id, e.size, lambda: self._meta.delete(e.dev_id))
            self._volumes.pop(name, None)

    def resize_volume(self, name: str, size: int) -> Volume:
        """Grow or shrink a volume. Shrinking unmaps every whole block past the new end; growing
        first makes the bytes past the old end read as zeros (a shrink may have left its last
        block's tail behind), so the grown part always reads as zeros."""
        check_volume_size(size)
        with self._guard():
            self._check_writable()
            e = self._entry(name)
            self._refuse_read_only(name, "resize")
            bs = self.block_size
            vol = self.volume(name)
            tail, need = 0, None
            if size > e.size and e.size % bs:
                tail = min(bs - e.size % bs, size - e.size)
                need = vol.tail_to_zero(e.size, tail)
                if need and self._alloc.available() < need:
                    raise NoDataSpace(
                        f"growing volume {name!r} needs a free data block to zero the tail of its "
                        f"last block (it is shared) and pool {self.name} has none; nothing was "
                        f"changed")

            def change() -> None:
                if size < e.size:
                    self._meta.remove_range(e.dev_id, -(-size // bs), 1 << 62)
                elif need is not None:
                    vol.zero_tail(e.size, tail)

            self._device_change("resize", name, e.dev_id, size, change, origin=e.origin)
            return self.volume(name)


    def revert(self, name: str, snap: str) -> Volume:
        """Make volume ``name``'s content that of its snapshot ``snap`` again; ``snap`` is kept.

        O(1): a new device, a snapshot of ``snap``, takes over ``name``'s name, size and origin
        and ``name``'s old device is deleted, in one transaction. ``snap`` must be a snapshot of
        ``name`` (directly or through other snapshots). When ``snap`` is larger, the blocks past
        ``name``'s size are unmapped in the new device; a smaller ``snap`` whose size ends inside
        a block is refused (its tail would need zeroing: resize one of them first)."""
        with self._guard():
            self._check_writable()
            e = self._entry(name)
            s = self._entry(snap)
            self._refuse_read_only(name, f"revert to snapshot {snap!r}")
            if snap == name or not self._descends(snap, name):
                raise InvalidArgument(f"volume {snap!r} is not a snapshot of {name!r} in pool "
                                      f"{self.name}; revert takes a snapshot of the volume")
            bs = self.block_size
            if s.size < e.size and s.size % bs:
                raise InvalidArgument(
                    f"snapshot {snap!r} ({s.size} bytes) is smaller than {name!r} ({e.size} "
                    f"bytes) and ends inside a block; resize one of them to the other's size "
                    f"first")
            dev = self._new_id()

            def change() -> None:
                self._meta.create_snap(dev, s.dev_id)
                if s.size > e.size:
                    self._meta.remove_range(dev, -(-e.size // bs), 1 << 62)
                self._meta.delete(e.dev_id)

            self._device_change("revert", name, dev, e.size, change, origin=e.origin)
            self._volumes.pop(name, None)
            return self.volume(name)

    def merge(self, snap: str) -> Volume:
        """Merge snapshot ``snap`` into its origin (as ``lvconvert --merge``): the origin's device
        is deleted and ``snap``'s device takes the origin's name and the origin's own origin, in
        one transaction. Other snapshots of the origin keep their names and data; snapshots of
        ``snap`` follow it to its new name. Returns the handle under the origin's name.
        InvalidArgument (nothing changed) when ``snap`` is not a snapshot or its origin is gone."""
        with self._guard():
            self._check_writable()
            s = self._entry(snap)
            if s.origin is None:
                raise InvalidArgument(f"volume {snap!r} in pool {self.name} is not a snapshot "
                                      f"(or its origin was deleted): there is nothing to merge "
                                      f"it into")
            o = self._registry.volumes.get(s.origin)
            if o is None:
                raise InvalidArgument(f"the origin {s.origin!r} of snapshot {snap!r} is gone "
                                      f"from pool {self.name}: there is nothing to merge it into")
            origin = s.origin
            self._refuse_read_only(origin, f"merge of snapshot {snap!r} into it")
            self._device_change("merge", origin, s.dev_id, s.size,
                                lambda: self._meta.delete(o.dev_id), origin=o.origin, source=snap)
            self._volumes.pop(origin, None)
            self._volumes.pop(snap, None)
            return self.volume(origin)

    def _descends(self, name: str, ancestor: str) -> bool:
        """Whether ``name``'s chain of origins reaches ``ancestor`` (by name)."""
        seen = set()
        e = self._registry.volumes.get(name)
        while e is not None and e.origin is not None and e.origin not in seen:
            if e.origin == ancestor:
                return True
            seen.add(e.origin)
            e = self._registry.volumes.get(e.origin)
        return False
