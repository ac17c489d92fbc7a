"""Space accounting per thin device: mapped, exclusive and shared blocks, highest mapped block.

A device's block is *exclusive* when its data block is mapped exactly once across all devices
(what ``thin_ls`` calls EXCLUSIVE_BLOCKS); the rest of its mappings are *shared*. Counting is
done per mapping, with numpy over every device's data-block array (sorted together, the blocks
that occur once picked out), not from the data space map, so it is right even where a shared leaf
has not been copied yet.

Cost: one walk of every device's mapping tree, O(total mappings) memory for the block arrays and
O(m log m) time for m mappings; nothing in proportion to the pool's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import MetadataError
from ..metadata import format as fmt
from ..metadata.walker import MetadataReader


@dataclass
class DeviceUsage:
    dev_id: int
    mapped_blocks: int          # from the device details, as thin_ls reports it
    exclusive_blocks: int
    shared_blocks: int
    highest_block: int | None   # highest mapped virtual block, None when nothing is mapped
    transaction: int
    creation_time: int
    snap_time: int


def device_usage(reader: MetadataReader) -> list[DeviceUsage]:
    """One row per device of the details tree, in id order. A device whose mapping tree is
    missing from the top-level tree is damage: MetadataError (``thin_ls`` refuses it too)."""
    details = reader.details()
    roots = reader.roots()
    orphans = sorted(set(details) - set(roots))
    if orphans:
        raise MetadataError(f"device {orphans[0]} has details but no mapping tree")
    blocks: dict[int, np.ndarray] = {}
    highest: dict[int, int | None] = {}
    for dev, root in sorted(roots.items()):
        keys, vals = reader.device_arrays(root)
        blocks[dev] = (vals >> np.uint64(fmt.TIME_BITS)).astype(np.int64)
        highest[dev] = int(keys[-1]) if len(keys) else None
    once = _mapped_once(list(blocks.values()))
    out = []
    for dev in sorted(details):
        d = details[dev]
        b = blocks.get(dev, np.zeros(0, np.int64))
        excl = _count_in(b, once)
        out.append(DeviceUsage(dev, d.mapped_blocks, excl, d.mapped_blocks - excl, highest.get(dev),
                               d.transaction_id, d.creation_time, d.snapshotted_time))
    return out


def _mapped_once(parts: list[np.ndarray]) -> np.ndarray:
    """The data blocks that occur exactly once in all of ``parts``, sorted. By sorting: memory and
    time follow the number of mappings, never the highest block number (a ``bincount`` over a
    15 TiB pool's block numbers would be 2 GB)."""
    every = np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
    if len(every) < 2:
        return every
    new = np.concatenate(([True], every[1:] != every[:-1]))
    last = np.concatenate((every[1:] != every[:-1], [True]))
    return every[new & last]


def shared_mask(blocks: np.ndarray, parts: list[np.ndarray]) -> np.ndarray:
    """For each data block in ``blocks``: True when it is *shared* by the rule above (it occurs
    more than once in all of ``parts``, every device's data blocks, ``blocks`` among them)."""
    once = _mapped_once(parts)
    if not len(blocks) or not len(once):
        return np.ones(len(blocks), bool)
    pos = np.minimum(np.searchsorted(once, blocks), len(once) - 1)
    return once[pos] != blocks


def _count_in(values: np.ndarray, sorted_set: np.ndarray) -> int:
    """How many of ``values`` are in ``sorted_set`` (not ``np.isin``: it may import numpy.ma)."""
    if not len(values) or not len(sorted_set):
        return 0
    pos = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return int(np.count_nonzero(sorted_set[pos] == values))


def thin_ls_size(sectors: int) -> str:
    """Human size exactly as thin_ls 0.9.0 prints it: whole numbers, KiB/MiB/... with no space,
    staying in a smaller unit up to 8 of the next (``5120KiB``, ``125MiB``)."""
    n = sectors * 512
    i = 0
    while n > 1024 * 1024:
        n //= 1024
        i += 1
    if n > 8 * 1024:
        n = int(n / 1024 + 0.5)
        i += 1
    return f"{n}{['', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'][i]}"


LS_FIELDS = ("DEV", "MAPPED_BLOCKS", "EXCLUSIVE_BLOCKS", "SHARED_BLOCKS", "HIGHEST_BLOCK",
             "MAPPED_SECTORS", "EXCLUSIVE_SECTORS", "SHARED_SECTORS", "HIGHEST_SECTOR",
             "MAPPED_BYTES", "EXCLUSIVE_BYTES", "SHARED_BYTES",
             "MAPPED", "EXCLUSIVE", "SHARED", "TRANSACTION", "CREATE_TIME", "SNAP_TIME")
DEFAULT_LS_FIELDS = ("DEV", "MAPPED", "CREATE_TIME", "SNAP_TIME")


def ls_value(u: DeviceUsage, name: str, block_sectors: int):
    """One thin_ls field of a device: an int, or a string for the human-unit fields."""
    per = {"MAPPED": u.mapped_blocks, "EXCLUSIVE": u.exclusive_blocks, "SHARED": u.shared_blocks}
    if name == "DEV":
        return u.dev_id
    if name in ("TRANSACTION", "CREATE_TIME", "SNAP_TIME"):
        return {"TRANSACTION": u.transaction, "CREATE_TIME": u.creation_time,
                "SNAP_TIME": u.snap_time}[name]
    if name == "HIGHEST_BLOCK":
        return -1 if u.highest_block is None else u.highest_block
    if name == "HIGHEST_SECTOR":
        return -1 if u.highest_block is None else u.highest_block * block_sectors
    base, _, unit = name.partition("_")
    blocks = per[base]
    if unit == "BLOCKS":
        return blocks
    if unit == "SECTORS":
        return blocks * block_sectors
    if unit == "BYTES":
        return blocks * block_sectors * 512
    return thin_ls_size(blocks * block_sectors)


def format_grid(rows: list[list], header: list[str] | None) -> str:
    """thin_ls's table: every cell right-aligned to its column and followed by one space."""
    cells = [[str(c) for c in r] for r in rows]
    all_rows = ([header] if header else []) + cells
    if not all_rows:
        return ""
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(all_rows[0]))]
    return "".join("".join(c.rjust(w) + " " for c, w in zip(r, widths)) + "\n" for r in all_rows)
