"""Crash harness: record every write and flush a workload makes, then rebuild what a disk could
hold after a crash at any point, and check the pool that opens from it. The same wrapping of
the library's system calls injects faults (:class:`Faults`: EIO or ENOSPC at the Nth read, write,
sync or punch of one file) and :class:`Interrupt` raises ``KeyboardInterrupt`` at the Nth
Python call inside a package (``thinpool.metadata``).

Recording (:class:`Recorder`) wraps the system calls the library's two I/O layers use
(``os.pwrite``, ``os.pwritev``, ``os.copy_file_range``, ``os.ftruncate``, ``os.fsync``,
``os.fdatasync``, ``os.replace`` and the data device's ``fallocate``), performs each for real, and
logs its effect on files inside the pool directory as events.

Replaying (:func:`crash_image`) starts from copies of the files taken before the workload and
applies the events before the crash point. Writes made after a file's last flush are not yet
durable; the mode decides what happens to them:

* ``drop``: none of them reach the disk;
* ``tear``: all of them do, except the last write in flight, of which only some 512-byte sectors
  of its first 4 KiB block reach the disk (a torn block);
* ``reorder``: a random subset of them does, in a random order.

``os.replace`` (the names registry's atomic rename after fsync) counts as durable at once.

The model (:class:`History`) keeps, per volume and block, every version written with the event
index at which the write *started*. After a crash at event ``k`` whose last completed commit ended
at event ``c``, a block may hold its version as of ``c`` or any version whose write started
at or after ``c`` and before ``k`` — never anything else (not another volume's data, not garbage).
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import thinpool.data.device as device_mod
from thinpool import Pool, PoolMode
from tests.tptools import assert_checks_pass

SECTOR = 512
MD_BLOCK = 4096


@dataclass
class Event:
    kind: str            # write | punch | flush | truncate | replace
    file: str
    offset: int = 0
    data: bytes = b""
    length: int = 0


def file_of(root: str, fd: int) -> str | None:
    """The path of ``fd``'s file relative to ``root``, or None when it lies elsewhere."""
    try:
        p = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    return os.path.relpath(p, root) if p.startswith(root + "/") else None


class Recorder:
    """Logs the effect of every write-side system call on files below ``root``."""

    def __init__(self, root: Path):
        self.root = str(Path(root).resolve())
        self.events: list[Event] = []
        self._saved: dict = {}

    def _name(self, fd: int) -> str | None:
        return file_of(self.root, fd)

    def __enter__(self) -> "Recorder":
        real = {n: getattr(os, n) for n in ("pwrite", "pwritev", "fsync", "fdatasync",
                                            "copy_file_range", "ftruncate", "replace")}
        real_falloc = device_mod._fallocate
        self._saved = {**real, "_fallocate": real_falloc}
        ev = self.events

        def pwrite(fd, data, offset):
            n = real["pwrite"](fd, data, offset)
            name = self._name(fd)
            if name:
                ev.append(Event("write", name, offset, bytes(memoryview(data)[:n])))
            return n

        def pwritev(fd, bufs, offset):
            n = real["pwritev"](fd, bufs, offset)
            name = self._name(fd)
            if name:
                ev.append(Event("write", name, offset, b"".join(bytes(b) for b in bufs)[:n]))
            return n

        def fsync(fd):
            real["fsync"](fd)
            name = self._name(fd)
            if name:
                ev.append(Event("flush", name))

        def fdatasync(fd):
            real["fdatasync"](fd)
            name = self._name(fd)
            if name:
                ev.append(Event("flush", name))

        def copy_file_range(src, dst, count, offset_src=None, offset_dst=None):
            data = os.pread(src, count, offset_src)
            n = real["copy_file_range"](src, dst, count, offset_src, offset_dst)
            name = self._name(dst)
            if name:
                ev.append(Event("write", name, offset_dst, data[:n]))
            return n

        def ftruncate(fd, length):
            real["ftruncate"](fd, length)
            name = self._name(fd)
            if name:
                ev.append(Event("truncate", name, length=length))

        def replace(src, dst, *a, **kw):
            real["replace"](src, dst, *a, **kw)
            d = str(Path(dst).resolve())
            if d.startswith(self.root + "/"):
                ev.append(Event("replace", os.path.relpath(d, self.root), data=Path(d).read_bytes()))

        def fallocate(fd, mode, offset, length):
            real_falloc(fd, mode, offset, length)
            name = self._name(fd)
            if name:
                ev.append(Event("punch", name, offset, length=length))

        os.pwrite, os.pwritev, os.fsync, os.fdatasync = pwrite, pwritev, fsync, fdatasync
        os.copy_file_range, os.ftruncate, os.replace = copy_file_range, ftruncate, replace
        device_mod._fallocate = fallocate
        return self

    def __exit__(self, *exc) -> None:
        _restore(self._saved)


