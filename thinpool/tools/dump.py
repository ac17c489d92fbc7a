"""Dump pool metadata: one walk, several output forms.

The intermediate form is a stream of events (superblock, device, mapping runs) produced by
:func:`dump` from a :class:`~thinpool.metadata.walker.MetadataReader` and consumed by an emitter:
:class:`XmlEmitter` writes exactly what ``thin_dump`` 0.9.0 writes (byte for byte), and
:class:`JsonEmitter` the same content as one JSON document. ``restore`` reads both forms back.

A run is a maximal stretch of consecutive virtual blocks mapped to consecutive data blocks with
the same time; it is computed with numpy over whole devices, not block by block.
Costs: O(mappings) in numpy passes (the XML lines too, see :mod:`.lines`), O(devices) Python steps.
"""

from __future__ import annotations

import json
from typing import IO, Protocol

import numpy as np

from ..errors import MetadataError, NotFound
from ..metadata import format as fmt
from ..metadata.walker import MetadataReader
from .lines import format_lines


class DumpEmitter(Protocol):
    def superblock(self, sb: dict) -> None: ...

    def device(self, dev: dict) -> None: ...

    def runs(self, begin: np.ndarray, data: np.ndarray, length: np.ndarray, time: np.ndarray) -> None: ...

    def end_device(self) -> None: ...

    def end(self) -> None: ...


def mapping_runs(keys: np.ndarray, values: np.ndarray):
    """Split sorted mappings into runs: (origin_begin, data_begin, length, time) arrays."""
    if len(keys) == 0:
        z = np.zeros(0, np.int64)
        return z, z, z, z
    keys = keys.astype(np.int64)
    data = (values >> np.uint64(fmt.TIME_BITS)).astype(np.int64)
    time = (values & np.uint64(fmt.TIME_MASK)).astype(np.int64)
    brk = np.flatnonzero((np.diff(keys) != 1) | (np.diff(data) != 1) | (np.diff(time) != 0)) + 1
    starts = np.concatenate([[0], brk])
    lengths = np.diff(np.concatenate([starts, [len(keys)]]))
    return keys[starts], data[starts], lengths, time[starts]


def superblock_info(reader: MetadataReader) -> dict:
    view = reader.view
    return {"uuid": "", "time": view.time, "transaction": view.trans_id, "flags": view.flags,
            "version": view.version, "data_block_size": view.data_block_size,
            "nr_data_blocks": reader.nr_data_blocks, "metadata_snap": view.metadata_snap}


def dump(reader: MetadataReader, out: DumpEmitter, dev_ids: list[int] | None = None,
         progress=None) -> None:
    """Walk the metadata (live or held snapshot) and feed ``out``. A device asked for in
    ``dev_ids`` that does not exist raises NotFound before anything is emitted.
    ``progress(1)``, if given, is called after each device."""
    details = reader.details()
    roots = reader.roots()
    wanted = sorted(roots) if dev_ids is None else sorted(set(dev_ids))
    missing = [dev for dev in wanted if dev not in roots]
    if missing:
        raise NotFound(f"no thin device {missing[0]} in the metadata")
    out.superblock(superblock_info(reader))
    for dev in wanted:
        d = details.get(dev)
        if d is None:
            raise MetadataError(f"device {dev} has a mapping tree but no details")
        out.device({"dev_id": dev, "mapped_blocks": d.mapped_blocks, "transaction": d.transaction_id,
                    "creation_time": d.creation_time, "snap_time": d.snapshotted_time})
        keys, values = reader.device_arrays(roots[dev])
        out.runs(*mapping_runs(keys, values))
        out.end_device()
        if progress is not None:
            progress(1)
    out.end()


#: thin_dump's two mapping lines: a single block (length 1), and a range.
_RUN_LINES = (
    ('    <single_mapping origin_block="', 0, '" data_block="', 1, '" time="', 3, '"/>\n'),
    ('    <range_mapping origin_begin="', 0, '" data_begin="', 1, '" length="', 2, '" time="', 3, '"/>\n'),
)

#: Mapping lines formatted and written at a time (about 7 MiB of scratch space).
_LINES_PER_WRITE = 1 << 16


class XmlEmitter:
    """thin_dump 0.9.0's XML."""

    def __init__(self, stream: IO[str]):
        self.w = stream.write

    def superblock(self, sb: dict) -> None:
        self.w(f'<superblock uuid="{sb["uuid"]}" time="{sb["time"]}" transaction="{sb["transaction"]}" '
               f'flags="{sb["flags"]}" version="{sb["version"]}" data_block_size="{sb["data_block_size"]}" '
               f'nr_data_blocks="{sb["nr_data_blocks"]}">\n')

    def device(self, d: dict) -> None:
        self.w(f'  <device dev_id="{d["dev_id"]}" mapped_blocks="{d["mapped_blocks"]}" '
               f'transaction="{d["transaction"]}" creation_time="{d["creation_time"]}" '
               f'snap_time="{d["snap_time"]}">\n')

    def runs(self, begin, data, length, time) -> None:
        kinds = (np.asarray(length) != 1).astype(np.int64)
        for a in range(0, len(begin), _LINES_PER_WRITE):     # bounded memory: a chunk at a time
            z = a + _LINES_PER_WRITE
            text = format_lines(_RUN_LINES, (begin[a:z], data[a:z], length[a:z], time[a:z]), kinds[a:z])
            self.w(text.decode("ascii"))

    def end_device(self) -> None:
        self.w("  </device>\n")

    def end(self) -> None:
        self.w("</superblock>\n")


class JsonEmitter:
    """The same content as one JSON document: ``{"superblock": {...}, "devices": [...]}`` where
    each device has its details and ``mappings`` as [origin_begin, data_begin, length, time] runs."""

    def __init__(self, stream: IO[str]):
        self.stream = stream
        self.doc: dict = {"superblock": None, "devices": []}

    def superblock(self, sb: dict) -> None:
        self.doc["superblock"] = dict(sb)

    def device(self, d: dict) -> None:
        self.doc["devices"].append({**d, "mappings": []})

    def runs(self, begin, data, length, time) -> None:
        self.doc["devices"][-1]["mappings"].extend(
            np.stack([begin, data, length, time], axis=1).tolist() if len(begin) else [])

    def end_device(self) -> None:
        pass

    def end(self) -> None:
        json.dump(self.doc, self.stream, indent=1)
        self.stream.write("\n")
