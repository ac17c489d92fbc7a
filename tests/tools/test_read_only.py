"""Read-only operations leave their input byte for byte unchanged (STYLE.md: tests as contracts).

dump (XML and JSON, live and through a held metadata snapshot), ls, delta, check, salvage,
``MetadataReader`` and repair's input are run on a pool with a held metadata snapshot, on
metadata written by ``thin_restore``, and on damaged metadata; the input's sha256 and
modification time must not change.
"""

from __future__ import annotations

import os
import random

import pytest

from tests.tools.helpers import (copy_file, flip_bit, our_delta, our_dump, our_ls, random_pool,
                                 random_steps, sha256, superblock)
from tests.tptools import TOOLS_AVAILABLE, random_superblock, thin_restore, to_xml
from thinpool.metadata.walker import MetadataReader
from thinpool.snapshot.accounting import device_usage
from thinpool.tools.check import check
from thinpool.tools.repair import repair, salvage


def read_everything(path, snap: bool = False) -> None:
    with MetadataReader(path, metadata_snap=snap) as r:
        r.details()
        for root in r.roots().values():
            r.device_arrays(root)
            list(r.mappings(root, 3, 1000))
        device_usage(r)


def operations(path, tmp_path, snap_held: bool, damaged: bool = False):
    """(name, callable) pairs of every read-only operation on ``path``."""
    ops = [("check", lambda: check(path)),
           ("salvage", lambda: salvage(path)),
           ("repair input", lambda: repair(path, tmp_path / f"repaired-{random.random()}.img"))]
    if damaged:
        return ops
    for snap in ([False, True] if snap_held else [False]):
        with MetadataReader(path, metadata_snap=snap) as r:
            devs = sorted(r.roots())
        pairs = [(devs[0], devs[-1]), (devs[-1], devs[-1])] if devs else []
        ops += [
            (f"dump xml snap={snap}", lambda s=snap: our_dump(path, snap=s)),
            (f"dump json snap={snap}", lambda s=snap: our_dump(path, snap=s, as_json=True)),
            (f"ls snap={snap}", lambda s=snap: (our_ls(path, snap=s),
                                                our_ls(path, headers=False, snap=s))),
            (f"reader snap={snap}", lambda s=snap: read_everything(path, s)),
        ]
        for a, b in pairs:
            ops.append((f"delta {a} {b} snap={snap}",
                        lambda a=a, b=b, s=snap: (our_delta(path, a, b, False, s),
                                                  our_delta(path, a, b, True, s))))
    return ops


def assert_unchanged(path, ops) -> None:
    digest, mtime = sha256(path), os.stat(path).st_mtime_ns
    for name, op in ops:
        op()
        assert sha256(path) == digest, f"{name} changed the input"
        assert os.stat(path).st_mtime_ns == mtime, f"{name} wrote to the input"


def test_pool_with_held_snapshot_is_left_unchanged(tmp_path):
    pool, model = random_pool(tmp_path / "pool", 3, steps=12, max_writes=300)
    pool.metadata.reserve_metadata_snap()
    random_steps(pool, model, random.Random(4), steps=8)
    pool.close()
    path = tmp_path / "pool" / "metadata"
    assert superblock(path).metadata_snap
    assert_unchanged(path, operations(path, tmp_path, snap_held=True))


@pytest.mark.skipif(not TOOLS_AVAILABLE, reason="needs thin_restore")
def test_thin_restore_output_is_left_unchanged(tmp_path):
    rng = random.Random(5)
    sb = random_superblock(rng, max_mappings=2000)
    while len(sb.devices) < 2:
        sb = random_superblock(rng, max_mappings=2000)
    path = thin_restore(to_xml(sb), tmp_path / "meta.img")
    assert_unchanged(path, operations(path, tmp_path, snap_held=False))


@pytest.mark.parametrize("what", ["superblock", "mapping root", "details root", "data index"])
def test_damaged_metadata_is_left_unchanged(tmp_path, what):
    pool, _ = random_pool(tmp_path / "pool", 6, steps=10, max_writes=300)
    pool.close()
    path = copy_file(tmp_path / "pool" / "metadata", tmp_path / "damaged.img")
    sb = superblock(path)
    with MetadataReader(path) as r:
        roots = r.roots()
    block = {"superblock": 0, "mapping root": max(roots.values()) if roots else 0,
             "details root": sb.device_details_root, "data index": sb.data_sm.bitmap_root}[what]
    flip_bit(path, block, 700)
    assert_unchanged(path, operations(path, tmp_path, snap_held=False, damaged=True))
