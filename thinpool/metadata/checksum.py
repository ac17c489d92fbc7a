"""Block checksums of the dm-thin metadata.

dm-thin uses CRC-32C with an initial value of ``0xFFFFFFFF`` and no final inversion, over bytes
4..4095 of a block, XORed with a per-kind salt. The ``crc32c`` package computes the standard
(inverted) CRC-32C in C, so we undo the inversion: ``std ^ 0xFFFFFFFF ^ salt``.
Cost: one C call over 4092 bytes; no allocation beyond a memoryview.
"""

from __future__ import annotations

import struct


def _load_crc32c():
    """The ``crc32c`` package's C function, without running the package's ``__init__``: that
    imports ``importlib.metadata`` (for ``__version__``) and its argparse command line, about
    20 ms of every command's start-up for one function. Loads the extension module from the
    package's directory; any surprise there falls back to the plain import."""
    try:
        import importlib.machinery
        import importlib.util
        import os
        spec = importlib.util.find_spec("crc32c")
        for d in (spec.submodule_search_locations or []) if spec else []:
            for suffix in importlib.machinery.EXTENSION_SUFFIXES:
                path = os.path.join(d, "_crc32c" + suffix)
                if os.path.isfile(path):
                    loader = importlib.machinery.ExtensionFileLoader("crc32c._crc32c", path)
                    ext = importlib.util.spec_from_loader(loader.name, loader)
                    mod = importlib.util.module_from_spec(ext)
                    loader.exec_module(mod)
                    return mod.crc32c
    except Exception:      # noqa: BLE001 - a different layout of the package: import it whole
        pass
    from crc32c import crc32c
    return crc32c


_std_crc32c = _load_crc32c()

_CSUM = struct.Struct("<I")


def block_checksum(block: bytes | bytearray | memoryview, salt: int) -> int:
    """The checksum a block of this kind must store at offset 0."""
    return _std_crc32c(memoryview(block)[4:]) ^ 0xFFFFFFFF ^ salt


def block_checksums(blocks, salt: int):
    """:func:`block_checksum` of each row of a ``(k, 4096)`` uint8 numpy array, as uint32s."""
    import numpy as np
    mv = memoryview(np.ascontiguousarray(blocks).reshape(-1))
    crc = _std_crc32c
    size = len(blocks[0]) if len(blocks) else 0
    std = np.fromiter([crc(mv[i + 4:i + size]) for i in range(0, len(mv), size)] if size else [],
                      np.uint32, len(blocks))
    return std ^ np.uint32(0xFFFFFFFF ^ salt)


def stored_checksum(block: bytes | bytearray | memoryview) -> int:
    return _CSUM.unpack_from(block, 0)[0]


def seal(block: bytearray, salt: int) -> None:
    """Write the checksum into offset 0 of ``block``; every other byte must be final."""
    _CSUM.pack_into(block, 0, block_checksum(block, salt))
