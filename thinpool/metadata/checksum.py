"""Block checksums of the dm-thin metadata.

dm-thin uses CRC-32C with an initial value of ``0xFFFFFFFF`` and no final inversion, over bytes
4..4095 of a block, XORed with a per-kind salt. The ``crc32c`` package computes the standard
(inverted) CRC-32C in C, so we undo the inversion: ``std ^ 0xFFFFFFFF ^ salt``.
Cost: one C call over 4092 bytes; no allocation beyond a memoryview.
"""

from __future__ import annotations

import struct

from crc32c import crc32c as _std_crc32c

_CSUM = struct.Struct("<I")


def block_checksum(block: bytes | bytearray | memoryview, salt: int) -> int:
    """The checksum a block of this kind must store at offset 0."""
    return _std_crc32c(memoryview(block)[4:]) ^ 0xFFFFFFFF ^ salt


def stored_checksum(block: bytes | bytearray | memoryview) -> int:
    return _CSUM.unpack_from(block, 0)[0]


def seal(block: bytearray, salt: int) -> None:
    """Write the checksum into offset 0 of ``block``; every other byte must be final."""
    _CSUM.pack_into(block, 0, block_checksum(block, salt))
