"""``tools.lines.format_lines`` against Python's own ``%`` formatting, one row at a time."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from thinpool.tools.dump import _RUN_LINES
from thinpool.tools.lines import format_lines


def by_python(templates, columns, kinds) -> bytes:
    out = []
    for i, k in enumerate(kinds):
        out.extend(p if isinstance(p, str) else str(int(columns[p][i])) for p in templates[k])
    return "".join(out).encode("ascii")


U64 = st.integers(0, (1 << 64) - 1)
SMALL = st.integers(0, 12)


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.tuples(st.one_of(SMALL, U64), st.one_of(SMALL, U64), st.one_of(SMALL, U64),
                               st.integers(0, 1)), max_size=60))
def test_two_templates_interleaved(rows) -> None:
    cols = [np.array([r[i] for r in rows], np.uint64) for i in range(3)]
    kinds = np.array([r[3] for r in rows], np.int64)
    templates = (("<a x=", 0, " y=", 2, "/>\n"), ("b", 1, "-", 0, "-", 2, "\n"))
    assert format_lines(templates, cols, kinds) == by_python(templates, cols, kinds)


def test_the_dump_lines_at_the_edges() -> None:
    """Zeros, powers of ten and their neighbours, the largest values of the on-disk fields."""
    edge = [0, 1, 9, 10, 11, 99, 100, 999_999, 1_000_000, (1 << 40) - 1, (1 << 63), (1 << 64) - 1]
    n = len(edge)
    cols = [np.array(edge, np.uint64), np.array(edge[::-1], np.uint64),
            np.array([1, 2] * (n // 2), np.uint64), np.array(edge, np.uint64) & np.uint64(0xFFFFFF)]
    kinds = (cols[2] != 1).astype(np.int64)
    got = format_lines(_RUN_LINES, cols, kinds)
    assert got == by_python(_RUN_LINES, cols, kinds)
    assert got.count(b"\n") == n and b"\0" not in got


def test_no_rows_and_one_template() -> None:
    assert format_lines(_RUN_LINES, [np.zeros(0, np.uint64)] * 4, np.zeros(0, np.int64)) == b""
    cols = [np.arange(5, dtype=np.uint64)]
    assert format_lines((("v", 0, ";"),), cols) == b"v0;v1;v2;v3;v4;"
