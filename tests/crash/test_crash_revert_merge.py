"""Crash points of one revert, one merge and one rename: the recorded operation (open, the change, close) is
cut before every event it made, in each of the three ways of harness.py (drop unflushed writes,
tear the write in flight, reorder unflushed writes). Every resulting disk must open as a pool
whose names are the old set or the new, whose reverted/merged name holds exactly the old
content or the new (never neither, never a mix), whose other volumes read as before, with no
name dropped for a missing device, and which both checkers pass.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from thinpool import Pool
from tests.crash.harness import Recorder, crash_image, snapshot_files, write_files
from tests.tptools import assert_checks_pass, requires_tools

BS = 64 * 1024
BLOCKS = 6
MODES = ("drop", "tear", "reorder")


def _content(pool: Pool, name: str) -> bytes:
    return pool.volume(name).read(0, BLOCKS * BS)


def _setup(root: Path) -> dict[str, bytes]:
    """vol (A blocks, then partly B), snap of vol (A), other snapshot of vol (B), and a
    snapshot of snap (A plus C): the model of every volume's bytes."""
    with Pool.create(root, data_size=64 * BS, block_size=BS) as pool:
        vol = pool.create_thin("vol", BLOCKS * BS)
        vol.write(0, b"A" * (3 * BS))
        pool.snapshot("vol", "snap")
        vol.write(BS, b"B" * (BS + 100))
        vol.write(4 * BS, b"b" * 10)
        pool.snapshot("vol", "other")
        pool.volume("snap").write(5 * BS, b"S" * 7)
        pool.snapshot("snap", "child").write(2 * BS, b"C" * 5)
        return {n: _content(pool, n) for n in pool.volumes()}


def _record(root: Path, op) -> tuple[dict, list]:
    initial = snapshot_files(root)
    with Recorder(root) as rec:
        with Pool.open(root) as pool:
            op(pool)
    return initial, rec.events


def _crashes(tmp: Path, initial, events, check) -> int:
    rng = random.Random(len(events))
    n = 0
    for mode in MODES:
        for k in range(len(events) + 1):
            where = f"crash before event {k} of {len(events)} ({mode})"
            root = tmp / "crashed"
            write_files(crash_image(initial, events, k, mode, rng), root)
            with Pool.open(root) as pool:
                assert not any("dropped name" in x for x in pool.notes), (where, pool.notes)
                check(pool, where)
            assert_checks_pass(root / "metadata")
            n += 1
    return n


@requires_tools
def test_revert_crash_points_old_or_new(tmp_path):
    root = tmp_path / "p"
    model = _setup(root)
    initial, events = _record(root, lambda p: p.revert("vol", "snap"))
    seen = set()

    def check(pool: Pool, where: str) -> None:
        assert set(pool.volumes()) == set(model), where
        got = _content(pool, "vol")
        assert got in (model["vol"], model["snap"]), f"{where}: vol holds neither old nor new"
        seen.add(got == model["snap"])
        for n in ("snap", "other", "child"):
            assert _content(pool, n) == model[n], (where, n)

    assert _crashes(tmp_path, initial, events, check) > 3 * 5
    assert seen == {False, True}            # both outcomes were reached


@requires_tools
def test_merge_crash_points_old_or_new(tmp_path):
    root = tmp_path / "p"
    model = _setup(root)
    initial, events = _record(root, lambda p: p.merge("snap"))
    seen = set()

    def check(pool: Pool, where: str) -> None:
        names = set(pool.volumes())
        assert names in (set(model), set(model) - {"snap"}), (where, names)
        merged = names == set(model) - {"snap"}
        seen.add(merged)
        assert _content(pool, "vol") == model["snap" if merged else "vol"], where
        if not merged:
            assert _content(pool, "snap") == model["snap"], where
        for n in ("other", "child"):
            assert _content(pool, n) == model[n], (where, n)
        origins = {v.name: v.origin for v in pool.stat().volumes}
        assert origins["child"] == ("vol" if merged else "snap"), where
        assert origins["other"] == "vol", where

    assert _crashes(tmp_path, initial, events, check) > 3 * 5
    assert seen == {False, True}


def _renamed(model: dict[str, bytes]) -> dict[str, bytes]:
    new = {("renamed" if n == "snap" else n): b for n, b in model.items()}
    return new


