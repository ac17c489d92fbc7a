"""Data in and out of volumes: write, read, import, export.

* ``write`` takes stdin, ``read`` gives stdout; both move 4 MiB chunks aligned to the volume's
  blocks. ``write`` checks the whole input fits before it changes anything (the input is spooled,
  in memory up to 32 MiB, then in a temporary file), so writing past the end changes nothing.
* ``import FILE`` is sparse-aware: holes are skipped with ``SEEK_DATA``/``SEEK_HOLE``, the rest is
  read in block-size pieces and all-zero blocks are not written (blocks the volume had mapped
  there are discarded, so the volume reads back exactly the file). The volume must be at least as
  large as the file.
* ``export FILE`` makes FILE the volume's size and writes only the non-zero 4 KiB pages of mapped
  blocks, so FILE keeps the volume's holes.

Both show a progress bar on stderr when it is a terminal. Readers hold the pool's readers' lock
and read its last commit, beside a writer.

**Long writes commit as they go.** ``write`` and ``import`` commit every 64 MiB written or every
5 seconds (:data:`COMMIT_BYTES`, :data:`COMMIT_SECONDS`; skipped while a reader holds the last
commit, tried again at the next step), so an interrupted or killed one keeps a prefix of what it
wrote, consistent at a commit (for ``import``: the file's first bytes, blocks where the file is
zero discarded up to there as well). ``write`` spools its input before it takes the writer lock.

**Out of data space** (the command is the pool's only user here: nothing could free space while
it waited), a write stops at once: what fits is written block by block and committed, and the
error (exit 4) says exactly which bytes were written, how many more blocks the rest needs and how
to go on.
"""

from __future__ import annotations

import errno
import os
import stat as stat_mod
import sys
import tempfile
import time
from pathlib import Path

import click

from thinpool.errors import InvalidArgument, NoDataSpace, OutOfRange
from thinpool.units import format_size

from . import output
from .app import SIZE, VOLUME, Session, Target, cli, confirm, get_volume, pass_session
from .safety import confirm_overwrite, refuse_pool_file, replacing

CHUNK = 4 << 20            # bytes per read/write; a multiple of every block size up to 4 MiB
PAGE = 4096                # export's hole granularity (the usual file system block)
SPOOL_IN_MEMORY = 32 << 20
COMMIT_BYTES = 64 << 20    # a long write or import commits after this many bytes...
COMMIT_SECONDS = 5.0       # ...or this many seconds, whichever comes first


