"""Commands on the volumes of a pool: snapshot, delete, rename, revert, merge."""

from __future__ import annotations

import click

from thinpool.registry import check_name
from thinpool.errors import AlreadyExists, BusyError, InvalidArgument
from thinpool.units import format_size

from . import output
from .forward import refuse_in_use
from .app import (TARGET, VOLUME, Session, check_pool_name, Target, cli, get_volume, pass_session, refuse_existing_volume,
                  warn_if_overcommitted)


@cli.command()
@click.argument("origin", metavar="POOL/ORIGIN", type=VOLUME)
@click.argument("name")
@click.option("--read-only", "read_only", is_flag=True,
              help="Make the snapshot read-only (as lvcreate -p r); 'thinpool configure "
                   "POOL/NAME --read-write' makes it writable later.")
@pass_session
def snapshot(session: Session, origin: Target, name: str, read_only: bool) -> None:
    """Make POOL/NAME, a writable (or, with --read-only, read-only) snapshot of POOL/ORIGIN.

    A snapshot is O(1): it shares every block with its origin until one of them writes it.
    Snapshots of a read-only volume are writable unless --read-only is given.

    \b
      thinpool snapshot demo/vol0 snap0
      thinpool snapshot demo/vol0 backup --read-only
    """
    target = _new_name(origin, name, "a snapshot stays in its origin's pool", "'NAME'")
    name = target.volume
    with session.pool(origin.pool, write=True) as pool:
        get_volume(pool, origin)
        refuse_existing_volume(pool, target)
        snap = pool.snapshot(origin.volume, name, read_only=read_only)
        output.echo(f"created {'read-only ' if read_only else ''}snapshot {target} of {origin} "
                    f"({format_size(snap.size)}, device id {snap.dev_id})")
        warn_if_overcommitted(pool)


@cli.command()
@click.argument("target", metavar="POOL/NAME", type=VOLUME)
@pass_session
def delete(session: Session, target: Target) -> None:
    """Delete a volume.

    Its blocks that no other volume shares go back to the pool; its snapshots stay as they are.

    \b
      thinpool delete demo/snap0
    """
    with session.pool(target.pool, write=True) as pool:
        vol = get_volume(pool, target)
        refuse_in_use(target.pool, target.volume)
        refuse_runtime(session, target.pool, target.volume)
        mapped = vol.mapped_blocks
        pool.delete(target.volume)
    output.echo(f"deleted volume {target} ({mapped} mapped block{'' if mapped == 1 else 's'})")


@cli.command()
@click.argument("target", metavar="POOL[/NAME]", type=TARGET)
@click.argument("new_name", metavar="NEW_NAME")
@pass_session
def rename(session: Session, target: Target, new_name: str) -> None:
    """Rename a volume (its device, data and snapshots stay; snapshots follow the new name), or
    a pool (its directory in the home).

    Also how volumes get their names back after every copy of the names was lost (they are then
    named by their device ids).

    \b
      thinpool rename demo/vol0 root
      thinpool rename demo/1 vol0
      thinpool rename demo lab
    """
    if target.volume is None:
        _rename_pool(session, target.pool, new_name)
        return
    new = _new_name(target, new_name, "a volume stays in its pool", "'NEW_NAME'")
    new_name = new.volume
    with session.pool(target.pool, write=True) as pool:
        get_volume(pool, target)
        refuse_existing_volume(pool, new)
        refuse_in_use(target.pool, target.volume)
        refuse_runtime(session, target.pool, target.volume)
        vol = pool.rename(target.volume, new_name)
    output.echo(f"renamed {target} to {new} (device id {vol.dev_id}, {format_size(vol.size)})")


