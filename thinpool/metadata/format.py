"""Byte layouts and constants of the dm-thin pool metadata, declared once.

Everything is little-endian and every block is 4096 bytes. The layouts below follow the Linux
kernel's ``dm-thin-metadata.c`` and ``persistent-data/`` as written up in
``shared/spec/dm-thin-metadata.md``; each ``struct.Struct`` is asserted against its documented
size so a typo fails at import time.

Superblock (block 0), 364 bytes used, rest zero::

    0x000 le32 csum            0x004 le32 flags          0x008 le64 blocknr
    0x010 16B  uuid            0x020 le64 magic          0x028 le32 version
    0x02C le32 time            0x030 le64 trans_id       0x038 le64 metadata_snap
    0x040 128B data sm root    0x0C0 128B metadata sm root
    0x140 le64 data_mapping_root   0x148 le64 device_details_root
    0x150 le32 data_block_size     0x154 le32 metadata_block_size
    0x158 le64 metadata_nr_blocks  0x160 le32 compat  0x164 le32 compat_ro  0x168 le32 incompat

Space-map root (first 32 bytes of each 128-byte area): nr_blocks, nr_allocated, bitmap_root,
ref_count_root (4 x le64).

B-tree node: 32-byte header (csum, flags, blocknr, nr_entries, max_entries, value_size, padding),
then ``max_entries`` le64 keys, then ``max_entries`` values of ``value_size`` bytes.

Bitmap block: csum, not_used, blocknr (16 bytes), then 16320 two-bit entries.
Metadata index block: csum, padding, blocknr (16 bytes), then 255 index entries of 16 bytes
(blocknr le64, nr_free le32, none_free_before le32).

Device details value (24 bytes): mapped_blocks le64, transaction_id le64, creation_time le32,
snapshotted_time le32.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

BLOCK_SIZE = 4096
SECTOR_SIZE = 512
METADATA_BLOCK_SECTORS = BLOCK_SIZE // SECTOR_SIZE

SUPERBLOCK_LOCATION = 0
THIN_MAGIC = 27022010
METADATA_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)

# Checksum salts, one per block kind (XORed into the CRC).
SUPERBLOCK_CSUM_XOR = 160774
BTREE_CSUM_XOR = 121107
BITMAP_CSUM_XOR = 240779
INDEX_CSUM_XOR = 160478

SB_FLAG_NEEDS_CHECK = 1

# B-tree node flags.
INTERNAL_NODE = 1
LEAF_NODE = 2
NODE_HEADER = struct.Struct("<IIQIIII")
assert NODE_HEADER.size == 32
#: The same header as a numpy record the size of a whole block, for arrays of nodes.
NODE_BLOCK_DTYPE = np.dtype({"names": ["csum", "flags", "blocknr", "nr_entries", "max_entries", "value_size"],
                             "formats": ["<u4", "<u4", "<u8", "<u4", "<u4", "<u4"],
                             "offsets": [0, 4, 8, 16, 20, 24], "itemsize": BLOCK_SIZE})

# Space maps.
ENTRIES_PER_BITMAP = (BLOCK_SIZE - 16) * 4          # 16320 two-bit entries
BITMAP_HEADER = struct.Struct("<IIQ")
assert BITMAP_HEADER.size == 16
INDEX_ENTRY = struct.Struct("<QII")
assert INDEX_ENTRY.size == 16
MAX_METADATA_BITMAPS = 255
METADATA_INDEX_HEADER = BITMAP_HEADER
MAX_METADATA_BLOCKS = MAX_METADATA_BITMAPS * ENTRIES_PER_BITMAP   # 4,161,600
SM_ROOT = struct.Struct("<QQQQ")
assert SM_ROOT.size == 32
SM_ROOT_AREA = 128

# Mapping values: (data_block << 24) | time.
TIME_BITS = 24
TIME_MASK = (1 << TIME_BITS) - 1
MAX_DEV_ID = (1 << 24) - 1
MAX_DATA_BLOCK = (1 << 40) - 1

# Size limits. A thin volume is a block device whose size the kernel keeps in a loff_t (signed
# 64-bit bytes), and each of its bytes must be addressable by the file calls that read and export
# it: a volume is at most 2**63 - 512 bytes, 8 EiB less one sector (LVM's limit on 64-bit too).
# The data device is a file or block device (at most 2**63 - 1 bytes) of at most
# MAX_DATA_BLOCK + 1 blocks (40-bit block numbers in the mappings).
MAX_VOLUME_SIZE = (1 << 63) - SECTOR_SIZE
MAX_DATA_DEVICE_SIZE = (1 << 63) - 1

# Data block size limits (sectors), the kernel's rule.
MIN_DATA_BLOCK_SECTORS = 128
MAX_DATA_BLOCK_SECTORS = 2097152

SUPERBLOCK = struct.Struct("<IIQ16sQIIQQ128s128sQQIIQIII")
assert SUPERBLOCK.size == 0x16C

DEVICE_DETAILS = struct.Struct("<QQII")
assert DEVICE_DETAILS.size == 24

# numpy dtypes for node values.
U64 = np.dtype("<u8")
U32 = np.dtype("<u4")
DETAILS_DTYPE = np.dtype([("mapped_blocks", "<u8"), ("transaction_id", "<u8"),
                          ("creation_time", "<u4"), ("snapshotted_time", "<u4")])
INDEX_DTYPE = np.dtype([("blocknr", "<u8"), ("nr_free", "<u4"), ("none_free_before", "<u4")])
assert DETAILS_DTYPE.itemsize == 24 and INDEX_DTYPE.itemsize == 16


def max_entries_for(value_size: int) -> int:
    """The kernel's node capacity: as many (key, value) pairs as fit, rounded down to a multiple of 3."""
    n = (BLOCK_SIZE - NODE_HEADER.size) // (8 + value_size)
    return 3 * (n // 3)


@dataclass(frozen=True)
class SpaceMapRoot:
    """The 32-byte root of a space map as stored in the superblock."""

    nr_blocks: int
    nr_allocated: int
    bitmap_root: int
    ref_count_root: int

    def pack(self) -> bytes:
        return SM_ROOT.pack(self.nr_blocks, self.nr_allocated, self.bitmap_root,
                            self.ref_count_root).ljust(SM_ROOT_AREA, b"\0")

    @classmethod
    def unpack(cls, raw: bytes) -> "SpaceMapRoot":
        return cls(*SM_ROOT.unpack_from(raw, 0))


@dataclass(frozen=True)
class Superblock:
    """The decoded superblock. ``pack()`` returns the 4096-byte block with a zero checksum field."""

    flags: int
    blocknr: int
    uuid: bytes
    magic: int
    version: int
    time: int
    trans_id: int
    metadata_snap: int
    data_sm_root: bytes
    metadata_sm_root: bytes
    data_mapping_root: int
    device_details_root: int
    data_block_size: int
    metadata_block_size: int
    metadata_nr_blocks: int
    compat_flags: int
    compat_ro_flags: int
    incompat_flags: int

    @classmethod
    def unpack(cls, buf: bytes) -> "Superblock":
        f = SUPERBLOCK.unpack_from(buf, 0)
        return cls(*f[1:])

    def pack(self) -> bytearray:
        out = bytearray(BLOCK_SIZE)
        SUPERBLOCK.pack_into(out, 0, 0, self.flags, self.blocknr, self.uuid, self.magic,
                             self.version, self.time, self.trans_id, self.metadata_snap,
                             self.data_sm_root, self.metadata_sm_root, self.data_mapping_root,
                             self.device_details_root, self.data_block_size,
                             self.metadata_block_size, self.metadata_nr_blocks,
                             self.compat_flags, self.compat_ro_flags, self.incompat_flags)
        return out

    @property
    def data_sm(self) -> SpaceMapRoot:
        return SpaceMapRoot.unpack(self.data_sm_root)

    @property
    def metadata_sm(self) -> SpaceMapRoot:
        return SpaceMapRoot.unpack(self.metadata_sm_root)


@dataclass(frozen=True)
class DeviceDetails:
    """One thin device's entry in the device-details tree."""

    mapped_blocks: int
    transaction_id: int
    creation_time: int
    snapshotted_time: int

    def pack(self) -> bytes:
        return DEVICE_DETAILS.pack(self.mapped_blocks, self.transaction_id, self.creation_time,
                                   self.snapshotted_time)

    @classmethod
    def unpack(cls, raw: bytes) -> "DeviceDetails":
        return cls(*DEVICE_DETAILS.unpack_from(raw, 0))


def pack_mapping(data_block: int, time: int) -> int:
    return (data_block << TIME_BITS) | (time & TIME_MASK)


def unpack_mapping(value: int) -> tuple[int, int]:
    return value >> TIME_BITS, value & TIME_MASK
