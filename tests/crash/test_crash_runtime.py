"""Crash points of the runtime's snapshotter: one prepare (a snapshot of a committed layer), one
view, one commit and one remove, each recorded (the pool opened, the snapshotter started, the
call, the pool closed) and cut before every event it made, in the three ways of harness.py.
Every resulting disk must open as a pool whose snapshotter (after its reconcile) lists the
snapshots as before the call or as after it, never anything else; whose runtime volumes are
exactly the ones its records own; whose committed and view snapshots are read-only; and which
both checkers pass."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from thinpool import Pool
from thinpool.runtime import records as rec
from thinpool.runtime.snapshotter import RuntimeOptions, Snapshotter
from tests.crash.harness import Recorder, crash_image, snapshot_files, write_files
from tests.tptools import assert_checks_pass, requires_tools

BS = 64 * 1024
MiB = 1 << 20
MODES = ("drop", "tear", "reorder")


def _snap(pool: Pool, root: Path) -> Snapshotter:
    return Snapshotter(pool, root, None, RuntimeOptions(base_size=2 * MiB))


def _listing(s: Snapshotter) -> dict:
    return {i.name: (i.kind.label, i.parent) for i in s.walk()}


def _setup(root: Path) -> dict:
    with Pool.create(root, data_size=64 * BS, block_size=BS) as pool:
        s = _snap(pool, root)
        s.prepare("extract")
        pool.volume(s.records.snapshots["extract"]["volume"]).write(0, b"L" * (2 * BS))
        s.commit("layer", "extract")
        s.prepare("active", "layer")
        pool.volume(s.records.snapshots["active"]["volume"]).write(BS, b"A" * 10)
        s.prepare("old", "layer")
        return _listing(s)


OPS = {
    "prepare": (lambda s: s.prepare("new", "layer"),
                lambda m: {**m, "new": ("active", "layer")}),
    "view": (lambda s: s.view("look", "layer"),
             lambda m: {**m, "look": ("view", "layer")}),
    "commit": (lambda s: s.commit("layer2", "active"),
               lambda m: {**{k: v for k, v in m.items() if k != "active"},
                          "layer2": ("committed", "layer")}),
    "remove": (lambda s: s.remove("old"),
               lambda m: {k: v for k, v in m.items() if k != "old"}),
}


@requires_tools
@pytest.mark.parametrize("op", sorted(OPS))
def test_runtime_crash_points_old_or_new(tmp_path, op):
    root = tmp_path / "p"
    before = _setup(root)
    call, expect = OPS[op]
    after = expect(before)
    initial = snapshot_files(root)
    with Recorder(root) as recorder:
        with Pool.open(root) as pool:
            call(_snap(pool, root))
    events = recorder.events
    rng = random.Random(len(events))
    seen = set()
    for mode in MODES:
        for k in range(len(events) + 1):
            where = f"{op}: crash before event {k} of {len(events)} ({mode})"
            crashed = tmp_path / "crashed"
            write_files(crash_image(initial, events, k, mode, rng), crashed)
            with Pool.open(crashed) as pool:
                s = _snap(pool, crashed)
                got = _listing(s)
                assert got in (before, after), (where, got)
                seen.add(got == after)
                runtime = {v for v in pool.volumes() if rec.is_runtime_volume(v)}
                assert runtime == s.records.owned_volumes(), where
                assert s.records.pending == [], where
                for x in s.records.snapshots.values():
                    assert pool.volume(x["volume"]).read_only == (x["kind"] != "active"), where
                layer = pool.volume(s.records.snapshots["layer"]["volume"])
                assert layer.read(0, 2 * BS) == b"L" * (2 * BS), where
            assert_checks_pass(crashed / "metadata")
    assert seen == {False, True}, f"{op}: the crash points never showed both outcomes"
