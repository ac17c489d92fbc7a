"""Shared fixtures for the benchmarks: pool images restored once per session by the real
``thin_restore``, fresh copies of them per benchmark round, and a summary of ratios against the
baseline printed after pytest-benchmark's table."""

from __future__ import annotations

import os
import pathlib
import shutil
from collections import defaultdict

import pytest

from tests.tptools import thin_restore
from thinpool import Pool

#: Data block size of every benchmark pool: 64 KiB (128 sectors).
BLOCK_SIZE = 64 * 1024
#: Size of every benchmark metadata file. thin_restore stores 1M mappings of one range in about
#: 8,000 metadata blocks (32 MiB); 64 MiB leaves room for the snapshots a benchmark takes.
METADATA_SIZE = 64 * 2**20
#: Data blocks of every benchmark pool, whatever the volume's size: the same for the baseline and
#: the big cases, so that only the number of mapped blocks differs. (A commit does vectorised work
#: proportional to the pool's data blocks; a varying pool size would measure that instead.)
NR_DATA_BLOCKS = 1_000_000
#: Key of ``benchmark.extra_info`` holding the size a benchmark is parametrized on; the summary
#: compares each benchmark with the one of the same group whose size is the group's smallest.
SIZE_KEY = "mapped_blocks"


def _have_thin_restore() -> bool:
    # The tools live in /usr/sbin, which is not on an ordinary user's PATH.
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"])
    return shutil.which("thin_restore", path=path) is not None


def range_xml(mapped_blocks: int, nr_data_blocks: int = NR_DATA_BLOCKS) -> str:
    """thin_restore XML: device 1 maps virtual blocks [0, n) to data blocks [0, n) in one range."""
    if not 0 < mapped_blocks <= nr_data_blocks:
        raise ValueError(f"need 0 < mapped_blocks <= {nr_data_blocks}, got {mapped_blocks}")
    return (
        f'<superblock uuid="" time="0" transaction="1" flags="0" version="2"'
        f' data_block_size="{BLOCK_SIZE // 512}" nr_data_blocks="{nr_data_blocks}">\n'
        f'  <device dev_id="1" mapped_blocks="{mapped_blocks}" transaction="0"'
        f' creation_time="0" snap_time="0">\n'
        f'    <range_mapping origin_begin="0" data_begin="0" length="{mapped_blocks}" time="0"/>\n'
        f"  </device>\n"
        f"</superblock>\n"
    )


def _fsync(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Origins:
    """Pools with one volume ("1") of n mapped blocks, built once and reused for the session."""

    def __init__(self, root: pathlib.Path, nr_data_blocks: int = NR_DATA_BLOCKS):
        self.root = root
        self.nr_data_blocks = nr_data_blocks
        self._metadata: dict[int, pathlib.Path] = {}
        self.data_path = root / "data"
        with open(self.data_path, "wb") as f:       # sparse: no data block is ever written
            f.truncate(nr_data_blocks * BLOCK_SIZE)
            os.fsync(f.fileno())

    def metadata(self, mapped_blocks: int) -> pathlib.Path:
        """The pristine metadata image for ``mapped_blocks`` (restored on first use). Never open it
        for writing: copy it with :meth:`open_copy`."""
        path = self._metadata.get(mapped_blocks)
        if path is None:
            path = thin_restore(range_xml(mapped_blocks, self.nr_data_blocks),
                                self.root / f"metadata-{mapped_blocks}", METADATA_SIZE)
            _fsync(path)   # so its writeback does not land in a timed commit's fsync
            self._metadata[mapped_blocks] = path
        return path

    def prepare(self, sizes, warm_up=None) -> None:
        """Restore every image now, run ``warm_up(pool)`` once on a copy of each, then sync the
        file system: so that no restore's writeback is still in flight when the first round is
        timed, and the first benchmark does not pay the process's one-off costs (lazy imports,
        the allocator growing its heap) that the later ones would not."""
        for n in sizes:
            self.metadata(n)
        if warm_up is not None:
            for n in sizes:
                pool = self.open_copy(n)
                try:
                    warm_up(pool)
                finally:
                    pool.close()
        os.sync()

    def open_copy(self, mapped_blocks: int, dest: pathlib.Path | None = None) -> Pool:
        """Copy the pristine image to ``dest`` (default: one scratch file, overwritten by every
        call; close the pool before the next call), make the copy durable, open it for writing.

        The fsync matters: without it the copy's dirty pages would be written back by the first
        commit's fsync, and the benchmark would time the copy (bigger for bigger volumes)."""
        if dest is None:
            dest = self.root / "copy"
        shutil.copyfile(self.metadata(mapped_blocks), dest)
        _fsync(dest)
        return Pool.open_files(dest, self.data_path, read_only=False)


@pytest.fixture(scope="session")
def origins(tmp_path_factory: pytest.TempPathFactory) -> Origins:
    if not _have_thin_restore():
        pytest.skip("thin_restore not found: install thin-provisioning-tools to build the pools")
    return Origins(tmp_path_factory.mktemp("origins"))


# ---------------------------------------------------------------------------------------------
# Summary: each benchmark's mean, median and min against its group's baseline (smallest size).
# ---------------------------------------------------------------------------------------------

#: Counts a benchmark may record in ``extra_info`` (exact, untimed), shown as extra columns.
_EXTRA_COLUMNS = {"metadata_blocks_written": "md written", "metadata_blocks_read": "md read"}


def _fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:9.3f} ms"


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    session = getattr(config, "_benchmarksession", None)
    benches = [b for b in getattr(session, "benchmarks", ())
               if SIZE_KEY in b.extra_info and b.stats.rounds]
    if not benches:
        return
    groups: dict[str, list] = defaultdict(list)
    for b in benches:
        groups[b.group or ""].append(b)
    tr = terminalreporter
    tr.section("ratios against the baseline (same run)")
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    if affinity is not None and len(affinity) != 1:
        tr.write_line(f"warning: not pinned to one CPU (affinity {affinity}); "
                      f"run under 'taskset -c 0'", yellow=True)
    for group in sorted(groups):
        rows = sorted(groups[group], key=lambda b: b.extra_info[SIZE_KEY])
        base = rows[0]
        tr.write_line(f"{group}  (baseline: {base.extra_info[SIZE_KEY]:,} {SIZE_KEY})")
        extra = [k for k in _EXTRA_COLUMNS if all(k in b.extra_info for b in rows)]
        tr.write_line(f"  {SIZE_KEY:>14}  {'mean':>12}  {'median':>12}  {'min':>12}  {'rounds':>6}"
                      f"  {'mean/base':>9}  {'median/base':>11}  {'min/base':>8}"
                      + "".join(f"  {_EXTRA_COLUMNS[k]:>10}" for k in extra))
        for b in rows:
            s, t = b.stats, base.stats
            tr.write_line(f"  {b.extra_info[SIZE_KEY]:>14,}  {_fmt_time(s.mean):>12}"
                          f"  {_fmt_time(s.median):>12}  {_fmt_time(s.min):>12}  {s.rounds:>6}"
                          f"  {s.mean / t.mean:>9.2f}  {s.median / t.median:>11.2f}"
                          f"  {s.min / t.min:>8.2f}"
                          + "".join(f"  {b.extra_info[k]:>10,}" for k in extra))
