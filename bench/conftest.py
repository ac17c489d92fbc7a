"""Shared fixtures for the benchmarks: pool images restored once per session by the real
``thin_restore``, fresh copies of them per benchmark round, and a summary of ratios against the
baseline printed after pytest-benchmark's table.

* ``origins``: pools whose device 1 is one range of N mapped blocks (``test_snapshot.py``);
* ``metadata_1m`` / ``metadata_4m``: four devices, 1 or 4 million mappings in a mix of runs and
  single blocks, one device a diverged snapshot of another (``_metadata.mixed_xml``), with a
  sparse data file: for the tools and the peak memory;
* ``single_1m``: one exclusive device of 1 million mappings in the same mix (delete);
* ``qcow2_1m``: qcow2 images with 1 million allocated clusters (snapshot and delete baselines).

Every one is built on first use and removed at the end of the session."""

from __future__ import annotations

import os
import pathlib
import shutil
from collections import defaultdict

import pytest

from tests.tptools import thin_restore
from thinpool import Pool

from ._metadata import mixed_xml, single_device_xml
from ._util import find_tool, qemu_img_create, remove, sparse_file

#: Data block size of every benchmark pool: 64 KiB (128 sectors).
BLOCK_SIZE = 64 * 1024
#: Size of every benchmark metadata file. thin_restore stores 1M mappings of one range in about
#: 8,000 metadata blocks (32 MiB); 64 MiB leaves room for the snapshots a benchmark takes.
METADATA_SIZE = 64 * 2**20
#: Data blocks of every benchmark pool, whatever the volume's size: the same for the baseline and
#: the big cases, so that only the number of mapped blocks differs. (Before issue 11 a commit did
#: vectorised work proportional to the pool's data blocks; the pool's size is workload 10's.)
NR_DATA_BLOCKS = 1_000_000
#: Key of ``benchmark.extra_info`` holding the size a benchmark is parametrized on; the summary
#: compares each benchmark with the one of the same group whose size is the group's smallest.
SIZE_KEY = "mapped_blocks"


def pytest_sessionstart(session) -> None:
    """Byte-compile thinpool first. Its command line is timed as whole processes (workloads 7-9),
    and an installed package has its ``.pyc`` files; a source checkout run with
    ``PYTHONDONTWRITEBYTECODE`` set (as some sandboxes and CI images do) would otherwise compile
    every module in every process, about 50 ms that a user never pays. The baseline side, numpy,
    comes with its own ``.pyc`` files from pip."""
    import compileall

    import thinpool
    compileall.compile_dir(os.path.dirname(thinpool.__file__), quiet=1)


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
def origins(tmp_path_factory: pytest.TempPathFactory, request) -> Origins:
    if not _have_thin_restore():
        pytest.skip("thin_restore not found: install thin-provisioning-tools to build the pools")
    root = tmp_path_factory.mktemp("origins")
    request.addfinalizer(lambda: remove(root))
    return Origins(root)


# ---------------------------------------------------------------------------------------------
# Big metadata from the real thin_restore, and qcow2 images for the qemu baselines
# ---------------------------------------------------------------------------------------------

class BigMetadata:
    """A pristine metadata image written by ``thin_restore`` from ``xml`` (never open it for
    writing: copy it), the XML itself and a sparse data file of ``nr_data_blocks`` blocks."""

    def __init__(self, root: pathlib.Path, xml_text: str, metadata_size: int):
        self.root = root
        self.xml = root / "input.xml"
        self.xml.write_text(xml_text)
        head = xml_text[: xml_text.index(">")]
        self.nr_data_blocks = int(head.split('nr_data_blocks="')[1].split('"')[0])
        self.nr_mappings = sum(int(part.split('"')[0]) for part in
                               xml_text.split('mapped_blocks="')[1:])
        self.metadata_size = metadata_size
        self.image = thin_restore(xml_text, root / "metadata", metadata_size)
        _fsync(self.image)
        self.data = sparse_file(root / "data", self.nr_data_blocks * BLOCK_SIZE)

    def copy(self, dest: pathlib.Path) -> pathlib.Path:
        """A durable copy of the image (its writeback must not land in a timed fsync)."""
        shutil.copyfile(self.image, dest)
        _fsync(dest)
        return dest


def _big_metadata(tmp_path_factory, name: str, xml_text: str, size: int, request) -> BigMetadata:
    if not _have_thin_restore():
        pytest.skip("thin_restore not found: install thin-provisioning-tools to build the pools")
    root = tmp_path_factory.mktemp(name)
    request.addfinalizer(lambda: remove(root))
    big = BigMetadata(root, xml_text, size)
    os.sync()
    return big


@pytest.fixture(scope="session")
def metadata_1m(tmp_path_factory, request) -> BigMetadata:
    """1,000,000 mappings over four devices (thin_restore takes about 4 s)."""
    return _big_metadata(tmp_path_factory, "mixed-1m", mixed_xml(1_000_000), 64 * 2**20, request)


@pytest.fixture(scope="session")
def metadata_4m(tmp_path_factory, request) -> BigMetadata:
    """4,000,000 mappings over four devices (thin_restore takes about 15 s)."""
    return _big_metadata(tmp_path_factory, "mixed-4m", mixed_xml(4_000_000), 256 * 2**20, request)


@pytest.fixture(scope="session")
def single_1m(tmp_path_factory, request) -> BigMetadata:
    """Device 1 alone, with 1,000,000 exclusive mappings."""
    return _big_metadata(tmp_path_factory, "single-1m", single_device_xml(1_000_000), 64 * 2**20,
                         request)


#: Allocated clusters of the qcow2 baselines: as many as the thinpool volumes' mapped blocks.
QCOW2_CLUSTERS = 1_000_000


@pytest.fixture(scope="session")
def qcow2_1m(tmp_path_factory, request):
    """``qcow2_1m(cluster_size)``: a qcow2 image whose every one of 1,000,000 clusters is
    allocated (``preallocation=metadata``: L2 entries and reference counts as if written, the
    data left sparse; ``qemu-img check`` reports 100 % allocated). ``qemu-img snapshot`` walks
    the same tables and counts either way; a one-off run on a 4 KiB-cluster image filled with
    ``qemu-io -c 'write -P 1 ...'`` timed the same (0.23-0.47 s against 0.30-0.54 s)."""
    if find_tool("qemu-img") is None:
        pytest.skip("qemu-img not found: install qemu-utils")
    root = tmp_path_factory.mktemp("qcow2")
    request.addfinalizer(lambda: remove(root))
    images: dict[int, pathlib.Path] = {}

    def get(cluster_size: int) -> pathlib.Path:
        if cluster_size not in images:
            path = root / f"c{cluster_size}.qcow2"
            qemu_img_create(path, QCOW2_CLUSTERS * cluster_size, cluster_size, "metadata")
            _fsync(path)
            images[cluster_size] = path
        return images[cluster_size]

    return get


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
