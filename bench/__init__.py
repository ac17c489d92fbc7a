"""Benchmarks for thinpool (pytest-benchmark).

Never collected by the default test run (``testpaths = ["tests"]``). Run them pinned to one CPU::

    taskset -c 0 python -m pytest bench/ --benchmark-only
    python -m bench            # the same; pins itself to CPU 0 when it can

Speed claims are proven here, side by side with a baseline in the same run, never by timing asserts
in ``tests/``. See ``bench/README.md``.
"""