def _rename_check(pool: Pool, where: str, model) -> bool:
    """Old names or new, each name holding its bytes, the child's origin following; True when
    renamed."""
    names = set(pool.volumes())
    renamed = names == set(_renamed(model))
    assert renamed or names == set(model), (where, names)
    for n, want in (_renamed(model) if renamed else model).items():
        assert _content(pool, n) == want, (where, n)
    origins = {v.name: v.origin for v in pool.stat().volumes}
    assert origins["child"] == ("renamed" if renamed else "snap"), where
    return renamed


@requires_tools
def test_rename_crash_points_old_or_new(tmp_path):
    root = tmp_path / "p"
    model = _setup(root)
    initial, events = _record(root, lambda p: p.rename("snap", "renamed"))
    seen = set()
    n = _crashes(tmp_path, initial, events,
                 lambda pool, where: seen.add(_rename_check(pool, where, model)))
    assert n >= 3 * 2
    assert seen == {False, True}


# -- an exception (a Ctrl-C) at every call inside the operation, in process ---------------------
def _interrupted_everywhere(tmp: Path, op, prefix: str, check, least: int = 5) -> dict[str, int]:
    from tests.crash.harness import Interrupt
    from thinpool.pool import PoolMode
    base = tmp / "base"
    model = _setup(base)
    import shutil
    d = tmp / "p"
    shutil.copytree(base, d)
    with Pool.open(d) as p, Interrupt(prefix=prefix) as counted:
        op(p)
    total = counted.count
    assert total > least, total
    outcomes = {"escaped": 0, "completed": 0, "degraded": 0}
    for nth in range(1, total + 1):
        shutil.rmtree(d)
        shutil.copytree(base, d)
        p = Pool.open(d)
        try:
            with Interrupt(nth, prefix=prefix) as it:
                try:
                    op(p)
                    outcomes["completed"] += 1
                except KeyboardInterrupt:
                    outcomes["escaped"] += 1
            assert it.fired, nth
            if p.mode != PoolMode.WRITE:
                outcomes["degraded"] += 1
            else:
                check(p, f"in process, after call {nth}", model)   # the open pool agrees too
        finally:
            p.close()
        assert_checks_pass(d / "metadata")
        with Pool.open(d) as p:
            if p.mode == PoolMode.READ_ONLY:
                p.clear_needs_check()
            assert not any("dropped name" in x for x in p.notes), (nth, p.notes)
            check(p, f"reopened after an interrupt at call {nth}", model)
    return outcomes


def _revert_check(pool: Pool, where: str, model) -> None:
    assert set(pool.volumes()) == set(model), where
    assert _content(pool, "vol") in (model["vol"], model["snap"]), where
    for n in ("snap", "other", "child"):
        assert _content(pool, n) == model[n], (where, n)


def _merge_check(pool: Pool, where: str, model) -> None:
    names = set(pool.volumes())
    merged = names == set(model) - {"snap"}
    assert merged or names == set(model), (where, names)
    assert _content(pool, "vol") == model["snap" if merged else "vol"], where
    for n in ("other", "child"):
        assert _content(pool, n) == model[n], (where, n)


@requires_tools
@pytest.mark.parametrize("prefix", ["thinpool.metadata", "thinpool.re"])
def test_revert_interrupted_at_every_call(tmp_path, prefix):
    out = _interrupted_everywhere(tmp_path, lambda p: p.revert("vol", "snap"), prefix,
                                  _revert_check)
    assert out["escaped"] > 0, out


@requires_tools
@pytest.mark.parametrize("prefix", ["thinpool.metadata", "thinpool.re"])
def test_merge_interrupted_at_every_call(tmp_path, prefix):
    out = _interrupted_everywhere(tmp_path, lambda p: p.merge("snap"), prefix, _merge_check)
    assert out["escaped"] > 0, out


@requires_tools
@pytest.mark.parametrize("prefix", ["thinpool.metadata", "thinpool.re"])
def test_rename_interrupted_at_every_call(tmp_path, prefix):
    out = _interrupted_everywhere(tmp_path, lambda p: p.rename("snap", "renamed"), prefix,
                                  lambda pool, where, model: _rename_check(pool, where, model),
                                  least=1)
    assert out["escaped"] > 0, out
