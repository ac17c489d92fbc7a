"""The needs-check marker: damage found by a command that cannot write NEEDS_CHECK itself.

A writer that finds damaged metadata sets NEEDS_CHECK in the superblock (guard.py). A reader
cannot: it does not hold the writer's lock, and the superblock belongs to the writer. So a reader
that finds damage in the *committed* metadata leaves ``<pool>/needs-check.json`` (a small JSON
record: why, which file, the transaction id it saw, the pid and the time), and:

* every writer's open honours it: it sets NEEDS_CHECK in the superblock, so the pool is
  read-only until a check, exactly as if the writer had found the damage itself;
* every reader's open reports it (``stat`` shows the pool as needing a check);
* only a clean ``thinpool check`` clears it (``Pool.clear_needs_check`` removes it).

A marker that cannot be parsed still counts (damage was found; what it said is lost).

Only damage in committed state may mark a pool: a reader racing with a writer's commit can read
a block that the writer has since reused, which looks damaged but is not.
:func:`committed_superblock` reads block 0 straight from the device; a caller compares it with the
superblock its view was built from (``Pool.report_damage``) or with itself around a second
attempt (``Pool._open``). Writers never overwrite a block the committed superblock reaches, so
when the superblock has not changed, the damaged block the reader saw is what is committed.

:func:`mark` writes atomically (temp file, fsync, rename, fsync of the directory); an exception
midway leaves the old marker or none. :func:`clear` unlinks it and fsyncs the directory. OS
errors propagate as OSError (callers type or note them). Nothing here prints.
"""

from __future__ import annotations

import json
import os
import struct
import time
from dataclasses import dataclass

from .errors import PoolDamaged
from .metadata import format as fmt
from .paths import MARKER_NAME
from .records import replace_file, sync_dir
from .units import format_size


@dataclass(frozen=True)
class Marker:
    reason: str
    transaction_id: int | None = None
    pid: int | None = None

    def __str__(self) -> str:
        return self.reason


def marker_path(pool_dir) -> str:
    return os.path.join(os.fspath(pool_dir), MARKER_NAME)


def read(pool_dir) -> Marker | None:
    """The pool's marker, or None when it has none."""
    path = marker_path(pool_dir)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        return Marker(str(doc["reason"]), doc.get("transaction_id"), doc.get("pid"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return Marker(f"a command found damage (its note {path} is unreadable)")


def mark(pool_dir, reason: str, transaction_id: int | None = None) -> None:
    """Leave the marker (replacing an older one: the newest finding is the one shown)."""
    d = os.fspath(pool_dir)
    doc = {"reason": reason, "transaction_id": transaction_id, "pid": os.getpid(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    replace_file(marker_path(d), json.dumps(doc, indent=1) + "\n")


def clear(pool_dir) -> bool:
    """Remove the marker; True if there was one."""
    try:
        os.unlink(marker_path(pool_dir))
    except FileNotFoundError:
        return False
    sync_dir(os.fspath(pool_dir))
    return True


def committed_superblock(metadata_path) -> bytes | None:
    """Block 0 of the metadata device as it is on disk now (no cache); None if unreadable."""
    try:
        fd = os.open(os.fspath(metadata_path), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.pread(fd, fmt.BLOCK_SIZE, 0)
    except OSError:
        return None
    finally:
        os.close(fd)


def view_is_current(metadata_path, seen: fmt.Superblock) -> bool:
    """True when the committed superblock on disk is still ``seen`` (the one a reader's view
    was built from): no commit happened since, so every block the view reached is committed."""
    raw = committed_superblock(metadata_path)
    try:
        return raw is not None and fmt.Superblock.unpack(raw) == seen
    except (ValueError, TypeError, struct.error):
        return False


def short_data(dpath: str, size: int, block_device: bool, nr_blocks: int, block_size: int,
               metadata_path: str, pool: str) -> PoolDamaged:
    """The error for a data device shorter than the metadata's ``nr_blocks``: which file, its
    size, the size needed and what to do (it is not metadata damage)."""
    need = nr_blocks * block_size
    grow = "a larger device" if block_device else f"'truncate -s {need} {dpath}'"
    return PoolDamaged(
        f"data device {dpath} is {format_size(size)} ({size} bytes) but the metadata "
        f"{metadata_path} describes {nr_blocks} blocks of {format_size(block_size)}, which need "
        f"{format_size(need)} ({need} bytes): the data device was cut short or replaced (this is "
        f"not metadata damage). If it was cut short, grow it back to {need} bytes ({grow}); what "
        f"was cut off reads as zeros, so restore that part from a backup if you have one. Then "
        f"run 'thinpool check {pool}'", dpath)
