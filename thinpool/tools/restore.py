"""Restore pool metadata from a dump (thin_dump XML or thinpool JSON), trees built bottom up.

:func:`parse_xml` / :func:`parse_json` read a dump completely into the intermediate form
(:class:`DumpImage`: superblock fields and, per device, its details and sorted mapping arrays)
and reject anything malformed with :class:`~thinpool.errors.InvalidArgument` naming the line,
*before* a byte of the output is touched. :func:`restore` then formats the output, builds every
device's mapping tree with :mod:`thinpool.metadata.bulk` (no per-mapping inserts), counts each
data block once per mapping, and commits. If building fails (output too small), block 0 of the
output is zeroed so no half-restored metadata is ever mistaken for a pool.

As ``thin_restore`` does: ``mapped_blocks`` is recomputed, a virtual block mapped twice keeps the
last mapping, data blocks must be below ``nr_data_blocks``, ``version`` defaults to 1 and ``flags``
to 0. Unlike it, device ids above 2^24 - 1, times above 2^24 - 1 and bad data block sizes are
refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from xml.parsers import expat

import numpy as np

from ..errors import InvalidArgument, NoMetadataSpace, ThinpoolError
from ..metadata import format as fmt
from ..metadata.bulk import build
from ..metadata.thin_metadata import ThinMetadata, check_data_block_size


@dataclass
class DeviceImage:
    dev_id: int
    transaction: int
    creation_time: int
    snap_time: int
    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    values: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))


@dataclass
class DumpImage:
    time: int
    transaction: int
    flags: int
    version: int
    data_block_size: int
    nr_data_blocks: int
    devices: list[DeviceImage] = field(default_factory=list)

    @property
    def nr_mappings(self) -> int:
        return sum(len(d.keys) for d in self.devices)


#: Virtual blocks are below 2^62 (a device of 2^62 blocks is far beyond any block device).
MAX_VIRTUAL_BLOCKS = 1 << 62
#: Mappings the largest metadata device could hold: every block a full leaf.
MAX_MAPPINGS = fmt.MAX_METADATA_BLOCKS * fmt.max_entries_for(8)

_SB_REQUIRED = ("uuid", "time", "transaction", "data_block_size", "nr_data_blocks")
_DEV_REQUIRED = ("dev_id", "transaction", "creation_time", "snap_time")


class _Collector:
    """Gathers runs for one device into growing lists of numpy arrays."""

    def __init__(self) -> None:
        self.begin: list[int] = []
        self.data: list[int] = []
        self.length: list[int] = []
        self.time: list[int] = []

    def add(self, b: int, d: int, n: int, t: int) -> None:
        self.begin.append(b)
        self.data.append(d)
        self.length.append(n)
        self.time.append(t)

    def arrays(self, img: DumpImage, dev_id: int) -> tuple[np.ndarray, np.ndarray]:
        if not self.begin:
            return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
        begin = np.array(self.begin, np.uint64)
        data = np.array(self.data, np.uint64)
        length = np.array(self.length, np.uint64)
        time = np.array(self.time, np.uint64)
        if (length == 0).any():
            raise InvalidArgument(f"device {dev_id}: a range_mapping has length 0")
        # Bounds of every run before any run is expanded to one entry per block, so a huge
        # length is an error, not an allocation of terabytes.
        nr = np.uint64(img.nr_data_blocks)
        past = (length > nr) | (data > nr - np.minimum(length, nr))
        if past.any():
            i = int(np.flatnonzero(past)[0])
            raise InvalidArgument(
                f"device {dev_id}: data blocks {int(data[i])}..{int(data[i]) + int(length[i]) - 1} "
                f"reach past the end of the pool ({img.nr_data_blocks} data blocks)")
        if int(time.max()) > fmt.TIME_MASK:
            raise InvalidArgument(f"device {dev_id}: a mapping time is above 2^24 - 1")
        vlimit = np.uint64(MAX_VIRTUAL_BLOCKS)
        if ((length > vlimit) | (begin > vlimit - np.minimum(length, vlimit))).any() or \
                int((data + length - np.uint64(1)).max()) > fmt.MAX_DATA_BLOCK:
            raise InvalidArgument(f"device {dev_id}: a block number is out of range")
        total = img.nr_mappings + float(length.sum(dtype=np.float64))
        if total > MAX_MAPPINGS:
            raise InvalidArgument(f"device {dev_id}: the dump has more mappings ({total:.0f}) than "
                                  f"the largest metadata device can hold ({MAX_MAPPINGS})")
        length = length.astype(np.int64)
        offs = np.arange(int(length.sum()), dtype=np.uint64) - np.repeat(
            np.cumsum(length) - length, length).astype(np.uint64)
        keys = np.repeat(begin, length) + offs
        blocks = np.repeat(data, length) + offs
        times = np.repeat(time, length)
        # Sort by virtual block; a block mapped twice keeps the last mapping (like thin_restore).
        order = np.argsort(keys, kind="stable")[::-1]
        k_rev = keys[order]
        uniq, first = np.unique(k_rev, return_index=True)
        pick = order[first]
        vals = (blocks[pick] << np.uint64(fmt.TIME_BITS)) | times[pick]
        return uniq, vals


def _int(attrs: dict, name: str, where: str, line: int) -> int:
    try:
        raw = attrs[name]
    except KeyError:
        raise InvalidArgument(f"line {line}: <{where}> lacks the {name} attribute") from None
    # ASCII digits only: int() would also take signs, spaces, "1_0" and non-ASCII digits.
    if not (isinstance(raw, str) and raw.isascii() and raw.isdigit()):
        raise InvalidArgument(f"line {line}: {where} {name}={raw!r} is not a whole number")
    if len(raw.lstrip("0")) > 20 or (v := int(raw, 10)) >= 1 << 64:
        raise InvalidArgument(f"line {line}: {where} {name}={raw!r} is out of range")
    return v


def parse_xml(stream) -> DumpImage:
    """Parse thin_dump XML from a binary stream."""
    parser = expat.ParserCreate()
    state: dict = {"img": None, "dev": None, "col": None, "seen": set(), "closed": False}

    def start(name, attrs):
        line = parser.CurrentLineNumber
        img = state["img"]
        if name == "superblock":
            if img is not None:
                raise InvalidArgument(f"line {line}: a second <superblock>")
            for a in _SB_REQUIRED:
                if a not in attrs:
                    raise InvalidArgument(f"line {line}: <superblock> lacks the {a} attribute")
            dbs = _int(attrs, "data_block_size", "superblock", line)
            try:
                check_data_block_size(dbs)
            except InvalidArgument as e:
                raise InvalidArgument(f"line {line}: {e}") from None
            version = _int(attrs, "version", "superblock", line) if "version" in attrs else 1
            if version not in fmt.SUPPORTED_VERSIONS:
                raise InvalidArgument(f"line {line}: metadata version {version} is not supported")
            state["img"] = DumpImage(
                time=_int(attrs, "time", "superblock", line),
                transaction=_int(attrs, "transaction", "superblock", line),
                flags=_int(attrs, "flags", "superblock", line) if "flags" in attrs else 0,
                version=version, data_block_size=dbs,
                nr_data_blocks=_int(attrs, "nr_data_blocks", "superblock", line))
            if state["img"].time > fmt.TIME_MASK:
                raise InvalidArgument(f"line {line}: superblock time is above 2^24 - 1")
            return
        if img is None:
            raise InvalidArgument(f"line {line}: <{name}> outside <superblock>")
        if name == "device":
            if state["dev"] is not None:
                raise InvalidArgument(f"line {line}: <device> inside another <device>")
            dev = DeviceImage(*(_int(attrs, a, "device", line) for a in _DEV_REQUIRED))
            if dev.dev_id > fmt.MAX_DEV_ID:
                raise InvalidArgument(f"line {line}: device id {dev.dev_id} is above 2^24 - 1")
            if dev.dev_id in state["seen"]:
                raise InvalidArgument(f"line {line}: device {dev.dev_id} appears twice")
            state["seen"].add(dev.dev_id)
            state["dev"], state["col"] = dev, _Collector()
            return
        col = state["col"]
        if name == "range_mapping":
            if col is None:
                raise InvalidArgument(f"line {line}: <range_mapping> outside <device>")
            col.add(_int(attrs, "origin_begin", name, line), _int(attrs, "data_begin", name, line),
                    _int(attrs, "length", name, line), _int(attrs, "time", name, line))
        elif name == "single_mapping":
            if col is None:
                raise InvalidArgument(f"line {line}: <single_mapping> outside <device>")
            col.add(_int(attrs, "origin_block", name, line), _int(attrs, "data_block", name, line),
                    1, _int(attrs, "time", name, line))
        else:
            raise InvalidArgument(f"line {line}: unknown element <{name}>")

    def end(name):
        if name == "device":
            dev = state["dev"]
            dev.keys, dev.values = state["col"].arrays(state["img"], dev.dev_id)
            state["img"].devices.append(dev)
            state["dev"] = state["col"] = None
        elif name == "superblock":
            state["closed"] = True

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    try:
        while True:
            chunk = stream.read(1 << 20)
            if not chunk:
                break
            parser.Parse(chunk, False)
        parser.Parse(b"", True)
    except expat.ExpatError as e:
        raise InvalidArgument(f"malformed XML: {expat.ErrorString(e.code)} at line {e.lineno}") from None
    if state["img"] is None or not state["closed"]:
        raise InvalidArgument("the dump is incomplete: no complete <superblock> element")
    state["img"].devices.sort(key=lambda d: d.dev_id)
    return state["img"]


def _jint(value, what: str) -> int:
    """A JSON number that must be a whole number in [0, 2^64)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"malformed JSON dump: {what} is {value!r}, not a whole number")
    if not 0 <= value < 1 << 64:
        raise InvalidArgument(f"malformed JSON dump: {what} {value} is out of range")
    return value


