"""Pool: a data device, dm-thin metadata, a names registry and a lock, behind one object.

A pool lives in a directory::

    <path>/pool.json     where the data and metadata are (files in the directory by default)
    <path>/metadata      dm-thin pool metadata (sparse file), unless --metadata named another
    <path>/data          the data device (sparse file), unless --data named another
    <path>/names.json    the names registry (see registry.py)
    <path>/pool.copy.json, names.copy.json   second copies of the two records (records.py)
    <path>/needs-check.json   left by a reader that found damaged metadata (damage.py)

Guarantees:

* **Crash safety.** :meth:`commit` fsyncs the data device, then commits the metadata in the
  kernel's order (superblock last); the data fsync runs outside the mutex, writers going on, and
  what they wrote meanwhile is synced again under it before the metadata. After a crash the pool opens at its last commit; an interrupted
  create/snapshot/delete is rolled forward or back with the registry (transaction id). The names
  file is written before each device change and caught up at :meth:`close` (see registry.py).
* **Reads without the lock.** ``Volume.read`` serves a request inside one cached block without
  taking the pool's mutex; it trusts the metadata's ``generation`` (moved by every commit, abort
  and close, the only points after which a freed data block can be handed out again).
* **One writer, and readers beside it** (locking.py). Opening for writing takes an exclusive
  ``flock`` on the metadata file; a second writer gets :class:`~thinpool.errors.BusyError` naming
  the holder's pid, at once or after ``wait`` seconds. Readers hold the pool directory's readers'
  lock instead and read the last commit while a writer works; each commit waits until no reader
  of the previous one is left (``reader_wait_hook`` hears of the wait; ``commit(wait=False)``
  skips a commit that would have to wait).
* **No half-made pools.** :meth:`create` validates everything first and removes whatever it
  created if any step fails.
* **Freed space goes back to the host.** Data blocks freed by a transaction (deletes, discards,
  copy-on-write) are hole-punched once the commit that freed them is durable. That is post-commit
  work: if it fails the commit still stands (the operation is reported done, with a note), and
  the blocks still free are punched after the next commit.
* **Failures inside an operation.** Every operation runs under :meth:`_guard`. An exception
  raised before the operation changed the metadata (bad arguments, no data space for a write, a
  refused device change, an interrupt before any change) leaves the transaction exactly as it
  was: other volumes' acknowledged writes are kept. An exception after it began changing the
  metadata (an I/O error, metadata exhausted, an interrupt inside a B-tree change) aborts the
  transaction and degrades the pool as the kernel's ``metadata_operation_failed`` does: NEEDS_CHECK
  is written and the pool is read-only (FAIL when even that cannot be recorded); it never commits
  half a change. Damaged metadata found on the way degrades it too. :meth:`stat` says why
  (``degraded``).
* **Device changes** (create, snapshot, delete, resize, revert, merge of a volume) are checked
  first and refused before anything changes; then the writes acknowledged so far are committed (as the kernel does
  before a snapshot), and the change is made and committed on its own, so a failure of the change
  itself rolls back to exactly the state before it. Device ids are chosen under the pool's mutex
  and only ever increase (a counter in the names registry), as LVM and Docker do.
* **Damage is never forgotten.** Damaged metadata found by any operation, or reported with
  :meth:`report_damage` by a tool that read the pool's metadata, marks the pool for a check: a
  writer sets NEEDS_CHECK, a reader (once the committed superblock shows its view is current)
  leaves the needs-check marker, which every writer's open turns into NEEDS_CHECK. Only
  :meth:`clear_needs_check` (after a clean check) removes both. A data device shorter than the
  metadata says is :class:`~thinpool.errors.PoolDamaged` naming it, not metadata damage; a lost
  or damaged copy of pool.json or of the names is a note, mended by the next writer's open.
* **Handles.** A :class:`Volume` names its device by id and creation epoch (the transaction that
  made it): once that device is deleted, every call on the handle raises NotFound, even when a
  later device got the same id.
* **Resources.** A pool that is garbage-collected unclosed releases its descriptors and its lock
  (with a ``ResourceWarning``, as files do); what it had not committed is dropped, as in a crash.

Split by concern: device changes in device_changes.py, the space policy in space_policy.py, the
stat records and modes in pool_stat.py (mixins and data this class is made of).

``Pool.open`` returns a context manager: leaving the block without an exception commits; either
way the pool is closed and unlocked. Nothing here prints.
"""

