"""``thinpool discard`` (as blkdiscard) and relative sizes (``resize --size +10G``, as lvextend)."""

from __future__ import annotations

import json
import random


from tests.cli.helpers import assert_one_line_error, tp
from tests.tptools import assert_checks_pass, requires_tools

BS = 64 * 1024
MiB = 1 << 20


def _stat(home, target):
    return json.loads(tp(home, "stat", target, "--json", check=0).stdout)


@requires_tools
def test_discard_unmaps_whole_blocks_zeroes_edges_and_reports_the_freed_space(home):
    tp(home, "create", "p", "--size", "64M", check=0)
    tp(home, "create", "p/v", "--size", "8M", check=0)
    old = random.Random(5).randbytes(4 * MiB)
    tp(home, "write", "p/v", input=old, check=0)
    tp(home, "snapshot", "p/v", "s", check=0)
    new = random.Random(6).randbytes(MiB)
    tp(home, "write", "p/v", input=new, check=0)         # blocks 0-15 now v's own
    used = _stat(home, "p")["data_blocks_used"]
    r = tp(home, "discard", "p/v", "--offset", "100", "--length", str(2 * MiB), "--yes", check=0)
    # Blocks 1..31 whole: unmapped; 1..15 were v's own and go back to the pool. Block 32 is
    # shared with s: zeroing its edge copies it first (one block taken).
    assert "31 block(s) unmapped" in r.out and "896 KiB freed in pool p" in r.out, r.out
    assert _stat(home, "p")["data_blocks_used"] == used - 14
    want = new[:100] + bytes(2 * MiB) + old[100 + 2 * MiB:]
    assert tp(home, "read", "p/v", "--length", str(4 * MiB), check=0).stdout == want
    assert tp(home, "read", "p/s", "--length", str(4 * MiB), check=0).stdout == old
    assert_checks_pass(home / "p" / "metadata")


def test_discard_refusals_change_nothing(home):
    tp(home, "create", "p", "--size", "16M", check=0)
    tp(home, "create", "p/v", "--size", "1M", check=0)
    tp(home, "write", "p/v", input=b"keep" * 100, check=0)
    before = (home / "p" / "metadata").read_bytes()
    assert_one_line_error(tp(home, "discard", "p/v", "--offset", "512K", "--length", "1M",
                             "--yes"), 2, "past the end", "nothing was discarded")
    assert_one_line_error(tp(home, "discard", "p/v"), 1, "--yes")
    assert_one_line_error(tp(home, "discard", "p/nope", "--yes"), 1, "no volume")
    assert (home / "p" / "metadata").read_bytes() == before
    assert tp(home, "read", "p/v", "--length", "400", check=0).stdout == b"keep" * 100


def test_relative_sizes(home):
    tp(home, "create", "p", "--size", "1G", check=0)
    tp(home, "create", "p/v", "--size", "1G", check=0)
    tp(home, "resize", "p/v", "--size", "+10G", check=0)
    assert _stat(home, "p/v")["size"] == 11 << 30
    tp(home, "resize", "p/v", "--size", "-1G", "--yes", check=0)
    assert _stat(home, "p/v")["size"] == 10 << 30
    assert_one_line_error(tp(home, "resize", "p/v", "--size", "-20G", "--yes"), 2,
                          "leaves nothing")
    assert_one_line_error(tp(home, "resize", "p/v", "--size", "-1G"), 1, "--yes")
    assert _stat(home, "p/v")["size"] == 10 << 30
    tp(home, "resize", "p", "--size", "+1G", check=0)
    assert _stat(home, "p")["data_blocks_total"] * BS == 2 << 30
    assert_one_line_error(tp(home, "resize", "p", "--size", "-1M"), 2, "cannot shrink")
    assert_one_line_error(tp(home, "resize", "p/v", "--size", "+1Q"), 2, "unknown unit")