def _chunk_for(bs: int) -> int:
    return max(CHUNK // bs, 1) * bs


# -- write -----------------------------------------------------------------------------------
@cli.command()
@click.argument("target", metavar="POOL/NAME", type=VOLUME)
@click.option("--offset", type=SIZE, default=0, show_default=True,
              help="Byte offset in the volume to write at.")
@pass_session
def write(session: Session, target: Target, offset: int) -> None:
    """Write stdin into a volume at --offset.

    \b
      echo hello | thinpool write demo/vol0
      thinpool write demo/vol0 --offset 1M < file
    """
    if sys.stdin is None:
        raise InvalidArgument(f"stdin is closed; pipe the data in, e.g. "
                              f"'thinpool write {target} < FILE'")
    if sys.stdin.isatty():
        raise InvalidArgument("stdin is a terminal; pipe the data in, e.g. "
                              f"'thinpool write {target} < FILE'")
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as spool:
        # The input first, without the writer lock (readers never need it; other writers
        # need it only while this one writes).
        session.refuse_if_busy(target.pool)
        with session.pool(target.pool, quiet=True) as pool:
            vol = get_volume(pool, target)
            vol.check_writable("write")      # before reading stdin
            size = _room(vol, target, offset)
        total = _spool_stdin(spool, size - offset, target, offset, size)
        spool.seek(0)
        with session.pool(target.pool, write=True) as pool:
            vol = get_volume(pool, target)
            _room(vol, target, offset, total)
            chunk = _chunk_for(pool.block_size)
            steps = _Steps(pool)
            pos = offset
            try:
                while pos < offset + total:
                    n = min(chunk - pos % chunk, offset + total - pos)
                    _put(vol, pos, spool.read(n), pool.block_size)
                    pos += n
                    steps.wrote(n)
            except _Stopped as e:
                raise _out_of_space(pool, vol, target, offset, e.at, offset + total,
                                    f"write the rest with 'thinpool write {target} --offset "
                                    f"{e.at}'") from None
    output.echo(f"wrote {total} bytes ({format_size(total)}) to {target} at offset {offset}")


def _room(vol, target: Target, offset: int, total: int = 0) -> int:
    _span(vol, target, offset, None, "writing")
    if offset + total > vol.size:
        raise OutOfRange(f"the input reaches past the end of volume {target} ({vol.size} bytes): "
                         f"only {vol.size - offset} bytes fit from offset {offset}; nothing was "
                         f"written (it shrank meanwhile)")
    return vol.size


class _Steps:
    """Commits a long write as it goes (see the module docstring)."""

    def __init__(self, pool, before_commit=None):
        self.pool = pool
        self.before_commit = before_commit
        self.bytes = 0
        self.since = time.monotonic()

    def wrote(self, n: int, upto: int | None = None) -> None:
        self.bytes += n
        if self.bytes < COMMIT_BYTES and time.monotonic() - self.since < COMMIT_SECONDS:
            return
        if self.before_commit is not None:
            self.before_commit(upto)
        if self.pool.commit(wait=False):
            self.bytes, self.since = 0, time.monotonic()


class _Stopped(Exception):
    """Out of data space: every byte before ``at`` was written."""

    def __init__(self, at: int):
        self.at = at


def _put(vol, pos: int, buf, bs: int) -> None:
    """Write ``buf`` at ``pos``; out of space, write what fits block by block and raise _Stopped."""
    try:
        vol.write(pos, buf)
        return
    except NoDataSpace:
        if len(buf) <= bs:
            raise _Stopped(pos) from None
    view, off = memoryview(buf), 0
    while off < len(buf):
        n = min(bs - (pos + off) % bs, len(buf) - off)
        try:
            vol.write(pos + off, view[off:off + n])
        except NoDataSpace:
            raise _Stopped(pos + off) from None
        off += n


def _out_of_space(pool, vol, target: Target, start: int, at: int, end: int,
                  resume: str) -> NoDataSpace:
    """Commit what was written and describe it, as dd does."""
    pool.commit()
    bs = pool.block_size
    need = vol.blocks_to_provision(at, end - at)
    free = pool.stat().data_blocks_free
    done = (f"wrote {at - start} bytes ({format_size(at - start)}, offsets {start} to {at}) and "
            f"committed them" if at > start else "wrote nothing")
    return NoDataSpace(
        f"pool {target.pool} is out of data space: {done}; the other {end - at} bytes need up "
        f"to {need} more data block(s) ({format_size(need * bs)}) and {free} are free: grow the "
        f"pool with 'thinpool resize {target.pool} --size SIZE', then {resume}")


def _spool_stdin(spool, room: int, target: Target, offset: int, size: int) -> int:
    stdin = sys.stdin.buffer
    total = 0
    while True:
        buf = stdin.read(1 << 20)
        if not buf:
            return total
        total += len(buf)
        if total > room:
            raise OutOfRange(f"the input reaches past the end of volume {target} ({size} bytes): "
                             f"only {room} bytes fit from offset {offset}; nothing was written "
                             f"(grow it with 'thinpool resize {target} --size SIZE')")
        spool.write(buf)


# -- read ------------------------------------------------------------------------------------
@cli.command()
@click.argument("target", metavar="POOL/NAME", type=VOLUME)
@click.option("--offset", type=SIZE, default=0, show_default=True,
              help="Byte offset in the volume to read from.")
@click.option("--length", type=SIZE, help="Bytes to read [default: to the end of the volume].")
@pass_session
def read(session: Session, target: Target, offset: int, length: int | None) -> None:
    """Copy a volume (or a range of it) to stdout.

    \b
      thinpool read demo/vol0 --length 20
      thinpool read demo/vol0 > vol0.img
    """
    with session.pool(target.pool) as pool:
        vol = get_volume(pool, target)
        length = _span(vol, target, offset, length, "reading")
        chunk = _chunk_for(pool.block_size)
        pos, end = offset, offset + length
        while pos < end:
            n = min(chunk - pos % chunk, end - pos)
            output.write_data(vol.read(pos, n))
            pos += n
    output.flush()


def _span(vol, target: Target, offset: int, length: int | None, doing: str,
          after: str = "") -> int:
    """The length of a request at ``offset`` (None: to the end); OutOfRange past the end."""
    if offset > vol.size:
        raise OutOfRange(f"offset {offset} is past the end of volume {target} "
                         f"({vol.size} bytes)")
    if length is None:
        return vol.size - offset
    if offset + length > vol.size:
        raise OutOfRange(f"{doing} {length} bytes at offset {offset} reaches past the end of "
                         f"volume {target} ({vol.size} bytes){after}")
    return length


# -- discard ---------------------------------------------------------------------------------
@cli.command()
@click.argument("target", metavar="POOL/NAME", type=VOLUME)
@click.option("--offset", type=SIZE, default=0, show_default=True,
              help="Byte offset in the volume to discard from.")
@click.option("--length", type=SIZE, help="Bytes to discard [default: to the end of the volume].")
@click.option("--yes", "-y", is_flag=True, help="Discard without asking.")
@pass_session
def discard(session: Session, target: Target, offset: int, length: int | None,
            yes: bool) -> None:
    """Discard a range of a volume, as blkdiscard does: it reads as zeros afterwards.

    Whole blocks in the range are unmapped (their space goes back to the pool unless a
    snapshot still shares them); the partial blocks at its edges are zeroed. Asks first on a
    terminal; needs --yes otherwise.

    \b
      thinpool discard demo/vol0 --yes
      thinpool discard demo/vol0 --offset 1M --length 4M --yes
    """
    with session.pool(target.pool, write=True) as pool:
        vol = get_volume(pool, target)
        vol.check_writable("discard")
        length = _span(vol, target, offset, length, "discarding", "; nothing was discarded")
        if length == 0:
            output.echo(f"nothing to discard in {target} at offset {offset}")
            return
        confirm(f"Discard {format_size(length)} of volume {target} at offset {offset}, "
                f"dropping the data there?", yes)
        mapped, used = vol.mapped_blocks, pool.stat().data_blocks_used
        vol.discard(offset, length)
        pool.commit()
        unmapped = mapped - vol.mapped_blocks
        freed = used - pool.stat().data_blocks_used
        bs = pool.block_size
    output.echo(f"discarded {length} bytes ({format_size(length)}) of {target} at offset {offset}: "
                f"{unmapped} block(s) unmapped, {format_size(max(freed, 0) * bs)} freed in pool "
                f"{target.pool}")


# -- import ----------------------------------------------------------------------------------
@cli.command(name="import")
@click.argument("target", metavar="POOL/NAME", type=VOLUME)
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--create", is_flag=True,
              help="Create the volume, of the image's (virtual) size, first.")