def parse_json(stream) -> DumpImage:
    """Parse thinpool's JSON dump (see :class:`thinpool.tools.dump.JsonEmitter`)."""
    try:
        doc = json.load(stream)
        sb = doc["superblock"]
        dbs = _jint(sb["data_block_size"], "data_block_size")
        check_data_block_size(dbs)
        img = DumpImage(_jint(sb["time"], "time"), _jint(sb["transaction"], "transaction"),
                        _jint(sb.get("flags", 0), "flags"), _jint(sb.get("version", 1), "version"),
                        dbs, _jint(sb["nr_data_blocks"], "nr_data_blocks"))
        if img.version not in fmt.SUPPORTED_VERSIONS or img.time > fmt.TIME_MASK:
            raise InvalidArgument("unsupported version or time out of range")
        seen = set()
        if not isinstance(doc["devices"], list):
            raise InvalidArgument("malformed JSON dump: devices is not a list")
        for d in doc["devices"]:
            if not isinstance(d, dict) or not isinstance(d.get("mappings"), list):
                raise InvalidArgument("malformed JSON dump: a device is not an object with a "
                                      "list of mappings")
            dev = DeviceImage(*(_jint(d[k], k) for k in _DEV_REQUIRED))
            if dev.dev_id in seen or not 0 <= dev.dev_id <= fmt.MAX_DEV_ID:
                raise InvalidArgument(f"device id {dev.dev_id} is repeated or out of range")
            seen.add(dev.dev_id)
            col = _Collector()
            for run in d["mappings"]:
                b, db, n, t = (_jint(x, f"device {dev.dev_id}: a mapping's number") for x in run)
                col.add(b, db, n, t)
            dev.keys, dev.values = col.arrays(img, dev.dev_id)
            img.devices.append(dev)
    except InvalidArgument:
        raise
    except RecursionError:
        raise InvalidArgument("malformed JSON dump: nested too deeply") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InvalidArgument(f"malformed JSON dump: {e}") from None
    img.devices.sort(key=lambda d: d.dev_id)
    return img


