"""Check a pool directory's own records: what ``thinpool check POOL`` adds to the metadata check.

The metadata check (check.py) looks at the dm-thin metadata only. A pool is more than that, and
a command that fails on one of the other parts must never send the admin to a check that says
"clean". :func:`check_records` reports, as :class:`~thinpool.tools.check.Finding` objects of
structure ``pool records`` (each naming its file and what to do):

* each copy of ``pool.json`` and of the names (``names.json``, ``names.copy.json``) that is
  missing or damaged (records.py); every copy of the names gone; volumes whose names were made
  up when they were lost (``guessed``);
* names whose device is not in the metadata, and devices with no name;
* a data device shorter than the metadata's ``nr_data_blocks`` says;
* as notes (severity ``info``, not problems): a pending operation the next writer's open
  settles, copies that differ after an interrupted write, the needs-check marker (damage.py),
  which a clean check clears.

Reads only: nothing is written, locked or created. Costs: the records' small files, the
superblock and the two top-level trees of the metadata. Damaged metadata is not reported here
(check.py does that): when the trees cannot be read, names are not compared with devices.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import damage
from ..config import read_config
from ..errors import ThinpoolError
from ..metadata import format as fmt
from ..metadata.block import device_size
from ..metadata.walker import MetadataReader
from ..paths import CONFIG_NAME, NAMES_NAME
from ..registry import Registry
from ..units import format_size
from .check import Finding

STRUCTURE = "pool records"
#: The kind of the note about the needs-check marker (a clean check clears the marker).
MARKER_KIND = "needs-check marker"


def _error(message: str) -> Finding:
    return Finding("pool records", message, structure=STRUCTURE)


def _note(message: str) -> Finding:
    return Finding("pool records", message, structure=STRUCTURE, severity="info")


def check_records(pool_dir) -> list[Finding]:
    """Every problem with the records of the pool in ``pool_dir`` (see the module docstring)."""
    pool_dir = Path(pool_dir)
    name = pool_dir.name
    out: list[Finding] = []
    again = f"the next command that writes to pool {name} rewrites it from the other copy"
    try:
        conf = read_config(pool_dir)
    except ThinpoolError as e:
        out.append(_error(str(e)))
        cfg = None
    else:
        cfg = conf.doc
        for p in conf.problems:
            out.append(_error(f"pool configuration: {p}; {again}"))
        if conf.differs:
            out.append(_note(f"the two copies of the pool configuration differ (a write was "
                             f"interrupted); {CONFIG_NAME} is used and the next write rewrites both"))
    marker = damage.read(pool_dir)
    if marker is not None:
        out.append(Finding(MARKER_KIND, f"pool {name} is marked for a check ({damage.marker_path(pool_dir)}): "
                           f"{marker}; writes are refused until a check finds the pool clean",
                           structure=STRUCTURE, severity="info"))
    if cfg is None:
        return out
    mpath, dpath = pool_dir / cfg["metadata"], pool_dir / cfg["data"]
    devices, sb = _metadata_devices(mpath)
    out += _data_size(name, dpath, sb)
    out += _names(name, pool_dir / NAMES_NAME, devices, again)
    return out


def _metadata_devices(mpath: Path) -> tuple[set[int] | None, fmt.Superblock | None]:
    """(device ids, superblock) of the metadata; None for what cannot be read."""
    try:
        with MetadataReader(mpath) as reader:
            sb = reader.sb
            try:
                return set(reader.roots()) | set(reader.details()), sb
            except ThinpoolError:
                return None, sb
    except (ThinpoolError, OSError):
        return None, None


def _data_size(name: str, dpath: Path, sb: fmt.Superblock | None) -> list[Finding]:
    if sb is None:
        return []
    bs = sb.data_block_size * fmt.SECTOR_SIZE
    need = sb.data_sm.nr_blocks * bs
    if not os.path.exists(dpath):
        return [_error(f"the data device {dpath} is missing; the metadata maps "
                       f"{sb.data_sm.nr_blocks} blocks of {format_size(bs)} on it "
                       f"({need} bytes): put it back (restore it from a backup)")]
    try:
        size = device_size(dpath)
    except ThinpoolError as e:
        return [_error(f"the data device {dpath} cannot be examined: {e}")]
    if size >= need:
        return []
    return [_error(f"the data device {dpath} is {format_size(size)} ({size} bytes) but the "
                   f"metadata describes {sb.data_sm.nr_blocks} blocks of {format_size(bs)}, which "
                   f"need {format_size(need)} ({need} bytes): it was cut short or replaced. If it "
                   f"was cut short, grow it back to {need} bytes (for a file: 'truncate -s {need} "
                   f"{dpath}'); what was cut off reads as zeros, so restore that part from a "
                   f"backup if you have one; then run 'thinpool check {name}' again")]


def _names(name: str, path: Path, devices: set[int] | None, again: str) -> list[Finding]:
    reg = Registry.load(str(path))
    out = []
    if reg.lost:
        out.append(_error(f"every copy of the names is gone ({'; '.join(map(str, reg.problems))})"
                          f": the volumes' names, sizes and origins are lost; commands show the "
                          f"devices by their ids; name them again with 'thinpool rename "
                          f"{name}/ID NAME' and 'thinpool resize {name}/NAME --size SIZE' "
                          f"(README: 'Lost names')"))
        return out
    for p in reg.problems:
        out.append(_error(f"names: {p}; the names are read from {reg.source}; {again}"))
    if reg.behind:
        out.append(_note("the two copies of the names differ (a write was interrupted); "
                         f"{reg.source} is used and the next write rewrites both"))
    if reg.pending is not None:
        p = reg.pending
        out.append(_note(f"an interrupted {p['op']} of {p['name']!r} is pending; the next "
                         f"command that writes to pool {name} finishes or undoes it"))
    for vol in reg.guessed():
        e = reg.volumes[vol]
        out.append(_error(f"volume {vol!r} (device {e.dev_id}) has a made-up name and size "
                          f"(the names were lost); name it with 'thinpool rename {name}/{vol} "
                          f"NAME' and size it with 'thinpool resize {name}/NAME --size SIZE'"))
    if devices is None:
        return out
    pending = reg.pending
    settled = {pending["dev_id"]} if pending is not None else set()
    named = {e.dev_id: n for n, e in reg.volumes.items()}
    for dev in sorted(devices - set(named) - settled):
        out.append(_error(f"device {dev} has no name in {path}; commands show it as {dev!r} "
                          f"(name it with 'thinpool rename {name}/{dev} NAME')"))
    for dev in sorted(set(named) - devices - settled):
        out.append(_error(f"volume {named[dev]!r} is named in {path} but its device {dev} is not "
                          f"in the metadata: its data is gone; the next command that writes to "
                          f"pool {name} drops the name"))
    return out
