"""Apply an OCI / Docker image layer tar to a directory, as container runtimes unpack images.

:func:`apply_layer` reads a layer (plain tar, gzip, zstd when the ``zstandard`` module is
importable, or Docker's legacy bzip2 and xz; told apart by their magic bytes) as a stream, entry
by entry, and applies it to ``root``, normally the root of a freshly mounted snapshot holding the
layers below. Memory does not grow with the size of the layer's files (content is copied in
:data:`CHUNK` pieces; runs of zeros become holes), only with its number of entries (the paths it
has written are remembered for the whiteout rules). :func:`diff_layer` (layer_diff.py) writes the
layer that turns one tree into another. Needs root (or CAP_CHOWN, CAP_MKNOD, CAP_FOWNER).

The entries
-----------
* Regular files: content, mode (setuid, setgid and sticky included), numeric uid/gid (user and
  group names are ignored), mtime (pax ``mtime`` to the nanosecond). An existing file is unlinked
  first, never written through: a hard link to it elsewhere keeps the old content.
* Directories: created, or kept when one exists (with its content) and given the entry's
  metadata. Mode, owner and mtime of every directory entry are set after the last entry, so a
  later entry inside does not change the mtime. A parent that no entry names is created with
  mode 0755, owned by the caller, and its metadata is not set later.
* Symbolic links (owner and mtime set on the link itself), hard links (to a path already in the
  root, resolved like an entry's path; the entry's own metadata is the target's), character and
  block devices and FIFOs.
* ``SCHILY.xattr.*`` pax records: set with ``setxattr``; one the filesystem does not support
  (ENOTSUP, or EPERM for ``security.*``, ``trusted.*`` and for any attribute of a symlink or
  device) is counted in ``xattrs_skipped``. Existing attributes are not removed.
* An entry over an existing path of another type replaces it: a non-directory over a directory
  removes the directory's tree first, a directory over a non-directory removes that.
* Whiteouts (OCI image spec): ``DIR/.wh.NAME`` removes ``DIR/NAME`` (a whole tree for a
  directory) and ``DIR/.wh..wh..opq`` everything in DIR, as far as they come from the layers
  below: a path this layer has written (an entry's path, or a parent of one) stays, whether the
  marker comes before or after it in the tar. A directory that stays because this layer wrote
  beneath it keeps its metadata, and what the lower layers had in it goes. A whiteout of a
  missing path is no error; the whiteout entry itself is not created. An entry named
  ``.wh..wh.*`` other than the opaque marker, or beneath one, is another tool's (aufs's
  ``.wh..wh.plnk``) and is skipped.

Safety
------
Nothing is written, removed or linked outside ``root``. Entry names are relative to it (leading
``./``, ``.`` and empty components are dropped; ``.`` is the root, which only a directory entry
may name, to set its metadata). Every path is resolved component by
component from a descriptor of the root with ``O_NOFOLLOW`` (never through a symbolic link, even
one pointing inside the root), and every change is an ``*at`` call on the parent's descriptor
that does not follow the last component. Refused with :class:`~thinpool.errors.InvalidLayer`
(an :class:`~thinpool.errors.InvalidArgument`) naming the entry: an absolute name, a ``..``
component, a parent that is a symbolic link or not a directory, a hard link whose target is
missing, a directory or the root, or resolves through a symbolic link, a ``.wh.`` name as a
parent, an unknown entry type, and a malformed tar or compressed stream (bad or truncated header,
content or compressed data, no end-of-archive block). This assumes that nothing else changes the
tree under ``root`` while the layer is applied (the snapshot is not mounted in any container).

A failure midway
----------------
A layer is not applied atomically. When apply_layer raises, the entries before the failing one
are applied, the failing one may be half done (a file without its content or metadata, the path
it replaced removed), and nothing after it is; the directory entries already applied are given
their metadata before the error propagates (as far as that still works). The caller applies
layers into a fresh snapshot and throws that away on failure. Errors of the filesystem or of
reading the layer's source (ENOSPC, EIO) propagate as the OSError they are.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from thinpool.errors import InvalidLayer
from thinpool.runtime.layer_diff import diff_layer
from thinpool.runtime.layer_format import (
    IMPLICIT_DIR_MODE,
    NS,
    OPAQUE_MARKER,
    PAX_ATIME,
    PAX_MTIME,
    PAX_XATTR_PREFIX,
    PERMISSION_BITS,
    WHITEOUT_META_PREFIX,
    WHITEOUT_PREFIX,
    LayerStats,
    normalize_name,
    pax_time_ns,
    whiteout_victim,
)
from thinpool.runtime.layer_stream import open_layer_tar

__all__ = ["CHUNK", "LayerStats", "apply_layer", "diff_layer"]

CHUNK = 256 * 1024                # content is copied in pieces of this size
_ZERO_CHUNK = bytes(CHUNK)        # a whole piece of zeros is left as a hole
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_REGULAR_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE)
_SPECIAL_TYPES = {tarfile.CHRTYPE: stat.S_IFCHR, tarfile.BLKTYPE: stat.S_IFBLK,
                  tarfile.FIFOTYPE: stat.S_IFIFO}
_XATTR_PRIVILEGED = ("security.", "trusted.")


def apply_layer(root: Path, layer: BinaryIO | Path) -> LayerStats:
    """Apply the layer tar ``layer`` (an open binary stream, read to its end and not closed, or a
    path) to the directory ``root``; see the module docstring for the rules and what a failure
    leaves. Raises InvalidLayer for a malformed or unsafe layer, MissingDependency for a zstd
    layer without the ``zstandard`` module, OSError for the filesystem's own errors."""
    if isinstance(layer, (str, os.PathLike)):
        with open(layer, "rb") as f:
            return apply_layer(root, f)
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        applier = _Applier(root_fd)
        applier.run(layer)
        return applier.stats
    finally:
        os.close(root_fd)


