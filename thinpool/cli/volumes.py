"""Commands on the volumes of a pool: snapshot, delete, rename."""

from __future__ import annotations

import click

from thinpool.registry import check_name
from thinpool.errors import InvalidArgument
from thinpool.units import format_size

from . import output
from .app import (VOLUME, Session, Target, cli, get_volume, pass_session, refuse_existing_volume,
                  warn_if_overcommitted)


@cli.command()
@click.argument("origin", metavar="POOL/ORIGIN", type=VOLUME)
@click.argument("name")
@pass_session
def snapshot(session: Session, origin: Target, name: str) -> None:
    """Make POOL/NAME, a writable snapshot of POOL/ORIGIN.

    A snapshot is O(1): it shares every block with its origin until one of them writes it.

    \b
      thinpool snapshot demo/vol0 snap0
    """
    target = _new_name(origin, name, "a snapshot stays in its origin's pool", "'NAME'")
    name = target.volume
    with session.pool(origin.pool, write=True) as pool:
        get_volume(pool, origin)
        refuse_existing_volume(pool, target)
        snap = pool.snapshot(origin.volume, name)
        output.echo(f"created snapshot {target} of {origin} ({format_size(snap.size)}, "
                    f"device id {snap.dev_id})")
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
        mapped = vol.mapped_blocks
        pool.delete(target.volume)
    output.echo(f"deleted volume {target} ({mapped} mapped block{'' if mapped == 1 else 's'})")


@cli.command()
@click.argument("target", metavar="POOL/NAME", type=VOLUME)
@click.argument("new_name", metavar="NEW_NAME")
@pass_session
def rename(session: Session, target: Target, new_name: str) -> None:
    """Rename a volume (its device, data and snapshots stay; snapshots follow the new name).

    Also how volumes get their names back after every copy of the names was lost (they are then
    named by their device ids).

    \b
      thinpool rename demo/vol0 root
      thinpool rename demo/1 vol0
    """
    new = _new_name(target, new_name, "a volume stays in its pool", "'NEW_NAME'")
    new_name = new.volume
    with session.pool(target.pool, write=True) as pool:
        get_volume(pool, target)
        refuse_existing_volume(pool, new)
        vol = pool.rename(target.volume, new_name)
    output.echo(f"renamed {target} to {new} (device id {vol.dev_id}, {format_size(vol.size)})")


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
