"""estimate_metadata_size against ``thin_metadata_size -b B -s S -m M -u b -n``.

Every power-of-two block size from 64 KiB to 1 GiB, pool sizes from just above one block to
exabytes (not all multiples of the block size), and max-thins counts from 1 to a million.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from thinpool.errors import InvalidArgument
from thinpool.tools.metadata_size import estimate_metadata_size

TOOL = shutil.which("thin_metadata_size", path="/usr/sbin:/sbin:/usr/local/sbin:/usr/bin")
pytestmark = pytest.mark.skipif(TOOL is None, reason="thin_metadata_size not installed")

KiB, GiB, TiB = 1 << 10, 1 << 30, 1 << 40
BLOCK_SIZES = [1 << k for k in range(16, 31)]          # 64 KiB .. 1 GiB


def pool_sizes(block: int) -> list[int]:
    sizes = {2 * block, 3 * block + 512, 10 * GiB + 4096, 123456789 * 512, TiB,
             5 * TiB + 7 * block, 1 << 50, 7 << 52}
    return sorted(s for s in sizes if s > block)


def run_tool(block: int, pool: int, thins: int) -> subprocess.CompletedProcess:
    return subprocess.run([TOOL, "-b", f"{block}b", "-s", f"{pool}b", "-m", str(thins),
                           "-u", "b", "-n"], capture_output=True, text=True)


def tool_size(block: int, pool: int, thins: int) -> int:
    r = run_tool(block, pool, thins)
    assert r.returncode == 0, r.stderr
    return int(r.stdout)


@pytest.mark.parametrize("block", BLOCK_SIZES, ids=lambda b: f"{b // KiB}KiB")
def test_estimate_equals_thin_metadata_size(block):
    for pool in pool_sizes(block):
        for thins in (1, 1000, 1 << 20):
            assert estimate_metadata_size(block, pool, thins) == tool_size(block, pool, thins), \
                (block, pool, thins)


@pytest.mark.parametrize("args", [(96 * KiB, TiB, 1), (256, TiB, 1), (64 * KiB, 64 * KiB, 1),
                                  (64 * KiB, 32 * KiB, 1), (64 * KiB, TiB, 0)])
def test_refuses_what_thin_metadata_size_refuses(args):
    assert run_tool(*args).returncode != 0
    with pytest.raises(InvalidArgument):
        estimate_metadata_size(*args)
