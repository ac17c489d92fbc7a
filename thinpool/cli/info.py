"""Read-only commands: stat, list. They open pools with the shared (reader's) lock.

``--json`` prints exact integers: for a pool the keys of ``Pool.stat().as_dict()`` (with
``mode`` the pool's mode, not the read-only handle's: see :func:`pool_stat`); for a volume
the keys of its entry in ``volumes`` plus ``pool`` and ``block_size``; with no argument a list of
pools. The JSON is emitted before any table code runs.
"""

from __future__ import annotations

import click

from thinpool.errors import ThinpoolError
from thinpool.units import format_size

from . import output
from .app import TARGET, Session, Target, cli, get_volume, pass_session
from .report import (Report, pool_keys, pool_row, render, report_options,
                     show_help, volume_rows)


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def pool_stat(pool) -> dict:
    """``pool.stat().as_dict()`` with ``mode`` the pool's own mode.

    These commands open pools read-only, and a read-only handle reports ``read_only``; the admin
    wants the mode a writer would find: ``read_only`` only if the metadata needs a check,
    ``out_of_data_space`` when no data block is free, else ``write``."""
    from thinpool import PoolMode

    st = pool.stat().as_dict()
    if st["needs_check"]:
        mode = PoolMode.READ_ONLY
    elif st["data_blocks_free"] == 0:
        mode = PoolMode.OUT_OF_DATA_SPACE
    else:
        mode = PoolMode.WRITE
    st["mode"] = mode.label
    _add_sharing(pool, st)
    _add_serving(pool, st)
    return pool_keys(st)


def _add_serving(pool, st: dict) -> None:
    """``served`` (the running ``thinpool serve`` of the pool: pid, socket, tcp; or None) and,
    per volume, ``served`` (exported over NBD) and ``attached`` (its loop device, or None)."""
    from thinpool.export.state import read_state

    state = None if pool.path is None else read_state(pool.path)
    st["served"] = None if state is None else {
        "pid": state.get("pid"), "socket": state.get("socket"), "tcp": state.get("tcp"),
        "read_only": state.get("read_only")}
    vols = {} if state is None else {v.get("name"): v for v in state.get("volumes", [])}
    for v in st["volumes"]:
        entry = vols.get(v["name"])
        v["served"] = entry is not None and bool(entry.get("nbd"))
        v["attached"] = None if entry is None else entry.get("attached")


def _add_sharing(pool, st: dict) -> None:
    """Exclusive and shared blocks per volume (as thin_ls counts them): one walk of the trees."""
    from thinpool.metadata.walker import MetadataReader
    from thinpool.snapshot.accounting import device_usage

    with MetadataReader(pool.metadata.bm.path) as reader:
        usage = {u.dev_id: u for u in device_usage(reader)}
    for v in st["volumes"]:
        u = usage.get(v["dev_id"])
        v["exclusive_blocks"] = u.exclusive_blocks if u else 0
        v["shared_blocks"] = u.shared_blocks if u else 0


def _each_pool(session: Session):
    """(name, stat dict) of every pool that opens; a pool that does not is reported on stderr
    and comes back as ``{"name": ..., "error": ..., "exit_code": ...}`` (so ``list --json``
    never drops a pool silently).

    Returns a list and the exit code of the first failure (0 if none)."""
    found, code = [], 0
    for name in session.pool_names():
        try:
            with session.pool(name) as pool:
                found.append(pool_stat(pool))
        except ThinpoolError as e:
            output.error(str(e))
            code = code or e.exit_code
            found.append({"name": name, "error": str(e), "exit_code": e.exit_code})
    return found, code


# -- stat ------------------------------------------------------------------------------------
def _report(kind: str, as_json: bool, **opts) -> Report | None:
    """The report options given, checked before any pool is opened; None for ``-o help``
    (printed here)."""
    report = Report(**opts)
    if report.wants_help:
        show_help(kind)
        return None
    if as_json and report.asked:
        raise click.UsageError("--json prints every key; -o, --units, --nosuffix, "
                               "--noheadings, --separator and --sort shape the table")
    return report


@cli.command()
@click.argument("target", metavar="[POOL[/NAME]]", type=TARGET, required=False)
@click.option("--json", "as_json", is_flag=True, help="Print exact numbers as JSON.")
@report_options
@pass_session
def stat(session: Session, target: Target | None, as_json: bool, **opts) -> int:
    """Show a pool, a volume, or every pool.

    For a pool: a header and a table of its volumes; for a volume: its details. With report
    options (-o, --units, --sort, ...: as lvs has them) only the table, of the volumes of the
    pool, of the one volume, or of every pool's volumes.

    \b
      thinpool stat demo
      thinpool stat demo/vol0
      thinpool stat --json demo
      thinpool stat demo -o name,size,mapped_bytes --units b --noheadings
      thinpool stat demo -o +read_only --sort -mapped_bytes
      thinpool stat -o help
    """
    report = _report("stat", as_json, **opts)
    if report is None:
        return 0
    if target is None:
        pools, code = _each_pool(session)
        if as_json:
            output.emit_json(pools)
            return code
        if report.asked:
            render([r for st in pools if "error" not in st for r in volume_rows(st)],
                   report, "stat")
            return code
        if not pools and not code:
            output.note(f"no pools in {session.home}; make one with "
                        f"'thinpool create POOL --size SIZE'")
        for i, st in enumerate(p for p in pools if "error" not in p):
            if i:
                output.echo()
            _show_pool(st)
        return code
    with session.pool(target.pool) as pool:
        if target.volume is not None:
            get_volume(pool, target)
        st = pool_stat(pool)
    warn_guessed(st)
    if report.asked:
        render([r for r in volume_rows(st)
                if target.volume is None or r["name"] == target.volume], report, "stat")
        return 0
    if target.volume is None:
        if as_json:
            output.emit_json(st)
        else:
            _show_pool(st)
        return 0
    vol = next(v for v in st["volumes"] if v["name"] == target.volume)
    if as_json:
        output.emit_json({"pool": st["name"], "block_size": st["block_size"], **vol})
    else:
        _show_volume(st, vol)
    return 0


