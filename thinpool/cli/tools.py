"""Metadata tools: check, repair, dump, restore, ls, delta, trim, metadata-size, metadata-snap.

Each takes a TARGET that is a pool by name (in --home) or a metadata file or block device by
path: a name with no ``/`` that names a pool is the pool, anything else is a path. On a pool the
read-only tools hold the pool's shared lock while they read, so no writer changes the metadata
under them; with ``--metadata-snap`` (``-m``) they read the held metadata snapshot instead and
need no lock, as thin_dump -m does beside a live pool.

Output matches thin-provisioning-tools 0.9.0 where it has the same command (dump's XML, ls's table,
delta's XML), byte for byte; ``--json`` gives the same content for scripts. Exit codes: check
returns 3 when it finds problems; a bad dump file is a usage error (2).
"""

from __future__ import annotations

import io
import os
from contextlib import contextmanager
from typing import Iterator

import click

from thinpool.errors import InvalidArgument, NotFound
from thinpool.units import format_size

from . import output
from .app import POOL, SIZE, Session, Target, cli, pass_session
from .safety import (
    confirm_overwrite,
    os_error,
    refuse_pool_file,
    removed_on_failure,
    replacing,
)


class Source:
    """Where a tool reads metadata: the file, and the pool's volume names when it is a pool."""

    def __init__(self, path: str, label: str = "the metadata", by_name: dict[str, int] | None = None,
                 pool=None):
        self.path = path
        self.label = label
        self.by_name = by_name or {}
        self.pool = pool

    def names(self) -> dict[int, str]:
        return {dev: name for name, dev in self.by_name.items()}

    def dev_id(self, text: str) -> int:
        """A device by volume name (on a pool) or by id."""
        if text in self.by_name:
            return self.by_name[text]
        try:
            return int(text, 10)
        except ValueError:
            raise NotFound(f"no volume or device id {text!r} in {self.label}") from None


def _is_pool(session: Session, target: str) -> bool:
    return "/" not in target and session.pool_exists(target)


@contextmanager
def source(session: Session, target: str, metadata_snap: bool = False) -> Iterator[Source]:
    if _is_pool(session, target):
        if metadata_snap:
            # No lock: the held snapshot does not change under a writer. Names come from the
            # registry as it is now (a volume made after the snapshot is simply not in it).
            from thinpool.paths import NAMES_NAME
            from thinpool.pool import pool_files
            from thinpool.registry import Registry
            path = session.pool_path(target)
            reg = Registry.load(str(path / NAMES_NAME))
            yield Source(str(pool_files(path)[0]), f"pool {target}",
                         {n: e.dev_id for n, e in reg.volumes.items()})
            return
        with session.pool(target) as pool:
            yield Source(pool.metadata.bm.path, f"pool {target}",
                         {v.name: v.dev_id for v in pool.stat().volumes}, pool)
        return
    if not os.path.exists(target):
        raise NotFound(f"{target!r} is neither a pool in {session.home} nor a metadata file or device")
    yield Source(target)


def _device_count(path: str) -> int | None:
    """How many devices the metadata has, for a progress bar; None if that cannot be read."""
    from thinpool.errors import ThinpoolError
    from thinpool.metadata.walker import MetadataReader
    try:
        with MetadataReader(path) as reader:
            return len(reader.roots())
    except ThinpoolError:
        return None


def _reader(src: Source, metadata_snap: bool):
    from thinpool.metadata.walker import MetadataReader
    return MetadataReader(src.path, metadata_snap=metadata_snap)


META_SNAP = click.option("-m", "--metadata-snap", is_flag=True,
                         help="Read the held metadata snapshot (see 'thinpool metadata-snap').")


