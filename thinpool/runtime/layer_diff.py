"""Write the layer tar that turns one directory tree into another: a container's changes as an
image layer.

``diff_layer(lower, upper, out)`` walks both trees (never following a symbolic link) and writes
to ``out`` an uncompressed pax tar such that :func:`~thinpool.runtime.layers.apply_layer` of it
onto a copy of ``lower`` gives ``upper``: the same paths, types, content, permission bits
(setuid, setgid, sticky), owners, mtimes to the nanosecond, symlink targets, device numbers and
extended attributes. Its entries:

* An upper path that is new, or differs from the lower one in type, permission bits, uid, gid,
  mtime, extended attributes, size (files), target (symlinks) or device number, is written in
  full. A regular file equal in all of those is taken as unchanged without reading it, except
  when its mtime has no fraction of a second (a filesystem with coarse times, or times set from a
  tar): then the contents are compared too. A rewrite that keeps the size and puts the mtime
  back to the nanosecond is therefore missed, as in containerd's and Docker's diffs.
* Every parent directory of a written entry, the root included (as ``./``), is written as well,
  so that the applier sets its mtime again after adding to it or removing from it.
* The top-most path of a deleted tree becomes a whiteout ``DIR/.wh.NAME``; opaque markers are
  never written. A path whose type changed needs none: applying replaces it.
* Upper files that share an inode are written once as a file and then as hard links to it (only
  among the files this diff writes; an unchanged peer is not linked to).
* Sockets are left out (tar has no type for them); a socket in upper over a lower path deletes
  that path.

The order is deterministic: each directory before its content; in a directory, first the
whiteouts, then the upper names, each sorted by their bytes; no user or group names, no atime.
The same two trees give the same bytes.

Not expressible, hence not written: an extended attribute removed from a directory that stays
(the applier keeps a directory's attributes). An upper name starting with ``.wh.`` cannot be a
layer's: :class:`~thinpool.errors.InvalidArgument`. A failure midway (that, or an OSError reading
a tree) leaves a partial tar in ``out`` and raises; the caller discards it.
"""

from __future__ import annotations

import errno
import os
import stat
import tarfile
from pathlib import Path
from typing import BinaryIO

from thinpool.errors import InvalidArgument
from thinpool.runtime.layer_format import (
    NS,
    PAX_MTIME,
    PAX_XATTR_PREFIX,
    PERMISSION_BITS,
    WHITEOUT_PREFIX,
    LayerStats,
    ns_to_pax_time,
)

_READ_CHUNK = 256 * 1024
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_DEVICE_TYPES = {stat.S_IFCHR: tarfile.CHRTYPE, stat.S_IFBLK: tarfile.BLKTYPE}


def diff_layer(lower: Path, upper: Path, out: BinaryIO) -> LayerStats:
    """Write to ``out`` the layer tar (uncompressed pax) that turns the tree ``lower`` into
    ``upper``; see the module docstring. ``out`` is written sequentially and not closed.
    Returns what was written (``entries``, ``bytes_written``, ``whiteouts``)."""
    lower, upper = Path(lower), Path(upper)
    for tree in (lower, upper):
        if not stat.S_ISDIR(os.lstat(tree).st_mode):
            raise InvalidArgument(f"{tree} is not a directory")
    stats = LayerStats()
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        _DiffWriter(lower, upper, tf, stats).run()
    return stats


def _listing(path: Path) -> dict[str, os.stat_result]:
    """The names in a directory with their lstat, sockets left out, sorted by their bytes."""
    found = {}
    for name in sorted(os.listdir(path), key=os.fsencode):
        st = os.lstat(path / name)
        if not stat.S_ISSOCK(st.st_mode):
            found[name] = st
    return found


def _xattrs(path: Path) -> list[tuple[str, bytes]]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno == errno.EOPNOTSUPP:
            return []
        raise
    found = []
    for name in sorted(names):
        try:
            found.append((name, os.getxattr(path, name, follow_symlinks=False)))
        except OSError as e:
            if e.errno != errno.ENODATA:    # gone since listxattr
                raise
    return found


def _same_content(a: Path, b: Path) -> bool:
    with open(os.open(a, _OPEN_FLAGS), "rb") as fa, open(os.open(b, _OPEN_FLAGS), "rb") as fb:
        while True:
            ca, cb = fa.read(_READ_CHUNK), fb.read(_READ_CHUNK)
            if ca != cb:
                return False
            if not ca:
                return True


def _unchanged(lpath: Path, lst: os.stat_result, upath: Path, ust: os.stat_result) -> bool:
    if stat.S_IFMT(lst.st_mode) != stat.S_IFMT(ust.st_mode):
        return False
    if (lst.st_mode & PERMISSION_BITS, lst.st_uid, lst.st_gid, lst.st_mtime_ns) != \
            (ust.st_mode & PERMISSION_BITS, ust.st_uid, ust.st_gid, ust.st_mtime_ns):
        return False
    if stat.S_ISREG(ust.st_mode):
        if lst.st_size != ust.st_size:
            return False
        if ust.st_mtime_ns % NS == 0 and not _same_content(lpath, upath):
            return False
    elif stat.S_ISLNK(ust.st_mode):
        if os.readlink(lpath) != os.readlink(upath):
            return False
    elif stat.S_ISCHR(ust.st_mode) or stat.S_ISBLK(ust.st_mode):
        if lst.st_rdev != ust.st_rdev:
            return False
    return _xattrs(lpath) == _xattrs(upath)


