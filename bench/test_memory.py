"""Peak memory opening and checking a pool with 4,000,000 mappings (workload 8).

The metadata is ``metadata_4m`` (four devices, 4M mappings, written by the real ``thin_restore``
into a 256 MiB file) with a sparse data file of 4,194,304 blocks of 64 KiB (256 GiB).

* **thinpool, command line** (8a): ``thinpool --home H check POOL`` on a pool directory holding
  that metadata (made once: ``Pool.create``, the image copied over its metadata, one read-write
  open so the names registry knows the four devices). It opens the pool read-only, holds it open
  and checks its metadata, as a user runs it; it must exit 0.
* **thinpool, library** (8b): a fresh Python process opens the metadata and data files
  (``Pool.open_files(metadata, data, read_only=True)``, reads ``stat()``) and, with the pool still
  open, runs ``thinpool.tools.check.check`` on the metadata; the check must be clean.
  ``open_files`` has no names registry, so opening also gives each device a name and a size.
* **baseline**: ``thin_check`` on the same metadata.

The figure is the process's peak resident set: ``ru_maxrss`` of that one child, from
``os.wait4`` in a small launcher process (``RUSAGE_CHILDREN`` would report the biggest child the
benchmark process ever waited for, and a child forked straight from the benchmark process starts
its high-water mark at the benchmark process's own size). The timing pytest-benchmark shows is the whole process's run time. Target: thinpool
under 300 MiB; the ratio is thin_check's peak over thinpool's.
"""

from __future__ import annotations

import json
import sys

import pytest

from thinpool import Pool

from ._util import need_tool, peak_rss, remove, set_value, tag, thinpool_argv

CLI = "8a. peak memory: thinpool check POOL, 4M mappings"
LIBRARY = "8b. peak memory: Pool.open_files + check, 4M mappings"
ROUNDS = 2

_SCRIPT = """
import json, sys
from thinpool import Pool
from thinpool.tools.check import check
meta, data = sys.argv[1], sys.argv[2]
pool = Pool.open_files(meta, data, read_only=True)
st = pool.stat()
report = check(meta)
pool.close()
json.dump({"clean": report.clean, "mappings": report.nr_mappings,
           "volumes": len(st.volumes)}, sys.stdout)
"""


def _measure(benchmark, argv, out_path, check_output=None) -> None:
    peaks: list[float] = []

    def once():
        peak, out = peak_rss(argv, out_path)
        if check_output is not None:
            check_output(out)
        peaks.append(peak)

    benchmark.pedantic(once, rounds=ROUNDS)
    set_value(benchmark, max(peaks))
    benchmark.extra_info["peaks_mib"] = peaks


@pytest.fixture(scope="module")
def pool_home(metadata_4m, tmp_path_factory):
    """A pool directory ``big`` in a thinpool home whose metadata is the 4M-mapping image."""
    home = tmp_path_factory.mktemp("home4m")
    path = home / "big"
    Pool.create(path, data_size=metadata_4m.nr_data_blocks * 64 * 1024,
                metadata_size=metadata_4m.metadata_size).close()
    metadata_4m.copy(path / "metadata")
    Pool.open(path).close()               # names for the devices (a read-write open saves them)
    with Pool.open(path, read_only=True) as pool:
        assert len(pool.volumes()) == 4
    yield home
    remove(home)


@pytest.mark.benchmark(group="8 peak memory, 4M mappings")
def test_memory_thinpool_check_cli(benchmark, pool_home, tmp_path):
    tag(benchmark, CLI, "thinpool", "MiB", label="thinpool --home H check big",
        target="< 300 MiB", target_max=300.0)

    def good(out: bytes) -> None:
        assert b"clean" in out and b"4000000 mapping" in out, out

    _measure(benchmark, thinpool_argv() + ["--home", str(pool_home), "check", "big"],
             tmp_path / "out", good)


@pytest.mark.benchmark(group="8 peak memory, 4M mappings")
def test_memory_thinpool_library(benchmark, metadata_4m, tmp_path):
    tag(benchmark, LIBRARY, "thinpool", "MiB", label="Pool.open_files + check (python)",
        target="< 300 MiB", target_max=300.0)

    def good(out: bytes) -> None:
        result = json.loads(out)
        assert result == {"clean": True, "mappings": metadata_4m.nr_mappings, "volumes": 4}, result

    _measure(benchmark, [sys.executable, "-c", _SCRIPT, str(metadata_4m.image),
                         str(metadata_4m.data)], tmp_path / "out", good)


@pytest.mark.benchmark(group="8 peak memory, 4M mappings")
def test_memory_thin_check(benchmark, metadata_4m, tmp_path):
    for row in (CLI, LIBRARY):
        tag(benchmark, row, "baseline", "MiB", label="thin_check 0.9.0")
    _measure(benchmark, [need_tool("thin_check", "thin-provisioning-tools"), "-q",
                         str(metadata_4m.image)], tmp_path / "out")