# -- check -----------------------------------------------------------------------------------
@cli.command()
@click.argument("target")
@click.option("--json", "as_json", is_flag=True, help="List the findings as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing; the exit code says it all.")
@pass_session
def check(session: Session, target: str, as_json: bool, quiet: bool) -> int:
    """Check metadata: every structure, every reference count; exit 3 if anything is wrong.

    Stricter than thin_check: it also verifies data block reference counts, mapped_blocks and
    mappings past the end of the data device. On a pool it also checks the pool's own records:
    both copies of its names and of pool.json, and the data device's size. Problems in the
    metadata mark the pool for a check (writes stop); a clean check clears the mark.

    \b
      thinpool check demo
      thinpool check /dev/vg/pool_tmeta --json
    """
    from thinpool.errors import MetadataError, PoolDamaged
    from thinpool.tools.check import CheckReport
    from thinpool.tools.check import check as run_check
    try:
        with source(session, target) as src:
            with output.count_progress(_device_count(src.path), "checking", "devices") as bar:
                report = run_check(src.path, progress=lambda n: bar.advance(1))
            flagged = src.pool is not None and src.pool.stat().needs_check
            if src.pool is not None and not report.clean:
                # Damage check found is damage found: writes stop until a check is clean.
                src.pool.report_damage(MetadataError(f"'thinpool check' found {len(report.errors)} "
                                                     f"problem(s): {report.errors[0]}"))
            if src.pool is not None:
                _report_unmapped(src.pool, target, report)
    except (MetadataError, PoolDamaged):
        if not _is_pool(session, target):
            raise
        # The pool does not open (damaged superblock or space maps, a short data device, no
        # readable pool.json): check what can be checked all the same; that is what check is
        # for. No writer holds it: a writer has to open it too.
        from thinpool.config import pool_files
        try:
            report = run_check(str(pool_files(session.pool_path(target))[0]))
        except PoolDamaged:
            report = CheckReport()              # (the records check below says why)
        flagged = False
    if _is_pool(session, target):
        # The pool's own records too (names, pool.json, the data device's size), so that no
        # command's advice to run check ends in a check that says clean.
        from thinpool.tools.pool_records import check_records
        report.findings[:0] = check_records(session.pool_path(target))
    if flagged and report.clean:
        # A clean check is what a pool marked NEEDS_CHECK waits for (after damage was repaired
        # or metadata space was added): let it take writes again.
        with session.pool(target, write=True) as pool:
            pool.clear_needs_check()
        from thinpool.tools.pool_records import MARKER_KIND
        report.findings = [f for f in report.findings if f.kind != MARKER_KIND]
        if not quiet and not as_json:
            output.note(f"pool {target} was marked for a check; the check is clean, the mark is cleared")
    if as_json:
        output.emit_json(report.as_dict())
    elif not quiet:
        for f in report.findings:
            (output.line if f.severity == "error" else output.note)(
                f"{'error' if f.severity == 'error' else 'note'}: {f}")
        status = "clean" if report.clean else f"{len(report.errors)} problem(s) found"
        output.line(f"{target}: {status}; transaction id {report.transaction_id}, "
                    f"{report.nr_devices} device(s), {report.nr_mappings} mapping(s)")
    return 0 if report.clean else 3


def _report_unmapped(pool, target: str, report) -> None:
    """Data-file space no mapping owns (an interrupted writer's): a note, not damage."""
    from thinpool.tools.check import Finding
    from thinpool.tools.leaks import unmapped_allocated
    found = unmapped_allocated(pool)
    if found is None or not found.blocks:
        return
    report.findings.append(Finding(
        "unmapped space",
        f"the data file holds {found.bytes} bytes ({format_size(found.bytes)}) in "
        f"{found.blocks} free data block(s) that no mapping owns (left by an interrupted or "
        f"uncommitted write); 'thinpool trim {target}' gives them back to the host",
        structure="data device", severity="info"))


# -- repair ----------------------------------------------------------------------------------
@cli.command()
@click.option("-i", "--input", "input_", required=True, help="Damaged metadata: a pool or a path.")
@click.option("-o", "--output", "output_", required=True, type=click.Path(dir_okay=False),
              help="Where to write the repaired metadata (a new file, or an existing file or device).")
