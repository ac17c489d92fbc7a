"""Building layer tars with tarfile and reading trees back with lstat, for the layer tests."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

MTIME = 1_600_000_000   # a fixed mtime (seconds) for entries that do not care


@dataclass
class E:
    """One layer entry. kind: file, dir, symlink, hardlink, chr, blk, fifo; ``link`` is a
    symlink's or hard link's target; ``pax`` extra pax records (xattrs, exact mtime)."""

    name: str
    kind: str = "file"
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = MTIME
    link: str = ""
    dev: tuple[int, int] = (0, 0)
    pax: dict[str, str] = field(default_factory=dict)


def wh(name: str) -> E:
    """A whiteout entry ``name`` (``dir/.wh.x`` or ``dir/.wh..wh..opq``), as Docker writes them."""
    return E(name, "file", mode=0o644)


_TYPES = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
          "hardlink": tarfile.LNKTYPE, "chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE,
          "fifo": tarfile.FIFOTYPE}


def tarinfo(e: E) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(e.name)
    ti.type = _TYPES[e.kind] if isinstance(e.kind, str) and e.kind in _TYPES else e.kind
    ti.mode, ti.uid, ti.gid, ti.mtime = e.mode, e.uid, e.gid, e.mtime
    ti.uname = ti.gname = ""
    ti.linkname = e.link
    ti.devmajor, ti.devminor = e.dev
    ti.pax_headers = dict(e.pax)
    if e.kind == "file":
        ti.size = len(e.data)
    return ti


def tar_bytes(entries: list[E], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for e in entries:
            tf.addfile(tarinfo(e), io.BytesIO(e.data) if e.kind == "file" else None)
    return buf.getvalue()


def compress(data: bytes, how: str | None) -> bytes:
    if how is None:
        return data
    if how == "gzip":
        return gzip.compress(data, compresslevel=1, mtime=0)
    if how == "bzip2":
        return bz2.compress(data)
    if how == "xz":
        return lzma.compress(data)
    if how == "zstd":
        import zstandard
        return zstandard.ZstdCompressor().compress(data)
    raise ValueError(how)


_KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
          stat.S_IFCHR: "chr", stat.S_IFBLK: "blk", stat.S_IFIFO: "fifo"}


def node(path: Path, *, mtimes: bool = True, dir_mtimes: bool = True, xattrs: bool = False):
    """What the tests compare of one path: kind, permission bits, owner, content (file), target
    (symlink) or device number, mtime (ns, None if not compared) and optionally xattrs."""
    st = os.lstat(path)
    kind = _KINDS[stat.S_IFMT(st.st_mode)]
    if kind == "file":
        data = path.read_bytes()
    elif kind == "symlink":
        data = os.readlink(path)
    elif kind in ("chr", "blk"):
        data = (os.major(st.st_rdev), os.minor(st.st_rdev))
    else:
        data = None
    mtime = st.st_mtime_ns if mtimes and (dir_mtimes or kind != "dir") else None
    out = (kind, st.st_mode & 0o7777, st.st_uid, st.st_gid, data, mtime)
    if xattrs:
        names = sorted(os.listxattr(path, follow_symlinks=False))
        out += (tuple((n, os.getxattr(path, n, follow_symlinks=False)) for n in names),)
    return out


def snapshot(root: Path, *, root_meta: bool = True, **kw) -> dict[str, tuple]:
    """Every path under root (root itself as "" when root_meta) with :func:`node`, by lstat."""
    out = {}
    if root_meta:
        out[""] = node(root, **kw)

    def walk(d: Path, rel: str):
        for name in sorted(os.listdir(d)):
            p, r = d / name, f"{rel}{name}"
            out[r] = node(p, **kw)
            if stat.S_ISDIR(os.lstat(p).st_mode):
                walk(p, r + "/")

    walk(root, "")
    return out


def can_mknod(where: Path) -> bool:
    probe = where / ".mknod-probe"
    try:
        os.mknod(probe, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        return False
    os.unlink(probe)
    return True
