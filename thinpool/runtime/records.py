"""The runtime's bookkeeping: ``POOL_DIR/runtime.json``, which snapshot owns which thin volume.

A :class:`RuntimeRecords` holds, in memory, the document of that file::

    {"version": 1, "next_id": N,
     "snapshots": {KEY: {"id", "kind", "parent", "volume", "labels", "created", "updated"}},
     "pending": [{"op": "prepare" | "remove", "key", "volume", ...}],
     "deferred": {VOLUME: {"key", "since"}},
     "volumes": {NAME: {"volume", "size", "created"}},
     "images": {NAME: {"top", "layers", "created"}}}

``snapshots`` are containerd's snapshots by key (a committed snapshot's key is its name);
``pending`` are operations under way, written before the pool is changed, so that a crash
leaves a record of what to finish or undo (:meth:`Snapshotter.reconcile
<thinpool.runtime.snapshotter.Snapshotter.reconcile>`); ``deferred`` are volumes whose removal
waits until their device is no longer busy (Docker devicemapper's deferred removal);
``volumes`` are the data volumes (named, kept when containers go); ``images`` the command line's
images (``thinpool image import``: each the committed snapshot of its last layer). Volume names are
``rt-<id>`` for snapshots (ids only ever increase: ``next_id``) and ``rt-vol-<name>`` for data
volumes, so the pool's other volumes are never the runtime's.

:meth:`save` writes the document with :func:`thinpool.records.write` (two copies, each replaced
atomically: temp file, fsync, rename), so after a crash the file is the document before or after
a save, never a mix. A failed save raises :class:`~thinpool.errors.ThinpoolError` and leaves the
file as it was (the caller undoes its in-memory change). :meth:`load` of damaged copies falls back
to the intact one; with both damaged it raises :class:`~thinpool.errors.MetadataError` (exit 3)
and nothing is overwritten.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

from thinpool import records
from thinpool.errors import MetadataError, ThinpoolError

from .types import Info, Kind

FILE_NAME = "runtime.json"
VERSION = 1
SNAPSHOT_PREFIX = "rt-"
DATA_VOLUME_PREFIX = "rt-vol-"


def _check(doc: dict) -> None:
    if doc.get("version") != VERSION:
        raise ValueError(f"unknown runtime records version {doc.get('version')!r}")
    if not isinstance(doc["next_id"], int):
        raise TypeError("next_id")
    for key, s in doc["snapshots"].items():
        if not isinstance(key, str) or not isinstance(s["volume"], str):
            raise TypeError("snapshot")
        Kind[s["kind"].upper()]
    if not isinstance(doc["pending"], list) or not isinstance(doc["deferred"], dict):
        raise TypeError("pending")
    if not isinstance(doc["volumes"], dict) or not isinstance(doc.setdefault("images", {}), dict):
        raise TypeError("volumes")


def empty() -> dict:
    return {"version": VERSION, "next_id": 1, "snapshots": {}, "pending": [], "deferred": {},
            "volumes": {}, "images": {}}


class RuntimeRecords:
    def __init__(self, pool_dir):
        self.path = Path(pool_dir) / FILE_NAME
        self.doc = empty()

    def load(self) -> None:
        if not os.path.exists(self.path) and not os.path.exists(records.copy_of(self.path)):
            self.doc = empty()
            return
        got = records.read(self.path, _check)
        if got.doc is None:
            why = "; ".join(str(p) for p in got.problems) or "unreadable"
            raise MetadataError(f"the runtime's records {self.path} cannot be read ({why}); "
                                f"nothing was changed")
        self.doc = got.doc

    def save(self) -> None:
        try:
            records.write(self.path, self.doc)
        except OSError as e:
            raise ThinpoolError(f"cannot write the runtime's records {self.path}: "
                                f"{e.strerror or e}") from e

    def snapshot_of_doc(self) -> dict:
        """A deep copy of the document (to restore after a failed save)."""
        return copy.deepcopy(self.doc)

    # -- views ----------------------------------------------------------------------------------
    @property
    def snapshots(self) -> dict[str, dict]:
        return self.doc["snapshots"]

    @property
    def pending(self) -> list[dict]:
        return self.doc["pending"]

    @property
    def deferred(self) -> dict[str, dict]:
        return self.doc["deferred"]

    @property
    def volumes(self) -> dict[str, dict]:
        return self.doc["volumes"]

    @property
    def images(self) -> dict[str, dict]:
        """The command line's images: name -> {"top": the committed snapshot of its last layer,
        "layers": every layer's snapshot, "created"}."""
        return self.doc["images"]

    def new_volume_name(self) -> tuple[int, str]:
        n = self.doc["next_id"]
        self.doc["next_id"] = n + 1
        return n, f"{SNAPSHOT_PREFIX}{n}"

    def drop_pending(self, volume: str) -> None:
        """Forget the operation under way on ``volume`` (in memory; the caller saves)."""
        self.doc["pending"] = [p for p in self.pending if p["volume"] != volume]

    def owned_volumes(self) -> set[str]:
        """Every pool volume the records account for (snapshots, operations under way,
        deferred removals, data volumes)."""
        owned = {s["volume"] for s in self.snapshots.values()}
        owned |= {p["volume"] for p in self.pending}
        owned |= set(self.deferred)
        owned |= {v["volume"] for v in self.volumes.values()}
        return owned

    def children(self, key: str) -> list[str]:
        return sorted(k for k, s in self.snapshots.items() if s["parent"] == key)

    def info(self, key: str) -> Info:
        s = self.snapshots[key]
        return Info(name=key, kind=Kind[s["kind"].upper()], parent=s["parent"],
                    labels=dict(s["labels"]), created_at=s["created"], updated_at=s["updated"])


def is_runtime_volume(name: str) -> bool:
    return name.startswith(SNAPSHOT_PREFIX)


def owner_of(pool_dir, volume: str) -> str | None:
    """What in the runtime's records of the pool at ``pool_dir`` owns ``volume`` ("snapshot
    KEY", "data volume NAME"), or None (no records, or not the runtime's). Reads only; records
    that cannot be read own nothing here (the snapshotter reports them when it starts)."""
    if not is_runtime_volume(volume):
        return None
    r = RuntimeRecords(pool_dir)
    try:
        r.load()
    except ThinpoolError:
        return None
    for key, s in r.snapshots.items():
        if s["volume"] == volume:
            return f"snapshot {key!r}"
    for name, v in r.volumes.items():
        if v["volume"] == volume:
            return f"data volume {name!r}"
    if volume in r.owned_volumes():
        return "an operation under way"
    return None