def _mtime_ns(m: tarfile.TarInfo) -> int:
    exact = pax_time_ns(m.pax_headers.get(PAX_MTIME))
    return exact if exact is not None else int(m.mtime) * NS


def _times(m: tarfile.TarInfo) -> tuple[int, int]:
    mtime = _mtime_ns(m)
    atime = pax_time_ns(m.pax_headers.get(PAX_ATIME))
    return (mtime if atime is None else atime, mtime)


def _xattrs(m: tarfile.TarInfo) -> list[tuple[str, bytes]]:
    """The entry's extended attributes; tarfile decoded the values with surrogateescape."""
    return [(k[len(PAX_XATTR_PREFIX):], v.encode("utf-8", "surrogateescape"))
            for k, v in m.pax_headers.items() if k.startswith(PAX_XATTR_PREFIX)]


def _copy_sparse(src, fd: int) -> int:
    """Copy ``src`` to the new file ``fd`` in CHUNK pieces, leaving whole pieces of zeros as
    holes; returns the bytes copied."""
    done, holes = 0, False
    while True:
        chunk = src.read(CHUNK)
        if not chunk:
            break
        if len(chunk) == CHUNK and chunk == _ZERO_CHUNK:
            os.lseek(fd, CHUNK, os.SEEK_CUR)
            holes = True
        else:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
        done += len(chunk)
    if holes:
        os.ftruncate(fd, done)
    return done


@dataclass
class _DirMeta:
    mode: int
    uid: int
    gid: int
    times: tuple[int, int]
    xattrs: list[tuple[str, bytes]]


# ---- applying entries -----------------------------------------------------------------------

