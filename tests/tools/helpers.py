"""Shared helpers for the tool tests: our tools' text, random pools, reading and editing images.

* ``our_dump`` / ``our_ls`` / ``our_delta`` render what the library computes in the text forms of
  ``thin_dump`` / ``thin_ls`` / ``thin_delta`` 0.9.0, so tests compare strings with the real tools.
* :func:`random_pool` drives the public :class:`~thinpool.Pool` API at random (creates, snapshots
  of snapshots, deletes, discards, scattered one-byte writes) and keeps a byte-level model of
  every volume so data can be read back later.
* :func:`device_mappings` reads every device's mappings from an image by walking the trees with
  this module's own reader, optionally skipping everything below one damaged block, which is what
  a repair must still recover.
* Block editing in place: :func:`flip_bit`, :func:`reseal_edit`, :func:`set_bitmap_entry`.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path

from tests.tptools import thin_delta, thin_dump, thin_ls
from thinpool import Pool
from thinpool.metadata import format as fmt
from thinpool.metadata.checksum import seal
from thinpool.metadata.walker import MetadataReader
from thinpool.snapshot.accounting import device_usage, format_grid, ls_value
from thinpool.snapshot.delta import delta, delta_xml
from thinpool.tools.dump import JsonEmitter, XmlEmitter, dump

BS = fmt.BLOCK_SIZE
KiB = 1024
MiB = 1 << 20

#: Every field ``thin_ls`` 0.9.0 accepts, in its --help order.
LS_FIELDS_090 = ("DEV", "MAPPED_BLOCKS", "EXCLUSIVE_BLOCKS", "SHARED_BLOCKS", "MAPPED_SECTORS",
                 "EXCLUSIVE_SECTORS", "SHARED_SECTORS", "MAPPED_BYTES", "EXCLUSIVE_BYTES",
                 "SHARED_BYTES", "MAPPED", "EXCLUSIVE", "SHARED", "TRANSACTION", "CREATE_TIME",
                 "SNAP_TIME")


# ---------------------------------------------------------------------------
# Our tools as text
# ---------------------------------------------------------------------------


def our_dump(path, snap: bool = False, as_json: bool = False) -> str:
    buf = io.StringIO()
    with MetadataReader(path, metadata_snap=snap) as r:
        dump(r, (JsonEmitter if as_json else XmlEmitter)(buf))
    return buf.getvalue()


def our_ls(path, fields=LS_FIELDS_090, headers: bool = True, snap: bool = False) -> str:
    with MetadataReader(path, metadata_snap=snap) as r:
        sectors = r.view.data_block_size
        rows = [[ls_value(u, f, sectors) for f in fields] for u in device_usage(r)]
    return format_grid(rows, list(fields) if headers else None)


def our_delta(path, left: int, right: int, verbose: bool = False, snap: bool = False) -> str:
    with MetadataReader(path, metadata_snap=snap) as r:
        return delta_xml(r, left, right, delta(r, left, right, verbose), verbose)


def tools_ls(path, fields=LS_FIELDS_090, headers: bool = True, snap: bool = False) -> str:
    args = (["-m"] if snap else []) + ([] if headers else ["--no-headers"])
    return thin_ls(path, *args, "-o", ",".join(fields))


def tools_delta(path, left: int, right: int, verbose: bool = False, snap: bool = False) -> str:
    args = (["-m"] if snap else []) + ["--thin1", str(left), "--thin2", str(right)]
    return thin_delta(path, *args, *(["--verbose"] if verbose else []))


def tools_dump(path, snap: bool = False) -> str:
    return thin_dump(path, *(["-m"] if snap else []))


def delta_pairs(devs: list[int], rng: random.Random, n: int = 6) -> list[tuple[int, int]]:
    """A few device pairs: a device with itself, both orders of one pair, and random ones."""
    if not devs:
        return []
    pairs = {(devs[0], devs[0]), (devs[-1], devs[0]), (devs[0], devs[-1])}
    while len(pairs) < min(n, len(devs) ** 2):
        pairs.add((rng.choice(devs), rng.choice(devs)))
    return sorted(pairs)


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sparse_file(path, size: int) -> Path:
    p = Path(path)
    with open(p, "wb") as f:
        f.truncate(size)
    return p


# ---------------------------------------------------------------------------
# Random pools through the Pool API
# ---------------------------------------------------------------------------


@dataclass
class PoolModel:
    """What each volume holds: byte offset -> byte, for the bytes written (all else reads 0)."""

    block_size: int
    volumes: dict[str, dict[int, int]] = field(default_factory=dict)
    origins: dict[str, str | None] = field(default_factory=dict)
    events: set[str] = field(default_factory=set)
    counter: int = 0

    def new_name(self) -> str:
        self.counter += 1
        return f"v{self.counter}"

    def verify(self, pool: Pool, rng: random.Random, samples: int = 200) -> None:
        for name, content in self.volumes.items():
            vol = pool.volume(name)
            offsets = list(content)
            for off in rng.sample(offsets, min(samples, len(offsets))):
                assert vol.read(off, 1) == bytes([content[off]]), f"{name}: byte at {off}"
            for _ in range(5):
                off = rng.randrange(vol.size)
                assert vol.read(off, 1) == bytes([content.get(off, 0)]), f"{name}: byte at {off}"


VOLUME_SIZE = 1 << 40


def random_pool(path, seed: int, *, steps: int = 30, max_writes: int = 300,
                block_size: int | None = None) -> tuple[Pool, PoolModel]:
    """A pool built by random Pool API calls; returns it open (committed) with its model."""
    rng = random.Random(seed)
    bs = block_size or rng.choice([64 * KiB, 64 * KiB, 128 * KiB, 192 * KiB])
    pool = Pool.create(path, data_size=65536 * bs, block_size=bs)
    model = PoolModel(bs)
    random_steps(pool, model, rng, steps=steps, max_writes=max_writes)
    return pool, model


def random_steps(pool: Pool, model: PoolModel, rng: random.Random, *, steps: int,
                 max_writes: int = 300) -> None:
    """Random Pool API calls, mirrored in ``model``; commits at the end.

    Writes are one byte per block (so the data file stays sparse): runs of consecutive blocks
    (range mappings), scattered blocks in a window (single mappings and splits) and, when
    ``max_writes`` is large, thousands of blocks (internal nodes). Snapshots are taken of any
    volume, snapshots included; deletes, whole-block and partial discards and commits happen
    in between. ``model.events`` records which kinds of step happened."""
    bs = model.block_size
    vblocks = VOLUME_SIZE // bs
    for _ in range(steps):
        names = sorted(model.volumes)
        op = rng.random()
        if not names or op < 0.12:
            name = model.new_name()
            pool.create_thin(name, VOLUME_SIZE)
            model.volumes[name] = {}
            model.origins[name] = None
        elif op < 0.3:
            origin, name = rng.choice(names), model.new_name()
            pool.snapshot(origin, name)
            model.volumes[name] = dict(model.volumes[origin])
            model.origins[name] = origin
            if model.origins.get(origin):
                model.events.add("snapshot of a snapshot")
        elif op < 0.37 and len(names) > 2:
            name = rng.choice(names)
            pool.delete(name)
            del model.volumes[name]
            model.events.add("delete")
        elif op < 0.5:
            name = rng.choice(names)
            content = model.volumes[name]
            if content and rng.random() < 0.7:
                start = max(0, rng.choice(list(content)) - rng.randrange(20 * bs))
            else:
                start = rng.randrange(vblocks - 1000) * bs
            if rng.random() < 0.6:
                start -= start % bs
                length = rng.randint(1, 300) * bs
                model.events.add("discard")
            else:
                length = rng.randint(1, 300 * bs)
                model.events.add("partial discard")
            pool.volume(name).discard(start, length)
            for off in [o for o in content if start <= o < start + length]:
                del content[off]
        else:
            name = rng.choice(names)
            content = model.volumes[name]
            vol = pool.volume(name)
            count = rng.choice([1, 5, 40, 150, max_writes])
            base = rng.choice([0, rng.randrange(1000), rng.randrange(vblocks - 60_000)])
            consecutive = rng.random() < 0.5
            window = rng.choice([count, 4 * count + 10, 50_000])
            for i in range(count):
                vb = base + (i if consecutive else rng.randrange(window))
                off = vb * bs + rng.randrange(bs)
                byte = rng.randrange(1, 256)
                vol.write(off, bytes([byte]))
                content[off] = byte
            if count >= 1000:
                model.events.add("thousands of writes")
        if rng.random() < 0.25:
            pool.commit()
    pool.commit()


# ---------------------------------------------------------------------------
# Reading images independently of the tools under test
# ---------------------------------------------------------------------------


def read_block(path, b: int) -> bytearray:
    with open(path, "rb") as f:
        f.seek(b * BS)
        return bytearray(f.read(BS))


def write_block(path, b: int, buf: bytes) -> None:
    assert len(buf) == BS
    with open(path, "r+b") as f:
        f.seek(b * BS)
        f.write(buf)


_HDR = struct.Struct("<IIQIIII")   # csum, flags, blocknr, nr_entries, max_entries, value_size, pad


@dataclass
class RawNode:
    flags: int
    keys: list[int]
    values: list[bytes]

    @property
    def is_leaf(self) -> bool:
        return self.flags == fmt.LEAF_NODE


def raw_node(path, b: int) -> RawNode:
    """A B-tree node decoded with the spec's layout (no checksum check)."""
    buf = read_block(path, b)
    _, flags, _, nr, mx, vsize, _ = _HDR.unpack_from(buf, 0)
    keys = list(struct.unpack_from(f"<{nr}Q", buf, 32))
    vals = [bytes(buf[32 + 8 * mx + vsize * i: 32 + 8 * mx + vsize * (i + 1)]) for i in range(nr)]
    return RawNode(flags, keys, vals)


