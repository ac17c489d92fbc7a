"""Creating a pool's files: the data device, the metadata, pool.json and the names registry
(each of the last two in two copies, see records.py).

:func:`make_pool_files` validates every argument before it touches the disk and, if any step
fails (or is interrupted), removes whatever it had made, so there is never a half-made pool. It
refuses to format a metadata device that already holds dm-thin metadata. The pool is then opened
by ``Pool.create``. Sizes follow the kernel's guidance (``default_metadata_size``) and limits.

:func:`adopt_pool_files` makes a pool of an existing dm-thin metadata/data pair (LVM's
``_tmeta``/``_tdata`` copied out, metadata from ``thin_restore``): it reads the metadata
read-only and writes only the pool's own records (pool.json and the names, naming each device
by its id), so on any failure the given files are as they were and nothing else is left.

:func:`rename_pool_dir` gives a pool's directory a new name under the pool's writer lock (no
other command changes the pool meanwhile; readers that have it open go on through their open
files). One ``rename(2)``, then the parent directory is synced: after a crash the pool is under
its old name or its new one, whole.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import PoolOptions, _rel, _write_json
from .data.device import DataDevice
from .errors import AlreadyExists, InvalidArgument, MetadataError
from .metadata import format as fmt
from .metadata.block import SUPERBLOCK_VALIDATOR, create_metadata_file
from .metadata.thin_metadata import ThinMetadata, check_data_block_size
from .paths import CONFIG_COPY_NAME, CONFIG_NAME, NAMES_COPY_NAME, NAMES_NAME
from .registry import Entry, Registry

DEFAULT_BLOCK_SIZE = 64 * 1024
MIN_METADATA_SIZE = 2 * 1024 * 1024
METADATA_BYTES_PER_BLOCK = 48


def default_metadata_size(nr_data_blocks: int) -> int:
    """The kernel's guidance: 48 bytes per data block, at least 2 MiB, within the format's limit."""
    size = max(MIN_METADATA_SIZE, METADATA_BYTES_PER_BLOCK * nr_data_blocks)
    size = -(-size // fmt.BLOCK_SIZE) * fmt.BLOCK_SIZE
    return min(size, fmt.MAX_METADATA_BLOCKS * fmt.BLOCK_SIZE)


def check_metadata_size(size: int) -> int:
    """Metadata beyond 255 bitmaps (4,161,600 blocks, about 15.88 GiB) cannot be used."""
    limit = fmt.MAX_METADATA_BLOCKS * fmt.BLOCK_SIZE
    if size > limit:
        raise InvalidArgument(f"metadata size {size} is above the format's maximum of {limit} "
                              f"bytes (15.88 GiB)")
    return size


def max_data_size(block_size: int) -> int:
    """The largest data size a pool of ``block_size`` blocks can have: 2**40 blocks, and no
    more than a file or device can hold (2**63 - 1 bytes), in whole blocks."""
    return min(fmt.MAX_DATA_BLOCK + 1, fmt.MAX_DATA_DEVICE_SIZE // block_size) * block_size


def check_data_size(size: int, block_size: int) -> int:
    limit = max_data_size(block_size)
    if size > limit:
        raise InvalidArgument(f"data size {size} is above the maximum of {limit} bytes for "
                              f"{block_size // 1024} KiB blocks (2**40 blocks, and at most "
                              f"8 EiB in a file or device)")
    return size


def check_volume_size(size) -> int:
    """A volume's size: a whole number of bytes above zero, at most MAX_VOLUME_SIZE (8 EiB less
    one sector, see metadata/format.py)."""
    _int_arg("volume size", size)
    if size == 0:
        raise InvalidArgument("a volume needs a size above zero")
    if size > fmt.MAX_VOLUME_SIZE:
        raise InvalidArgument(f"volume size {size} is above the maximum of {fmt.MAX_VOLUME_SIZE} "
                              f"bytes (8 EiB less one sector: a block device's size is a signed "
                              f"64-bit number of bytes)")
    return size


def check_block_size(block_size: int) -> int:
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size % fmt.SECTOR_SIZE:
        raise InvalidArgument(f"block size {block_size!r} is not a whole number of 512-byte sectors")
    check_data_block_size(block_size // fmt.SECTOR_SIZE)
    return block_size


def _int_arg(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidArgument(f"{name} must be an integer number of bytes, not {value!r}")
    if value < 0:
        raise InvalidArgument(f"{name} must not be negative ({value})")
    return value


def make_pool_files(path, data_size: int | None, block_size: int, metadata_size: int | None,
                    data_path, metadata_path, **options) -> None:
    """Make a new pool's files in directory ``path`` (see the module docstring)."""
    check_block_size(block_size)
    try:
        opts = PoolOptions(**options).check()
    except TypeError as e:
        raise InvalidArgument(str(e)) from None
    if data_size is not None:
        _int_arg("data size", data_size)
        check_data_size(data_size, block_size)
    if metadata_size is not None:
        _int_arg("metadata size", metadata_size)
        check_metadata_size(metadata_size)
    if data_size is None and data_path is None:
        raise InvalidArgument("a data size is needed for a new data file")
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise AlreadyExists(f"{path} exists already; choose another pool path")
    for p in (data_path, metadata_path):
        if p is not None and Path(p).is_dir():
            raise InvalidArgument(f"{p} is a directory, not a file or block device")
    if data_path is not None and metadata_path is not None:
        from .ownership import file_id
        if file_id(data_path) is not None and file_id(data_path) == file_id(metadata_path):
            raise InvalidArgument(f"data {data_path} and metadata {metadata_path} are the same "
                                  f"file or device")
    made: list[Path] = []
    made_dir = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        # Data device.
        dpath = Path(data_path) if data_path is not None else path / "data"
        if dpath.exists():
            with DataDevice.open(dpath, block_size) as dev:
                if data_size is None:
                    data_size = dev.size
                elif data_size > dev.size:      # a given file or device is never grown
                    kind = "device" if dev.is_block_device else "file"
                    raise InvalidArgument(f"data {kind} {dpath} holds {dev.size} bytes, less "
                                          f"than the {data_size} asked for (it is not grown)")
        else:
            if data_size < block_size:
                raise InvalidArgument(f"data size {data_size} is smaller than one block ({block_size} bytes)")
            DataDevice.create_file(dpath, data_size - data_size % block_size, block_size).close()
            made.append(dpath)
        nr_data_blocks = data_size // block_size
        if nr_data_blocks < 1:
            raise InvalidArgument(f"data size {data_size} is smaller than one block ({block_size} bytes)")
        # Metadata device.
        mpath = Path(metadata_path) if metadata_path is not None else path / "metadata"
        if mpath.exists():
            _refuse_live_metadata(mpath)
            have = mpath.stat().st_size if mpath.is_file() else None
            if metadata_size is not None and have is not None and have < metadata_size:
                raise InvalidArgument(f"metadata file {mpath} holds {have} bytes, less than the "
                                      f"{metadata_size} asked for (it is not grown)")
        else:
            msize = metadata_size if metadata_size is not None else default_metadata_size(nr_data_blocks)
            msize = -(-msize // fmt.BLOCK_SIZE) * fmt.BLOCK_SIZE
            if msize < MIN_METADATA_SIZE:
                raise InvalidArgument(f"metadata size {msize} is below the minimum of 2 MiB")
            create_metadata_file(mpath, msize)
            made.append(mpath)
        ThinMetadata.format(mpath, block_size // fmt.SECTOR_SIZE, nr_data_blocks).close()
        _write_records(path, dpath, mpath, opts, Registry(str(path / NAMES_NAME)), made)
    except BaseException:
        _undo(path, made, made_dir)
        raise


def _write_records(path: Path, dpath: Path, mpath: Path, opts: PoolOptions, names: Registry,
                   made: list[Path]) -> None:
    """pool.json and the names (two copies each), noting in ``made`` what is written."""
    config = {"version": 1, "data": _rel(dpath, path), "metadata": _rel(mpath, path),
              "options": asdict(opts)}
    made += [path / CONFIG_NAME, path / CONFIG_COPY_NAME]
    _write_json(path / CONFIG_NAME, config)
    made += [path / NAMES_NAME, path / NAMES_COPY_NAME]
    names.save()


def _undo(path: Path, made: list[Path], made_dir: bool) -> None:
    for p in reversed(made):
        try:
            p.unlink()
        except OSError:
            pass
    if made_dir:
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class Adopted:
    """One device of an adopted pool: its new name, size and where the size came from."""
    dev_id: int
    name: str
    size: int
    mapped_blocks: int
    #: "given" (``sizes``), "mapped" (up to its highest mapped block) or "empty" (nothing
    #: mapped and no size given: one block).
    size_from: str


def adopt_pool_files(path, data_path, metadata_path, sizes: dict[int, int] | None = None,
                     **options) -> list[Adopted]:
    """Make directory ``path`` a pool over the existing ``metadata_path`` and ``data_path``
    (see the module docstring). ``sizes`` gives device ids their virtual sizes in bytes; any
    other device gets a size up to its highest mapped block. Every device is named by its id
    (``rename`` names it better). Refused, before anything is written: metadata that is not
    dm-thin's (MetadataError) or is flagged as needing a check, a data device smaller than
    the metadata's data space, a size for a device the metadata lacks or below the device's
    highest mapped block (InvalidArgument)."""
    try:
        opts = PoolOptions(**options).check()
    except TypeError as e:
        raise InvalidArgument(str(e)) from None
    path, dpath, mpath = Path(path), Path(data_path), Path(metadata_path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise AlreadyExists(f"{path} exists already; choose another pool path")
    for p in (dpath, mpath):
        if not p.exists():
            raise InvalidArgument(f"{p} does not exist")
        if p.is_dir():
            raise InvalidArgument(f"{p} is a directory, not a file or block device")
    from .ownership import file_id
    if file_id(dpath) == file_id(mpath):
        raise InvalidArgument(f"data {dpath} and metadata {mpath} are the same file or device")
    sizes = dict(sizes or {})
    meta = ThinMetadata.open(mpath, read_only=True)
    try:
        if meta.needs_check:
            raise MetadataError(f"{mpath} is flagged as needing a check (needs_check); check and "
                                f"repair it first (thin_check, thinpool repair)")
        block_size = meta.sb.data_block_size * fmt.SECTOR_SIZE
        nr_data_blocks = meta.data_sm.nr_blocks
        trans_id, ids = meta.trans_id, meta.device_ids()
        found = {d: (meta.highest_mapped(d), meta.device(d).mapped_blocks) for d in ids}
    finally:
        meta.close()
    with DataDevice.open(dpath, block_size) as dev:
        if dev.size < nr_data_blocks * block_size:
            raise InvalidArgument(f"data {dpath} holds {dev.size} bytes, less than the "
                                  f"{nr_data_blocks} blocks of {block_size} bytes "
                                  f"({nr_data_blocks * block_size} bytes) the metadata maps")
    unknown = sorted(set(sizes) - set(ids))
    if unknown:
        raise InvalidArgument(f"no device {', '.join(map(str, unknown))} in {mpath} (it has "
                              f"{', '.join(map(str, ids)) or 'none'})")
    adopted = []
    for d in ids:
        last, mapped = found[d]
        end = 0 if last is None else (last + 1) * block_size
        if d in sizes:
            size, size_from = check_volume_size(sizes[d]), "given"
            if size <= end - block_size:
                raise InvalidArgument(f"device {d} maps block {last} (bytes up to {end}); a "
                                      f"size of {size} bytes would hide it")
        elif last is None:
            size, size_from = block_size, "empty"
        else:
            size, size_from = end, "mapped"
        adopted.append(Adopted(d, str(d), size, mapped, size_from))
    names = Registry(str(path / NAMES_NAME), transaction_id=trans_id,
                     volumes={a.name: Entry(a.dev_id, a.size, epoch=trans_id) for a in adopted},
                     next_id=max(ids, default=0) + 1)
    made: list[Path] = []
    made_dir = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        _write_records(path, dpath, mpath, opts, names, made)
    except BaseException:
        _undo(path, made, made_dir)
        raise
    return adopted


def _refuse_live_metadata(path: Path) -> None:
    """Refuse to format over a device that holds dm-thin metadata already."""
    try:
        with open(path, "rb") as f:
            head = f.read(fmt.BLOCK_SIZE)
    except OSError as e:
        raise InvalidArgument(f"cannot read metadata device {path}: {e.strerror}") from None
    if len(head) == fmt.BLOCK_SIZE:
        try:
            SUPERBLOCK_VALIDATOR.check(head, 0)
        except MetadataError:
            return
        if fmt.Superblock.unpack(head).magic == fmt.THIN_MAGIC:
            raise AlreadyExists(f"{path} already holds dm-thin pool metadata; "
                                f"wipe it first if you really mean to reuse it")


def rename_pool_dir(path, new_path, wait: float | None = 0) -> None:
    """Rename the pool directory ``path`` to ``new_path`` (which must not exist), holding the
    pool's writer lock (BusyError after ``wait`` seconds if another writer has it). Files the
    pool was given with --data/--metadata outside its directory stay where they are."""
    from .config import pool_files
    from .locking import MetadataLock

    path, new_path = Path(path), Path(new_path)
    if new_path.exists() or new_path.is_symlink():
        raise AlreadyExists(f"{new_path} exists already; choose another name")
    mpath, _ = pool_files(path)
    lock = MetadataLock(str(mpath), exclusive=True, wait=wait)
    try:
        if new_path.exists():
            raise AlreadyExists(f"{new_path} exists already; choose another name")
        os.rename(path, new_path)
        fd = os.open(new_path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        lock.release()
