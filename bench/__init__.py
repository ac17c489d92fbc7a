"""Benchmarks for thinpool (pytest-benchmark).

Never collected by the default test run (``testpaths = ["tests"]``). Run them pinned to one CPU::

    python -m bench                          # everything, then one table: thinpool | baseline | ratio
    python -m bench -k "tools or snapshot"   # a subset (pytest -k on test and module names)
    taskset -c 0 python -m pytest bench/ --benchmark-only   # pytest-benchmark's own tables

Speed claims are proven here, side by side with a baseline in the same run, never by timing asserts
in ``tests/``. See ``bench/README.md``.
"""