def node_value_offset(path, b: int, i: int) -> int:
    """Byte offset of value ``i`` inside node ``b``."""
    _, _, _, _, mx, vsize, _ = _HDR.unpack_from(read_block(path, b), 0)
    return 32 + 8 * mx + vsize * i


def tree_leaves(path, root: int, skip: int | None = None) -> list[int]:
    """Leaves below ``root`` in key order; nothing below block ``skip`` (nor ``skip`` itself)."""
    if root == skip:
        return []
    n = raw_node(path, root)
    if n.is_leaf:
        return [root]
    out: list[int] = []
    for v in n.values:
        out += tree_leaves(path, struct.unpack("<Q", v)[0], skip)
    return out


def superblock(path) -> fmt.Superblock:
    return fmt.Superblock.unpack(bytes(read_block(path, 0)))


def device_roots(path, skip: int | None = None) -> dict[int, int]:
    sb = superblock(path)
    roots = {}
    for leaf in tree_leaves(path, sb.data_mapping_root, skip):
        n = raw_node(path, leaf)
        roots.update((k, struct.unpack("<Q", v)[0]) for k, v in zip(n.keys, n.values))
    return roots


def device_details(path, skip: int | None = None) -> dict[int, tuple[int, int, int, int]]:
    sb = superblock(path)
    out = {}
    for leaf in tree_leaves(path, sb.device_details_root, skip):
        n = raw_node(path, leaf)
        out.update((k, fmt.DEVICE_DETAILS.unpack(v)) for k, v in zip(n.keys, n.values))
    return out


