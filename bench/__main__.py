"""``python -m bench [pytest options]``: run the benchmarks, pinned to CPU 0 like ``taskset -c 0``."""

from __future__ import annotations

import os
import pathlib
import sys

import pytest


def main(argv: list[str]) -> int:
    if hasattr(os, "sched_setaffinity") and 0 in os.sched_getaffinity(0):
        os.sched_setaffinity(0, {0})
    here = pathlib.Path(__file__).resolve().parent
    return int(pytest.main([str(here), "--benchmark-only", *argv]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
