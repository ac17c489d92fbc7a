"""A held metadata snapshot read through our tools and through ``thin_dump -m`` & co.

A random pool (Pool API) reserves a metadata snapshot and then goes on changing: writes,
copy-on-write into snapshots, new snapshots, deletes, discards, commits. While the snapshot is
held, reading it with ``MetadataReader(path, metadata_snap=True)`` must give exactly what
``thin_dump -m``, ``thin_ls -m`` and ``thin_delta -m`` print, and must still be the pool as it was
when the snapshot was taken; the live trees must match the plain tools; ``check`` and
``thin_check`` must pass. After release every block only the snapshot used is freed: both space
maps equal the counts recomputed from the trees, and ``thin_check`` passes.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from tests.tools.helpers import (LS_FIELDS_090, copy_file, delta_pairs, device_roots,
                                 flip_bit, our_delta, our_dump, our_ls, random_pool, random_steps,
                                 raw_node, read_block, superblock, tools_delta, tools_dump,
                                 tools_ls)
from tests.tptools import assert_checks_pass
from tests.tptools import requires_tools, thin_check
from thinpool.errors import NotFound
from thinpool.metadata import format as fmt
from thinpool.metadata.walker import MetadataReader, expected_counts
from thinpool.tools.check import check
from thinpool.tools.repair import repair

pytestmark = requires_tools

SEEDS = range(3)


def tree_nodes(path, root: int) -> set[int]:
    """Every node of the tree at ``root``."""
    out, stack = set(), [root]
    while stack:
        b = stack.pop()
        out.add(b)
        n = raw_node(path, b)
        if not n.is_leaf:
            stack += [int.from_bytes(v, "little") for v in n.values]
    return out


def device_roots_at(path, top_root: int) -> list[int]:
    """The mapping roots a top-level tree at ``top_root`` holds."""
    return [int.from_bytes(v, "little") for b in tree_nodes(path, top_root)
            if raw_node(path, b).is_leaf for v in raw_node(path, b).values]


@pytest.fixture(scope="module", params=SEEDS)
def held(request, tmp_path_factory):
    """(pool, metadata path, dump at reservation time, device ids then), snapshot held."""
    seed = request.param
    d = tmp_path_factory.mktemp(f"held-{seed}")
    pool, model = random_pool(d / "pool", seed, steps=14, max_writes=600)
    path = d / "pool" / "metadata"
    before = tools_dump(path)
    with MetadataReader(path) as r:
        devs = sorted(r.roots())
    pool.metadata.reserve_metadata_snap()
    random_steps(pool, model, random.Random(seed + 1000), steps=14, max_writes=600)
    for name in sorted(model.volumes)[:2]:          # copy-on-write of blocks the snapshot holds
        vol = pool.volume(name)
        for off in list(model.volumes[name])[:50]:
            vol.write(off, b"\xee")
            model.volumes[name][off] = 0xEE
    pool.commit()
    yield pool, path, before, devs
    pool.close()


def test_snapshot_is_still_the_pool_as_it_was(held):
    pool, path, before, _ = held
    sb_line, _, rest = before.partition("\n")
    frozen = sb_line.replace(f'nr_data_blocks="{pool.metadata.nr_data_blocks}"',
                             'nr_data_blocks="0"') + "\n" + rest     # -m prints 0 (spec 9.1)
    assert our_dump(path, snap=True) == frozen
    assert our_dump(path) != before          # the pool did change meanwhile


def test_dump_m_equals_thin_dump_m(held):
    _, path, _, _ = held
    assert our_dump(path, snap=True) == tools_dump(path, snap=True)
    assert our_dump(path) == tools_dump(path)


@pytest.mark.parametrize("headers", [True, False])
def test_ls_m_equals_thin_ls_m(held, headers):
    _, path, _, _ = held
    assert our_ls(path, LS_FIELDS_090, headers, snap=True) == \
        tools_ls(path, LS_FIELDS_090, headers, snap=True)
    assert our_ls(path, LS_FIELDS_090, headers) == tools_ls(path, LS_FIELDS_090, headers)


@pytest.mark.parametrize("verbose", [False, True], ids=["plain", "verbose"])
def test_delta_m_equals_thin_delta_m(held, verbose):
    _, path, _, devs = held
    for left, right in delta_pairs(devs, random.Random(7), n=5):
        assert our_delta(path, left, right, verbose, snap=True) == \
            tools_delta(path, left, right, verbose, snap=True), (left, right)
    with MetadataReader(path) as r:
        live = sorted(r.roots())
    for left, right in delta_pairs(live, random.Random(8), n=3):
        assert our_delta(path, left, right, verbose) == tools_delta(path, left, right, verbose)


def test_check_and_thin_check_pass_while_held(held):
    _, path, _, _ = held
    report = check(path)
    assert report.clean, [str(f) for f in report.errors]
    assert_checks_pass(path)
    assert_checks_pass(path, "-m")


def test_release_frees_what_only_the_snapshot_used(tmp_path):
    pool, model = random_pool(tmp_path / "pool", 11, steps=12, max_writes=600)
    path = tmp_path / "pool" / "metadata"
    meta = pool.metadata
    meta.reserve_metadata_snap()
    random_steps(pool, model, random.Random(12), steps=12, max_writes=600)
    used_held = meta.metadata_sm.nr_allocated()
    meta.release_metadata_snap()
    with pytest.raises(NotFound):
        MetadataReader(path, metadata_snap=True)
    em, ed = expected_counts(meta)
    assert np.array_equal(em, meta.metadata_sm.all_counts())
    assert np.array_equal(ed, meta.data_sm.all_counts())
    assert meta.metadata_sm.nr_allocated() < used_held
    assert_checks_pass(path)
    assert check(path).clean
    assert our_dump(path) == tools_dump(path)
    pool.close()


def test_damage_only_the_snapshot_holds_is_found_and_repair_keeps_the_pool(held, tmp_path):
    """A node only the held snapshot still uses: check names it, thin_check fails, and repair
    (which rebuilds the live trees) keeps every live mapping."""
    _, path, _, _ = held
    sb = superblock(path)
    copy = fmt.Superblock.unpack(bytes(read_block(path, sb.metadata_snap)))
    live: set[int] = {sb.data_mapping_root}
    for root in device_roots(path).values():
        live |= tree_nodes(path, root)
    only_held = sorted(set().union(*(tree_nodes(path, r)
                                     for r in device_roots_at(path, copy.data_mapping_root)))
                       - live)
    assert only_held, "the later changes left no node to the snapshot alone"
    damaged = copy_file(path, tmp_path / "damaged.img")
    flip_bit(damaged, only_held[0], 1000)
    report = check(damaged)
    assert any(f.block == only_held[0] for f in report.errors), [str(f) for f in report.errors]
    assert thin_check(damaged).returncode != 0
    repair(damaged, tmp_path / "repaired.img")
    assert tools_dump(tmp_path / "repaired.img") == tools_dump(path)
    assert_checks_pass(tmp_path / "repaired.img")
    assert check(tmp_path / "repaired.img").clean
