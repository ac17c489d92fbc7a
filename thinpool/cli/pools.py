"""Commands that make, grow and remove pools and volumes: create, resize, destroy.

Each is a thin shell: check the arguments, open the pool through the session, call the library,
report one line. ``create`` and ``resize`` take either ``POOL`` or ``POOL/NAME``.
"""

from __future__ import annotations

import os
import shutil
import stat as stat_mod
from pathlib import Path

import click

from thinpool.config import pool_files
from thinpool.errors import (AlreadyExists, InvalidArgument, MetadataError, PoolDamaged,
                             ThinpoolError)
from thinpool.ownership import file_id
from thinpool.units import SECTOR_SIZE, format_size

from . import output
from .app import (POOL, RELATIVE_SIZE, SIZE, TARGET, Session, Target, cli, confirm, get_volume,
                  pass_session, refuse_existing_volume, resolve_size, warn_if_overcommitted)
from .forward import refuse_in_use as refuse_volume_in_use
from .safety import refuse_in_use

DEFAULT_BLOCK_SIZE = 64 * 1024


def _pool_options(fn):
    """The pool behaviour options shared by create and configure."""
    fn = click.option("--low-water-hook", metavar="COMMAND",
                      help="Shell command run once when free data falls below --low-water "
                           "(gets THINPOOL_POOL and THINPOOL_FREE_BLOCKS).")(fn)
    fn = click.option("--low-water", type=SIZE,
                      help="Free-space mark that triggers --low-water-hook (0 = off).")(fn)
    fn = click.option("--no-space-timeout", type=click.FloatRange(min=0), metavar="SECONDS",
                      help="How long a write waits for space when the pool is full "
                           "[default: 60; 0 = fail at once].")(fn)
    fn = click.option("--error-if-no-space/--queue-if-no-space", default=None,
                      help="Fail writes at once when the pool is full, or let them wait.")(fn)
    return fn