def parse_dump(path) -> DumpImage:
    """Read a dump file, XML or JSON (decided from its first non-blank byte)."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise InvalidArgument(f"cannot read {path}: {e.strerror}") from None
    with f:
        head = f.read(64).lstrip()
        f.seek(0)
        try:
            if head.startswith(b"{"):
                return parse_json(f)
            return parse_xml(f)
        except MemoryError:
            raise ThinpoolError(f"{path} describes more mappings than fit in memory") from None


def restore(img: DumpImage, output) -> None:
    """Write ``img`` as fresh metadata onto ``output`` (an existing file or block device)."""
    output = os.fspath(output)
    if not os.path.exists(output):
        raise InvalidArgument(f"output {output} does not exist; create it with the metadata size first")
    meta = ThinMetadata.format(output, img.data_block_size, img.nr_data_blocks)
    try:
        for dev in img.devices:
            root = build(meta.mapping_tree, dev.keys, dev.values)
            if len(dev.values):
                meta.data_sm.inc_many((dev.values >> np.uint64(fmt.TIME_BITS)).astype(np.int64))
            meta.adopt_device(dev.dev_id, root, len(dev.keys), dev.transaction,
                              dev.creation_time, dev.snap_time)
        meta.time = img.time
        meta.trans_id = img.transaction
        meta.sb = replace(meta.sb, flags=img.flags, version=img.version)
        meta.commit()
    except BaseException as e:
        _wipe_superblock(meta)
        meta.close()
        if isinstance(e, NoMetadataSpace):
            raise NoMetadataSpace(f"{output} is too small for {img.nr_mappings} mappings; "
                                  f"give a larger metadata device") from None
        raise
    meta.close()


def _wipe_superblock(meta: ThinMetadata) -> None:
    try:
        meta.bm.zero_block(0)
    except (OSError, ThinpoolError):
        pass
