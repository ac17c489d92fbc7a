"""Text lines from columns of integers, formatted with numpy instead of one Python step per line.

:func:`format_lines` fills one template per row: constant text with unsigned decimal fields
between, e.g. ``('  <m a="', 0, '" b="', 1, '"/>\\n')`` for two columns. Each row may use its own
template (``kinds`` picks it), which is how a dump interleaves single and range mappings. The
result is the same text ``''.join(template % row)`` would give, built in a few vectorised passes:
digits by repeated division (as many passes as the largest number has digits) into a grid of
fixed-width rows, then one pass that drops the unused places.

Costs: O(rows x digits) numpy work, O(output) memory; no Python step per row.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Piece = str | int       # constant text, or the index of a column


def _digits(col: np.ndarray) -> np.ndarray:
    """ASCII digits of non-negative integers, right-aligned in an (n, width) uint8 array whose
    leading non-digit places hold 0 (zero itself is "0")."""
    col = col.astype(np.uint64, copy=False)
    width = len(str(int(col.max()))) if len(col) else 1
    out = np.empty((len(col), width), np.uint8)
    rest = col.copy()
    ten = np.uint64(10)
    for j in range(width - 1, -1, -1):
        out[:, j] = (rest % ten).astype(np.uint8) + ord("0")
        rest //= ten
    for n in range(1, width):                 # blank the leading zeros of the shorter numbers
        out[col < np.uint64(10 ** n), width - 1 - n] = 0
    return out


def format_lines(templates: Sequence[Sequence[Piece]], columns: Sequence[np.ndarray],
                 kinds: np.ndarray | None = None) -> bytes:
    """The rows' text as ASCII bytes. ``columns`` are equal-length arrays of non-negative
    integers; ``kinds[i]`` is the template of row i (default: template 0 for every row). A
    template may use any subset of the columns, each at most once; its text must be ASCII
    without NUL bytes.

    Each row is laid out at a fixed width (every field as wide as its column's largest number,
    blank places NUL), then one pass of ``bytes.translate`` drops the NULs: what is left, row after row, is
    the text."""
    n = len(columns[0]) if columns else 0
    if n == 0:
        return b""
    kinds = np.zeros(n, np.int64) if kinds is None else np.asarray(kinds, np.int64)
    digits = {p: _digits(columns[p]) for tpl in templates for p in tpl if isinstance(p, int)}

    def width(p: Piece) -> int:
        return len(p) if isinstance(p, str) else digits[p].shape[1]

    total = max(sum(width(p) for p in tpl) for tpl in templates)
    grid = np.zeros((n, total), np.uint8)
    for k, tpl in enumerate(templates):
        rows = None if len(templates) == 1 else np.flatnonzero(kinds == k)
        if rows is not None and not len(rows):
            continue
        part = np.zeros((n if rows is None else len(rows), total), np.uint8)
        at = 0
        for p in tpl:
            w = width(p)
            if isinstance(p, str):
                part[:, at:at + w] = np.frombuffer(p.encode("ascii"), np.uint8)
            else:
                part[:, at:at + w] = digits[p] if rows is None else digits[p][rows]
            at += w
        if rows is None:
            grid = part
        else:
            grid[rows] = part
    return grid.tobytes().translate(None, b"\0")       # (several times faster than a mask)
