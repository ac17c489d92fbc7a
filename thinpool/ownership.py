"""Which files belong to the pools under a home directory, by identity, not by path.

A pool's own files are its data and metadata (in its directory, or the files or block devices
named with ``--data``/``--metadata``, as its ``pool.json`` records them), its ``pool.json``, its
names registry and anything else in its directory. Commands that write a file they are given
(export, dump -o, restore -o, repair -o) or take over one (create --data/--metadata) ask
:func:`owner` first and refuse a pool's file: writing over one destroys the pool, and a data file
shared by two pools hands the same blocks to both.

Files are compared by what they are, not by how they are named, so symlinks, hard links,
``./`` and ``..`` paths are all caught: a block device by its device number (``st_rdev``: two
device nodes of one disk are the same device), anything else by ``(st_dev, st_ino)``. A path
that does not exist yet is judged by its directory: a new file inside a pool's directory would be
removed with the pool, so it counts as the pool's too.

Contract: pure functions over the home directory, its pools' ``pool.json`` files and ``stat``;
nothing is opened for writing, nothing locked, nothing printed. A pool whose ``pool.json`` is
unreadable still protects everything in its directory. Each call costs one ``listdir`` of the
home and of each pool directory and a few ``stat`` calls per pool. Raises nothing for missing or
unreadable entries (they protect nothing); ``home`` missing means no pools.
"""

from __future__ import annotations

import json
import os
import stat as stat_mod
from dataclasses import dataclass
from pathlib import Path

from .paths import CONFIG_COPY_NAME, CONFIG_NAME, NAMES_COPY_NAME, NAMES_NAME, is_pool_dir

#: The identity of a file: ("blk", st_rdev) for a block device, ("ino", st_dev, st_ino) otherwise.
FileId = tuple


@dataclass(frozen=True)
class PoolFile:
    """A file (or directory) that belongs to pool ``pool``: ``role`` is ``data``, ``metadata``,
    ``config``, ``names``, ``file`` (something else in its directory) or ``directory``."""

    pool: str
    role: str
    path: Path

    def describe(self) -> str:
        if self.role == "directory":
            return f"the directory of pool {self.pool!r} ({self.path})"
        what = {"data": "data", "metadata": "metadata", "config": "configuration (pool.json)",
                "names": "names registry"}.get(self.role)
        return (f"the {what} of pool {self.pool!r} ({self.path})" if what
                else f"a file of pool {self.pool!r} ({self.path})")


def file_id(path) -> FileId | None:
    """The identity of what ``path`` names (symlinks followed); None if it does not exist."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return _id(st)


def _id(st: os.stat_result) -> FileId:
    if stat_mod.S_ISBLK(st.st_mode):
        return ("blk", st.st_rdev)
    return ("ino", st.st_dev, st.st_ino)


def pool_dirs(home) -> list[Path]:
    """The pool directories in ``home`` (those holding either copy of pool.json, or of the
    names when both are lost), sorted by name."""
    try:
        names = sorted(os.listdir(home))
    except (OSError, ValueError):
        return []
    return [Path(home) / n for n in names if is_pool_dir(os.path.join(home, n))]


def pool_files(home) -> dict[FileId, PoolFile]:
    """Every file that belongs to a pool under ``home``, by identity."""
    found: dict[FileId, PoolFile] = {}

    def add(path: Path, pool: str, role: str) -> None:
        fid = file_id(path)
        if fid is not None and (fid not in found or found[fid].role in ("file", "directory")):
            found[fid] = PoolFile(pool, role, path)

    for d in pool_dirs(home):
        name = d.name
        add(d, name, "directory")
        try:
            entries = sorted(os.listdir(d))
        except OSError:
            entries = []
        for entry in entries:
            add(d / entry, name, "file")
        add(d / CONFIG_NAME, name, "config")
        add(d / CONFIG_COPY_NAME, name, "config")
        add(d / NAMES_NAME, name, "names")
        add(d / NAMES_COPY_NAME, name, "names")
        for role, default in (("data", "data"), ("metadata", "metadata")):
            add(d / _configured(d, role, default), name, role)
    return found


def _configured(pool_dir: Path, key: str, default: str) -> str:
    for name in (CONFIG_NAME, CONFIG_COPY_NAME):
        try:
            value = json.loads((pool_dir / name).read_text())[key]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(value, str) and value and "\0" not in value:
            return value
    return default


def owner(path, home) -> PoolFile | None:
    """The pool file ``path`` is (or, for a path that does not exist yet, whose directory is a
    pool's directory), else None."""
    files = pool_files(home)
    fid = file_id(path)
    if fid is not None:
        return files.get(fid)
    parent = file_id(os.path.dirname(os.fspath(path)) or ".")
    hit = files.get(parent) if parent is not None else None
    return hit if hit is not None and hit.role == "directory" else None
