"""``thinpool adopt POOL --data D --metadata M [--size ID=SIZE ...]``: take over an existing
dm-thin metadata/data pair (LVM's ``_tmeta``/``_tdata`` copied out, metadata ``thin_restore``
made) as a pool of the home.

The metadata is checked first (``thinpool check``'s checker; findings: exit 3 and nothing
made); then :func:`thinpool.creation.adopt_pool_files` writes the pool's records and the pool
is opened once to prove it opens. The files stay where they are and are not copied: like
``create --data/--metadata``, the pool uses them in place, and a file another pool of the home
uses is refused (exit 5). Each device is named by its id; each line says where its size came
from (``--size``, or up to its highest mapped block), since dm-thin metadata keeps no virtual
sizes.
"""

from __future__ import annotations

from pathlib import Path

import click

from thinpool.errors import AlreadyExists, InvalidArgument, MetadataError
from thinpool.units import format_size, parse_size

from . import output
from .app import POOL, Session, cli, pass_session
from .safety import refuse_in_use


class DeviceSizeParam(click.ParamType):
    """``ID=SIZE``: a device id and its virtual size."""

    name = "id=size"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        dev, sep, size = str(value).partition("=")
        if not sep or not dev.strip().isdigit():
            self.fail(f"{value!r} is not ID=SIZE (a device id, '=', a size such as 10G)",
                      param, ctx)
        try:
            return int(dev), parse_size(size.strip())
        except InvalidArgument as e:
            self.fail(f"{value!r}: {e}", param, ctx)


@cli.command()
@click.argument("target", metavar="POOL", type=POOL)
@click.option("--data", "data_path", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="The existing data file or block device.")
@click.option("--metadata", "metadata_path", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="The existing dm-thin metadata file or block device.")
@click.option("--size", "sizes", type=DeviceSizeParam(), multiple=True, metavar="ID=SIZE",
              help="Virtual size of device ID (repeatable); others get their highest mapped "
                   "block.")
@click.option("--json", "as_json", is_flag=True, help="Print the adopted devices as JSON.")
@pass_session
def adopt(session: Session, target, data_path: Path, metadata_path: Path,
          sizes: tuple[tuple[int, int], ...], as_json: bool) -> None:
    """Make a pool of an existing dm-thin metadata and data pair, in place.

    \b
      thin_restore -i pool.xml -o meta.bin
      thinpool adopt old --data tdata.img --metadata meta.bin --size 1=10G
      thinpool rename old/1 root
    """
    from thinpool import Pool
    from thinpool.creation import adopt_pool_files
    from thinpool.tools.check import check

    name = target.pool
    path = session.pool_path(name)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise AlreadyExists(f"pool {name!r} exists already in {session.home}; choose another "
                            f"name")
    for opt, p in (("--data", data_path), ("--metadata", metadata_path)):
        if not p.exists():
            raise InvalidArgument(f"{opt} {p} does not exist")
        refuse_in_use(session, p, opt)
    given: dict[int, int] = {}
    for dev, size in sizes:
        if dev in given:
            raise click.UsageError(f"--size gives device {dev} two sizes")
        given[dev] = size
    report = check(metadata_path)
    if not report.clean:
        first = "; ".join(f.message for f in report.errors[:3])
        raise MetadataError(f"--metadata {metadata_path} does not pass the check "
                            f"({len(report.errors)} problem(s): {first}); nothing was adopted; "
                            f"'thinpool repair -i {metadata_path} -o FILE' rebuilds what is "
                            f"readable")
    devices = adopt_pool_files(path, data_path, metadata_path, given)
    with Pool.open(path) as pool:          # it opens, and its names agree with its metadata
        st = pool.stat()
    bs = st.block_size
    if as_json:
        output.emit_json({"name": name, "path": str(path), "block_size": bs,
                          "data_size": st.data_blocks_total * bs,
                          "transaction_id": st.transaction_id,
                          "volumes": [{"name": d.name, "dev_id": d.dev_id, "size": d.size,
                                       "mapped_blocks": d.mapped_blocks,
                                       "size_from": d.size_from} for d in devices]})
        return
    output.echo(f"adopted pool {name} in {path}: {len(devices)} device"
                f"{'' if len(devices) == 1 else 's'}, {format_size(st.data_blocks_total * bs)} "
                f"of data in blocks of {format_size(bs)}, transaction id {st.transaction_id}")
    why = {"given": "given with --size",
           "mapped": "up to its highest mapped block; --size {id}=SIZE gives another",
           "empty": "nothing is mapped: one block; --size {id}=SIZE gives another"}
    for d in devices:
        output.echo(f"  {name}/{d.name}: device {d.dev_id}, {format_size(d.size)} "
                    f"({why[d.size_from].format(id=d.dev_id)}), {d.mapped_blocks} mapped "
                    f"block{'' if d.mapped_blocks == 1 else 's'}")
    if devices:
        output.note(f"devices are named by their ids; 'thinpool rename {name}/"
                    f"{devices[0].name} NAME' names one; dm-thin metadata keeps no origins, "
                    f"so no volume is shown as a snapshot")