@click.option("--json", "as_json", is_flag=True)
@click.option("--yes", "-y", is_flag=True, help="Overwrite an existing output without asking.")
@pass_session
def repair(session: Session, input_: str, output_: str, as_json: bool, yes: bool) -> int:
    """Rebuild clean metadata from everything still readable; never writes the input.

    An existing output that is not empty is overwritten only after a yes on the terminal (or
    with --yes); a pool's own files are refused as the output.

    \b
      thinpool repair -i demo -o /tmp/demo-meta.repaired
    """
    from thinpool.tools.repair import repair as run_repair
    if _is_pool(session, input_):
        from thinpool.pool import pool_files
        path = str(pool_files(session.pool_path(input_))[0])
    else:
        path = input_
        if not os.path.exists(path):
            raise NotFound(f"{input_!r} is neither a pool nor a metadata file or device")
    refuse_pool_file(session, output_, "the repair output")
    confirm_overwrite(output_, yes, " with the repaired metadata")
    with removed_on_failure(output_):
        report = run_repair(path, output_)
    if as_json:
        output.emit_json(report.as_dict())
        return 0
    for line in report.lost:
        output.note(f"lost: {line}")
    output.echo(f"wrote {output_}: {report.devices} device(s), {report.mappings} mapping(s)"
                + ("" if not report.lost else f"; {len(report.lost)} problem(s) worked around"))
    return 0


# -- dump / restore --------------------------------------------------------------------------
@cli.command()
@click.argument("target")
@click.option("--format", "fmt", type=click.Choice(["xml", "json"]), default="xml", show_default=True)
@click.option("--dev-id", "dev_ids", multiple=True, help="Only this device (name or id); repeatable.")
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False), help="Write here, not stdout.")
@META_SNAP
@click.option("--yes", "-y", is_flag=True, help="Overwrite an existing -o file without asking.")
@pass_session
def dump(session: Session, target: str, fmt: str, dev_ids: tuple[str, ...], out: str | None,
         metadata_snap: bool, yes: bool) -> None:
    """Dump metadata as thin_dump's XML (byte for byte) or as JSON.

    \b
      thinpool dump demo > demo.xml
      thinpool dump demo --format json --dev-id vol0
    """
    from thinpool.tools.dump import JsonEmitter, XmlEmitter
    from thinpool.tools.dump import dump as run_dump
    if out:
        refuse_pool_file(session, out, "the dump output")
    with source(session, target, metadata_snap) as src:
        ids = [src.dev_id(d) for d in dev_ids] or None
        with _reader(src, metadata_snap) as reader:
            buf = io.StringIO()
            total = len(ids) if ids else len(reader.roots())
            with output.count_progress(total, "dumping", "devices") as bar:
                run_dump(reader, (XmlEmitter if fmt == "xml" else JsonEmitter)(buf), ids,
                         progress=bar.advance)
    text = buf.getvalue()
    if out:
        confirm_overwrite(out, yes, " with the dump")
        data = text.encode()
        with replacing(out) as fd:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
    else:
        output.write_text(text)


@cli.command()
@click.option("-i", "--input", "input_", required=True, type=click.Path(dir_okay=False),
              help="A dump: thin_dump XML or thinpool JSON.")
@click.option("-o", "--output", "output_", required=True,
              help="Metadata file or device to write (a new file is made sparse).")