@pass_session
def import_(session: Session, target: Target, file: Path, create: bool) -> None:
    """Copy FILE (a raw image, or qcow2, vmdk, vdi) into a volume, leaving holes unmapped.

    The volume must exist and be at least as large as the image's virtual size, or be made by
    --create. A raw FILE is read directly (holes and all-zero blocks skipped); other formats
    (found by 'qemu-img info') are converted by qemu-img through an NBD server in this process,
    and zero ranges are unmapped. Afterwards the volume's first bytes equal the image's.

    \b
      thinpool import demo/vol0 disk.img
      thinpool import demo/vm disk.qcow2 --create
    """
    fmt, size = _image_format(file)
    if fmt != "raw":
        _import_image(session, target, file, fmt, size, create)
        return
    fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = _source_size(fd, file)
        with session.pool(target.pool, write=True) as pool:
            vol = _import_target(pool, target, file, size, create)
            written = _import(fd, size, vol, pool.block_size, f"import {file.name}", pool, target)
    finally:
        os.close(fd)
    output.echo(f"imported {file} ({format_size(size)}) into {target}: "
                f"{format_size(written)} of data written, the rest left unmapped")


def _image_format(file: Path) -> tuple[str, int | None]:
    """("raw", None) or (qemu-img's format name, virtual size). Without qemu-img every file is
    taken as raw, except one that starts like a qcow2, vmdk or vdi image: that needs it."""
    import shutil

    from thinpool.export import images
    if shutil.which("qemu-img") is None:
        try:
            with open(file, "rb") as f:
                head = f.read(80)
        except OSError:
            return "raw", None
        if head[:4] in (b"QFI\xfb", b"KDMV") or head[64:68] == b"\x7f\x10\xda\xbe":
            images.qemu_img()                    # NotFound, naming the package
        return "raw", None
    info = images.image_info(file)
    return info.format, info.virtual_size


def _fits(vol, target: Target, file: Path, size: int) -> None:
    if size > vol.size:
        raise InvalidArgument(
            f"{file} is {format_size(size)} ({size} bytes), larger than volume {target} "
            f"({vol.size} bytes); grow it first with "
            f"'thinpool resize {target} --size {size}'")


def _create_for(pool, target: Target, size: int, file: Path) -> None:
    from .app import refuse_existing_volume, warn_if_overcommitted
    refuse_existing_volume(pool, target)
    if size <= 0:
        raise InvalidArgument(f"{file} is empty: there is nothing to make a volume of")
    pool.create_thin(target.volume, size)
    warn_if_overcommitted(pool)


