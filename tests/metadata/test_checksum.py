"""Block checksums (spec section 2) and the validators that apply them (block.py).

The spec's test values are checked byte for byte against the shared test vectors, and the C-backed
``block_checksum`` is compared with an independent table-driven CRC-32C written here.
"""

from __future__ import annotations

import struct

import pytest
from crc32c import crc32c as std_crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.metadata.helpers import read_block
from tests.tptools import TESTDATA_CASES, testdata_image
from thinpool.errors import ChecksumMismatch, CorruptBlock, MetadataError
from thinpool.metadata import format as fmt
from thinpool.metadata.block import (BITMAP_VALIDATOR, INDEX_VALIDATOR, NODE_VALIDATOR,
                                     SUPERBLOCK_VALIDATOR)
from thinpool.metadata.checksum import block_checksum, seal, stored_checksum

needs_vectors = pytest.mark.skipif("01-single" not in TESTDATA_CASES, reason="test vectors missing")


def _table() -> list[int]:
    out = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        out.append(c)
    return out


_TABLE = _table()


def crc_no_final_inversion(data: bytes) -> int:
    """CRC-32C, initial 0xFFFFFFFF, reflected, without the final XOR: the kernel's crc32c(~0, ...)."""
    c = 0xFFFFFFFF
    for byte in data:
        c = _TABLE[(c ^ byte) & 0xFF] ^ (c >> 8)
    return c


def test_salts_are_the_spec_values() -> None:
    assert fmt.SUPERBLOCK_CSUM_XOR == 160774 == 0x27406
    assert fmt.BTREE_CSUM_XOR == 121107 == 0x1D913
    assert fmt.BITMAP_CSUM_XOR == 240779 == 0x3AC8B
    assert fmt.INDEX_CSUM_XOR == 160478 == 0x272DE


def test_crc_of_123456789() -> None:
    assert std_crc32c(b"123456789") == 0xE3069283
    assert crc_no_final_inversion(b"123456789") == 0x1CF96D7C
    # block_checksum skips the 4-byte checksum field and applies the salt.
    assert block_checksum(b"\xde\xad\xbe\xef" + b"123456789", 0) == 0x1CF96D7C
    assert block_checksum(b"\0\0\0\0" + b"123456789", 0x27406) == 0x1CF96D7C ^ 0x27406


@given(st.binary(min_size=4, max_size=600), st.integers(0, 0xFFFFFFFF))
@settings(derandomize=True, max_examples=200, deadline=None)
def test_block_checksum_matches_table_crc(data: bytes, salt: int) -> None:
    assert block_checksum(data, salt) == crc_no_final_inversion(data[4:]) ^ salt


@needs_vectors
def test_01_single_superblock_checksum(tmp_path) -> None:
    img = testdata_image("01-single", tmp_path)
    sb = read_block(img, 0)
    assert bytes(sb[:4]) == bytes.fromhex("e5ce6c45")
    assert crc_no_final_inversion(bytes(sb[4:])) == 0x456EBAE3
    assert std_crc32c(bytes(sb[4:])) == 0xBA91451C
    assert block_checksum(sb, 0) == 0x456EBAE3
    assert block_checksum(sb, fmt.SUPERBLOCK_CSUM_XOR) == 0x456CCEE5 == stored_checksum(sb)
    SUPERBLOCK_VALIDATOR.check(bytes(sb), 0)


@needs_vectors
def test_01_single_empty_leaf_checksum(tmp_path) -> None:
    img = testdata_image("01-single", tmp_path)
    leaf = read_block(img, 2)
    assert stored_checksum(leaf) == 0xC360E452
    assert block_checksum(leaf, fmt.BTREE_CSUM_XOR) == 0xC360E452
    assert crc_no_final_inversion(bytes(leaf[4:])) ^ 121107 == 0xC360E452
    NODE_VALIDATOR.check(bytes(leaf), 2)


@needs_vectors
def test_01_single_every_block_kind_validates(tmp_path) -> None:
    """Block numbers from the testdata README's layout table for 01-single."""
    img = testdata_image("01-single", tmp_path)
    kinds = {0: SUPERBLOCK_VALIDATOR, 1: INDEX_VALIDATOR, 2: NODE_VALIDATOR, 3: BITMAP_VALIDATOR,
             4: NODE_VALIDATOR, 5: NODE_VALIDATOR, 6: NODE_VALIDATOR, 7: NODE_VALIDATOR,
             9: BITMAP_VALIDATOR, 10: NODE_VALIDATOR}
    for b, v in kinds.items():
        v.check(bytes(read_block(img, b)), b)
        # Any other kind's salt rejects it.
        for other in {SUPERBLOCK_VALIDATOR, INDEX_VALIDATOR, NODE_VALIDATOR, BITMAP_VALIDATOR} - {v}:
            with pytest.raises(ChecksumMismatch):
                other.check(bytes(read_block(img, b)), b)


def test_seal_round_trip_and_prepare() -> None:
    buf = bytearray(fmt.BLOCK_SIZE)
    buf[100:110] = b"0123456789"
    seal(buf, 7)
    assert stored_checksum(buf) == block_checksum(buf, 7)
    for v in (SUPERBLOCK_VALIDATOR, NODE_VALIDATOR, BITMAP_VALIDATOR, INDEX_VALIDATOR):
        b = bytearray(fmt.BLOCK_SIZE)
        # A valid empty leaf so the node validator's header checks pass too.
        struct.pack_into("<IIQIIII", b, 0, 0, fmt.LEAF_NODE, 0, 0, 252, 8, 0)
        v.prepare(b, 1234)
        assert struct.unpack_from("<Q", b, 8)[0] == 1234
        v.check(bytes(b), 1234)


@pytest.mark.parametrize("offset", [0, 3, 4, 8, 100, 4095])
def test_any_changed_byte_is_a_checksum_mismatch(offset: int) -> None:
    b = bytearray(fmt.BLOCK_SIZE)
    struct.pack_into("<IIQIIII", b, 0, 0, fmt.LEAF_NODE, 0, 0, 252, 8, 0)
    NODE_VALIDATOR.prepare(b, 42)
    b[offset] ^= 0x10
    with pytest.raises(ChecksumMismatch) as exc:
        NODE_VALIDATOR.check(bytes(b), 42)
    e = exc.value
    assert isinstance(e, CorruptBlock) and isinstance(e, MetadataError)
    assert e.block == 42 and "42" in str(e)
    assert e.expected == stored_checksum(b) and e.got == block_checksum(b, fmt.BTREE_CSUM_XOR)
    assert e.expected != e.got


def test_wrong_location_is_reported() -> None:
    b = bytearray(fmt.BLOCK_SIZE)
    BITMAP_VALIDATOR.prepare(b, 5)
    with pytest.raises(CorruptBlock) as exc:
        BITMAP_VALIDATOR.check(bytes(b), 6)
    assert not isinstance(exc.value, ChecksumMismatch)
    assert exc.value.block == 6 and exc.value.check == "wrong location"
    assert "5" in exc.value.detail


def test_the_crc_comes_without_the_crc32c_packages_start_up_imports() -> None:
    """The C function is loaded on its own (the package's __init__ costs ~20 ms of every
    command's start-up) and is the real CRC-32C (the standard check value of "123456789")."""
    import subprocess
    import sys
    code = ("import sys; from thinpool.metadata import checksum as c; "
            "print(hex(c._std_crc32c(b'123456789')), 'importlib.metadata' in sys.modules, "
            "'argparse' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0xe3069283", "False", "False"]