class _Applier:
    def __init__(self, root_fd: int):
        self.root_fd = root_fd
        self.stats = LayerStats()
        self.written: set[str] = set()            # paths of this layer's entries
        self.written_parents: set[str] = set()    # their parent directories
        self.pending: dict[str, _DirMeta] = {}    # directory entries, metadata set at the end

    def run(self, stream: BinaryIO) -> None:
        tf, decoded = open_layer_tar(stream)
        failed = True
        try:
            self._entries(tf)
            if decoded.what != "tar":   # read the compressed stream to its end: its checksum
                while decoded.read(CHUNK):
                    pass
            failed = False
        finally:
            self._finish_dirs(best_effort=failed)

    def _entries(self, tf: tarfile.TarFile) -> None:
        last = None
        while True:
            try:
                m = tf.next()
            except tarfile.TarError as e:
                raise InvalidLayer(None, f"bad tar after entry {last!r}: {e}") from None
            except InvalidLayer as e:
                if e.entry is None:
                    raise InvalidLayer(None, f"{e.reason} (after entry {last!r})") from e
                raise
            if m is None:
                error = getattr(tf, "layer_error", None)
                if error:
                    raise InvalidLayer(None, f"{error} (after entry {last!r})")
                return
            tf.members.clear()   # tarfile keeps every member read; a layer can have millions
            try:
                self._entry(tf, m)
            except tarfile.TarError as e:
                raise InvalidLayer(m.name, str(e)) from None
            except InvalidLayer as e:
                if e.entry is None:
                    raise InvalidLayer(m.name, e.reason) from e
                raise
            last = m.name

    def _entry(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        rel = normalize_name(m.name)
        parts = rel.split("/") if rel else []
        markers = [p for p in parts if p.startswith(WHITEOUT_META_PREFIX)]
        if markers and (markers != [OPAQUE_MARKER] or parts[-1] != OPAQUE_MARKER):
            return      # another tool's marker (aufs .wh..wh.plnk and such): skipped
        if any(p.startswith(WHITEOUT_PREFIX) for p in parts[:-1]):
            raise InvalidLayer(m.name, "a whiteout name as a parent directory")
        victim = whiteout_victim(parts[-1], m.name) if parts else None
        if victim is not None:
            self._whiteout(m.name, parts, victim)
            return
        if not parts:
            if not m.isdir():
                raise InvalidLayer(m.name, "the root can only be a directory")
            self._dir_entry(m, "", None, "")
            self.stats.entries += 1
            return
        self._note_written(rel)
        pfd = self._open_parent(m.name, parts, create=True)
        try:
            name = parts[-1]
            if m.type in _REGULAR_TYPES:
                self._file(tf, m, pfd, name, rel)
            elif m.type == tarfile.DIRTYPE:
                self._dir_entry(m, rel, pfd, name)
            elif m.type == tarfile.SYMTYPE:
                self._symlink(m, pfd, name, rel)
            elif m.type == tarfile.LNKTYPE:
                self._hardlink(m, pfd, name, rel)
            elif m.type in _SPECIAL_TYPES:
                self._special(m, pfd, name, rel)
            else:
                raise InvalidLayer(m.name, f"unsupported entry type {m.type!r}")
        finally:
            os.close(pfd)
        self.stats.entries += 1

    def _note_written(self, rel: str) -> None:
        self.written.add(rel)
        while "/" in rel:
            rel = rel.rsplit("/", 1)[0]
            if rel in self.written_parents:
                break
            self.written_parents.add(rel)

    # -- resolving paths --

    def _open_parent(self, entry: str, parts: list[str], *, create: bool) -> int | None:
        """A descriptor of the directory holding ``parts[-1]``, walked from the root without
        following any symbolic link. Missing directories are created (``create``) or give None,
        as does a non-directory when not ``create``; a symbolic link is an InvalidLayer."""
        fd = os.dup(self.root_fd)
        try:
            for i, comp in enumerate(parts[:-1]):
                nfd = self._step(entry, parts, i, fd, create=create)
                os.close(fd)
                fd = nfd
                if fd is None:
                    return None
            return fd
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise

    def _step(self, entry: str, parts: list[str], i: int, fd: int, *, create: bool) -> int | None:
        """Open the directory ``parts[i]`` in ``fd``, as :meth:`_open_parent` says."""
        comp = parts[i]
        try:
            return os.open(comp, _DIR_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            if not create:
                return None
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            where = "/".join(parts[:i + 1])
            if stat.S_ISLNK(os.lstat(comp, dir_fd=fd).st_mode):
                raise InvalidLayer(entry, f"{where!r} is a symbolic link: a layer may not "
                                          f"write through one") from None
            if not create:
                return None
            raise InvalidLayer(entry, f"{where!r} is not a directory") from None
        os.mkdir(comp, 0o700, dir_fd=fd)
        nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
        try:
            os.fchown(nfd, os.geteuid(), os.getegid())
            os.fchmod(nfd, IMPLICIT_DIR_MODE)
        except BaseException:
            os.close(nfd)
            raise
        return nfd

    def _clear(self, pfd: int, name: str, rel: str, *, for_dir: bool) -> bool:
        """Make room for a new entry: True when a directory is there and kept (``for_dir``),
        else whatever is there is removed (a directory with its tree)."""
        try:
            st = os.lstat(name, dir_fd=pfd)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if for_dir:
                return True
            shutil.rmtree(name, dir_fd=pfd)
            gone = rel + "/"
            for key in [k for k in self.pending if k == rel or k.startswith(gone)]:
                del self.pending[key]
        else:
            os.unlink(name, dir_fd=pfd)
        return False

    # -- the entry types --

    def _file(self, tf, m, pfd: int, name: str, rel: str) -> None:
        self._clear(pfd, name, rel, for_dir=False)
        fd = os.open(name, _NEW_FILE_FLAGS, 0o600, dir_fd=pfd)
        try:
            src = tf.extractfile(m)
            copied = _copy_sparse(src, fd)
            if copied != m.size:
                raise InvalidLayer(m.name, f"truncated content: {copied} of {m.size} bytes")
            os.fchown(fd, m.uid, m.gid)         # before chmod: chown clears setuid/setgid
            os.fchmod(fd, m.mode & PERMISSION_BITS)
            for key, value in _xattrs(m):
                self._setxattr(fd, key, value, node_ok=True)
            os.utime(fd, ns=_times(m))
        finally:
            os.close(fd)
        self.stats.bytes_written += m.size

    def _dir_entry(self, m, rel: str, pfd: int | None, name: str) -> None:
        if pfd is not None and not self._clear(pfd, name, rel, for_dir=True):
            os.mkdir(name, 0o700, dir_fd=pfd)
        self.pending[rel] = _DirMeta(m.mode & PERMISSION_BITS, m.uid, m.gid, _times(m),
                                     _xattrs(m))

    def _symlink(self, m, pfd: int, name: str, rel: str) -> None:
        if not m.linkname:
            raise InvalidLayer(m.name, "symbolic link without a target")
        self._clear(pfd, name, rel, for_dir=False)
        os.symlink(m.linkname, name, dir_fd=pfd)
        self._node_metadata(m, pfd, name, chmod=False)

    def _special(self, m, pfd: int, name: str, rel: str) -> None:
        self._clear(pfd, name, rel, for_dir=False)
        kind = _SPECIAL_TYPES[m.type]
        if kind == stat.S_IFIFO:
            os.mkfifo(name, 0o600, dir_fd=pfd)
        else:
            os.mknod(name, 0o600 | kind, os.makedev(m.devmajor, m.devminor), dir_fd=pfd)
        self._node_metadata(m, pfd, name, chmod=True)

    def _node_metadata(self, m, pfd: int, name: str, *, chmod: bool) -> None:
        """Owner, mode, xattrs and times of a symlink, device or FIFO just made at name."""
        os.chown(name, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
        if chmod:   # name is the device or FIFO just made: chmod cannot follow anything
            os.chmod(name, m.mode & PERMISSION_BITS, dir_fd=pfd)
        for key, value in _xattrs(m):
            self._setxattr(f"/proc/self/fd/{pfd}/{name}", key, value, node_ok=False)
        os.utime(name, ns=_times(m), dir_fd=pfd, follow_symlinks=False)

    def _hardlink(self, m, pfd: int, name: str, rel: str) -> None:
        target = normalize_name(m.linkname, m.name)
        if target == rel:
            return      # a link to itself: nothing to do
        tparts = target.split("/") if target else []
        if not tparts:
            raise InvalidLayer(m.name, "hard link to the root")
        try:
            tfd = self._open_parent(m.name, tparts, create=False)
        except InvalidLayer as e:
            raise InvalidLayer(m.name, f"hard link target {m.linkname!r}: {e.reason}") from None
        if tfd is None:
            raise InvalidLayer(m.name, f"hard link target {m.linkname!r} does not exist")
        try:
            try:
                tst = os.lstat(tparts[-1], dir_fd=tfd)
            except FileNotFoundError:
                raise InvalidLayer(m.name, f"hard link target {m.linkname!r} does not exist") \
                    from None
            if stat.S_ISDIR(tst.st_mode):
                raise InvalidLayer(m.name, f"hard link to the directory {m.linkname!r}")
            self._clear(pfd, name, rel, for_dir=False)
            try:
                os.link(tparts[-1], name, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                raise InvalidLayer(m.name, f"hard link target {m.linkname!r} was removed by "
                                           f"the entry itself") from None
        finally:
            os.close(tfd)

    def _setxattr(self, target, key: str, value: bytes, *, node_ok: bool) -> None:
        """Set one xattr; count it as skipped when the filesystem does not support it (node_ok:
        the target is a regular file or directory, where user.* attributes are allowed)."""
        try:
            if isinstance(target, int):
                os.setxattr(target, key, value)
            else:
                os.setxattr(target, key, value, follow_symlinks=False)
        except OSError as e:
            if e.errno == errno.EOPNOTSUPP or (
                    e.errno in (errno.EPERM, errno.EACCES)
                    and (key.startswith(_XATTR_PRIVILEGED) or not node_ok)):
                self.stats.xattrs_skipped += 1
                return
            raise

    # -- whiteouts --

    def _whiteout(self, entry: str, parts: list[str], victim: str) -> None:
        """``victim`` "" is the opaque marker: clear the lower content of the directory."""
        if victim:
            self.stats.whiteouts += 1
        else:
            self.stats.opaque_dirs += 1
        pfd = self._open_parent(entry, parts, create=False)
        if pfd is None:
            return
        try:
            dir_rel = "/".join(parts[:-1])
            prefix = dir_rel + "/" if dir_rel else ""
            for name in ([victim] if victim else sorted(os.listdir(pfd))):
                self._remove_lower(pfd, name, prefix + name)
        finally:
            os.close(pfd)

    def _remove_lower(self, pfd: int, name: str, rel: str) -> None:
        """Remove what the lower layers have at ``rel``, keeping what this layer wrote."""
        try:
            st = os.lstat(name, dir_fd=pfd)
        except FileNotFoundError:
            return
        if rel not in self.written and rel not in self.written_parents:
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(name, dir_fd=pfd)
            else:
                os.unlink(name, dir_fd=pfd)
            return
        if stat.S_ISDIR(st.st_mode):
            cfd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
            try:
                for child in sorted(os.listdir(cfd)):
                    self._remove_lower(cfd, child, f"{rel}/{child}")
            finally:
                os.close(cfd)

    # -- the end --

    def _finish_dirs(self, *, best_effort: bool) -> None:
        """Set the metadata of the directory entries (after all their content)."""
        for rel, meta in self.pending.items():
            try:
                fd = self._open_dir(rel)
                if fd is None:
                    continue
                try:
                    os.fchown(fd, meta.uid, meta.gid)
                    os.fchmod(fd, meta.mode)
                    for key, value in meta.xattrs:
                        self._setxattr(fd, key, value, node_ok=True)
                    os.utime(fd, ns=meta.times)
                finally:
                    os.close(fd)
            except (OSError, InvalidLayer):
                if not best_effort:
                    raise
        self.pending.clear()

    def _open_dir(self, rel: str) -> int | None:
        if not rel:
            return os.dup(self.root_fd)
        parts = rel.split("/")
        pfd = self._open_parent(rel, parts, create=False)
        if pfd is None:
            return None
        try:
            return os.open(parts[-1], _DIR_FLAGS, dir_fd=pfd)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                return None
            raise
        finally:
            os.close(pfd)
