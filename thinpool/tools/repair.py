"""Repair: rebuild clean metadata from everything still readable in damaged metadata.

Reads the input only (it is opened read-only and never written). What survives:

* the superblock's fields, as long as block 0 still has the dm-thin magic (a bad checksum is
  tolerated and reported);
* every device that the top-level tree or the details tree still names, with the details that can
  be read (missing details are rebuilt: transaction id and times from the superblock);
* every mapping in every readable leaf of each device's tree, where the key lies inside the range
  its parent gave it, keys increase and the data block is inside the data device. A node that
  fails validation loses only the mappings below it.

The result is written with :func:`thinpool.tools.restore.restore`: fresh trees built bottom up
and fresh space maps (a device's leaves are no longer shared with its snapshots; their data
blocks are counted once per mapping). Returns a :class:`RepairReport` saying what was lost.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import CorruptBlock, InvalidArgument, MetadataError
from ..metadata import format as fmt
from ..metadata.block import (NODE_VALIDATOR, SUPERBLOCK_VALIDATOR, BlockManager,
                              create_metadata_file, device_size)
from ..metadata.btree import Node
from .restore import DeviceImage, DumpImage, restore


@dataclass
class RepairReport:
    devices: int = 0
    mappings: int = 0
    lost: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"devices": self.devices, "mappings": self.mappings, "lost": self.lost}


def _salvage(bm: BlockManager, root: int, dtype: np.dtype, what: str, lost: list[str],
             visited: set[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every (key, value) still readable below ``root``, in key order."""
    keys_out: list[np.ndarray] = []
    vals_out: list[np.ndarray] = []
    stack = [(root, 0, None, 0)]
    while stack:
        b, lo, hi, depth = stack.pop()
        if depth > 16:
            lost.append(f"{what}: block {b}: tree deeper than 16 levels (a cycle?)")
            continue
        try:
            n = Node(b, bm.read(b, NODE_VALIDATOR), dtype)
        except (CorruptBlock, MetadataError) as e:
            lost.append(f"{what}: {e}")
            continue
        keys = n.keys[: n.nr].astype(np.int64)
        ok = (keys >= lo) & (True if hi is None else keys < hi)
        if n.nr > 1:
            inc = np.concatenate([[True], np.diff(keys) > 0])
            ok &= inc
        if not ok.all():
            lost.append(f"{what}: block {b}: {int((~ok).sum())} entries out of order or range dropped")
        idx = np.flatnonzero(ok)
        if n.is_leaf:
            keys_out.append(n.keys[idx].copy())
            vals_out.append(n.values[idx].copy())
            continue
        kids = [(int(n.values[i]), int(n.keys[i]),
                 int(n.keys[idx[j + 1]]) if j + 1 < len(idx) else hi) for j, i in enumerate(idx)]
        for child, clo, chi in reversed(kids):
            if child >= bm.nr_blocks:
                lost.append(f"{what}: block {b} points past the end of the device (block {child})")
                continue
            stack.append((child, clo, chi, depth + 1))
    if not keys_out:
        return np.zeros(0, fmt.U64), np.zeros(0, dtype)
    return np.concatenate(keys_out), np.concatenate(vals_out)


def salvage(path) -> tuple[DumpImage, RepairReport]:
    """Read what can be read of the metadata at ``path`` into the dump intermediate form."""
    bm = BlockManager(path, read_only=True, cache_blocks=64)
    report = RepairReport()
    try:
        if bm.nr_blocks == 0:
            raise MetadataError(f"{path} is empty")
        raw = bm.read_raw(0)
        try:
            SUPERBLOCK_VALIDATOR.check(raw, 0)
        except CorruptBlock as e:
            report.lost.append(f"superblock: {e.check} (its fields are used anyway)")
        sb = fmt.Superblock.unpack(raw)
        if sb.magic != fmt.THIN_MAGIC:
            raise MetadataError(f"{path}: the superblock is gone (no dm-thin magic); nothing to repair from")
        dbs = sb.data_block_size
        if not (128 <= dbs <= 2097152 and dbs % 128 == 0):
            raise MetadataError(f"{path}: the superblock's data block size {dbs} is damaged")
        nr_data = sb.data_sm.nr_blocks
        dkeys, dvals = _salvage(bm, sb.device_details_root, fmt.DETAILS_DTYPE, "device details", report.lost)
        details = {int(k): v for k, v in zip(dkeys.tolist(), dvals)}
        tkeys, tvals = _salvage(bm, sb.data_mapping_root, fmt.U64, "top-level tree", report.lost)
        roots = {int(k): int(v) for k, v in zip(tkeys.tolist(), tvals.tolist())}
        img = DumpImage(time=sb.time & fmt.TIME_MASK, transaction=sb.trans_id, flags=0,
                        version=sb.version if sb.version in fmt.SUPPORTED_VERSIONS else 2,
                        data_block_size=dbs, nr_data_blocks=nr_data)
        for dev in sorted(set(details) | set(roots)):
            if dev > fmt.MAX_DEV_ID:
                report.lost.append(f"device id {dev} is out of range; dropped")
                continue
            d = details.get(dev)
            if d is None:
                report.lost.append(f"device {dev}: details lost; rebuilt from the superblock")
                dimg = DeviceImage(dev, sb.trans_id, sb.time & fmt.TIME_MASK, sb.time & fmt.TIME_MASK)
            else:
                dimg = DeviceImage(dev, int(d["transaction_id"]), int(d["creation_time"]) & fmt.TIME_MASK,
                                   int(d["snapshotted_time"]) & fmt.TIME_MASK)
            if dev in roots and roots[dev] < bm.nr_blocks:
                keys, vals = _salvage(bm, roots[dev], fmt.U64, f"device {dev}", report.lost)
                blocks = vals >> np.uint64(fmt.TIME_BITS)
                good = blocks < np.uint64(nr_data)
                if not good.all():
                    report.lost.append(f"device {dev}: {int((~good).sum())} mappings past the data "
                                       f"device dropped")
                dimg.keys, dimg.values = keys[good], vals[good]
            elif dev in roots:
                report.lost.append(f"device {dev}: mapping tree root {roots[dev]} is past the end")
            else:
                report.lost.append(f"device {dev}: mapping tree lost; kept as an empty device")
            img.devices.append(dimg)
        report.devices = len(img.devices)
        report.mappings = img.nr_mappings
        return img, report
    finally:
        bm.close()


def repair(input_path, output_path) -> RepairReport:
    """Salvage ``input_path`` and write clean metadata to ``output_path`` (never the input)."""
    src, dst = os.path.realpath(input_path), os.path.realpath(output_path)
    if src == dst:
        raise InvalidArgument("repair writes a new metadata device: the output must not be the input")
    img, report = salvage(input_path)
    if not os.path.exists(output_path):
        create_metadata_file(output_path, device_size(input_path))
    restore(img, output_path)
    return report