class _DiffWriter:
    def __init__(self, lower: Path, upper: Path, tf: tarfile.TarFile, stats: LayerStats):
        self.lower = lower
        self.upper = upper
        self.tf = tf
        self.stats = stats
        # The directories from the root to the one being walked: [rel, lstat, written yet].
        self.parents: list[list] = []
        self.links: dict[tuple[int, int], str] = {}   # (st_dev, st_ino) -> first path written

    def run(self) -> None:
        lst, ust = os.lstat(self.lower), os.lstat(self.upper)
        self.parents.append(["", ust, False])
        if not _unchanged(self.lower, lst, self.upper, ust):
            self._write_parents()
        self._walk("", lower_is_dir=True)

    def _walk(self, rel: str, *, lower_is_dir: bool) -> None:
        upath, lpath = self.upper / rel, self.lower / rel
        uppers = _listing(upath)
        lowers = _listing(lpath) if lower_is_dir else {}
        for name in uppers:
            if name.startswith(WHITEOUT_PREFIX):
                raise InvalidArgument(f"{upath / name}: a name starting with {WHITEOUT_PREFIX!r} "
                                      f"cannot be written in a layer (it means a whiteout)")
        prefix = f"{rel}/" if rel else ""
        for name in lowers:
            if name not in uppers:
                self._write_parents()
                self._whiteout(prefix + name)
        for name, ust in uppers.items():
            child = prefix + name
            lst = lowers.get(name)
            changed = lst is None or not _unchanged(lpath / name, lst, upath / name, ust)
            if stat.S_ISDIR(ust.st_mode):
                self.parents.append([child, ust, False])
                if changed:
                    self._write_parents()
                self._walk(child, lower_is_dir=lst is not None and stat.S_ISDIR(lst.st_mode))
                self.parents.pop()
            elif changed:
                self._write_parents()
                self._write(child, ust)

    def _write_parents(self) -> None:
        for parent in self.parents:
            if not parent[2]:
                self._write(parent[0], parent[1])
                parent[2] = True

    def _header(self, rel: str, st: os.stat_result) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(rel or ".")
        ti.mode = st.st_mode & PERMISSION_BITS
        ti.uid, ti.gid = st.st_uid, st.st_gid
        ti.uname = ti.gname = ""
        mtime = st.st_mtime_ns
        if mtime % NS or mtime < 0:     # the exact time goes in pax; keep tarfile off it
            ti.mtime = max(0, mtime // NS)
            ti.pax_headers[PAX_MTIME] = ns_to_pax_time(mtime)
        else:
            ti.mtime = mtime // NS
        for name, value in _xattrs(self.upper / rel):
            ti.pax_headers[PAX_XATTR_PREFIX + name] = value.decode("utf-8", "surrogateescape")
        return ti

    def _write(self, rel: str, st: os.stat_result) -> None:
        path = self.upper / rel
        ti = self._header(rel, st)
        kind = stat.S_IFMT(st.st_mode)
        if kind == stat.S_IFDIR:
            ti.type = tarfile.DIRTYPE
        elif kind == stat.S_IFLNK:
            ti.type = tarfile.SYMTYPE
            ti.linkname = os.readlink(path)
        elif kind in _DEVICE_TYPES:
            ti.type = _DEVICE_TYPES[kind]
            ti.devmajor, ti.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        elif kind == stat.S_IFIFO:
            ti.type = tarfile.FIFOTYPE
        elif kind == stat.S_IFREG:
            inode = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and inode in self.links:
                ti.type = tarfile.LNKTYPE
                ti.linkname = self.links[inode]
            else:
                if st.st_nlink > 1:
                    self.links[inode] = rel
                with open(os.open(path, _OPEN_FLAGS), "rb") as f:
                    ti.size = os.fstat(f.fileno()).st_size
                    self.tf.addfile(ti, f)
                self.stats.entries += 1
                self.stats.bytes_written += ti.size
                return
        else:
            raise InvalidArgument(f"{path}: unsupported file type {kind:#o}")
        self.tf.addfile(ti)
        self.stats.entries += 1

    def _whiteout(self, rel: str) -> None:
        head, _, name = rel.rpartition("/")
        ti = tarfile.TarInfo(f"{head}/{WHITEOUT_PREFIX}{name}" if head else WHITEOUT_PREFIX + name)
        ti.mode = 0o644
        ti.uname = ti.gname = ""
        self.tf.addfile(ti)
        self.stats.whiteouts += 1