# -- fault injection -------------------------------------------------------------------------
_KINDS = {"pread": "read", "preadv": "read", "pwrite": "write", "pwritev": "write",
          "copy_file_range": "write", "fsync": "sync", "fdatasync": "sync"}


class Faults:
    """Fail the ``nth`` system call of ``kinds`` (read, write, sync, punch) on file ``file``
    (relative to ``root``, e.g. ``metadata`` or ``data``) with ``OSError(err)``; the call is not
    performed. With ``nth=None`` nothing fails and :attr:`count` tells how many calls there were,
    so a sweep can try every one. :attr:`fired` says whether the fault happened."""

    def __init__(self, root: Path, file: str, kinds=("read", "write", "sync"), nth: int | None = None,
                 err: int = errno.EIO):
        self.root = str(Path(root).resolve())
        self.file = file
        self.kinds = {kinds} if isinstance(kinds, str) else set(kinds)
        self.nth = nth
        self.err = err
        self.count = 0
        self.fired = False
        self._saved: dict = {}

    def _hit(self, fd: int, kind: str) -> None:
        if kind not in self.kinds or file_of(self.root, fd) != self.file:
            return
        self.count += 1
        if self.nth is not None and self.count == self.nth:
            self.fired = True
            raise OSError(self.err, os.strerror(self.err))

    def __enter__(self) -> "Faults":
        self._saved = {n: getattr(os, n) for n in _KINDS}
        self._saved["_fallocate"] = device_mod._fallocate

        def wrap(name, real):
            kind = _KINDS[name]
            fd_arg = 1 if name == "copy_file_range" else 0      # the destination's descriptor

            def call(*args, **kw):
                self._hit(args[fd_arg], kind)
                return real(*args, **kw)
            return call

        for n in _KINDS:
            setattr(os, n, wrap(n, self._saved[n]))
        real_falloc = self._saved["_fallocate"]

        def fallocate(fd, mode, offset, length):
            self._hit(fd, "punch")
            return real_falloc(fd, mode, offset, length)

        device_mod._fallocate = fallocate
        return self

    def __exit__(self, *exc) -> None:
        _restore(self._saved)


class Interrupt:
    """Raise ``KeyboardInterrupt`` at the ``nth`` Python function call made in a module under
    ``prefix`` (in this thread), as a Ctrl-C landing there would; with ``after``, calls are
    counted from the first call of the function of that name on. With ``nth=None`` it only
    counts (:attr:`count`); :attr:`fired` says whether it happened."""

    def __init__(self, nth: int | None = None, prefix: str = "thinpool.metadata",
                 after: str | None = None):
        self.nth = nth
        self.prefix = prefix
        self.after = after          # count only from the first call of a function of this name
        self.count = 0
        self.fired = False

    def _trace(self, frame, event, arg):
        if event == "call" and frame.f_globals.get("__name__", "").startswith(self.prefix):
            if self.after is not None:
                if frame.f_code.co_name != self.after:
                    return None
                self.after = None
            self.count += 1
            if self.count == self.nth:
                self.fired = True
                sys.settrace(None)
                raise KeyboardInterrupt(f"injected at call {self.nth} ({frame.f_code.co_name})")
        return None

    def __enter__(self) -> "Interrupt":
        sys.settrace(self._trace)
        return self

    def __exit__(self, *exc) -> None:
        sys.settrace(None)


def settle(p, d):
    """A degraded pool: commit (nothing half done may go in), close, check what is on disk with
    both oracles, and reopen it with NEEDS_CHECK cleared."""
    try:
        assert p.mode == PoolMode.READ_ONLY and p.stat().needs_check
        p.commit()
    finally:
        p.close()
    assert_checks_pass(Path(d) / "metadata")
    p = Pool.open(d)
    p.clear_needs_check()
    return p


def _restore(saved: dict) -> None:
    """Put back the system calls a Recorder or Faults replaced."""
    for n, f in saved.items():
        if n == "_fallocate":
            device_mod._fallocate = f
        else:
            setattr(os, n, f)


