"""The names registry: volume names and sizes beside the pool metadata.

dm-thin knows only 24-bit device ids; names and virtual sizes are the manager's business (as they
were for Docker's devicemapper driver). The registry is a small JSON document kept in two files,
``names.json`` and ``names.copy.json`` (records.py), each replaced atomically (temp file, fsync,
rename, fsync of the directory), so a reader sees the old or the new file, never a mix, and losing
or damaging one file loses no name, size or origin: the other is used (with a note) and the damaged
one is moved aside and rewritten by the next writer's open. Only when both are gone are the
devices named by their ids (entries marked ``guessed``, which ``stat`` warns about until they are
renamed).

A change to the set of devices is a two-phase operation tied to the pool's transaction id:

1. ``begin(op)`` records the pending operation with the transaction id it will commit as;
2. the metadata commits the change together with that transaction id;
3. ``finish()`` applies the operation to the names and clears it.

Step 3 need not reach the disk at once: the file written in step 1, together with the metadata's
transaction id, already says how the operation ended. So :class:`~thinpool.pool.Pool` finishes in
memory only (``finish(durable=False)``) and the file catches up with the next ``begin``, at
:meth:`Registry.flush` (the pool's close, a held metadata snapshot) or, after a crash, at the
next open's reconcile. That saves two of a snapshot's five fsyncs. Only the holder of the pool's
exclusive lock reads the file in between, and it has the names in memory.

A pending record that is not one :meth:`Registry.begin` writes makes that copy damaged (never a
raw ``KeyError``). Entries carry the ``epoch`` of
their device (the transaction id that created it), which handles compare to tell a deleted
device from a later one with the same id.

:meth:`Registry.reconcile` runs at every open: a pending operation whose transaction id the
metadata reached is rolled forward, any other is rolled back. So an interrupted create, snapshot,
delete, resize, revert or merge is never left half done. Names whose device is missing from the metadata are dropped and
devices with no name get one (their id as text), so the two always agree after an open.

An entry's ``read_only`` flag (``Pool.set_read_only``, as ``lvchange -p r``) lives here only, never
in the dm-thin metadata: :meth:`Registry.set_read_only` writes it at once (both copies, each
atomically: a crash leaves the old flag or the new), and a read-only snapshot carries it in its
own pending record (``"read_only": true``), so reconcile rolls it forward with the snapshot. It is
written only when set: names files from before the field load with every volume writable.
"""

from __future__ import annotations

import errno
import json
import re
from dataclasses import dataclass, field

from . import records
from .errors import InvalidArgument, NoSpace, ThinpoolError

_NAME = re.compile(r"^[A-Za-z0-9_+][A-Za-z0-9_.+@:-]{0,127}$")