from __future__ import annotations

import os
import warnings
import weakref
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .data.allocator import DataAllocator
from .data.device import DataDevice
from . import damage
from .errors import (BusyError, IncompatibleMetadata, InvalidArgument,
                     MetadataError, NoMetadataSpace, NotFound, ReadOnlyError,
                     ThinpoolError)
from .device_changes import DeviceChanges
from .guard import OperationGuard
from .metadata import format as fmt
from .metadata.thin_metadata import ThinMetadata
from .registry import Entry, Registry
from .volume import Volume

from .config import (PoolOptions, _read_config, _write_json, pool_files,  # noqa: F401
                     read_config, settle_config)
from .creation import (DEFAULT_BLOCK_SIZE, _int_arg, check_block_size,  # noqa: F401 (API)
                       check_data_size, check_metadata_size, check_volume_size,
                       default_metadata_size, make_pool_files)
from .locking import (READERS_LOCK_NAME, MetadataLock as _Lock, ReadersLock, process_command,
                      writer_of)
from .paths import CONFIG_NAME, NAMES_NAME
from .pool_stat import PoolMode, PoolStat, VolumeStat  # noqa: F401 (API)
from .space_policy import SpacePolicy



class Pool(DeviceChanges, SpacePolicy):
    """An open thin pool."""

    def __init__(self) -> None:
        self._meta: ThinMetadata | None = None
        self._data: DataDevice | None = None
        self._lock: _Lock | None = None
        self._readers: ReadersLock | None = None
        #: Called with the readers' pids when a commit has to wait for them (see locking.py).
        self.reader_wait_hook = None
        #: False: an allocation that finds no free data block fails at once with NoDataSpace
        #: instead of waiting ``no_space_timeout`` seconds (for a process that is the pool's
        #: only user, no one else could free space meanwhile).
        self.wait_for_space = True
        self._registry: Registry | None = None
        self._volumes: weakref.WeakValueDictionary[str, Volume] = weakref.WeakValueDictionary()
        self.notes: list[str] = []
        self.options = PoolOptions()
        self.name = "?"
        self.read_only = True
        # One operation at a time, and the rule for exceptions inside one (guard.py).
        self._ops = OperationGuard(lambda: None if self.read_only else self._meta,
                                   lambda: self.name, on_damage=self.report_damage)
        self._mutex = self._ops.mutex            # waits for space release it
        self._space = self._ops.space
        self._low_water_fired = False
        self._unpunched: list[np.ndarray] = []   # freed blocks a failed punch left behind
        self._marker: damage.Marker | None = None  # a reader found damage (damage.py)

    # -- creating and opening ----------------------------------------------------------------
    @classmethod
    def create(cls, path, data_size: int | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
               metadata_size: int | None = None, data_path=None, metadata_path=None,
               **options) -> "Pool":
        """Make a new pool in directory ``path`` and return it open for writing.

        ``options`` are :class:`PoolOptions` fields (``error_if_no_space``, ``no_space_timeout``,
        ``low_water_blocks``, ``low_water_hook``)."""
        make_pool_files(path, data_size, block_size, metadata_size, data_path, metadata_path,
                        **options)
        return cls.open(path)

    @classmethod
    def open(cls, path, read_only: bool = False, wait: float | None = 0) -> "Pool":
        """Open the pool in directory ``path``. For writing, ``wait`` is how long to wait for
        another writer to close it (seconds; None: as long as it takes) before BusyError."""
        path = Path(path)
        conf = read_config(path)
        self = cls()
        self.path = path
        self.name = path.name
        self.options = PoolOptions.from_dict(conf.doc.get("options"))
        self._open(str(path / conf.doc["metadata"]), str(path / conf.doc["data"]),
                   str(path / NAMES_NAME), read_only, wait, str(path / READERS_LOCK_NAME))
        self.notes += settle_config(path, conf, write=not read_only)
        return self

    def configure(self, **changes) -> PoolOptions:
        """Change and save pool options (see :class:`PoolOptions`)."""
        self._check_open()
        if self.read_only or self.path is None:
            raise ReadOnlyError("options can only be changed on a pool opened for writing")
        try:
            opts = PoolOptions(**{**asdict(self.options), **changes}).check()
        except TypeError as e:
            raise InvalidArgument(str(e)) from None
        cfg = {k: v for k, v in _read_config(self.path).items() if k != "copies"}
        cfg["options"] = asdict(opts)
        _write_json(self.path / CONFIG_NAME, cfg)
        with self._space:
            self.options = opts
            self._low_water_fired = False
            self._space.notify_all()
        return opts

    @classmethod
    def open_files(cls, metadata_path, data_path=None, read_only: bool = True) -> "Pool":
        """Open raw metadata (and optionally a data device) with no pool directory or names file.

        Devices are named by their id."""
        self = cls()
        self.path = None
        self.name = Path(metadata_path).name
        self._open(os.fspath(metadata_path), None if data_path is None else os.fspath(data_path),
                   None, read_only)
        return self

    def _open(self, mpath: str, dpath: str | None, names: str | None, read_only: bool,
              wait: float | None = 0, readers: str | None = None) -> None:
        if not os.path.exists(mpath):
            raise NotFound(f"metadata device {mpath} does not exist")
        self.read_only = read_only
        try:
            self._take_locks(mpath, read_only, wait, readers)
            self._meta = self._open_metadata(mpath, read_only)
            if self._readers is not None and not read_only:
                self._meta.commit_gate = self._commit_window
            elif self._readers is not None:
                writer = writer_of(mpath)
                if writer is not None:
                    self.notes.append(
                        f"process {writer}{process_command(writer)} is changing the pool: this "
                        f"shows its last commit (transaction {self._meta.trans_id})")
            bs = self._meta.data_block_size * fmt.SECTOR_SIZE
            self.block_size = bs
            if dpath is not None:
                self._data = DataDevice.open(dpath, bs, read_only=read_only)
                if self._data.nr_blocks < self._meta.nr_data_blocks:
                    raise damage.short_data(dpath, self._data.size, self._data.is_block_device,
                                            self._meta.nr_data_blocks, self.block_size,
                                            self._meta.bm.path, self.name)
            self._alloc = DataAllocator(self._meta)
            self._registry = Registry.load(names)
            if read_only and self._registry.pending is not None:
                self.notes.append("an interrupted operation is pending; open for writing to finish it")
            reg = self._registry
            if read_only:
                reg.path = None          # reconcile in memory only
            self.notes += reg.reconcile(self._meta.trans_id, self._meta.device_ids(), self._size_guess)
            if read_only:
                reg.path = names
            self._honour_marker()
        except BaseException:
            self._close_parts()
            raise

    def _take_locks(self, mpath: str, read_only: bool, wait: float | None,
                    readers: str | None) -> None:
        if readers is not None:
            try:
                self._readers = ReadersLock(readers)
            except OSError:               # (a directory we may not write: lock as before)
                self._readers = None
        if self._readers is None:
            self._lock = _Lock(mpath, exclusive=not read_only, wait=wait)
            return
        if read_only:
            if writer_of(mpath) == os.getpid():
                raise BusyError(f"pool {self.name} is open for writing by this process "
                                f"({os.getpid()}) through another Pool object; read through that "
                                f"one, or close it first", holder_pid=os.getpid())
            self._readers.share()
            return
        self._lock = _Lock(mpath, exclusive=True, wait=wait)
        self._readers.refuse_own_readers(f"pool {self.name}")

    def _commit_window(self, wait: bool = True):
        """Held around a commit: no reader of the last commit is left (locking.py)."""
        return self._readers.exclusive(wait=wait, on_wait=self.reader_wait_hook)

    def _open_metadata(self, mpath: str, read_only: bool) -> ThinMetadata:
        """Open the metadata; damage that a second attempt finds in the same committed
        superblock marks the pool for a check (damage.py)."""
        try:
            return ThinMetadata.open(mpath, read_only=read_only)
        except MetadataError as e:
            if isinstance(e, IncompatibleMetadata) or self.path is None:
                raise
            first = damage.committed_superblock(mpath)
            try:
                return ThinMetadata.open(mpath, read_only=read_only)   # a commit raced with us?
            except MetadataError as again:
                if first is not None and damage.committed_superblock(mpath) == first:
                    self._leave_marker(f"the metadata {mpath} does not open: {again}", None)
                raise again from None

    def _leave_marker(self, reason: str, transaction_id: int | None) -> bool:
        try:
            damage.mark(self.path, reason, transaction_id)
        except OSError as err:
            self.notes.append(f"the damage could not be recorded in "
                              f"{damage.marker_path(self.path)} ({err.strerror or err})")
            return False
        return True

    def _honour_marker(self) -> None:
        """A reader left the needs-check marker: a writer sets NEEDS_CHECK (the pool is
        read-only until a check); a reader reports the pool as needing a check."""
        self._marker = None if self.path is None else damage.read(self.path)
        if self._marker is not None and not self.read_only and not self._meta.needs_check:
            self._degrade(f"an earlier command found damaged metadata ({self._marker})")

    def report_damage(self, error: BaseException) -> bool:
        """Damage found while reading this pool (by one of its operations or by a tool that
        read its metadata file). If it is in the committed metadata, the pool is marked for a
        check: a writer degrades (NEEDS_CHECK), a reader leaves the needs-check marker, which the
        next writer's open turns into NEEDS_CHECK. A reader whose view is older than the
        committed superblock (a writer committed meanwhile) marks nothing: what it saw may have
        been a block reused since. Returns whether the pool was marked."""
        with self._mutex:
            meta = self._meta
            if (meta is None or self.path is None or not isinstance(error, MetadataError)
                    or isinstance(error, IncompatibleMetadata)):
                return False
            reason = f"damaged metadata in {meta.bm.path}: {error}"
            if not self.read_only:
                if not meta.needs_check:
                    self._degrade(reason)
                return True
            if not damage.view_is_current(meta.bm.path, meta.sb):
                return False
            if not self._leave_marker(reason, meta.trans_id):
                return False
            self._marker = damage.read(self.path)
            return True

    def _size_guess(self, dev_id: int) -> int:
        """A size for a device nobody named: up to its highest mapped block."""
        last = self._meta.highest_mapped(dev_id)
        return (0 if last is None else last + 1) * self.block_size

    # -- context manager ---------------------------------------------------------------------
    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and self._meta is not None and not self.read_only:
                self.commit()
        finally:
            self.close()

    def close(self) -> None:
        with self._mutex:
            try:
                if self._registry is not None and self._meta is not None and not self.read_only:
                    self._registry.flush()
            except ThinpoolError as e:
                # Post-commit work: the pending record and the transaction id on disk already
                # say how every change ended, and the next open settles the names from them.
                self.notes.append(f"the names file could not catch up ({e}); the next open "
                                  f"brings it in line")
            finally:
                self._close_parts()

    def _close_parts(self) -> None:
        # The metadata first: its close moves the generation, so a lock-free reader that raced
        # with this close throws its bytes away before the data descriptor's number can be
        # reused by anything else.
        try:
            if self._meta is not None:
                meta, self._meta = self._meta, None
                meta.close()
        finally:
            try:
                if self._data is not None:
                    data, self._data = self._data, None
                    data.close()
            finally:
                for attr in ("_lock", "_readers"):
                    lock = getattr(self, attr)
                    if lock is not None:
                        setattr(self, attr, None)
                        lock.release()

    def __del__(self) -> None:
        if getattr(self, "_lock", None) is None and getattr(self, "_readers", None) is None:
            return
        warnings.warn(f"pool {self.name} was never closed; closing it now (what it had not "
                      f"committed is dropped)", ResourceWarning, source=self)
        try:
            self.close()
        except Exception:  # noqa: BLE001 - a finalizer must not raise
            pass

    # -- checks ------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._meta is None:
            raise ThinpoolError("the pool is closed")

    def _check_readable(self) -> None:
        self._check_open()
        if self._failed:
            raise ThinpoolError(f"pool {self.name} has failed ({self._failed}); close it and run "
                                f"'thinpool check {self.name}'")

    def _live(self, vol: Volume) -> Entry:
        """The registry entry of a handle's device; NotFound once that device is gone."""
        self._check_open()
        e = self._registry.volumes.get(vol.name)
        if e is None or e.dev_id != vol.dev_id or e.epoch != vol.epoch:
            raise NotFound(f"volume {vol.name!r} (device {vol.dev_id}) no longer exists in pool "
                           f"{self.name}: this handle is stale")
        return e

    def _check_writable(self, allow_needs_check: bool = False) -> None:
        self._check_readable()
        if self.read_only:
            raise ReadOnlyError(f"pool {self.name} is open read-only")
        if self._meta.needs_check and not allow_needs_check:
            raise ReadOnlyError(
                f"pool {self.name} is read-only until it is checked (metadata damage was found, or "
                f"it ran out of metadata space): run 'thinpool check {self.name}', and "
                f"'thinpool repair' if that finds problems")
        if self._data is None:
            raise ReadOnlyError(f"pool {self.name} was opened without its data device")

    def _entry(self, name: str) -> Entry:
        self._check_open()
        e = self._registry.volumes.get(name)
        if e is None:
            raise NotFound(f"no volume {name!r} in pool {self.name}")
        return e

    # -- volumes -----------------------------------------------------------------------------
    @property
    def mode(self) -> PoolMode:
        """The pool's condition (not this handle's: see ``read_only`` for that)."""
        with self._mutex:
            return self._mode()

    def _mode(self) -> PoolMode:
        self._check_open()
        if self._failed:
            return PoolMode.FAIL
        if self._meta.needs_check or self._marker is not None:
            return PoolMode.READ_ONLY
        if self._alloc.available() == 0:
            return PoolMode.OUT_OF_DATA_SPACE
        return PoolMode.WRITE

    # -- degradation (see guard.py) ----------------------------------------------------------
    def _guard(self):
        """Run one operation under the pool's mutex and the failure rule of guard.py."""
        return self._ops.operation()

    def _degrade(self, why: str) -> None:
        self._ops.degrade(why)

    @property
    def _failed(self) -> str | None:
        return self._ops.failed

    def clear_needs_check(self) -> None:
        """Clear NEEDS_CHECK (after a clean check); the pool takes writes again. What was not
        committed is thrown away, as the kernel does when it leaves read-only mode."""
        with self._guard():
            self._check_writable(allow_needs_check=True)
            self._meta.set_needs_check(False)
            self._ops.recovered()
            if self.path is not None:
                damage.clear(self.path)
            self._marker = None

    def guessed_names(self) -> list[str]:
        """Volumes whose names were made up because every copy of the names was lost: their
        id as name, a size up to the last mapped block, no origin (see registry.py)."""
        with self._mutex:
            self._check_open()
            return self._registry.guessed()

    def volumes(self) -> list[str]:
        with self._mutex:
            self._check_open()
            vols = self._registry.volumes
            return sorted(vols, key=lambda n: vols[n].dev_id)

    def volume(self, name: str) -> Volume:
        with self._mutex:
            e = self._entry(name)
            v = self._volumes.get(name)
            if v is None or v.dev_id != e.dev_id or v.epoch != e.epoch:
                v = Volume(self, name, e.dev_id, e.size, e.epoch)
                self._volumes[name] = v
            v.size = e.size
            return v

    # -- pool size ---------------------------------------------------------------------------
    def resize(self, data_size: int | None = None, metadata_size: int | None = None) -> None:
        """Grow the data device and/or the metadata device (never shrink).

        Growing the metadata works on a pool that ran out of metadata space (NEEDS_CHECK set);
        a check then clears the flag."""
        with self._guard():
            self._resize(data_size, metadata_size)
            self._space.notify_all()

    def _resize(self, data_size: int | None, metadata_size: int | None) -> None:
        self._check_writable(allow_needs_check=data_size is None)
        meta = self._meta
        before = (meta.data_sm.nr_blocks, meta.metadata_sm.nr_blocks)
        # Check everything before changing anything.
        nr = None
        if data_size is not None:
            _int_arg("data size", data_size)
            check_data_size(data_size, self.block_size)
            nr = data_size // self.block_size
            if nr < meta.nr_data_blocks:
                raise InvalidArgument(
                    f"the pool cannot shrink: it has {meta.nr_data_blocks * self.block_size} "
                    f"bytes of data space, asked for {data_size}")
        mblocks = None
        if metadata_size is not None:
            _int_arg("metadata size", metadata_size)
            mblocks = -(-metadata_size // fmt.BLOCK_SIZE)
            check_metadata_size(mblocks * fmt.BLOCK_SIZE)
            if mblocks < meta.metadata_sm.nr_blocks:
                raise InvalidArgument("the metadata device cannot shrink")
        grow_data = nr is not None and nr > meta.nr_data_blocks
        if grow_data:
            E = fmt.ENTRIES_PER_BITMAP
            new_bitmaps = -(-nr // E) - -(-meta.nr_data_blocks // E)
            need = new_bitmaps + new_bitmaps // 100 + 16   # bitmaps, index leaves, commit shadows
            if mblocks is None and meta.metadata_sm.nr_allocatable() < need:
                raise NoMetadataSpace(
                    f"growing the data to {data_size} bytes needs about {need} free metadata "
                    f"blocks and {meta.metadata_sm.nr_allocatable()} are free: grow the metadata "
                    f"first ('thinpool resize {self.name} --metadata-size SIZE'); nothing was changed")
            if nr * self.block_size > self._data.size:
                # The file before the metadata: a size it cannot have (EFBIG) changes nothing.
                self._data.grow(nr * self.block_size)
        if mblocks is not None:                  # metadata first: the data growth may need it
            if mblocks > meta.bm.nr_blocks:
                meta.bm.grow(mblocks)
            meta.resize_metadata()
        if grow_data:
            meta.resize_data(nr)
        # A grown space map alone is not among the metadata's "changes": commit regardless.
        grew = (meta.data_sm.nr_blocks, meta.metadata_sm.nr_blocks) != before
        self._commit(force=grew)

    # -- transactions ------------------------------------------------------------------------
    def commit(self, wait: bool = True) -> bool:
        """Make every write so far durable: data fsync, then metadata, superblock last.

        A commit waits until no reader of the last commit is left (locking.py); with
        ``wait=False`` it is skipped instead (returns False: nothing was committed, the
        transaction goes on), as a periodic commit may be.

        The long part, the data ``fdatasync``, runs first without the pool's mutex, so that
        writers go on meanwhile (``DataDevice.sync_ahead``); then, under the mutex, the data is
        synced again (only what was written during the first sync, nothing when no write came:
        every write of the data device runs under the mutex, so none is in flight then) and the
        metadata is committed. So no mapping reaches the disk before the data it maps, and a
        failure of the first sync is raised by the second, under the mutex, as before."""
        data = self._data
        if data is not None and not self.read_only:
            data.sync_ahead()
        with self._guard():
            with (self._commit_window(wait) if self._readers is not None and not self.read_only
                  else nullcontext(True)) as free:
                if not free:
                    return False
                self._commit(force=False)
            self._space.notify_all()      # blocks freed by this transaction can be reused now
            return True

    def _commit(self, force: bool) -> None:
        self._check_open()
        if self.read_only:
            raise ReadOnlyError(f"pool {self.name} is open read-only")
        meta = self._meta
        # Data first, always: writes into exclusive blocks change no metadata but must still be
        # durable once commit (or Volume.flush) returns. Mappings to data that may not have
        # reached the disk must never be committed: a failed sync degrades the pool.
        if self._data is not None:
            try:
                self._data.sync()
            except ThinpoolError as e:
                if meta.has_changes():
                    self._degrade(f"the data device could not be synced ({e}); the uncommitted "
                                  f"transaction was rolled back")
                raise
        if not force and not meta.has_changes():
            return
        self._after_commit(meta.commit())

    def _after_commit(self, freed: np.ndarray) -> None:
        """Post-commit work: give the host back the space of data blocks a commit freed (and
        of blocks an earlier failed punch left, if they are still free). A failure here is a
        note, never the operation's failure: the commit stands."""
        if self._data is None:
            return
        if self._unpunched:
            freed = self._meta.still_free_data(np.concatenate([freed, *self._unpunched]))
            self._unpunched = []
        if not len(freed):
            return
        try:
            for start, n in _block_runs(freed):
                self._data.punch_blocks(start, n)
        except ThinpoolError as e:
            self._unpunched.append(freed)
            self.notes.append(f"the space of {len(freed)} freed data block(s) could not be given "
                              f"back to the host ({e}); it is retried after the next commit "
                              f"('thinpool trim {self.name}' also does it)")

    def write_names(self) -> None:
        """Bring the names file up to date now (a long-lived writer, after a change, so that
        readers beside it find no operation pending); otherwise :meth:`close` does it."""
        with self._mutex:
            if self._registry is not None and self._meta is not None and not self.read_only:
                self._registry.flush()

    def reserve_metadata_snap(self) -> int:
        """Commit and hold a metadata snapshot (the kernel's ``reserve_metadata_snap``): its trees
        stay intact for readers (``dump -m``) while the pool goes on. Returns its block."""
        with self._guard():
            self._check_writable()
            if self._data is not None:
                self._data.sync()
            if self._registry is not None:
                self._registry.flush()     # readers of the held snapshot take names from it
            held, freed = self._meta.reserve_metadata_snap()
            self._after_commit(freed)
            return held

    def release_metadata_snap(self) -> None:
        with self._guard():
            self._check_writable()
            self._meta.release_metadata_snap()

    # -- information -------------------------------------------------------------------------
    def stat(self) -> PoolStat:
        with self._mutex:
            return self._stat()

    def _stat(self) -> PoolStat:
        self._check_open()
        meta = self._meta
        vols = []
        for name in self.volumes():
            e = self._registry.volumes[name]
            d = meta.devices.get(e.dev_id)
            mapped = d.mapped_blocks if d else 0
            vols.append(VolumeStat(name, e.dev_id, e.size, mapped, mapped * self.block_size,
                                   e.origin, d.creation_time if d else 0,
                                   d.snapshotted_time if d else 0, e.guessed, e.read_only))
        used = meta.data_sm.nr_allocated()
        mused = meta.metadata_sm.nr_allocated()
        return PoolStat(
            name=self.name, path=None if self.path is None else str(self.path),
            data_path=None if self._data is None else self._data.path,
            metadata_path=meta.bm.path, block_size=self.block_size,
            data_blocks_total=meta.nr_data_blocks, data_blocks_used=used,
            data_blocks_free=meta.nr_data_blocks - used,
            metadata_blocks_total=meta.metadata_sm.nr_blocks, metadata_blocks_used=mused,
            metadata_blocks_free=meta.metadata_sm.nr_blocks - mused,
            transaction_id=meta.trans_id, time=meta.time, mode=self._mode().label,
            needs_check=meta.needs_check or self._marker is not None, volumes=vols,
            error_if_no_space=self.options.error_if_no_space,
            no_space_timeout=self.options.no_space_timeout,
            low_water_blocks=self.options.low_water_blocks,
            degraded=self._ops.failed or self._ops.degraded or (
                "NEEDS_CHECK is set in the metadata" if meta.needs_check else None) or (
                None if self._marker is None else
                f"an earlier command found damaged metadata ({self._marker})"))

    @property
    def metadata(self) -> ThinMetadata:
        """The open metadata, for tools (read it; change it only through the pool)."""
        self._check_open()
        return self._meta


def _block_runs(blocks: np.ndarray):
    """(start, length) runs of consecutive block numbers in a sorted array."""
    if not len(blocks):
        return
    breaks = np.flatnonzero(np.diff(blocks) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(blocks)]])
    for a, z in zip(starts.tolist(), ends.tolist()):
        yield int(blocks[a]), z - a