def device_mappings(path, skip: int | None = None) -> dict[int, dict[int, int]]:
    """Every device (named by the top-level tree) -> {virtual block: packed value}, leaving out
    whatever lies below block ``skip``."""
    out = {}
    for dev, root in device_roots(path, skip).items():
        m: dict[int, int] = {}
        for leaf in tree_leaves(path, root, skip):
            n = raw_node(path, leaf)
            m.update((k, struct.unpack("<Q", v)[0]) for k, v in zip(n.keys, n.values))
        out[dev] = m
    return out


# ---------------------------------------------------------------------------
# Editing images
# ---------------------------------------------------------------------------


def flip_bit(path, b: int, offset: int, bit: int = 2) -> None:
    """Flip one bit of block ``b`` and leave its checksum stale."""
    buf = read_block(path, b)
    buf[offset] ^= 1 << bit
    write_block(path, b, bytes(buf))


def reseal_edit(path, b: int, salt: int, fn) -> None:
    """Apply ``fn(buf)`` to block ``b`` and recompute its checksum: consistent but wrong."""
    buf = read_block(path, b)
    fn(buf)
    seal(buf, salt)
    write_block(path, b, bytes(buf))


def bitmap_entry(buf: bytes, e: int) -> int:
    """Entry ``e`` of a space-map bitmap block, decoded as spec 5.1 says (high bit first)."""
    byte = buf[16 + e // 4]
    s = 2 * (e % 4)
    return 2 * ((byte >> s) & 1) + ((byte >> (s + 1)) & 1)


def set_bitmap_entry(buf: bytearray, e: int, value: int) -> None:
    """Set entry ``e`` (0..3) of a bitmap block: count 1 is mask 0x02 << s, 2 is 0x01 << s."""
    s = 2 * (e % 4)
    i = 16 + e // 4
    buf[i] &= ~(0x03 << s) & 0xFF
    buf[i] |= {0: 0, 1: 0x02, 2: 0x01, 3: 0x03}[value] << s


def metadata_bitmaps(path) -> list[int]:
    """Locations of the metadata space map's bitmaps (from its index block)."""
    root = superblock(path).metadata_sm
    index = read_block(path, root.bitmap_root)
    n = -(-root.nr_blocks // fmt.ENTRIES_PER_BITMAP)
    return [fmt.INDEX_ENTRY.unpack_from(index, 16 + 16 * i)[0] for i in range(n)]


def data_bitmaps(path) -> list[int]:
    """Locations of the data space map's bitmaps (from its index tree)."""
    out = []
    for leaf in tree_leaves(path, superblock(path).data_sm.bitmap_root):
        out += [fmt.INDEX_ENTRY.unpack(v)[0] for v in raw_node(path, leaf).values]
    return out


def set_count(path, bitmaps: list[int], block: int, value: int) -> None:
    """Set a space map's bitmap entry for ``block`` to ``value`` and re-checksum the bitmap."""
    loc = bitmaps[block // fmt.ENTRIES_PER_BITMAP]
    reseal_edit(path, loc, fmt.BITMAP_CSUM_XOR,
                lambda buf: set_bitmap_entry(buf, block % fmt.ENTRIES_PER_BITMAP, value))


def get_count(path, bitmaps: list[int], block: int) -> int:
    loc = bitmaps[block // fmt.ENTRIES_PER_BITMAP]
    return bitmap_entry(read_block(path, loc), block % fmt.ENTRIES_PER_BITMAP)


def copy_file(src, dst) -> Path:
    """Copy ``src`` to ``dst`` keeping it sparse (all-zero 64 KiB chunks become holes)."""
    dst = Path(dst)
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while chunk := fi.read(1 << 16):
            if chunk.count(0) == len(chunk):
                fo.seek(len(chunk), os.SEEK_CUR)
            else:
                fo.write(chunk)
    os.truncate(dst, os.path.getsize(src))
    return dst