def check_name(name: object) -> str:
    """Volume names: 1-128 characters of ``A-Z a-z 0-9 _ . + - @ :``, not starting with ``.`` or ``-``."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"invalid volume name {name!r}: use 1-128 characters from A-Z a-z 0-9 _ . + - @ :, "
            f"not starting with '.' or '-'")
    return name


@dataclass
class Entry:
    dev_id: int
    size: int
    origin: str | None = None
    #: The transaction id that created the device: with ``dev_id`` its identity, so a handle to
    #: a deleted device is never mistaken for a later device that got the same id.
    epoch: int = 0
    #: The name and size were made up when every copy of the names was lost (see reconcile).
    guessed: bool = False
    #: The volume's content may not change (``Pool.set_read_only``, as ``lvchange -p r``). Kept
    #: in the names only (never in the dm-thin metadata); written only when set, so names files
    #: from before the field load with every volume writable.
    read_only: bool = False


#: ``revert``: a new device (a snapshot of the snapshot reverted to) takes over ``name`` with
#: ``size`` and ``origin``; the old device of ``name`` is deleted in the same transaction.
#: ``merge``: the snapshot ``source`` (device ``dev_id``) takes over its origin's ``name`` and
#: the origin's own ``origin``; the origin's device is deleted in the same transaction.
_OPS = ("create", "snapshot", "delete", "resize", "revert", "merge")


def _check_pending(p) -> dict | None:
    """A pending record as written by :meth:`Registry.begin`, or ValueError."""
    if p is None:
        return None
    ok = (isinstance(p, dict) and p.get("op") in _OPS and isinstance(p.get("name"), str)
          and all(type(p.get(k)) is int and p[k] >= 0 for k in ("dev_id", "size", "transaction_id"))
          and (p.get("origin") is None or isinstance(p.get("origin"), str))
          and (p["op"] != "merge" or isinstance(p.get("source"), str))
          and type(p.get("read_only", False)) is bool)
    if not ok:
        raise ValueError(f"its pending operation record is malformed ({json.dumps(p)[:200]})")
    return p


def _parse(raw: dict) -> tuple:
    """(transaction_id, volumes, pending, next_id) of a names document; ValueError, KeyError,
    TypeError or AttributeError when it is not one."""
    vols = {}
    for n, e in raw.get("volumes", {}).items():
        try:
            check_name(n)
        except InvalidArgument as err:
            raise ValueError(str(err)) from None
        ro = e.get("read_only", False)
        if type(ro) is not bool:
            raise ValueError(f"volume {n!r}: read_only must be true or false, not {ro!r}")
        vols[n] = Entry(int(e["dev_id"]), int(e["size"]), e.get("origin"), int(e.get("epoch", 0)),
                        bool(e.get("guessed", False)), ro)
    return (int(raw.get("transaction_id", 0)), vols, _check_pending(raw.get("pending")),
            int(raw.get("next_id", 1)))


@dataclass
class Registry:
    path: str | None
    transaction_id: int = 0
    volumes: dict[str, Entry] = field(default_factory=dict)
    pending: dict | None = None
    #: The next device id to hand out: ids only ever increase, as LVM's and Docker's do.
    next_id: int = 1
    #: The file lags behind memory: an operation was finished without being written.
    stale: bool = field(default=False, compare=False, repr=False)
    #: Copies found missing or damaged at load (records.Problem); the next save rewrites them.
    problems: list = field(default_factory=list, compare=False, repr=False)
    #: No copy was intact at load: every name, size and origin is gone.
    lost: bool = field(default=False, compare=False, repr=False)
    #: The file the names were read from, and whether the other copy differs from it.
    source: str | None = field(default=None, compare=False, repr=False)
    behind: bool = field(default=False, compare=False, repr=False)
    #: What save did on the way (damaged copies moved aside), for the pool's notes.
    notes: list = field(default_factory=list, compare=False, repr=False)

    # -- persistence -------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | None) -> "Registry":
        """The names from the newest intact copy (see records.py). A damaged or missing copy is
        kept in :attr:`problems`; when no copy is intact the names are :attr:`lost` and
        :meth:`reconcile` names the devices by their ids (marked ``guessed``)."""
        if path is None:
            return cls(path)
        got = records.read(path, _parse)
        if got.doc is None:
            reg = cls(path)
            reg.lost = True
        else:
            reg = cls(path, *_parse(got.doc))
            reg.source = got.source
            reg.behind = got.differs or got.legacy      # the next save writes both
        reg.problems = got.problems
        return reg

    def save(self) -> None:
        """Write both copies atomically; an OS error is NoSpace (ENOSPC, EDQUOT) or
        ThinpoolError, and each file stays as it was or is complete. Damaged copies found at
        load are first moved aside (records.preserve), never overwritten."""
        if self.path is None:
            return
        try:
            self._save()
        except OSError as e:
            err = NoSpace if e.errno in (errno.ENOSPC, errno.EDQUOT) else ThinpoolError
            raise err(f"cannot write the names registry {self.path}: {e.strerror or e}") from e

    def _save(self) -> None:
        self.notes += records.preserve(self.problems)
        self.problems = []
        records.write(self.path, self._doc())
        self.stale = False
        self.behind = False

    def _doc(self) -> dict:
        return {"version": 1, "transaction_id": self.transaction_id,
                "volumes": {n: {"dev_id": e.dev_id, "size": e.size, "origin": e.origin,
                                "epoch": e.epoch, **({"guessed": True} if e.guessed else {}),
                                **({"read_only": True} if e.read_only else {})}
                            for n, e in sorted(self.volumes.items())},
                "pending": self.pending, "next_id": self.next_id}

    def flush(self) -> None:
        """Write the names if an operation was finished in memory only."""
        if self.stale:
            self.save()

    # -- queries -----------------------------------------------------------------------------
    def by_id(self) -> dict[int, str]:
        return {e.dev_id: n for n, e in self.volumes.items()}

    # -- two-phase changes -------------------------------------------------------------------
    def begin(self, op: str, name: str, dev_id: int, size: int, transaction_id: int,
              origin: str | None = None, source: str | None = None,
              read_only: bool = False) -> None:
        self.pending = {"op": op, "name": name, "dev_id": dev_id, "size": size,
                        "transaction_id": transaction_id, "origin": origin}
        if source is not None:
            self.pending["source"] = source
        if read_only:                  # (only a snapshot made read-only carries it)
            self.pending["read_only"] = True
        self.save()

    def finish(self, durable: bool = True) -> None:
        """Apply the pending operation (its metadata transaction has committed). With
        ``durable=False`` only in memory: the file keeps the pending record, which the next
        save, :meth:`flush` or a reconcile after a crash resolves the same way."""
        self._apply(self.pending)
        self.pending = None
        if durable:
            self.save()
        else:
            self.stale = self.path is not None

    def cancel(self) -> None:
        self.pending = None
        self.save()

    def _apply(self, p: dict) -> None:
        if p["op"] in ("create", "snapshot"):
            self.volumes[p["name"]] = Entry(p["dev_id"], p["size"], p.get("origin"),
                                            p["transaction_id"],
                                            read_only=bool(p.get("read_only", False)))
            self.next_id = max(self.next_id, p["dev_id"] + 1)
        elif p["op"] == "revert":
            # The name's old device is gone from the metadata; its snapshots keep the name.
            self.volumes[p["name"]] = Entry(p["dev_id"], p["size"], p.get("origin"),
                                            p["transaction_id"])
            self.next_id = max(self.next_id, p["dev_id"] + 1)
        elif p["op"] == "merge":
            src = self.volumes.pop(p["source"], None)
            epoch = src.epoch if src is not None and src.dev_id == p["dev_id"] else p["transaction_id"]
            self.volumes[p["name"]] = Entry(p["dev_id"], p["size"], p.get("origin"), epoch)
            for e in self.volumes.values():      # snapshots of the merged one follow its new name
                if e.origin == p["source"]:
                    e.origin = p["name"]
        elif p["op"] == "resize":
            e = self.volumes.get(p["name"])
            if e is not None:
                e.size = p["size"]
        elif p["op"] == "delete":
            self.volumes.pop(p["name"], None)
            for e in self.volumes.values():      # its snapshots outlive it, without an origin
                if e.origin == p["name"]:
                    e.origin = None
        self.transaction_id = p["transaction_id"]

    def reconcile(self, transaction_id: int, device_ids: list[int], size_of) -> list[str]:
        """Bring the names in line with the metadata; returns what was done (for logs and stat).

        A copy found missing or damaged at load is rewritten from the one in use (by a writer:
        a reader reconciles with ``path`` None and writes nothing). When every copy was lost,
        each device gets its id as its name and a size up to its last mapped block, marked
        ``guessed`` (:meth:`guessed`) until it is renamed."""
        notes: list[str] = []
        changed = bool(self.problems) or self.behind
        if self.problems and not self.lost:
            notes.append(f"names: {'; '.join(map(str, self.problems))}; the names were read from "
                         f"{self.source}" + ("; both files are rewritten from it now"
                                             if self.path is not None else
                                             "; the next command that writes to the pool "
                                             "rewrites it"))
        if self.pending is not None:
            p = self.pending
            if transaction_id >= p["transaction_id"]:
                self._apply(p)
                notes.append(f"rolled forward an interrupted {p['op']} of {p['name']!r}")
            else:
                notes.append(f"rolled back an interrupted {p['op']} of {p['name']!r}")
            self.pending = None
            changed = True
        ids = set(device_ids)
        for name, e in list(self.volumes.items()):
            if e.dev_id not in ids:
                del self.volumes[name]
                notes.append(f"dropped name {name!r}: device {e.dev_id} is not in the metadata")
                changed = True
        named = self.by_id()
        for dev in sorted(ids - set(named)):
            name = str(dev) if str(dev) not in self.volumes else f"dev-{dev}"
            self.volumes[name] = Entry(dev, size_of(dev), epoch=transaction_id, guessed=True)
            changed = True
        if self.lost and ids:
            why = "; ".join(map(str, self.problems))
            notes.append(f"names: every copy of the names is gone ({why}); the devices are "
                         f"named by their ids, sized up to their last mapped block, with no "
                         f"origins")
        elif self.lost and self.problems:
            notes.append(f"names: {'; '.join(map(str, self.problems))}; the pool has no devices, "
                         f"so no name was lost")
        if self.transaction_id != transaction_id:
            self.transaction_id = transaction_id
            changed = True
        if ids and self.next_id <= max(ids):
            self.next_id = max(ids) + 1
            changed = True
        self.lost = False
        if changed:
            self.save()
            notes += self.notes
            self.notes = []
        return notes

    def guessed(self) -> list[str]:
        """Names made up for devices whose names were lost (see :meth:`reconcile`)."""
        return sorted((n for n, e in self.volumes.items() if e.guessed),
                      key=lambda n: self.volumes[n].dev_id)

    def set_read_only(self, name: str, on: bool) -> None:
        """Mark volume ``name`` read-only (or writable again); written at once, both copies
        atomically, so a crash leaves the old flag or the new one. Call it with no operation
        pending. On a failed write the flag in memory is put back."""
        e = self.volumes[name]
        was, e.read_only = e.read_only, bool(on)
        try:
            self.save()
        except BaseException:
            e.read_only = was
            raise

    def rename(self, old: str, new: str) -> None:
        """Give volume ``old`` the name ``new`` (clears ``guessed``); written at once. Call it
        with no operation pending."""
        e = self.volumes.pop(old)
        was, e.guessed = e.guessed, False
        self.volumes[new] = e
        for other in self.volumes.values():
            if other.origin == old:
                other.origin = new
        try:
            self.save()
        except BaseException:
            self.volumes.pop(new, None)
            self.volumes[old] = e
            e.guessed = was
            for other in self.volumes.values():
                if other.origin == new:
                    other.origin = old
            raise
