"""Big pools from the command line (issue 11): cost independent of the pool's size, and pools
larger than the file system allows.

* Memory, not time: ``stat``, ``create POOL/VOL``, a 1-byte ``write`` and ``snapshot`` on a
  2 TiB pool (33,554,432 blocks, a block mapped near its end) peak within 64 MiB of the same
  commands on a 1 GiB pool (``ru_maxrss`` of the command's own process, from ``wait4`` in a small
  launcher: a child forked by pytest would start its high-water mark at pytest's size). On the
  starting commit the 2 TiB pool alone needed some 300 MiB more (every count in two arrays, and
  ``stat``'s sharing count sized by the highest mapped block).
* Big pools written by thinpool pass ``thin_check`` and ``thinpool check``: mappings in the
  first, a middle and the partial last bitmap, a snapshot broken by copy-on-write, a delete.
* A data file larger than the file system (or the process's ``ulimit -f``) allows: one line
  naming the limit and what to do, exit 2, nothing left behind; a resize past it changes
  nothing and leaves the pool writable (it used to degrade it to read-only, NEEDS_CHECK set,
  because the metadata had grown first).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from bench._util import peak_rss
from tests.cli.helpers import THINPOOL, assert_one_line_error, clean_env, tp
from tests.tptools import assert_checks_pass, requires_tools
from thinpool import Pool
from thinpool.metadata.thin_metadata import ThinMetadata

MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40

def _peak_mib(tmp_path: Path, home: Path, *args: str, stdin: bytes = b"") -> float:
    """Peak RSS of ``thinpool --home HOME ARGS`` as a process of its own; it must succeed."""
    (tmp_path / "in").write_bytes(stdin)
    return peak_rss([*THINPOOL, "--home", str(home), *args], tmp_path / "out", tmp_path / "in")[0]


@pytest.fixture(scope="module")
def homes(tmp_path_factory):
    """Two homes, each with one pool ``p`` and a volume ``v``: 1 GiB and 2 TiB. The big one
    maps virtual block 5 of ``v`` to a data block near the end of the pool."""
    out = {}
    for name, size in (("small", GiB), ("big", 2 * TiB)):
        home = tmp_path_factory.mktemp(name)
        tp(home, "create", "p", "--size", str(size), check=0)
        tp(home, "create", "p/v", "--size", "1G", check=0)
        out[name] = home
    meta = ThinMetadata.open(out["big"] / "p" / "metadata")
    far = meta.alloc_data(1, hint=meta.nr_data_blocks - 7)
    assert int(far[0]) == meta.nr_data_blocks - 7
    meta.insert(1, 5, int(far[0]))
    meta.commit()
    meta.close()
    return out


def test_commands_on_a_big_pool_need_no_more_memory(homes, tmp_path) -> None:
    steps = [("stat", "p"), ("stat", "--json", "p"), ("create", "p/w", "--size", "1G"),
             ("write", "p/w", "--offset", "12345"), ("snapshot", "p/v", "s")]
    for args in steps:
        peaks = {name: _peak_mib(tmp_path, home, *args, stdin=b"x") for name, home in homes.items()}
        assert peaks["big"] - peaks["small"] < 64, (args, peaks)
    st = json.loads(tp(homes["big"], "stat", "--json", "p", check=0).out)
    v = next(x for x in st["volumes"] if x["name"] == "v")
    assert st["data_blocks_total"] == 2 * TiB // 65536
    assert v["mapped_blocks"] == 1 and v["exclusive_blocks"] == 0 and v["shared_blocks"] == 1
    assert tp(homes["big"], "read", "p/w", "--offset", "12345", "--length", "1", check=0).stdout == b"x"


def test_sharing_counts_allocate_by_mappings_not_by_pool_size(homes) -> None:
    """stat's exclusive/shared columns (accounting.device_usage) used to ``np.bincount`` the
    mapped data blocks: an array of 8 bytes per block up to the highest one mapped (268 MB here,
    2 GB at 15 TiB). Lazily paged, so not in the RSS, but allocated: tracemalloc sees numpy's
    buffers."""
    import tracemalloc

    from thinpool.metadata.walker import MetadataReader
    from thinpool.snapshot.accounting import device_usage

    with MetadataReader(homes["big"] / "p" / "metadata") as reader:
        tracemalloc.start()
        try:
            usage = device_usage(reader)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    v = next(u for u in usage if u.dev_id == 1)       # (a snapshot of it may share the block)
    assert v.mapped_blocks == 1 and v.exclusive_blocks + v.shared_blocks == 1
    assert peak < 4 * MiB, peak


@requires_tools
def test_big_pools_written_by_thinpool_pass_both_checks(tmp_path) -> None:
    path = tmp_path / "big"
    with Pool.create(path, data_size=2 * TiB) as pool:
        nr = pool.metadata.nr_data_blocks
        vol = pool.create_thin("v", 4 * TiB)
        bs = pool.block_size
        for vb in range(40):
            vol.write(vb * bs, bytes([vb]) * 100)
        pool.snapshot("v", "s")
        vol.write(3 * bs, b"cow")                     # copy-on-write of a shared block
        pool.commit()
    # Mappings in a middle bitmap and in the partial last one, through the metadata.
    meta = ThinMetadata.open(path / "metadata")
    for hint, vb in ((nr // 2, 1000), (nr - 3, 2000)):
        blocks = meta.alloc_data(3, hint=hint)
        assert int(blocks[0]) == hint
        meta.insert_run(1, np.arange(vb, vb + 3), blocks)
    meta.commit()
    assert meta.data_sm.nr_allocated() == 40 + 1 + 6
    meta.close()
    assert_checks_pass(path / "metadata")
    with Pool.open(path) as pool:
        pool.delete("s")
        assert pool.stat().data_blocks_used == 40 + 6
    assert_checks_pass(path / "metadata")


# ---------------------------------------------------------------------------
# Larger than the file system allows (EFBIG)
# ---------------------------------------------------------------------------

def _file_limit(limit: int):
    """preexec_fn: this process may write files of at most ``limit`` bytes (``ulimit -f``)."""
    def set_it() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)       # EFBIG instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return set_it


def _limited(home: Path, limit: int, *args: str):
    r = subprocess.run([*THINPOOL, "--home", str(home), *args], capture_output=True,
                       env=clean_env(), timeout=120, preexec_fn=_file_limit(limit), check=False)
    r.stderr = r.stderr.decode(errors="replace")
    return r


def test_a_pool_larger_than_the_file_size_limit(tmp_path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    r = _limited(home, GiB, "create", "p", "--size", "2G")
    assert_one_line_error(r, 2, "cannot create data file", "2 GiB", "at most 1 GiB (1073741824 bytes)",
                          "ulimit -f", "smaller --size", "block device", "--data")
    assert list(home.iterdir()) == []                 # nothing made, nothing left behind
    tp(home, "create", "p", "--size", "1G", check=0)  # what fits works


def test_the_file_systems_own_limit(tmp_path) -> None:
    """Where the file system refuses a 17 TiB file (ext4 with 4 KiB blocks: 16 TiB - 4 KiB)."""
    probe = tmp_path / "probe"
    fd = os.open(probe, os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, 17 * TiB)
        pytest.skip(f"the file system under {tmp_path} takes a 17 TiB file")
    except OSError as e:
        if e.errno != 27:                              # EFBIG
            raise
    finally:
        os.close(fd)
        probe.unlink()
    home = tmp_path / "home"
    home.mkdir()
    r = tp(home, "create", "p", "--size", "17T")
    assert_one_line_error(r, 2, "17 TiB", "the file system there allows files of at most",
                          "smaller --size", "--data")
    assert list(home.iterdir()) == []
    limit = int(r.stderr.split("at most ")[1].split("(")[1].split(" bytes")[0])
    fd = os.open(probe, os.O_RDWR | os.O_CREAT)      # the limit named is exactly the largest size
    try:
        os.ftruncate(fd, limit)
        with pytest.raises(OSError):
            os.ftruncate(fd, limit + 1)
    finally:
        os.close(fd)
        probe.unlink()


@requires_tools
@pytest.mark.parametrize("with_metadata", [False, True])
def test_a_resize_past_the_file_size_limit_changes_nothing(tmp_path, with_metadata) -> None:
    home = tmp_path / "home"
    tp(home, "create", "p", "--size", "1G", check=0)
    tp(home, "create", "p/v", "--size", "100M", check=0)
    tp(home, "write", "p/v", input=b"kept", check=0)
    sizes = {f.name: f.stat().st_size for f in (home / "p").iterdir()}
    extra = ["--metadata-size", "64M"] if with_metadata else []
    r = _limited(home, GiB + GiB // 2, "resize", "p", "--size", "2G", *extra)
    assert_one_line_error(r, 2, "cannot grow data file", "at most 1.5 GiB", "smaller size")
    assert {f.name: f.stat().st_size for f in (home / "p").iterdir()} == sizes
    st = json.loads(tp(home, "stat", "--json", "p", check=0).out)
    assert st["mode"] == "write" and not st["needs_check"] and st["degraded"] is None
    assert st["data_blocks_total"] * st["block_size"] == GiB
    assert tp(home, "read", "p/v", "--length", "4", check=0).stdout == b"kept"
    assert_checks_pass(home / "p" / "metadata")
    tp(home, "resize", "p", "--size", "2G", *extra, check=0)     # without the limit it works
    assert json.loads(tp(home, "stat", "--json", "p", check=0).out)["data_blocks_total"] == 2 * 16384
