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
import subprocess
import sys

import pytest

from thinpool import Pool

from ._util import need_tool, remove, set_value, tag, thinpool_argv

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


#: Runs argv[2:] with its stdout in file argv[1], waits for it and prints its rusage. A small,
#: fresh process on purpose: a child's ``ru_maxrss`` starts at the RSS of the process that forked
#: it (Linux carries the pre-exec high-water mark across exec), so measured straight from the
#: benchmark process (hundreds of MiB by then) every child would seem at least that big.
_LAUNCHER = """
import json, os, sys
out = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
with open("/proc/self/status") as f:
    rss = [int(line.split()[1]) for line in f if line.startswith("VmHWM:")][0]
pid = os.fork()
if pid == 0:
    os.dup2(out, 1)
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"exit": os.waitstatus_to_exitcode(status), "maxrss_kib": usage.ru_maxrss,
                  "launcher_rss_kib": rss}))
"""


def _peak_mib(argv: list[str], out_path) -> tuple[float, bytes]:
    """Run ``argv``; its peak RSS in MiB and its stdout. Raises if it fails."""
    r = subprocess.run([sys.executable, "-I", "-S", "-c", _LAUNCHER, str(out_path), *argv],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise AssertionError(f"launcher failed: {r.stderr[-2000:]}")
    result = json.loads(r.stdout.strip().splitlines()[-1])
    if result["exit"] != 0:
        raise AssertionError(f"{argv[0]} exited {result['exit']}: {r.stderr[-2000:]}")
    # The child's high-water mark starts at the launcher's size (its VmHWM when it forked):
    # the figure is the child's own only if it is bigger.
    assert result["maxrss_kib"] > result["launcher_rss_kib"], result
    with open(out_path, "rb") as f:
        return result["maxrss_kib"] / 1024, f.read()


def _measure(benchmark, argv, out_path, check_output=None) -> None:
    peaks: list[float] = []

    def once():
        peak, out = _peak_mib(argv, out_path)
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