def warn_guessed(st: dict) -> None:
    """Loudly, on stderr: volumes whose names were made up because every copy of the names was
    lost, and the commands that name them again."""
    guessed = [v for v in st["volumes"] if v.get("guessed")]
    if not guessed:
        return
    pool = st["name"]
    first = guessed[0]["name"]
    output.warn(f"pool {pool}: the names of {len(guessed)} volume(s) were lost "
                f"({', '.join(v['name'] for v in guessed)} are device ids, their sizes only "
                f"reach their last mapped block and their origins are unknown); name each "
                f"again with 'thinpool rename {pool}/{first} NAME' and give it its size with "
                f"'thinpool resize {pool}/NAME --size SIZE' (README: 'Lost names')")


def _show_pool(st: dict) -> None:
    bs = st["block_size"]
    data_total, data_used = st["data_size"], st["data_used"]
    meta_total, meta_used = st["metadata_size"], st["metadata_used"]
    mode = st["mode"] + (" (needs check)" if st["needs_check"] else "")
    output.fields(f"pool {st['name']}  ({st['path']})", [
        ("block size", format_size(bs)),
        ("data", f"{format_size(data_used)} used of {format_size(data_total)} "
                 f"({_pct(data_used, data_total)})"),
        ("metadata", f"{format_size(meta_used)} used of {format_size(meta_total)} "
                     f"({_pct(meta_used, meta_total)})"),
        ("transaction id", str(st["transaction_id"])),
        ("mode", mode),
        *([("degraded", st["degraded"])] if st.get("degraded") else []),
        *([("served", _served_line(st["served"]))] if st.get("served") else []),
    ])
    if not st["volumes"]:
        output.line("  no volumes")
        return
    fields = "+served" if st.get("served") else None
    render(volume_rows(st), Report(fields=fields), "stat", indent=2)


def _served_line(served: dict) -> str:
    where = served["socket"] + (f" and tcp {served['tcp']}" if served.get("tcp") else "")
    return f"over NBD by thinpool serve (pid {served['pid']}) on {where}"


def _show_volume(st: dict, v: dict) -> None:
    output.fields(f"volume {st['name']}/{v['name']}", [
        ("device id", str(v["dev_id"])),
        ("virtual size", f"{format_size(v['size'])} ({v['size']} bytes)"),
        ("mapped", f"{format_size(v['mapped_bytes'])} in {v['mapped_blocks']} "
                   f"block{'' if v['mapped_blocks'] == 1 else 's'} of {format_size(st['block_size'])} "
                   f"({_pct(min(v['mapped_bytes'], v['size']), v['size'])})"),
        ("exclusive", f"{format_size(v['exclusive_bytes'])} "
                      f"({v['exclusive_blocks']} blocks mapped by no other volume)"),
        ("shared", f"{format_size(v['shared_bytes'])} "
                   f"({v['shared_blocks']} blocks shared with other volumes)"),
        ("origin", v["origin"] or "-"),
        ("served", "over NBD" + (f", attached at {v['attached']}" if v.get("attached") else "")
         if v.get("served") else "no"),
        ("read-only", "yes (writes, discards and resizes are refused; 'thinpool configure "
                      f"{st['name']}/{v['name']} --read-write' makes it writable)"
         if v.get("read_only") else "no"),
        ("creation time", str(v["creation_time"])),
        ("snapshotted time", str(v["snapshotted_time"])),
    ])


# -- list ------------------------------------------------------------------------------------
@cli.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print exact numbers as JSON.")
@report_options
@pass_session
def list_(session: Session, as_json: bool, **opts) -> int:
    """List every pool and its volumes.

    --json prints, for each pool, what 'stat --json POOL' prints (the same keys); the report
    options (-o, --units, --sort, ...: as lvs has them) shape the table.

    \b
      thinpool list
      thinpool list --json
      thinpool list -o name,size,data_used --units g --separator ,
      thinpool list -o help
    """
    report = _report("list", as_json, **opts)
    if report is None:
        return 0
    pools, code = _each_pool(session)
    if as_json:
        output.emit_json(pools)
        return code
    if not pools:
        if not code:
            output.note(f"no pools in {session.home}; make one with "
                        f"'thinpool create POOL --size SIZE'")
        return code
    rows = []
    for st in pools:
        if "error" in st:          # (said on stderr already): a row with its name only
            rows.append({"name": st["name"], "pool": st["name"], "type": "pool",
                         "mode": "does not open"})
            continue
        rows.append(pool_row(st))
        rows.extend(volume_rows(st, full_names=True))
    render(rows, report, "list")
    return code