def _options_from(error_if_no_space, no_space_timeout, low_water, low_water_hook, bs: int) -> dict:
    out = {}
    if error_if_no_space is not None:
        out["error_if_no_space"] = error_if_no_space
    if no_space_timeout is not None:
        out["no_space_timeout"] = no_space_timeout
    if low_water is not None:
        out["low_water_blocks"] = -(-low_water // bs)
    if low_water_hook is not None:
        out["low_water_hook"] = low_water_hook or None
    return out


# -- create ----------------------------------------------------------------------------------
@cli.command()
@click.argument("target", metavar="POOL[/NAME]", type=TARGET)
@click.option("--size", type=SIZE, help="Data size of a pool, virtual size of a volume.")
@click.option("--block-size", type=SIZE, help="Pool data block size: a multiple of 64K "
              "from 64K to 1G [default: 64K].")
@click.option("--metadata-size", type=SIZE,
              help="Pool metadata size [default: 48 bytes per data block, at least 2M].")
@click.option("--data", "data_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Put the pool's data on this existing file or block device.")
@click.option("--metadata", "metadata_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Put the pool's metadata on this existing file or block device.")
@_pool_options
@pass_session
def create(session: Session, target: Target, size: int | None, block_size: int | None,
           metadata_size: int | None, data_path: Path | None, metadata_path: Path | None,
           error_if_no_space, no_space_timeout, low_water, low_water_hook) -> None:
    """Make a pool (POOL) or a thin volume in it (POOL/NAME).

    \b
      thinpool create demo --size 10G                 a pool with a 10 GiB sparse data file
      thinpool create demo --data /dev/sdb1 --metadata /dev/sdb2
      thinpool create demo/vol0 --size 100G           a thin volume; may exceed the pool
    """
    if target.volume is not None:
        extra = [name for name, value in (("--block-size", block_size),
                                          ("--metadata-size", metadata_size),
                                          ("--data", data_path), ("--metadata", metadata_path),
                                          ("--error-if-no-space", error_if_no_space),
                                          ("--no-space-timeout", no_space_timeout),
                                          ("--low-water", low_water),
                                          ("--low-water-hook", low_water_hook))
                 if value is not None]
        if extra:
            raise click.UsageError(f"{', '.join(extra)} applies to pools, not to volumes")
        if size is None:
            raise click.UsageError("a volume needs --size")
        _create_volume(session, target, size)
    else:
        bs = DEFAULT_BLOCK_SIZE if block_size is None else block_size
        _create_pool(session, target.pool, size, block_size, metadata_size, data_path,
                     metadata_path, _options_from(error_if_no_space, no_space_timeout, low_water,
                                                  low_water_hook, bs))


def _create_pool(session: Session, name: str, size: int | None, block_size: int | None,
                 metadata_size: int | None, data_path: Path | None,
                 metadata_path: Path | None, options: dict | None = None) -> None:
    from thinpool import Pool
    from thinpool.pool import check_block_size

    bs = DEFAULT_BLOCK_SIZE if block_size is None else block_size
    try:
        check_block_size(bs)
    except InvalidArgument:
        raise InvalidArgument(f"block size {format_size(bs)} ({bs} bytes) is not one the kernel "
                              f"accepts: use a multiple of 64 KiB from 64 KiB to 1 GiB, "
                              f"e.g. --block-size 64K") from None
    if size is None and data_path is None:
        raise click.UsageError("a new pool needs --size (or --data naming an existing file "
                               "or block device)")
    for opt, p in (("--data", data_path), ("--metadata", metadata_path)):
        if p is not None and not p.exists():
            raise InvalidArgument(f"{opt} {p} does not exist; give an existing file or block "
                                  f"device, or leave {opt} out for a sparse file in the pool")
        if p is not None:
            refuse_in_use(session, p, opt)
    if (data_path is not None and metadata_path is not None
            and file_id(data_path) == file_id(metadata_path)):
        raise InvalidArgument(f"--data {data_path} and --metadata {metadata_path} are the same "
                              f"file; give two different ones")
    path = session.pool_path(name)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise AlreadyExists(f"pool {name!r} exists already in {session.home}; choose another "
                            f"name, or remove it with 'thinpool destroy {name}'")
    size, notice = _pool_data_size(size, bs, data_path)
    with Pool.create(path, data_size=size, block_size=bs, metadata_size=metadata_size,
                     data_path=data_path, metadata_path=metadata_path, **(options or {})) as pool:
        st = pool.stat()
    if notice:
        output.note(notice)
    output.echo(f"created pool {name} in {path}: {format_size(st.data_blocks_total * bs)} of data "
                f"in {st.data_blocks_total} blocks of {format_size(bs)}, "
                f"{format_size(st.metadata_blocks_total * 4096)} of metadata")


def _blocks(n: int, bs: int) -> str:
    return f"{format_size(n)} ({n // bs} block{'' if n // bs == 1 else 's'} of {format_size(bs)})"


def _pool_data_size(size: int | None, bs: int, data_path: Path | None) -> tuple[int, str | None]:
    """The data size a new pool gets, in whole blocks, and a notice when it differs from what
    was asked (printed once the pool is made). A new data file: --size rounded up. A given file or device is never grown: without
    --size all of it (rounded down), with --size that much if it holds it."""
    from thinpool.creation import max_data_size
    if data_path is None:
        if size < bs:
            raise InvalidArgument(f"--size {format_size(size)} is smaller than one data block "
                                  f"({format_size(bs)}); give at least --size {format_size(bs)}")
        limit = max_data_size(bs)
        if size > limit:
            raise InvalidArgument(f"--size {format_size(size)} is more than a pool of "
                                  f"{format_size(bs)} blocks can have ({format_size(limit)})")
        used = min(-(-size // bs) * bs, limit)
        return used, None if used == size else f"pool size rounded up to {_blocks(used, bs)}"
    have = _device_size(data_path)
    kind = "block device" if stat_mod.S_ISBLK(os.stat(data_path).st_mode) else "file"
    whole = have - have % bs
    if whole < bs:
        raise InvalidArgument(f"--data {data_path} holds {format_size(have)}, less than one data "
                              f"block ({format_size(bs)})")
    if size is None:
        return whole, None if whole == have else (
            f"using {_blocks(whole, bs)} of the {format_size(have)} of {kind} {data_path} "
            f"(whole blocks only)")
    if size > have:
        grow = ("a block device does not grow: give a smaller --size or a larger device"
                if kind == "block device" else
                f"thinpool does not grow a given file: leave out --size to use all of it, or "
                f"grow it first (truncate -s {size} {data_path})")
        raise InvalidArgument(f"--size {format_size(size)} is more than --data {data_path} holds "
                              f"({format_size(have)}); {grow}")
    if size < bs:
        raise InvalidArgument(f"--size {format_size(size)} is smaller than one data block "
                              f"({format_size(bs)}); give at least --size {format_size(bs)}")
    used = -(-size // bs) * bs
    if used > have:
        return whole, (f"pool size rounded down to {_blocks(whole, bs)}: --data {data_path} "
                       f"holds only {format_size(have)}")
    return used, None if used == size else f"pool size rounded up to {_blocks(used, bs)}"


def _device_size(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise InvalidArgument(f"cannot open {path}: {e.strerror}") from None
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def round_volume_size(size: int) -> tuple[int, str | None]:
    """A volume's size in whole 512-byte sectors (rounded up), within the limit, and a notice
    when that differs from ``size`` (printed once the command succeeded)."""
    from thinpool.creation import check_volume_size
    check_volume_size(size)
    used = -(-size // SECTOR_SIZE) * SECTOR_SIZE
    if used == size:
        return size, None
    check_volume_size(used)
    return used, (f"volume size rounded up to {format_size(used)} ({used} bytes: whole "
                  f"512-byte sectors)")


def _create_volume(session: Session, target: Target, size: int) -> None:
    size, notice = round_volume_size(size)
    with session.pool(target.pool, write=True) as pool:
        refuse_existing_volume(pool, target)
        vol = pool.create_thin(target.volume, size)
        if notice:
            output.note(notice)
        output.echo(f"created volume {target} of {format_size(vol.size)} (device id {vol.dev_id})")
        warn_if_overcommitted(pool)


# -- configure -------------------------------------------------------------------------------
@cli.command()
@click.argument("target", metavar="POOL[/VOL]", type=TARGET)
@_pool_options
@click.option("--read-only/--read-write", "read_only", default=None,
              help="Volumes: make POOL/VOL read-only (writes, discards, resizes, reverts and "
                   "merges onto it are refused, exit 2) or writable again, as 'lvchange -p r|rw'.")
@click.option("--json", "as_json", is_flag=True, help="Print the options as JSON.")
@pass_session
def configure(session: Session, target: Target, error_if_no_space, no_space_timeout, low_water,
              low_water_hook, read_only, as_json: bool) -> None:
    """Show or change how a pool behaves when it fills up, or whether a volume is read-only.

    \b
      thinpool configure demo --error-if-no-space
      thinpool configure demo --low-water 1G --low-water-hook 'logger pool $THINPOOL_POOL is low'
      thinpool configure demo/snap0 --read-only     as lvchange -p r
      thinpool configure demo/snap0 --read-write
    """
    if target.volume is not None:
        _configure_volume(session, target, read_only, as_json, [
            name for name, value in (("--error-if-no-space", error_if_no_space),
                                     ("--no-space-timeout", no_space_timeout),
                                     ("--low-water", low_water),
                                     ("--low-water-hook", low_water_hook)) if value is not None])
        return
    if read_only is not None:
        raise click.UsageError(f"--read-only and --read-write apply to volumes, not to pools; "
                               f"give POOL/VOL, e.g. 'thinpool configure {target.pool}/VOL "
                               f"--read-only'")
    from dataclasses import asdict
    with session.pool(target.pool, write=True) as pool:
        changes = _options_from(error_if_no_space, no_space_timeout, low_water, low_water_hook,
                                pool.block_size)
        opts = pool.configure(**changes) if changes else pool.options
        bs = pool.block_size
    if as_json:
        output.emit_json(asdict(opts))
        return
    output.fields(f"pool {target.pool}", [
        ("when full", "fail writes at once" if opts.error_if_no_space or not opts.no_space_timeout
         else f"writes wait up to {opts.no_space_timeout:g} s for space"),
        ("low-water mark", "off" if not opts.low_water_blocks else
         f"{format_size(opts.low_water_blocks * bs)} ({opts.low_water_blocks} blocks)"),
        ("low-water hook", opts.low_water_hook or "-"),
    ])


def _configure_volume(session: Session, target: Target, read_only: bool | None, as_json: bool,
                      pool_only: list[str]) -> None:
    if pool_only:
        raise click.UsageError(f"{', '.join(pool_only)} appl{'ies' if len(pool_only) == 1 else 'y'} "
                               f"to pools, not to volumes; give just {target.pool!r}")
    with session.pool(target.pool, write=read_only is not None) as pool:
        vol = get_volume(pool, target)
        was = vol.read_only
        if read_only is not None and read_only != was:
            vol = pool.set_read_only(target.volume, read_only)
        now = vol.read_only
    if as_json:
        output.emit_json({"pool": target.pool, "name": target.volume, "read_only": now})
        return
    state = "read-only" if now else "writable"
    if read_only is None:
        output.echo(f"volume {target} is {state}")
    elif now == was:
        output.echo(f"volume {target} is {state} already; nothing was changed")
    else:
        output.echo(f"volume {target} is {state} now"
                    + (f" (make it writable again with 'thinpool configure {target} "
                       f"--read-write')" if now else ""))


# -- resize ----------------------------------------------------------------------------------
@cli.command()
@click.argument("target", metavar="POOL[/NAME]", type=TARGET)
@click.option("--size", type=RELATIVE_SIZE, help="New data size of a pool (grow only) or new "
              "virtual size of a volume; +SIZE or -SIZE: that much more or less.")
@click.option("--metadata-size", type=SIZE, help="New metadata size of a pool (grow only).")
@click.option("--yes", "-y", is_flag=True, help="Shrink a volume without asking.")
@pass_session
def resize(session: Session, target: Target, size: tuple[str, int] | None,
           metadata_size: int | None, yes: bool) -> None:
    """Grow a pool, or grow or shrink a volume.

    A pool's data (--size) and metadata (--metadata-size) only grow. Shrinking a volume drops
    its data past the new end: it asks first on a terminal and needs --yes otherwise.

    \b
      thinpool resize demo --size 20G         pools only grow
      thinpool resize demo/vol0 --size 200G
      thinpool resize demo/vol0 --size +10G        10 GiB more, as lvextend -L +10G
      thinpool resize demo/vol0 --size 1G --yes   shrinking drops the data past the new end
    """
    if target.volume is not None:
        if metadata_size is not None:
            raise click.UsageError("--metadata-size applies to pools, not to volumes")
        if size is None:
            raise click.UsageError("give the volume's new --size")
        with session.pool(target.pool, write=True) as pool:
            old = get_volume(pool, target).size
            refuse_volume_in_use(target.pool, target.volume)
            size, notice = round_volume_size(resolve_size(size, old, f"volume {target}"))
            if size < old:
                confirm(f"Shrink volume {target} from {format_size(old)} to "
                        f"{format_size(size)}, dropping its data past {format_size(size)}?", yes)
            vol = pool.resize_volume(target.volume, size)
            if notice:
                output.note(notice)
            output.echo(f"resized volume {target} from {format_size(old)} to "
                        f"{format_size(vol.size)}")
            if size < old:
                output.warn(f"the data of {target} past {format_size(size)} was discarded")
            else:
                warn_if_overcommitted(pool)
        return
    if size is None and metadata_size is None:
        raise click.UsageError("give the pool's new --size (and/or --metadata-size)")
    if size is not None and size[0] == "-":
        raise InvalidArgument(f"pool {target.pool} cannot shrink (dm-thin pools only grow); "
                              f"give a larger --size or +SIZE")
    with session.pool(target.pool, write=True) as pool:
        st = pool.stat()
        bs = st.block_size
        notice = None
        if size is not None:
            size = resolve_size(size, st.data_blocks_total * bs, f"pool {target.pool}")
        if size is not None and size % bs:
            size = -(-size // bs) * bs
            notice = f"pool size rounded up to {_blocks(size, bs)}"
        old_data = st.data_blocks_total * bs
        old_meta = st.metadata_blocks_total * 4096
        if size is not None and size // bs < st.data_blocks_total:
            raise InvalidArgument(
                f"pool {target.pool} cannot shrink from {format_size(old_data)} to "
                f"{format_size(size)}: its data blocks may be in use anywhere in the data device "
                f"(dm-thin pools only grow); make a new pool and copy the volumes instead")
        if metadata_size is not None and -(-metadata_size // 4096) < st.metadata_blocks_total:
            raise InvalidArgument(
                f"the metadata of pool {target.pool} cannot shrink from {format_size(old_meta)} "
                f"to {format_size(metadata_size)} (dm-thin metadata only grows)")
        pool.resize(data_size=size, metadata_size=metadata_size)
        st = pool.stat()
    if notice:
        output.note(notice)
    new_data = st.data_blocks_total * bs
    new_meta = st.metadata_blocks_total * 4096
    if new_data == old_data and new_meta == old_meta:
        output.echo(f"pool {target.pool} already has {format_size(new_data)} of data and "
                    f"{format_size(new_meta)} of metadata; nothing changed")
        return
    parts = []
    if new_data != old_data:
        parts.append(f"data from {format_size(old_data)} to {format_size(new_data)}")
    if new_meta != old_meta:
        parts.append(f"metadata from {format_size(old_meta)} to {format_size(new_meta)}")
    output.echo(f"resized pool {target.pool}: {', '.join(parts)}")


# -- destroy ---------------------------------------------------------------------------------
@cli.command()
@click.argument("target", metavar="POOL", type=POOL)
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@pass_session
def destroy(session: Session, target: Target, yes: bool) -> None:
    """Remove a pool and every volume in it.

    Files the pool made in its directory are deleted; a data or metadata file or device given
    with --data/--metadata at creation is left as it is.

    \b
      thinpool destroy demo --yes
    """
    path = session.require_pool(target.pool)
    kept = _given_devices(path)
    question = f"Destroy pool {target.pool} ({path}) and every volume in it?"
    try:
        with session.pool(target.pool, write=True) as pool:    # the lock: nobody has it open
            count = len(pool.volumes())
            confirm(question, yes)
            shutil.rmtree(path)
    except (MetadataError, PoolDamaged) as e:  # a pool too broken to open can still be removed
        output.warn(f"pool {target.pool} does not open ({e})")
        confirm(question, yes)
        shutil.rmtree(path)
        count = None
    volumes = "" if count is None else f" ({count} volume{'' if count == 1 else 's'})"
    output.echo(f"destroyed pool {target.pool}{volumes}")
    for p in kept:
        output.note(f"left {p} as it was (given at creation); wipe it yourself to reuse it")


def _given_devices(path: Path) -> list[Path]:
    """The data and metadata files or devices outside the pool's directory (--data/--metadata)."""
    try:
        where = list(pool_files(path))       # from either copy of pool.json
    except ThinpoolError:
        return []
    return [p for p in where if p.resolve().parent != path.resolve()]