def snapshot_files(root: Path) -> dict[str, bytearray]:
    return {str(p.relative_to(root)): bytearray(p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


def _apply(files: dict[str, bytearray], e: Event, partial: tuple[int, int] | None = None) -> None:
    buf = files.setdefault(e.file, bytearray())
    if e.kind == "write":
        data = e.data
        off = e.offset
        if partial is not None:             # only some sectors of the first 4 KiB block land
            lo, hi = partial
            data, off = data[lo:hi], off + lo
        end = off + len(data)
        if len(buf) < end:
            buf.extend(bytes(end - len(buf)))
        buf[off:end] = data
    elif e.kind == "punch":
        end = min(len(buf), e.offset + e.length)
        if end > e.offset:
            buf[e.offset:end] = bytes(end - e.offset)
    elif e.kind == "truncate":
        if e.length < len(buf):
            del buf[e.length:]
        else:
            buf.extend(bytes(e.length - len(buf)))
    elif e.kind == "replace":
        files[e.file] = bytearray(e.data)


def crash_image(initial: dict[str, bytearray], events: list[Event], k: int, mode: str,
                rng: random.Random) -> dict[str, bytearray]:
    """The files as a disk could hold them after a crash just before event ``k``."""
    last_flush: dict[str, int] = {}
    for i, e in enumerate(events[:k]):
        if e.kind == "flush":
            last_flush[e.file] = i
    files = {n: bytearray(b) for n, b in initial.items()}
    pending: list[Event] = []
    for i, e in enumerate(events[:k]):
        durable = e.kind == "replace" or i < last_flush.get(e.file, -1)
        if e.kind == "flush":
            continue
        if durable:
            _apply(files, e)
        else:
            pending.append(e)
    if mode == "drop":
        return files
    if mode == "tear":
        for e in pending[:-1]:
            _apply(files, e)
        if pending:
            e = pending[-1]
            if e.kind == "write" and e.data:
                # Some 512-byte sectors (aligned on the device) of its first 4 KiB reach the disk.
                end = min(e.offset + len(e.data), (e.offset // MD_BLOCK + 1) * MD_BLOCK)
                s0 = e.offset // SECTOR
                for sec in range(s0, (end + SECTOR - 1) // SECTOR):
                    if rng.random() < 0.5:
                        lo = max(e.offset, sec * SECTOR) - e.offset
                        hi = min(end, (sec + 1) * SECTOR) - e.offset
                        _apply(files, e, (lo, hi))
            else:
                _apply(files, e)
        return files
    if mode == "reorder":
        chosen = [e for e in pending if rng.random() < 0.5]
        rng.shuffle(chosen)
        for e in chosen:
            _apply(files, e)
        return files
    raise ValueError(mode)


def write_files(files: dict[str, bytearray], root: Path) -> None:
    if root.exists():
        shutil.rmtree(root)
    for name, data in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(bytes(data))


# -- the model -------------------------------------------------------------------------------
@dataclass
class VolumeHistory:
    size_blocks: int
    born: int                                   # event index when its creation started
    died: int | None = None
    snapshot: bool = False
    blocks: dict[int, list[tuple[int, bytes]]] = field(default_factory=dict)


class History:
    """Versions of every block of every volume, stamped with event (or journal) indices."""

    def __init__(self, block_size: int):
        self.bs = block_size
        self.zero = bytes(block_size)
        self.vols: dict[str, VolumeHistory] = {}
        self.commits: list[tuple[int, int, frozenset[str]]] = []   # (start, end, names after)

    def current(self, name: str, vb: int) -> bytes:
        v = self.vols[name].blocks.get(vb)
        return v[-1][1] if v else self.zero

    def create(self, name: str, blocks: int, at: int, origin: str | None = None) -> None:
        h = VolumeHistory(blocks, at, snapshot=origin is not None)
        if origin is not None:
            for vb in range(blocks):
                h.blocks[vb] = [(at, self.current(origin, vb))]
        self.vols[name] = h

    def write(self, name: str, offset: int, data: bytes, at: int) -> None:
        bs = self.bs
        end = offset + len(data)
        for vb in range(offset // bs, (end - 1) // bs + 1):
            lo, hi = max(offset, vb * bs), min(end, (vb + 1) * bs)
            old = self.current(name, vb)
            new = old[: lo - vb * bs] + data[lo - offset: hi - offset] + old[hi - vb * bs:]
            self.vols[name].blocks.setdefault(vb, []).append((at, new))

    def live_names(self, at: int) -> frozenset[str]:
        return frozenset(n for n, v in self.vols.items() if v.born <= at and (v.died is None or v.died > at))

    def allowed(self, name: str, vb: int, since: int, until: int) -> list[bytes]:
        """Contents block ``vb`` may have after a crash before event ``until`` when the last
        completed commit ended at event ``since``."""
        h = self.vols[name]
        versions = h.blocks.get(vb, [])
        # A version stamped ``since`` started after that commit had ended.
        out = [d for at, d in versions if since <= at < until]
        older = [d for at, d in versions if at < since]
        if older:
            out.append(older[-1])
        elif not (h.snapshot and h.born >= since):
            out.append(self.zero)       # never written before the commit: reads as zeros
        return out

    def states(self, k: int) -> tuple[int, list[frozenset[str]]]:
        """For a crash before event ``k``: the end of the last completed commit, and the name
        sets the pool may show (that commit's, or the in-flight one's)."""
        done = [c for c in self.commits if c[1] <= k]
        last_end = done[-1][1] if done else 0
        names = [done[-1][2] if done else frozenset()]
        flight = [c for c in self.commits if c[0] < k < c[1]]
        if flight:
            names.append(flight[0][2])
        return last_end, names