def _import_target(pool, target: Target, file: Path, size: int, create: bool):
    """The volume an import of ``size`` bytes from ``file`` goes into (made first with
    ``--create``): writable and large enough, or a clear error."""
    if create:
        _create_for(pool, target, size, file)
    vol = get_volume(pool, target)
    vol.check_writable("import")
    _fits(vol, target, file, size)
    return vol


def _import_image(session: Session, target: Target, file: Path, fmt: str, size: int,
                  create: bool) -> None:
    from thinpool.export import images
    if fmt not in images.FORMATS:
        raise InvalidArgument(f"{file} is a {fmt} image; import takes raw, "
                              f"{', '.join(images.FORMATS)}")
    with session.pool(target.pool, write=True) as pool:
        vol = _import_target(pool, target, file, size, create)
        images.import_image(pool, target.volume, file, fmt, target_is_zero=create)
        mapped = vol.mapped_blocks * pool.block_size
    output.echo(f"imported {fmt} image {file} ({format_size(size)}) into {target}: "
                f"{format_size(mapped)} mapped, the rest left unmapped")


def _source_size(fd: int, file: Path) -> int:
    st = os.fstat(fd)
    if stat_mod.S_ISREG(st.st_mode):
        return st.st_size
    if stat_mod.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    raise InvalidArgument(f"{file} is neither a regular file nor a block device; "
                          f"for a pipe use 'thinpool write'")


