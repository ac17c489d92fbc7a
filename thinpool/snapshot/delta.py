"""Delta between two thin devices: which virtual blocks they share, which differ, which only one maps.

Compared by data block only (time is ignored), as ``thin_delta`` does. The result is a list of
runs ``(kind, begin, length, left_data_begin, right_data_begin)`` with kind one of ``same``,
``different``, ``left_only``, ``right_only``. Plain runs merge every stretch of consecutive virtual
blocks of one kind; verbose runs also require the data blocks to continue (thin_delta
``--verbose``). :func:`delta_xml` renders either form byte-for-byte as thin_delta 0.9.0 does.

Cost: both devices' mappings as numpy arrays; O(n log n) for the merge, vectorised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import NotFound
from ..metadata import format as fmt
from ..metadata.walker import MetadataReader

KINDS = ("same", "different", "left_only", "right_only")


@dataclass
class Run:
    kind: str
    begin: int
    length: int
    left_data: int | None
    right_data: int | None

    def as_dict(self) -> dict:
        return {"kind": self.kind, "begin": self.begin, "length": self.length,
                "left_data_begin": self.left_data, "right_data_begin": self.right_data}


def _arrays(reader: MetadataReader, roots: dict[int, int], dev: int):
    if dev not in roots:
        raise NotFound(f"no thin device {dev} in the metadata")
    keys, vals = reader.device_arrays(roots[dev])
    return keys.astype(np.int64), (vals >> np.uint64(fmt.TIME_BITS)).astype(np.int64)


def delta(reader: MetadataReader, left: int, right: int, verbose: bool = False) -> list[Run]:
    roots = reader.roots()
    lk, ld = _arrays(reader, roots, left)
    rk, rd = _arrays(reader, roots, right)
    keys = np.union1d(lk, rk)
    if not len(keys):
        return []
    li = np.searchsorted(lk, keys)
    ri = np.searchsorted(rk, keys)
    in_l = (li < len(lk)) & (lk[np.minimum(li, max(len(lk) - 1, 0))] == keys) if len(lk) else np.zeros(len(keys), bool)
    in_r = (ri < len(rk)) & (rk[np.minimum(ri, max(len(rk) - 1, 0))] == keys) if len(rk) else np.zeros(len(keys), bool)
    lval = np.where(in_l, ld[np.minimum(li, max(len(ld) - 1, 0))] if len(ld) else -1, -1)
    rval = np.where(in_r, rd[np.minimum(ri, max(len(rd) - 1, 0))] if len(rd) else -1, -1)
    kind = np.where(in_l & in_r, np.where(lval == rval, 0, 1), np.where(in_l, 2, 3))
    brk = (np.diff(keys) != 1) | (np.diff(kind) != 0)
    if verbose:
        lstep = np.diff(lval) != 1
        rstep = np.diff(rval) != 1
        k1 = kind[1:]
        brk |= np.where(k1 == 3, rstep, lstep) | ((k1 == 1) & rstep)
    starts = np.concatenate([[0], np.flatnonzero(brk) + 1])
    ends = np.concatenate([starts[1:], [len(keys)]])
    runs = []
    for a, z in zip(starts.tolist(), ends.tolist()):
        k = int(kind[a])
        runs.append(Run(KINDS[k], int(keys[a]), z - a,
                        int(lval[a]) if in_l[a] else None, int(rval[a]) if in_r[a] else None))
    if not verbose:
        runs = _merge_adjacent(runs)
    return runs


def _merge_adjacent(runs: list[Run]) -> list[Run]:
    out: list[Run] = []
    for r in runs:
        if out and out[-1].kind == r.kind and out[-1].begin + out[-1].length == r.begin:
            out[-1].length += r.length
        else:
            out.append(r)
    return out


def delta_xml(reader: MetadataReader, left: int, right: int, runs: list[Run], verbose: bool) -> str:
    v = reader.view
    snap = f' metadata_snap="{v.metadata_snap}"' if v.metadata_snap else ""
    lines = [f'<superblock uuid="" time="{v.time}" transaction="{v.trans_id}" '
             f'data_block_size="{v.data_block_size}" nr_data_blocks="{reader.nr_data_blocks}"{snap}>',
             f'  <diff left="{left}" right="{right}">']
    if not verbose:
        for r in runs:
            lines.append(f'    <{r.kind} begin="{r.begin}" length="{r.length}"/>')
    else:
        open_kind = None
        for r in runs:
            if r.kind != open_kind:
                if open_kind:
                    lines.append(f"    </{open_kind}>")
                lines.append(f"    <{r.kind}>")
                open_kind = r.kind
            if r.kind == "different":
                lines.append(f'      <range begin="{r.begin}" left_data_begin="{r.left_data}" '
                             f'right_data_begin="{r.right_data}" length="{r.length}"/>')
            else:
                d = r.right_data if r.kind == "right_only" else r.left_data
                lines.append(f'      <range begin="{r.begin}" data_begin="{d}" length="{r.length}"/>')
        if open_kind:
            lines.append(f"    </{open_kind}>")
    lines += ["  </diff>", "</superblock>"]
    return "\n".join(lines) + "\n"
