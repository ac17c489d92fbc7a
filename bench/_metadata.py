"""Big metadata for the benchmarks: thin_dump-style XML with a realistic mix of mappings, restored
by the real ``thin_restore``.

:func:`mixed_xml` writes a pool of four devices holding ``nr_mappings`` mappings in all:

* device 1, an origin with 40 % of the mappings;
* device 2, a snapshot of device 1 that has since diverged: the same virtual blocks, three runs in
  four still shared with device 1 (same data blocks, time 0), one in four copied to new data blocks
  (time 1) — so ``ls`` has exclusive and shared blocks to count and data reference counts of 2;
* devices 3 and 4, independent volumes with 10 % each.

Each device is a sequence of runs separated by gaps of 0-15 unmapped virtual blocks: 40 % of the
runs are one block (``<single_mapping>``), the rest 2-64 blocks (``<range_mapping>``). Runs are
laid out on the data device in a shuffled order with gaps of 0-3 free blocks, as on a pool that
was written out of order. Everything comes from a seeded generator: the same arguments give the
same XML, byte for byte.
"""

from __future__ import annotations

import io

import numpy as np

BLOCK_SECTORS = 128          # 64 KiB data blocks

def _runs(rng: np.random.Generator, nr_mappings: int) -> tuple[np.ndarray, np.ndarray]:
    """(virtual begin, length) of runs covering exactly ``nr_mappings`` blocks."""
    est = int(nr_mappings / 20) + 64
    while True:
        lengths = np.where(rng.random(est) < 0.4, 1, rng.integers(2, 65, est))
        total = np.cumsum(lengths)
        if total[-1] >= nr_mappings:
            break
        est *= 2
    n = int(np.searchsorted(total, nr_mappings)) + 1
    lengths = lengths[:n].copy()
    lengths[-1] -= int(total[n - 1]) - nr_mappings          # trim the last run to fit exactly
    gaps = rng.integers(0, 16, n)
    begins = np.cumsum(gaps + np.concatenate([[0], lengths[:-1]]))
    return begins.astype(np.int64), lengths.astype(np.int64)


class _DataSpace:
    """Hands out data blocks for runs: shuffled order, small gaps, never reused."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.next = 0

    def place(self, lengths: np.ndarray) -> np.ndarray:
        order = self.rng.permutation(len(lengths))
        gaps = self.rng.integers(0, 4, len(lengths))
        sizes = lengths[order] + gaps[order]
        starts_in_order = self.next + np.cumsum(sizes) - sizes
        self.next += int(sizes.sum())
        starts = np.empty(len(lengths), np.int64)
        starts[order] = starts_in_order
        return starts


def nr_data_blocks_for(nr_mappings: int) -> int:
    """Data blocks of the pool :func:`mixed_xml` writes: what it uses, rounded up to 2^k."""
    used = int(nr_mappings * 0.75) + 1024           # 70 % mapped once, gaps of ~ 1.5/run
    return 1 << (used - 1).bit_length()


def mixed_xml(nr_mappings: int, seed: int = 6) -> str:
    """thin_restore XML for four devices holding ``nr_mappings`` mappings in all (see the module
    docstring)."""
    rng = np.random.default_rng(seed)
    space = _DataSpace(rng)
    devices: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
    counts = {1: int(nr_mappings * 0.4)}           # device 2 has as many as device 1
    counts[3] = (nr_mappings - 2 * counts[1]) // 2
    counts[4] = nr_mappings - 2 * counts[1] - counts[3]
    for dev in (1, 3, 4):
        begins, lengths = _runs(rng, counts[dev])
        devices[dev] = (begins, space.place(lengths), lengths, np.zeros(len(lengths), np.int64))
    # Device 2: device 1's runs, one in four moved to new data blocks at time 1.
    begins, data, lengths, _ = devices[1]
    moved = rng.random(len(lengths)) < 0.25
    data2 = data.copy()
    data2[moved] = space.place(lengths[moved])
    devices[2] = (begins, data2, lengths, moved.astype(np.int64))
    nr_data = nr_data_blocks_for(nr_mappings)
    if space.next > nr_data:
        raise AssertionError(f"used {space.next} data blocks, more than {nr_data}")

    out = io.StringIO()
    out.write(f'<superblock uuid="" time="1" transaction="1" flags="0" version="2" '
              f'data_block_size="{BLOCK_SECTORS}" nr_data_blocks="{nr_data}">\n')
    for dev in sorted(devices):
        begins, data, lengths, times = devices[dev]
        out.write(f'  <device dev_id="{dev}" mapped_blocks="{int(lengths.sum())}" transaction="0" '
                  f'creation_time="{0 if dev != 2 else 1}" snap_time="{1 if dev <= 2 else 0}">\n')
        single = '    <single_mapping origin_block="{}" data_block="{}" time="{}"/>\n'.format
        ranged = '    <range_mapping origin_begin="{}" data_begin="{}" length="{}" time="{}"/>\n'.format
        out.write("".join(
            single(b, d, t) if n == 1 else ranged(b, d, n, t)
            for b, d, n, t in zip(begins.tolist(), data.tolist(), lengths.tolist(), times.tolist())))
        out.write("  </device>\n")
    out.write("</superblock>\n")
    return out.getvalue()


def single_device_xml(nr_mappings: int, seed: int = 7) -> str:
    """thin_restore XML for one device (id 1) of ``nr_mappings`` exclusive mappings in the same
    mix of single blocks and runs, laid out out of order on the data device."""
    rng = np.random.default_rng(seed)
    space = _DataSpace(rng)
    begins, lengths = _runs(rng, nr_mappings)
    data = space.place(lengths)
    nr_data = 1 << (space.next - 1).bit_length()
    out = io.StringIO()
    out.write(f'<superblock uuid="" time="0" transaction="1" flags="0" version="2" '
              f'data_block_size="{BLOCK_SECTORS}" nr_data_blocks="{nr_data}">\n')
    out.write(f'  <device dev_id="1" mapped_blocks="{nr_mappings}" transaction="0" '
              f'creation_time="0" snap_time="0">\n')
    single = '    <single_mapping origin_block="{}" data_block="{}" time="0"/>\n'.format
    ranged = '    <range_mapping origin_begin="{}" data_begin="{}" length="{}" time="0"/>\n'.format
    out.write("".join(single(b, d) if n == 1 else ranged(b, d, n)
                      for b, d, n in zip(begins.tolist(), data.tolist(), lengths.tolist())))
    out.write("  </device>\n</superblock>\n")
    return out.getvalue()
