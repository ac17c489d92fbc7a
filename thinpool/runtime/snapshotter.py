"""containerd's snapshotter model over a thin pool: layers and containers as thin snapshots.

A :class:`Snapshotter` keeps containerd's snapshots (by key) in the pool's runtime records
(records.py) and gives each one a thin volume of the pool (``rt-<id>``):

* :meth:`prepare` ``(key, parent)``: an ACTIVE, writable snapshot. Without a parent, a new thin
  volume of ``options.base_size`` with a fresh filesystem (``options.fs_type``, made through the
  volume's block device); with a parent (which must be COMMITTED), an O(1) thin snapshot of the
  parent's volume. :meth:`view` is the same but read-only (a VIEW: the volume is marked
  read-only and attached read-only). Both return :meth:`mounts`.
* :meth:`mounts`: the volume's block device (attached through ``devices`` when it is not yet),
  the filesystem type and mount options (``ro`` for views).
* :meth:`commit` ``(name, key)``: an ACTIVE snapshot becomes COMMITTED under ``name``: its device
  is detached (refused, BusyError, while something has it mounted), its volume marked read-only.
* :meth:`remove`: refused (BusyError) while the snapshot has children; its device is detached and
  its volume deleted. A device still busy is, with ``options.deferred_removal``, removed later
  (at the next call that finds it free, or :meth:`cleanup`); the snapshot is gone at once.
* :meth:`stat`, :meth:`update` (labels), :meth:`walk` (containerd's filters, a subset: see
  :func:`_matches`), :meth:`usage` (the blocks the snapshot adds to its parent: mapped in its
  volume and not shared with the parent's, from the committed mapping trees), :meth:`cleanup`
  (deletes runtime volumes no record owns, retries deferred removals).

A new snapshot is refused (NoDataSpace) while the pool's free data space is below
``options.min_free_space`` percent (Docker devicemapper's ``dm.min_free_space``).

Crash safety: every change of the pool is preceded by a save of the records naming it as
pending (``prepare``: the volume about to be made; ``remove``: the volume about to be deleted)
and followed by a save that clears it, and every pool change is committed before the records
say it is done. :meth:`reconcile` (run by the constructor) finishes or undoes what a crash left:
a pending prepare is undone (its volume deleted: containerd never saw it succeed and will ask
again), a pending remove is finished, committed snapshots' volumes are marked read-only again
where a crash came between the two steps of a commit, records whose volume is gone are dropped
(``notes`` says so) and runtime volumes nobody owns are deleted. So no thin device is ever
orphaned and no record points at a missing one. An error midway through an operation undoes
what it did in this process when it can; what it cannot undo is left pending for reconcile.

Devices: ``devices`` (a :class:`Devices`) turns a volume into a block device and back: the
export daemon's FUSE-file-plus-loop attachments (:class:`DaemonDevices`), or no devices at all
(``devices=None``: ``mounts`` then raises, and a parentless prepare makes no filesystem, for
pools handed to other means of access). Thread-safe: one lock around every operation.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from thinpool.errors import AlreadyExists, BusyError, InvalidArgument, NoDataSpace, NotFound, ThinpoolError

from . import records as rec
from .filesystem import FILESYSTEMS, make_filesystem
from .types import Info, Kind, Mount, Usage

if TYPE_CHECKING:
    from thinpool.pool import Pool

GiB = 1 << 30


@dataclass
class RuntimeOptions:
    """Docker devicemapper's options that still make sense (``dm.basesize``, ``dm.fs``,
    ``dm.mkfsarg``, ``dm.mountopt``, ``dm.min_free_space``, ``dm.use_deferred_removal``)."""

    base_size: int = 10 * GiB
    fs_type: str = "ext4"
    mkfs_options: list[str] = field(default_factory=list)
    mount_options: list[str] = field(default_factory=list)
    min_free_space: float = 10.0          # percent of the pool's data space
    deferred_removal: bool = True

    def check(self) -> None:
        if self.fs_type not in FILESYSTEMS:
            raise InvalidArgument(f"unsupported filesystem {self.fs_type!r} (use "
                                  f"{', '.join(sorted(FILESYSTEMS))})")
        if not isinstance(self.base_size, int) or self.base_size <= 0:
            raise InvalidArgument(f"the base size must be a positive number of bytes, not "
                                  f"{self.base_size!r}")
        if not 0 <= self.min_free_space < 100:
            raise InvalidArgument(f"the minimum free space is a percentage from 0 to 99, not "
                                  f"{self.min_free_space!r}")


class Devices(Protocol):
    """How a volume becomes a block device."""

    def attach(self, volume: str, read_only: bool) -> str: ...     # the device path
    def detach(self, volume: str) -> None: ...    # BusyError while it is mounted or held
    def attached(self, volume: str) -> str | None: ...


class DaemonDevices:
    """:class:`Devices` through an export :class:`~thinpool.export.daemon.Daemon` of this
    process (its attachments show in ``thinpool stat`` and its ``exports.json``)."""

    def __init__(self, daemon):
        self.daemon = daemon

    def attach(self, volume: str, read_only: bool) -> str:
        return self.daemon.attach_volume(volume, read_only)

    def detach(self, volume: str) -> None:
        self.daemon.detach_volume(volume)

    def attached(self, volume: str) -> str | None:
        return self.daemon.attached_device(volume)


class Snapshotter:
    def __init__(self, pool: "Pool", pool_dir, devices: Devices | None,
                 options: RuntimeOptions | None = None):
        self.pool = pool
        self.devices = devices
        self.records = rec.RuntimeRecords(Path(pool_dir))
        self.notes: list[str] = []
        self._lock = threading.RLock()
        #: An operation stopped midway in this process (an error, an interrupt): the next
        #: operation first runs :meth:`reconcile`, as a restart would.
        self._unsettled = True
        with self._lock:
            self.records.load()
            # Given options, else those the pool's records keep (configure), else the defaults.
            self.options = options or RuntimeOptions(**self.records.doc.get("options", {}))
            self.options.check()
            self.reconcile()

    def configure(self, **changes) -> RuntimeOptions:
        """Change and keep (in the pool's runtime records) the options of this snapshotter and
        of every later one of this pool; InvalidArgument for a bad value changes nothing."""
        import dataclasses
        with self._lock:
            try:
                new = dataclasses.replace(self.options, **changes)
            except TypeError as e:
                raise InvalidArgument(f"unknown runtime option: {e}") from None
            new.check()
            doc = self.records.snapshot_of_doc()
            self.records.doc["options"] = dataclasses.asdict(new)
            self._save(doc)
            self._done()
            self.options = new
            return new

    @property
    def settled(self) -> bool:
        """False after an operation stopped midway in this process, until the next operation
        (or :meth:`reconcile`) has finished or undone what it left."""
        return not self._unsettled

    # -- containerd's calls -------------------------------------------------------------------
    def prepare(self, key: str, parent: str = "", labels: dict[str, str] | None = None
                ) -> list[Mount]:
        return self._create(key, parent, labels, Kind.ACTIVE)

    def view(self, key: str, parent: str = "", labels: dict[str, str] | None = None
             ) -> list[Mount]:
        return self._create(key, parent, labels, Kind.VIEW)

    def mounts(self, key: str) -> list[Mount]:
        with self._lock:
            self._settle()
            s = self._get(key)
            if s["kind"] == "committed":
                raise InvalidArgument(f"snapshot {key!r} is committed: only active snapshots and "
                                      f"views are mounted")
            return self._mounts(s)

    def commit(self, name: str, key: str, labels: dict[str, str] | None = None) -> None:
        with self._lock:
            self._settle()
            _check_key(name)
            s = self._get(key)
            if s["kind"] != "active":
                raise InvalidArgument(f"snapshot {key!r} is {s['kind']}: only an active "
                                      f"snapshot can be committed")
            if name in self.records.snapshots:
                raise AlreadyExists(f"snapshot {name!r} exists already")
            volume = s["volume"]
            if self.devices is not None:
                self.devices.detach(volume)         # BusyError while mounted: nothing changed
            doc = self.records.snapshot_of_doc()
            now = time.time()
            entry = dict(s, kind="committed", updated=now, created=now)
            if labels:
                entry["labels"] = {**s["labels"], **_labels(labels)}
            del self.records.snapshots[key]         # (an active has no children: no parent
            self.records.snapshots[name] = entry    # links to follow)
            self._save(doc)
            self.pool.set_read_only(volume, True)      # reconcile redoes it after a crash
            self._commit()
            self._done()

    def remove(self, key: str) -> None:
        with self._lock:
            self._settle()
            s = self._get(key)
            children = self.records.children(key)
            if children:
                raise BusyError(f"snapshot {key!r} has {len(children)} child"
                                f"{'ren' if len(children) > 1 else ''} ({', '.join(children[:3])}"
                                f"{', ...' if len(children) > 3 else ''}): remove them first")
            volume = s["volume"]
            deferred = False
            if self.devices is not None and self.devices.attached(volume):
                try:
                    self.devices.detach(volume)
                except BusyError:
                    if not self.options.deferred_removal:
                        raise
                    deferred = True
            doc = self.records.snapshot_of_doc()
            del self.records.snapshots[key]
            if deferred:
                self.records.deferred[volume] = {"key": key, "since": time.time()}
                self._save(doc)
                self.notes.append(f"the device of snapshot {key!r} is busy: its volume {volume} "
                                  f"is removed once it is free")
                self._done()
                return
            self._delete_recorded(doc, key, volume)
            self._done()

    def stat(self, key: str) -> Info:
        with self._lock:
            self._get(key)
            return self.records.info(key)

    def update(self, info: Info, fieldpaths: list[str] | None = None) -> Info:
        """containerd's Update: only labels change. ``fieldpaths`` empty or None: the labels are
        replaced by ``info.labels``; ``labels``: the same; ``labels.KEY``: that label is set
        from ``info.labels`` or, when ``info.labels`` lacks it, deleted."""
        with self._lock:
            s = self._get(info.name)
            labels = dict(s["labels"])
            new = _labels(info.labels or {})
            paths = list(fieldpaths or [])
            if not paths or "labels" in paths:
                labels = dict(new)
                paths = [p for p in paths if p != "labels"]
            for p in paths:
                if not p.startswith("labels."):
                    raise InvalidArgument(f"cannot update field {p!r} of a snapshot (only labels)")
                k = p[len("labels."):]
                if k in new:
                    labels[k] = new[k]
                else:
                    labels.pop(k, None)
            doc = self.records.snapshot_of_doc()
            s["labels"] = labels
            s["updated"] = time.time()
            self._save(doc)
            self._done()
            return self.records.info(info.name)

    def walk(self, filters: list[str] | None = None) -> list[Info]:
        with self._lock:
            out = [self.records.info(k) for k in sorted(self.records.snapshots)]
            if filters:
                out = [i for i in out if any(_matches(i, f) for f in filters)]
            return out

    def usage(self, key: str) -> Usage:
        """The blocks this snapshot adds to its parent (mapped in its volume, with a data block
        that differs from the parent's at that place or where the parent maps nothing), as
        bytes; all its mapped blocks when it has no parent. From the mapping trees as last
        committed (this commits first)."""
        with self._lock:
            s = self._get(key)
            parent = self.records.snapshots.get(s["parent"]) if s["parent"] else None
            blocks = self._own_blocks(s["volume"], parent["volume"] if parent else None)
            return Usage(size=blocks * self.pool.block_size, inodes=0, blocks=blocks)

    def cleanup(self) -> list[str]:
        """Delete the runtime volumes no record owns and retry the deferred removals; the
        volumes deleted."""
        with self._lock:
            waiting = list(self.records.deferred)
            self._settle()                         # (retries the deferred removals)
            gone = [v for v in waiting if v not in self.records.deferred]
            owned = self.records.owned_volumes()
            for v in self.pool.volumes():
                if rec.is_runtime_volume(v) and v not in owned:
                    self._delete_volume(v)
                    gone.append(v)
            return gone

    def release(self, key: str) -> None:
        """Detach the device of snapshot ``key`` if it has one (BusyError, nothing changed,
        while something has it mounted): for callers that mount it themselves and are done
        (the command line's containers); containerd never calls this."""
        with self._lock:
            self._settle()
            s = self._get(key)
            if self.devices is not None:
                self.devices.detach(s["volume"])

    # -- data volumes (named; kept when containers go) ---------------------------------------
    def create_volume(self, name: str, size: int) -> None:
        """A data volume ``name`` of ``size`` bytes with a fresh filesystem (as a parentless
        prepare makes, crash-safe the same way); its device is left detached."""
        from thinpool.registry import check_name
        with self._lock:
            self._settle()
            check_name(name)
            if name in self.records.volumes:
                raise AlreadyExists(f"data volume {name!r} exists already")
            volume = f"{rec.DATA_VOLUME_PREFIX}{name}"
            if volume in self.pool.volumes():
                raise AlreadyExists(f"pool {self.pool.name} has a volume {volume} already")
            self._check_space(name)
            doc = self.records.snapshot_of_doc()
            self.records.pending.append({"op": "prepare", "key": f"volume {name}", "volume": volume})
            self._save(doc)
            try:
                self.pool.create_thin(volume, size)
                self._commit()
                if self.devices is not None:
                    dev = self.devices.attach(volume, read_only=False)
                    make_filesystem(self.options.fs_type, dev, self.options.mkfs_options)
                    self.devices.detach(volume)
            except BaseException:
                self._undo_prepare(volume)
                raise
            doc = self.records.snapshot_of_doc()
            self.records.volumes[name] = {"volume": volume, "size": size, "created": time.time()}
            self.records.drop_pending(volume)
            self._save(doc)
            self._done()

    def volume_mount(self, name: str) -> Mount:
        """What to mount for data volume ``name`` (its device attached if it is not)."""
        with self._lock:
            self._settle()
            v = self._data_volume(name)
            if self.devices is None:
                raise InvalidArgument("this snapshotter has no block devices to mount")
            dev = self.devices.attached(v["volume"]) or self.devices.attach(v["volume"], False)
            return Mount(type=self.options.fs_type, source=dev,
                         options=list(self.options.mount_options))

    def release_volume(self, name: str) -> None:
        with self._lock:
            v = self._data_volume(name)
            if self.devices is not None:
                self.devices.detach(v["volume"])

    def remove_volume(self, name: str) -> None:
        with self._lock:
            self._settle()
            v = self._data_volume(name)
            volume = v["volume"]
            if self.devices is not None:
                self.devices.detach(volume)          # BusyError while mounted: nothing changed
            doc = self.records.snapshot_of_doc()
            del self.records.volumes[name]
            self._delete_recorded(doc, f"volume {name}", volume)
            self._done()

    def _data_volume(self, name: str) -> dict:
        v = self.records.volumes.get(name)
        if v is None:
            raise NotFound(f"data volume {name!r} does not exist")
        return v

    # -- images (the command line's, without containerd) --------------------------------------
    def set_image(self, name: str, top: str, layers: list[str]) -> None:
        with self._lock:
            self._get(top, what="image layer")
            doc = self.records.snapshot_of_doc()
            self.records.images[name] = {"top": top, "layers": list(layers), "created": time.time()}
            self._save(doc)
            self._done()

    def image(self, name: str) -> dict:
        img = self.records.images.get(name)
        if img is None:
            raise NotFound(f"image {name!r} does not exist (thinpool image import makes one)")
        return dict(img)

    def remove_image(self, name: str) -> None:
        with self._lock:
            self.image(name)
            doc = self.records.snapshot_of_doc()
            del self.records.images[name]
            self._save(doc)
            self._done()

    # -- restart ------------------------------------------------------------------------------
    def reconcile(self) -> None:
        """Finish or undo what a crash left (see the module docstring). Idempotent."""
        with self._lock:
            r = self.records
            volumes = set(self.pool.volumes())
            doc = r.snapshot_of_doc()
            changed = False
            for p in list(r.pending):
                v = p["volume"]
                if v in volumes:
                    self._delete_volume(v)
                    volumes.discard(v)
                r.pending.remove(p)
                changed = True
                if p["op"] == "prepare":
                    self.notes.append(f"an interrupted prepare of snapshot {p['key']!r} was undone")
                else:
                    self.notes.append(f"an interrupted removal of snapshot {p['key']!r} was finished")
            for key, s in list(r.snapshots.items()):
                if s["volume"] not in volumes:
                    del r.snapshots[key]
                    changed = True
                    self.notes.append(f"snapshot {key!r} lost its volume {s['volume']}; its record "
                                      f"was dropped")
            for v in list(r.deferred):
                if v not in volumes:
                    del r.deferred[v]
                    changed = True
            for name, v in list(r.volumes.items()):
                if v["volume"] not in volumes:
                    del r.volumes[name]
                    changed = True
                    self.notes.append(f"data volume {name!r} lost its volume {v['volume']}; its "
                                      f"record was dropped")
            for name, img in list(r.images.items()):
                if img["top"] not in r.snapshots:
                    del r.images[name]
                    changed = True
            if changed:
                self._save(doc)
            for s in r.snapshots.values():
                if s["kind"] != "active" and not self.pool.volume(s["volume"]).read_only:
                    self.pool.set_read_only(s["volume"], True)
            owned = r.owned_volumes()
            for v in sorted(volumes):
                if rec.is_runtime_volume(v) and v not in owned:
                    self._delete_volume(v)
                    self.notes.append(f"volume {v} belonged to no snapshot; it was deleted")
            self._retry_deferred()
            self._unsettled = False

    def _settle(self) -> None:
        if self._unsettled:
            self.reconcile()
        else:
            self._retry_deferred()

    # -- internals ------------------------------------------------------------------------------
    def _create(self, key: str, parent: str, labels, kind: Kind) -> list[Mount]:
        with self._lock:
            self._settle()
            _check_key(key)
            if key in self.records.snapshots:
                raise AlreadyExists(f"snapshot {key!r} exists already")
            origin = None
            if parent:
                p = self._get(parent, what="parent")
                if p["kind"] != "committed":
                    raise InvalidArgument(f"parent {parent!r} is {p['kind']}, not committed")
                origin = p["volume"]
            self._check_space(key)
            doc = self.records.snapshot_of_doc()
            n, volume = self.records.new_volume_name()
            now = time.time()
            entry = {"id": n, "kind": kind.label, "parent": parent, "volume": volume,
                     "labels": _labels(labels or {}), "created": now, "updated": now}
            self.records.pending.append({"op": "prepare", "key": key, "volume": volume})
            self._save(doc)
            try:
                read_only = kind == Kind.VIEW
                if origin is not None:
                    self.pool.snapshot(origin, volume, read_only=read_only)
                    self._commit()
                else:
                    self.pool.create_thin(volume, self.options.base_size)
                    self._commit()
                    if self.devices is not None:
                        dev = self.devices.attach(volume, read_only=False)
                        make_filesystem(self.options.fs_type, dev, self.options.mkfs_options)
                        if read_only:
                            self.devices.detach(volume)
                    if read_only:
                        self.pool.set_read_only(volume, True)
                        self._commit()
                mounts = (self._mounts(entry) if self.devices is not None else [])
            except BaseException:
                self._undo_prepare(volume)
                raise
            doc = self.records.snapshot_of_doc()
            self.records.snapshots[key] = entry
            self.records.drop_pending(volume)
            self._save(doc)
            self._done()
            return mounts

    def _undo_prepare(self, volume: str) -> None:
        """Undo a prepare that failed in this process; what cannot be undone now stays pending
        for :meth:`reconcile`."""
        try:
            if self.devices is not None and self.devices.attached(volume):
                self.devices.detach(volume)
            if volume in self.pool.volumes():
                self._delete_volume(volume)
            self._clear_pending(volume)
        except ThinpoolError as e:
            self.notes.append(f"a failed prepare left volume {volume} behind ({e}); the next "
                              f"start removes it")

    def _mounts(self, s: dict) -> list[Mount]:
        if self.devices is None:
            raise InvalidArgument("this snapshotter has no block devices to mount (no export "
                                  "daemon)")
        view = s["kind"] == "view"
        dev = self.devices.attached(s["volume"]) or self.devices.attach(s["volume"], read_only=view)
        opts = list(self.options.mount_options)
        if view:
            opts = ["ro", *[o for o in opts if o != "rw"]]
        return [Mount(type=self.options.fs_type, source=dev, options=opts)]

    def _own_blocks(self, volume: str, parent_volume: str | None) -> int:
        from thinpool.metadata.walker import MetadataReader
        from thinpool.snapshot.delta import delta

        self._commit()
        dev = self.pool.volume(volume).dev_id
        with MetadataReader(self.pool.metadata.bm.path) as reader:
            if parent_volume is None:
                details = reader.details()
                return details[dev].mapped_blocks if dev in details else 0
            pdev = self.pool.volume(parent_volume).dev_id
            return sum(r.length for r in delta(reader, pdev, dev)
                       if r.kind in ("different", "right_only"))

    def _check_space(self, key: str) -> None:
        want = self.options.min_free_space
        if not want:
            return
        st = self.pool.stat()
        free = 100.0 * st.data_blocks_free / max(st.data_blocks_total, 1)
        if free < want:
            raise NoDataSpace(f"pool {self.pool.name} has {free:.1f}% of its data space free, "
                              f"below the minimum of {want:g}% for new snapshots; snapshot "
                              f"{key!r} was not made (free space: remove snapshots, or grow the "
                              f"pool)")

    def _retry_deferred(self) -> list[str]:
        gone = []
        for volume in list(self.records.deferred):
            try:
                if self.devices is not None and self.devices.attached(volume):
                    self.devices.detach(volume)
            except BusyError:
                continue
            doc = self.records.snapshot_of_doc()
            key = self.records.deferred.pop(volume)["key"]
            self._delete_recorded(doc, key, volume)
            self._done()
            gone.append(volume)
        return gone

    def _commit(self) -> None:
        """Commit the pool's transaction and bring its names file up to date (so that other
        processes reading the pool beside this one see the volumes as they are)."""
        self.pool.commit()
        self.pool.write_names()

    def _delete_volume(self, volume: str) -> None:
        if volume in self.pool.volumes():
            self.pool.delete(volume)
            self._commit()

    def _delete_recorded(self, before: dict, key: str, volume: str) -> None:
        """Delete ``volume`` the crash-safe way: the records (changed by the caller since
        ``before``) saved with the removal pending, the volume deleted and committed, the pending
        record cleared."""
        self.records.pending.append({"op": "remove", "key": key, "volume": volume})
        self._save(before)
        self._delete_volume(volume)
        self._clear_pending(volume)

    def _clear_pending(self, volume: str) -> None:
        doc = self.records.snapshot_of_doc()
        self.records.drop_pending(volume)
        self._save(doc)

    def _save(self, before: dict) -> None:
        """Save the records; on failure restore the in-memory document ``before``. Marks the
        snapshotter unsettled until the operation ends (:meth:`_done`)."""
        self._unsettled = True
        try:
            self.records.save()
        except BaseException:
            self.records.doc = before
            raise

    def _done(self) -> None:
        """The operation under way finished: nothing is left for :meth:`reconcile`."""
        self._unsettled = False

    def _get(self, key: str, what: str = "snapshot") -> dict:
        if not isinstance(key, str) or not key:
            raise InvalidArgument(f"a {what} key must be a non-empty string, not {key!r}")
        s = self.records.snapshots.get(key)
        if s is None:
            raise NotFound(f"{what} {key!r} does not exist")
        return s


def _check_key(key: object) -> None:
    if not isinstance(key, str) or not key or len(key) > 4096 or "\0" in key:
        raise InvalidArgument(f"invalid snapshot key {key!r}: a non-empty string without NUL")


def _labels(labels: dict) -> dict[str, str]:
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                               for k, v in labels.items()):
        raise InvalidArgument("labels must map strings to strings")
    return dict(labels)


def _matches(info: Info, expr: str) -> bool:
    """containerd's filter syntax, the part snapshotters see: ``a==b,c!=d`` (conjunction) over
    ``name``, ``parent``, ``kind`` and ``labels.KEY``; a bare field tests presence. Anything
    else is InvalidArgument."""
    for term in (t.strip() for t in expr.split(",")):
        if not term:
            continue
        for op in ("!=", "==", "~="):
            if op in term:
                field_, value = (x.strip() for x in term.split(op, 1))
                break
        else:
            field_, op, value = term, None, None
        value = value.strip('"') if value is not None else None
        if field_ == "name":
            have = info.name
        elif field_ == "parent":
            have = info.parent
        elif field_ == "kind":
            have = info.kind.label
        elif field_.startswith("labels."):
            have = info.labels.get(field_[len("labels."):].strip('"'))
        else:
            raise InvalidArgument(f"cannot filter snapshots on {field_!r} (name, parent, kind, "
                                  f"labels.KEY)")
        if op is None:
            ok = bool(have)
        elif op == "==":
            ok = have == value
        elif op == "!=":
            ok = have != value
        else:
            import re
            try:
                ok = have is not None and re.search(value, have) is not None
            except re.error as e:
                raise InvalidArgument(f"bad regular expression in filter {term!r}: {e}") from None
        if not ok:
            return False
    return True