def _data_extents(fd: int, size: int):
    """(start, end) byte ranges of FILE that may hold data; holes between them read as zeros."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        except OSError as e:
            if e.errno == errno.ENXIO:           # no data after pos
                return
            yield pos, size                      # SEEK_DATA unsupported: all of it is data
            return
        if start >= size:
            return
        yield start, end
        pos = end


def _import(fd: int, size: int, vol, bs: int, label: str, pool, target: Target) -> int:
    """Write FILE's non-zero blocks; discard blocks the volume had mapped where FILE is zero
    (up to each commit, so an interrupted import keeps an exact prefix of FILE)."""
    import numpy as np

    nblocks = -(-size // bs)
    was_mapped = np.zeros(nblocks, bool)
    for vb, _, _ in vol.mappings():
        if vb < nblocks:
            was_mapped[vb] = True
    written_blocks = np.zeros(nblocks, bool)
    chunk = _chunk_for(bs)
    written = 0
    cleared = [0]                               # blocks below this are settled

    def clear_stale(upto: int | None) -> None:
        """Unmap the blocks below byte ``upto`` that FILE has zero but the volume had mapped."""
        hi = nblocks if upto is None else min(upto // bs, nblocks)
        lo = cleared[0]
        if hi <= lo:
            return
        stale = was_mapped[lo:hi] & ~written_blocks[lo:hi]
        for a, z in _true_runs(stale):
            vol.discard((lo + a) * bs, min((lo + z) * bs, size) - (lo + a) * bs)
        cleared[0] = hi

    steps = _Steps(pool, clear_stale)
    pos = 0
    try:
        with output.progress(size, label) as bar:
            done = 0
            for start, end in _data_extents(fd, size):
                start = max(start - start % bs, done)             # whole blocks
                end = min(-(-end // bs) * bs, size)
                bar.advance(start - done)
                pos = start
                while pos < end:
                    n = min(chunk, end - pos)
                    buf = os.pread(fd, n, pos)
                    if len(buf) != n:
                        raise InvalidArgument(f"the source changed size while it was read "
                                              f"(short read at offset {pos})")
                    for a, z in _nonzero_runs(buf, bs):
                        try:
                            _put(vol, pos + a, memoryview(buf)[a:z], bs)
                        except _Stopped as e:
                            written_blocks[(pos + a) // bs: e.at // bs] = True
                            written += e.at - pos - a
                            raise
                        written_blocks[(pos + a) // bs: -(-(pos + z) // bs)] = True
                        written += z - a
                    bar.advance(n)
                    pos += n
                    steps.wrote(n, pos)
                done = end
            bar.advance(size - done)
        clear_stale(None)
    except _Stopped as e:
        clear_stale(e.at)
        raise _out_of_space(pool, vol, target, 0, e.at, size,
                            "run the import again (the blocks already written are "
                            "written again)") from None
    return written


def _true_runs(flags) -> list[tuple[int, int]]:
    """[start, end) index runs where the boolean array is True."""
    import numpy as np

    if not len(flags):
        return []
    edges = np.diff(np.concatenate(([0], flags.astype(np.int8), [0])))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    return list(zip(starts.tolist(), ends.tolist()))


def _nonzero_runs(buf: bytes, granule: int) -> list[tuple[int, int]]:
    """[start, end) byte runs of ``buf`` made of whole ``granule`` pieces that are not all zero
    (the last piece may be short)."""
    import numpy as np

    n = len(buf)
    full = n // granule
    flags = np.zeros(full + (1 if n % granule else 0), bool)
    if full:
        if granule % 8 == 0:
            arr = np.frombuffer(buf, np.uint64, count=full * granule // 8).reshape(full, -1)
        else:
            arr = np.frombuffer(buf, np.uint8, count=full * granule).reshape(full, -1)
        flags[:full] = arr.any(axis=1)
    if n % granule:
        flags[full] = any(memoryview(buf)[full * granule:])
    return [(a * granule, min(z * granule, n)) for a, z in _true_runs(flags)]


# -- export ----------------------------------------------------------------------------------
@cli.command()
@click.argument("target", metavar="POOL/NAME", type=VOLUME)
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["raw", "qcow2", "vmdk", "vdi"]),
              default="raw", show_default=True, help="Image format of FILE.")
@click.option("--yes", "-y", is_flag=True, help="Overwrite an existing FILE without asking.")
@pass_session
def export(session: Session, target: Target, file: Path, fmt: str, yes: bool) -> None:
    """Copy a volume into a sparse FILE (created, or replaced once it is complete).

    Only mapped blocks are read and only their non-zero 4 KiB pages are written, so FILE takes
    no more space than the data in it. With --format qcow2, vmdk or vdi, qemu-img writes the
    image, reading the volume through an NBD server in this process (unmapped ranges stay out
    of the image). An existing FILE that is not empty is replaced only after a yes on the
    terminal (or with --yes), and only when the export is complete. A pool's own files are
    refused.

    \b
      thinpool export demo/vol0 vol0.img
      thinpool export demo/vol0 vol0.qcow2 --format qcow2
    """
    if file.exists() and not file.is_file():
        raise InvalidArgument(f"{file} is not a regular file; export writes a sparse file "
                              f"(for a device, use 'thinpool read {target} > DEVICE')")
    refuse_pool_file(session, file, "the export file")
    if fmt != "raw":
        _export_image(session, target, file, fmt, yes)
        return
    with session.pool(target.pool) as pool:
        vol = get_volume(pool, target)
        confirm_overwrite(file, yes, f" with volume {target}")
        with replacing(file) as fd:
            os.ftruncate(fd, vol.size)
            written = _export(fd, vol, pool.block_size, f"export {target}")
    output.echo(f"exported {target} ({format_size(vol.size)}) to {file}: "
                f"{format_size(written)} of data written, the rest left as holes")


def _export_image(session: Session, target: Target, file: Path, fmt: str, yes: bool) -> None:
    from thinpool.export import images
    images.qemu_img()
    with session.pool(target.pool) as pool:
        vol = get_volume(pool, target)
        confirm_overwrite(file, yes, f" with volume {target}")
        with replacing(file) as fd:          # the temporary file's name, for qemu-img
            images.export_image(pool, target.volume, f"/proc/{os.getpid()}/fd/{fd}", fmt)
    output.echo(f"exported {target} ({format_size(vol.size)}) to {fmt} image {file} "
                f"({format_size(os.stat(file).st_blocks * 512)} on disk)")


def _export(fd: int, vol, bs: int, label: str) -> int:
    size = vol.size
    per_read = _chunk_for(bs) // bs
    vblocks = [vb for vb, _, _ in vol.mappings() if vb * bs < size]
    written = 0
    with output.progress(size, label) as bar:
        done = 0
        i = 0
        while i < len(vblocks):
            j = i + 1                      # a run of consecutive mapped blocks, one read each
            while j < len(vblocks) and vblocks[j] == vblocks[j - 1] + 1 and j - i < per_read:
                j += 1
            start = vblocks[i] * bs
            end = min((vblocks[j - 1] + 1) * bs, size)
            buf = vol.read(start, end - start)
            for a, z in _nonzero_runs(buf, PAGE):
                written += z - a
                view = memoryview(buf)[a:z]
                while view:
                    n = os.pwrite(fd, view, start + a)
                    view, a = view[n:], a + n
            bar.advance(end - done)
            done = end
            i = j
        bar.advance(size - done)
    return written
