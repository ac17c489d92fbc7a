"""Read-only commands on a volume's mappings: map, diff.

* ``thinpool map POOL/VOL [--json]`` prints the volume's allocation map as ``qemu-img map
  --output=json`` does (extents in bytes covering the whole volume, plus ``shared`` for mapped
  ones); without ``--json`` a table.
* ``thinpool diff POOL/A POOL/B [--json]`` prints the byte ranges whose content may differ
  between two volumes of one pool, as ``rbd diff --format json`` does (``exists`` is a JSON
  boolean here, where rbd writes the strings "true"/"false"); without ``--json`` a table.

Both open the pool with the readers' lock (``session.pool``) and read its committed metadata
with the walkers (:mod:`thinpool.snapshot.map`); they change nothing. Exit codes: an unknown pool
or volume 1, two volumes of different pools 2 (a usage error, found before any pool is opened),
damaged metadata 3.
"""

from __future__ import annotations

import click

from thinpool.errors import InvalidArgument
from thinpool.units import format_size

from . import output
from .app import VOLUME, Session, Target, cli, get_volume, pass_session


def _reader(pool):
    from thinpool.metadata.walker import MetadataReader
    return MetadataReader(pool.metadata.bm.path)


# -- map -------------------------------------------------------------------------------------
@cli.command("map")
@click.argument("target", metavar="POOL/VOL", type=VOLUME)
@click.option("--json", "as_json", is_flag=True,
              help="qemu-img map --output=json's extents (exact bytes), plus 'shared'.")
@pass_session
def map_(session: Session, target: Target, as_json: bool) -> None:
    """Show which byte ranges of a volume are mapped, and where in the pool's data file.

    \b
      thinpool map demo/vol0
      thinpool map demo/vol0 --json
    """
    from thinpool.snapshot.map import volume_map
    with session.pool(target.pool) as pool:
        vol = get_volume(pool, target)
        with _reader(pool) as reader:
            extents = volume_map(reader, vol.dev_id, vol.size, pool.block_size)
    if as_json:
        output.emit_json([e.as_dict() for e in extents])
        return
    mapped = sum(e.length for e in extents if e.data)
    output.line(f"volume {target}: {format_size(mapped)} mapped of {format_size(vol.size)} "
                f"in {sum(1 for e in extents if e.data)} extent(s)")
    output.table(None, [("start", "right"), ("length", "right"), ("size", "right"),
                        ("data", "left"), ("data offset", "right"), ("shared", "left")],
                 [(str(e.start), str(e.length), format_size(e.length),
                   "yes" if e.data else "zero", str(e.offset) if e.data else "-",
                   ("yes" if e.shared else "no") if e.data else "-") for e in extents])


# -- diff ------------------------------------------------------------------------------------
@cli.command("diff")
@click.argument("a", metavar="POOL/A", type=VOLUME)
@click.argument("b", metavar="POOL/B", type=VOLUME)
@click.option("--json", "as_json", is_flag=True,
              help="rbd diff --format json's ranges (exact bytes).")
@pass_session
def diff(session: Session, a: Target, b: Target, as_json: bool) -> None:
    """Show the byte ranges whose content may differ between two volumes of one pool.

    Computed from the mappings alone, as 'thinpool delta' does: a range both volumes map to the
    same data blocks, or neither maps, is the same. 'exists' says whether B maps data there.

    \b
      thinpool diff demo/snap0 demo/vol0
    """
    from thinpool.snapshot.map import volume_diff
    if a.pool != b.pool:
        raise InvalidArgument(f"{a} and {b} are in different pools; diff compares two volumes "
                              f"of one pool")
    with session.pool(a.pool) as pool:
        va, vb = get_volume(pool, a), get_volume(pool, b)
        with _reader(pool) as reader:
            ranges = volume_diff(reader, va.dev_id, vb.dev_id, max(va.size, vb.size),
                                 pool.block_size)
    if as_json:
        output.emit_json([r.as_dict() for r in ranges])
        return
    total = sum(r.length for r in ranges)
    output.line(f"{a} -> {b}: {format_size(total)} may differ, in {len(ranges)} range(s)")
    if ranges:
        output.table(None, [("offset", "right"), ("length", "right"), ("size", "right"),
                            ("in B", "left")],
                     [(str(r.offset), str(r.length), format_size(r.length),
                       "data" if r.exists else "unmapped") for r in ranges])
