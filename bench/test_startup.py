"""Start-up: ``thinpool --home H stat POOL`` as a whole process against
``python -c 'import numpy'`` with the same interpreter (workload 9 of the table; the issue's
target for the command line's start-up).

The pool is small (a 1 GiB sparse data file, one volume with 4 MiB written, one snapshot of it),
so the figure is start-up: the interpreter, the imports (click, rich, numpy, thinpool), opening
the pool read-only, one walk of its small trees and printing the table. The console script
beside this interpreter is run directly (a pyenv shim would add its own start-up to one side).
"""

from __future__ import annotations

import sys

import pytest

from thinpool import Pool

from ._util import MiB, remove, run, tag, thinpool_argv

WORKLOAD = "9. start-up: thinpool stat POOL vs python -c 'import numpy'"
ROUNDS = 10


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    with Pool.create(home / "demo", data_size=1024 * MiB) as pool:
        vol = pool.create_thin("vol0", 4096 * MiB)
        vol.write(0, b"\xab" * (4 * MiB))
        pool.snapshot("vol0", "snap0")
    yield home
    remove(home)


@pytest.mark.benchmark(group="9 start-up")
def test_startup_thinpool_stat(benchmark, home):
    tag(benchmark, WORKLOAD, "thinpool", "ms", label="thinpool --home H stat demo",
        target="at most 2x import numpy", target_ratio=0.5)
    benchmark.pedantic(run, args=(thinpool_argv() + ["--home", str(home), "stat", "demo"],),
                       rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.benchmark(group="9 start-up")
def test_startup_import_numpy(benchmark):
    tag(benchmark, WORKLOAD, "baseline", "ms", label="python -c 'import numpy' (same interpreter)")
    benchmark.pedantic(run, args=([sys.executable, "-c", "import numpy"],), rounds=ROUNDS,
                       warmup_rounds=1)
