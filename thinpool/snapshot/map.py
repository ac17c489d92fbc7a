"""A volume's allocation map and the byte ranges in which two volumes differ, in bytes.

* :func:`volume_map` is ``qemu-img map --output=json`` for a thin device: extents covering
  ``[0, size)`` in order, with no gaps and no overlaps. An unmapped stretch reads as zeros and is
  ``present: false, zero: true, data: false`` with no offset; a mapped one is ``present: true,
  zero: false, data: true`` with ``offset`` the byte offset of its first byte in the pool's data
  device (data block times block size) and ``shared``: whether another device (any device of the
  pool, including ones without a name) maps the same data block. The sharing rule is the one of
  :mod:`.accounting` (``thin_ls``): a data block is shared when it occurs more than once among
  every device's mappings. Neighbouring mapped blocks form one extent only when they are
  consecutive in the volume and in the data device and have the same ``shared``; neighbouring
  holes always merge. The last extent ends at ``size`` even when it is not a whole block.
  ``depth`` is always 0 (a thin device has no backing chain: a snapshot's blocks are its own
  mappings).
* :func:`volume_diff` is ``rbd diff --format json`` between two devices: the byte ranges whose
  content may differ, from the mappings alone (no data is read), by the rule ``thin_delta`` and
  :mod:`.delta` use: a virtual block is the same when both map it to one data block or neither
  maps it; otherwise it is in the diff. ``exists`` says whether the second device maps data
  there (so also true where both map different blocks); ranges touching each other with the same
  ``exists`` are merged. Ranges are clipped to ``limit`` bytes. Every byte outside the result
  reads the same on both devices.

Both only read (a :class:`~thinpool.metadata.walker.MetadataReader`, the committed metadata);
they raise :class:`~thinpool.errors.NotFound` for a device id that is not in the metadata and
:class:`~thinpool.errors.CorruptBlock` (a MetadataError) for trees the walker refuses.

Costs: :func:`volume_map` walks every device's mapping tree (the sharing rule needs them all):
O(total mappings) memory and O(m log m) time; :func:`volume_diff` walks the two devices' trees.
Python work is per extent, the rest is vectorised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidArgument, NotFound
from ..metadata import format as fmt
from ..metadata.walker import MetadataReader
from .accounting import shared_mask
from .delta import delta


@dataclass(frozen=True)
class Extent:
    """One run of :func:`volume_map`, in bytes. ``offset``/``shared`` are None for holes."""

    start: int
    length: int
    data: bool
    offset: int | None = None
    shared: bool | None = None

    def as_dict(self) -> dict:
        """qemu-img map's JSON object (plus ``shared`` for mapped extents)."""
        d = {"start": self.start, "length": self.length, "depth": 0, "present": self.data,
             "zero": not self.data, "data": self.data}
        if self.data:
            d["offset"] = self.offset
            d["shared"] = self.shared
        return d


@dataclass(frozen=True)
class DiffRange:
    """One range of :func:`volume_diff`, in bytes."""

    offset: int
    length: int
    exists: bool

    def as_dict(self) -> dict:
        return {"offset": self.offset, "length": self.length, "exists": self.exists}


def _blocks(reader: MetadataReader, root: int) -> tuple[np.ndarray, np.ndarray]:
    keys, vals = reader.device_arrays(root)
    return keys.astype(np.int64), (vals >> np.uint64(fmt.TIME_BITS)).astype(np.int64)


def _check(size: int, block_size: int) -> None:
    if size < 0 or block_size <= 0:
        raise InvalidArgument(f"bad size {size} or block size {block_size}")


def volume_map(reader: MetadataReader, dev_id: int, size: int, block_size: int) -> list[Extent]:
    """Extents covering ``[0, size)`` of device ``dev_id`` (see the module docstring)."""
    _check(size, block_size)
    roots = reader.roots()
    if dev_id not in roots:
        raise NotFound(f"no thin device {dev_id} in the metadata")
    every = {dev: _blocks(reader, root) for dev, root in roots.items()}
    keys, data = every[dev_id]
    inside = keys * block_size < size
    keys, data = keys[inside], data[inside]
    shared = shared_mask(data, [d for _, d in every.values()])
    out: list[Extent] = []
    at = 0                                   # bytes covered so far
    if len(keys):
        brk = (np.diff(keys) != 1) | (np.diff(data) != 1) | (shared[1:] != shared[:-1])
        starts = np.concatenate([[0], np.flatnonzero(brk) + 1])
        ends = np.concatenate([starts[1:], [len(keys)]])
        for a, z in zip(starts.tolist(), ends.tolist()):
            begin = int(keys[a]) * block_size
            end = min((int(keys[z - 1]) + 1) * block_size, size)
            if begin > at:
                out.append(Extent(at, begin - at, False))
            out.append(Extent(begin, end - begin, True, int(data[a]) * block_size,
                              bool(shared[a])))
            at = end
    if size > at:
        out.append(Extent(at, size - at, False))
    return out


def volume_diff(reader: MetadataReader, a: int, b: int, limit: int,
                block_size: int) -> list[DiffRange]:
    """Byte ranges (below ``limit``) whose content may differ between devices ``a`` and ``b``."""
    _check(limit, block_size)
    out: list[DiffRange] = []
    for r in delta(reader, a, b):
        if r.kind == "same":
            continue
        begin = r.begin * block_size
        end = min((r.begin + r.length) * block_size, limit)
        if end <= begin:
            continue
        exists = r.kind in ("different", "right_only")
        if out and out[-1].exists == exists and out[-1].offset + out[-1].length == begin:
            out[-1] = DiffRange(out[-1].offset, end - out[-1].offset, exists)
        else:
            out.append(DiffRange(begin, end - begin, exists))
    return out