@cli.command()
@click.argument("target", metavar="POOL/VOL", type=VOLUME)
@click.argument("snap", metavar="SNAP")
@pass_session
def revert(session: Session, target: Target, snap: str) -> None:
    """Give POOL/VOL its snapshot SNAP's content again; SNAP is kept.

    O(1): a new snapshot of SNAP takes over VOL's name, size and origin and VOL's old device is
    deleted, in one transaction (a crash leaves the old content or the new). What VOL holds now
    that SNAP does not is lost. Exit 2 when SNAP is not a snapshot of VOL.

    \b
      thinpool revert demo/vol0 snap0
    """
    snap_target = _new_name(target, snap, "a snapshot stays in its origin's pool", "'SNAP'")
    with session.pool(target.pool, write=True) as pool:
        old = get_volume(pool, target)
        old_id = old.dev_id
        get_volume(pool, snap_target)
        refuse_in_use(target.pool, target.volume)
        refuse_runtime(session, target.pool, target.volume)
        vol = pool.revert(target.volume, snap_target.volume)
    output.echo(f"reverted {target} to snapshot {snap_target} (device id {old_id} deleted, now "
                f"device id {vol.dev_id}, {format_size(vol.size)})")


@cli.command()
@click.argument("target", metavar="POOL/SNAP", type=VOLUME)
@pass_session
def merge(session: Session, target: Target) -> None:
    """Merge snapshot POOL/SNAP into its origin (as 'lvconvert --merge').

    The origin's device is deleted and SNAP's device takes the origin's name (and the origin's
    own origin), in one transaction. Other snapshots of the origin keep their names and data.
    Exit 2 when SNAP is not a snapshot or its origin is gone.

    \b
      thinpool merge demo/snap0
    """
    with session.pool(target.pool, write=True) as pool:
        get_volume(pool, target)
        origin = next((v.origin for v in pool.stat().volumes if v.name == target.volume), None)
        refuse_in_use(target.pool, target.volume, *([origin] if origin else []))
        refuse_runtime(session, target.pool, target.volume, *([origin] if origin else []))
        vol = pool.merge(target.volume)
    output.echo(f"merged {target} into {Target(target.pool, vol.name)} (device id "
                f"{vol.dev_id}, {format_size(vol.size)}); {target} is gone")


def _new_name(beside: Target, text: str, rule: str, hint: str) -> Target:
    """A new volume name in ``beside``'s pool: ``NAME`` or ``POOL/NAME`` of that same pool."""
    if "/" in text:
        pool, _, text = text.partition("/")
        if pool != beside.pool:
            raise InvalidArgument(f"{rule} {beside.pool!r}; give just the new name")
    try:
        check_name(text)
    except InvalidArgument as e:
        raise click.BadParameter(str(e), param_hint=hint) from None
    return Target(beside.pool, text)


def _rename_pool(session: Session, old: str, new: str) -> None:
    from thinpool.creation import rename_pool_dir
    try:
        check_pool_name(new)
    except InvalidArgument as e:
        raise click.BadParameter(str(e), param_hint="'NEW_NAME'") from None
    path = session.require_pool(old)
    if session.pool_path(new).exists():
        raise AlreadyExists(f"{session.pool_path(new)} exists already; choose another name "
                            f"for pool {old!r}")
    try:
        rename_pool_dir(path, session.pool_path(new), wait=session.wait)
    except BusyError as e:
        raise session.busy(old, e.holder_pid) from e
    output.echo(f"renamed pool {old} to {new} ({session.pool_path(new)})")


def refuse_runtime(session: Session, pool_name: str, *volumes: str) -> None:
    """BusyError (exit 5) for a volume the container runtime owns (a snapshot, a data volume):
    changing it behind the runtime's back would break its records and containerd's view."""
    from thinpool.runtime.records import owner_of
    path = session.require_pool(pool_name)
    for name in volumes:
        owner = owner_of(path, name)
        if owner is not None:
            raise BusyError(f"volume {pool_name}/{name} belongs to the container runtime ({owner}); "
                            f"change it through containerd or 'thinpool container|image|volume'")