@click.option("--metadata-size", type=SIZE, help="Size for a new output file [default: enough].")
@click.option("--yes", "-y", is_flag=True, help="Overwrite an existing output without asking.")
@pass_session
def restore(session: Session, input_: str, output_: str, metadata_size: int | None,
            yes: bool) -> None:
    """Write fresh metadata from a dump; trees are built bottom up.

    An existing output that is not empty is overwritten only after a yes on the terminal (or
    with --yes); a pool's own files are refused as the output.

    \b
      thinpool restore -i demo.xml -o /tmp/meta.img
    """
    from thinpool.metadata.block import create_metadata_file
    from thinpool.tools.restore import parse_dump
    from thinpool.tools.restore import restore as run_restore
    if _is_pool(session, output_):
        raise InvalidArgument(f"{output_!r} is a pool; restore writes a metadata file or device "
                              f"(give a path)")
    refuse_pool_file(session, output_, "the restore output")
    if metadata_size is not None:
        from thinpool.creation import check_metadata_size
        check_metadata_size(metadata_size)
    img = parse_dump(input_)
    confirm_overwrite(output_, yes, " with the restored metadata")
    with removed_on_failure(output_):
        if not os.path.exists(output_):
            size = metadata_size or max(4 << 20, 64 * img.nr_mappings
                                        + 64 * len(img.devices) * 4096
                                        + (img.nr_data_blocks // 16320 + 8) * 8192)
            try:
                create_metadata_file(output_, size)
            except OSError as e:
                raise os_error(e, output_, "create") from None
        from thinpool.locking import lock_metadata
        with lock_metadata(output_):         # never under a pool that has it open
            run_restore(img, output_)
    output.echo(f"restored {len(img.devices)} device(s) and {img.nr_mappings} mapping(s) to {output_}")


# -- ls --------------------------------------------------------------------------------------
@cli.command(name="ls")
@click.argument("target")
@click.option("-o", "--format", "fields", help="Comma-separated fields (thin_ls's, plus NAME on a pool).")
@click.option("--no-headers", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="Every field as JSON.")
@META_SNAP
@pass_session
def ls(session: Session, target: str, fields: str | None, no_headers: bool, as_json: bool,
       metadata_snap: bool) -> None:
    """List thin devices with thin_ls's fields.

    Fields: DEV NAME MAPPED_BLOCKS EXCLUSIVE_BLOCKS SHARED_BLOCKS HIGHEST_BLOCK, the _SECTORS and
    _BYTES forms, MAPPED EXCLUSIVE SHARED (human units), TRANSACTION CREATE_TIME SNAP_TIME.

    \b
      thinpool ls demo
      thinpool ls demo -o NAME,MAPPED,EXCLUSIVE,SHARED
    """
    from thinpool.snapshot.accounting import (
        DEFAULT_LS_FIELDS,
        LS_FIELDS,
        device_usage,
        format_grid,
        ls_value,
    )
    with source(session, target, metadata_snap) as src:
        names = src.names()
        with _reader(src, metadata_snap) as reader:
            usage = device_usage(reader)
            block_sectors = reader.view.data_block_size
    known = LS_FIELDS + ("NAME",)
    if fields:
        chosen = [f.strip().upper() for f in fields.split(",") if f.strip()]
        bad = [f for f in chosen if f not in known]
        if bad:
            raise InvalidArgument(f"unknown field(s) {', '.join(bad)}; choose from {', '.join(known)}")
    else:
        chosen = list(DEFAULT_LS_FIELDS)
        if names:
            chosen.insert(1, "NAME")

    def value(u, f):
        return names.get(u.dev_id, "-") if f == "NAME" else ls_value(u, f, block_sectors)

    if as_json:
        output.emit_json([{f.lower(): value(u, f) for f in (known if not fields else chosen)}
                          for u in usage])
        return
    rows = [[value(u, f) for f in chosen] for u in usage]
    output.write_text(format_grid(rows, None if no_headers else chosen))


# -- delta -----------------------------------------------------------------------------------
@cli.command()
@click.argument("target")
@click.option("--snap1", "--thin1", "left", required=True, help="First device: name or id.")
@click.option("--snap2", "--thin2", "right", required=True, help="Second device: name or id.")
@click.option("--format", "fmt", type=click.Choice(["xml", "json"]), default="xml", show_default=True)
@click.option("--verbose", is_flag=True, help="Ranges with their data blocks.")
@META_SNAP
@pass_session
def delta(session: Session, target: str, left: str, right: str, fmt: str, verbose: bool,
          metadata_snap: bool) -> None:
    """Show what differs between two devices, as thin_delta does.

    \b
      thinpool delta demo --snap1 vol0 --snap2 snap0
    """
    from thinpool.snapshot.delta import delta as run_delta
    from thinpool.snapshot.delta import delta_xml
    with source(session, target, metadata_snap) as src:
        a, b = src.dev_id(left), src.dev_id(right)
        with _reader(src, metadata_snap) as reader:
            runs = run_delta(reader, a, b, verbose)
            text = delta_xml(reader, a, b, runs, verbose) if fmt == "xml" else None
    if text is not None:
        output.write_text(text)
    else:
        output.emit_json({"left": a, "right": b, "runs": [r.as_dict() for r in runs]})


# -- trim ------------------------------------------------------------------------------------
@cli.command()
@click.argument("pool_target", metavar="POOL", type=POOL)
@click.option("--json", "as_json", is_flag=True)
@pass_session
def trim(session: Session, pool_target: Target, as_json: bool) -> None:
    """Give the host back the space of every free data block (holes in a data file).

    \b
      thinpool trim demo
    """
    from thinpool.tools.trim import trim as run_trim
    with session.pool(pool_target.pool, write=True) as pool:
        result = run_trim(pool)
        bs = pool.block_size
    if as_json:
        output.emit_json({**result.as_dict(), "block_size": bs})
        return
    freed = "" if result.bytes_released is None else f"; the host got {format_size(result.bytes_released)} back"
    output.echo(f"trimmed {result.free_blocks} free block(s) ({format_size(result.free_blocks * bs)}) "
                f"in {result.runs} run(s){freed}")
    if not result.supported:
        output.warn("the data device could not release some space (no hole punching or discard)")


# -- metadata-size ---------------------------------------------------------------------------
@cli.command(name="metadata-size")
@click.option("-b", "--block-size", type=SIZE, required=True)
@click.option("-s", "--pool-size", type=SIZE, required=True)
@click.option("-m", "--max-thins", type=click.IntRange(min=1), required=True)
@click.option("--json", "as_json", is_flag=True)
def metadata_size(block_size: int, pool_size: int, max_thins: int, as_json: bool) -> None:
    """Estimate the metadata a pool needs (thin_metadata_size's figure).

    \b
      thinpool metadata-size --block-size 64K --pool-size 1T --max-thins 100
    """
    from thinpool.tools.metadata_size import estimate_metadata_size
    size = estimate_metadata_size(block_size, pool_size, max_thins)
    if as_json:
        output.emit_json({"metadata_size": size, "block_size": block_size, "pool_size": pool_size,
                          "max_thins": max_thins})
    else:
        output.line(f"{format_size(size)} ({size} bytes) of metadata for a {format_size(pool_size)} "
                    f"pool of {format_size(block_size)} blocks and up to {max_thins} thin devices")


# -- metadata-snap ---------------------------------------------------------------------------
@cli.command(name="metadata-snap")
@click.argument("action", type=click.Choice(["reserve", "release"]))
@click.argument("pool_target", metavar="POOL", type=POOL)
@pass_session
def metadata_snap(session: Session, action: str, pool_target: Target) -> None:
    """Hold (reserve) or drop (release) a metadata snapshot for consistent reads of a live pool.

    \b
      thinpool metadata-snap reserve demo
      thinpool dump -m demo > demo-at-snapshot.xml
      thinpool metadata-snap release demo
    """
    with session.pool(pool_target.pool, write=True) as pool:
        if action == "reserve":
            block = pool.reserve_metadata_snap()
            output.echo(f"holding a metadata snapshot of pool {pool_target.pool} at block {block}")
        else:
            pool.release_metadata_snap()
            output.echo(f"released the metadata snapshot of pool {pool_target.pool}")
