"""The snapshotter's semantics over a real pool, without block devices (``devices=None``): what
containerd may ask and what it must get back; the bookkeeping checked against the pool's own
volumes, and both metadata checkers after the changes."""

from __future__ import annotations

import pytest

from thinpool import Pool
from thinpool.errors import AlreadyExists, BusyError, InvalidArgument, NoDataSpace, NotFound
from thinpool.runtime import records as rec
from thinpool.runtime.snapshotter import RuntimeOptions, Snapshotter
from thinpool.runtime.types import Info, Kind
from tests.tptools import assert_checks_pass

BS = 64 * 1024
MiB = 1 << 20


@pytest.fixture
def pool(tmp_path):
    p = Pool.create(tmp_path / "p", data_size=64 * MiB, block_size=BS)
    try:
        yield p
    finally:
        p.close()


def _dir(pool) -> str:
    return pool.stat().path


def make(pool, **opts) -> Snapshotter:
    return Snapshotter(pool, _dir(pool), None, RuntimeOptions(base_size=8 * MiB, **opts))


def owned_matches_pool(s: Snapshotter) -> None:
    runtime = {v for v in s.pool.volumes() if rec.is_runtime_volume(v)}
    assert runtime == s.records.owned_volumes()
    assert {x["volume"] for x in s.records.snapshots.values()} <= set(s.pool.volumes())


def test_prepare_commit_child_view_remove(pool):
    s = make(pool)
    assert s.prepare("a", labels={"x": "1"}) == []
    info = s.stat("a")
    assert (info.kind, info.parent, info.labels) == (Kind.ACTIVE, "", {"x": "1"})
    vol_a = s.records.snapshots["a"]["volume"]
    pool.volume(vol_a).write(0, b"layer one" * 100)
    s.commit("layer1", "a")
    with pytest.raises(NotFound):
        s.stat("a")
    assert s.stat("layer1").kind == Kind.COMMITTED
    assert pool.volume(vol_a).read_only            # committed is immutable
    s.prepare("c1", "layer1")
    s.view("v1", "layer1")
    c1 = pool.volume(s.records.snapshots["c1"]["volume"])
    v1 = pool.volume(s.records.snapshots["v1"]["volume"])
    assert c1.read(0, 900) == b"layer one" * 100 == v1.read(0, 900)
    assert v1.read_only and not c1.read_only
    c1.write(0, b"changed")
    assert pool.volume(vol_a).read(0, 9) == b"layer one"
    assert [i.name for i in s.walk()] == ["c1", "layer1", "v1"]
    with pytest.raises(BusyError, match="has 2 children"):
        s.remove("layer1")
    with pytest.raises(InvalidArgument, match="only an active"):
        s.commit("x", "v1")
    s.remove("c1")
    s.remove("v1")
    s.remove("layer1")
    assert s.walk() == [] and [v for v in pool.volumes() if rec.is_runtime_volume(v)] == []
    owned_matches_pool(s)
    pool.commit()
    assert_checks_pass(pool.stat().metadata_path)


def test_errors_change_nothing(pool):
    s = make(pool)
    s.prepare("a")
    before = (s.records.snapshot_of_doc(), sorted(pool.volumes()))
    with pytest.raises(AlreadyExists):
        s.prepare("a")
    with pytest.raises(NotFound):
        s.prepare("b", "missing")
    with pytest.raises(InvalidArgument, match="not committed"):
        s.prepare("b", "a")                 # an active is no parent
    with pytest.raises(NotFound):
        s.remove("missing")
    with pytest.raises(NotFound):
        s.commit("n", "missing")
    with pytest.raises(InvalidArgument):
        s.prepare("")
    with pytest.raises(InvalidArgument):
        s.prepare("k", labels={"a": 1})
    s.commit("n", "a")
    s.prepare("b")
    with pytest.raises(AlreadyExists):
        s.commit("n", "b")                  # the name is taken
    assert s.stat("b").kind == Kind.ACTIVE
    assert before[0]["next_id"] < s.records.doc["next_id"]
    owned_matches_pool(s)


def test_ids_only_increase_across_restarts(pool, tmp_path):
    s = make(pool)
    s.prepare("a")
    first = s.records.snapshots["a"]["volume"]
    s.remove("a")
    s = make(pool)                          # a restart: the records are read again
    s.prepare("a")
    assert s.records.snapshots["a"]["volume"] != first


def test_update_labels_with_containerd_masks(pool):
    s = make(pool)
    s.prepare("a", labels={"keep": "1", "drop": "2", "change": "3"})
    got = s.update(Info("a", Kind.ACTIVE, labels={"change": "new", "add": "4"}),
                   ["labels.change", "labels.drop", "labels.add"])
    assert got.labels == {"keep": "1", "change": "new", "add": "4"}
    assert got.updated_at >= got.created_at
    got = s.update(Info("a", Kind.ACTIVE, labels={"only": "this"}))
    assert got.labels == {"only": "this"}
    with pytest.raises(InvalidArgument):
        s.update(Info("a", Kind.ACTIVE), ["parent"])
    with pytest.raises(NotFound):
        s.update(Info("zz", Kind.ACTIVE), ["labels.x"])
    assert make(pool).stat("a").labels == {"only": "this"}     # saved


def test_walk_filters(pool):
    s = make(pool)
    s.prepare("a", labels={"containerd.io/snapshot.ref": "sha256:1"})
    s.commit("base", "a")
    s.prepare("c", "base", labels={"role": "x"})
    s.view("v", "base")
    names = lambda f: [i.name for i in s.walk(f)]  # noqa: E731
    assert names(["kind==committed"]) == ["base"]
    assert names(["parent==base"]) == ["c", "v"]
    assert names(["labels.role==x"]) == ["c"]
    assert names(["labels.\"containerd.io/snapshot.ref\""]) == ["base"]
    assert names(["kind==active", "kind==view"]) == ["c", "v"]       # either filter
    assert names(["parent==base,kind!=view"]) == ["c"]               # both terms
    assert names(["name~=^b"]) == ["base"]
    with pytest.raises(InvalidArgument):
        s.walk(["size==1"])


def test_usage_counts_what_a_snapshot_adds(pool):
    s = make(pool)
    s.prepare("a")
    base = pool.volume(s.records.snapshots["a"]["volume"])
    base.write(0, b"x" * (3 * BS))
    assert s.usage("a").blocks == 3 and s.usage("a").size == 3 * BS
    s.commit("base", "a")
    s.prepare("c", "base")
    assert s.usage("c").blocks == 0                        # shares every block
    c = pool.volume(s.records.snapshots["c"]["volume"])
    c.write(BS, b"y")                                      # one copy-on-write
    c.write(5 * BS, b"z")                                  # one new block
    assert s.usage("c").blocks == 2
    assert s.usage("base").blocks == 3
    free = pool.stat().data_blocks_free
    s.remove("c")
    assert pool.stat().data_blocks_free == free + 2        # its own blocks went back


def test_min_free_space_refuses_new_snapshots(pool):
    s = make(pool, min_free_space=50)
    s.prepare("a")
    vol = pool.volume(s.records.snapshots["a"]["volume"])
    vol.write(0, b"f" * (8 * MiB))
    s.commit("big", "a")
    s.prepare("ok", "big")                                 # 87% free still
    pool.create_thin("filler", 64 * MiB).write(0, b"g" * (28 * MiB))
    before = sorted(pool.volumes())
    with pytest.raises(NoDataSpace, match="below the minimum of 50%"):
        s.prepare("no", "big")
    assert sorted(pool.volumes()) == before and "no" not in s.records.snapshots
    with pytest.raises(InvalidArgument):
        make(pool, min_free_space=100)


def test_reconcile_finishes_or_undoes_what_a_crash_left(pool):
    s = make(pool)
    s.prepare("a")
    s.commit("base", "a")
    s.prepare("c", "base")
    doomed = s.records.snapshots["c"]["volume"]
    # A prepare cut after the pool made its volume, a removal cut before the pool deleted it,
    # a commit cut between its two steps, and a volume that nothing owns.
    pool.create_thin("rt-900", MiB)
    s.records.pending.append({"op": "prepare", "key": "half", "volume": "rt-900"})
    del s.records.snapshots["c"]
    s.records.pending.append({"op": "remove", "key": "c", "volume": doomed})
    pool.set_read_only(s.records.snapshots["base"]["volume"], False)
    pool.create_thin("rt-901", MiB)
    pool.create_thin("mine", MiB)                          # not the runtime's: kept
    s.records.save()
    s2 = make(pool)
    assert [i.name for i in s2.walk()] == ["base"]
    assert pool.volume(s2.records.snapshots["base"]["volume"]).read_only
    assert "rt-900" not in pool.volumes() and "rt-901" not in pool.volumes()
    assert doomed not in pool.volumes() and "mine" in pool.volumes()
    assert s2.records.pending == []
    assert any("interrupted prepare" in n for n in s2.notes)
    assert any("interrupted removal" in n for n in s2.notes)
    owned_matches_pool(s2)
    pool.commit()
    assert_checks_pass(pool.stat().metadata_path)


def test_cleanup_deletes_unowned_runtime_volumes(pool):
    s = make(pool)
    s.prepare("a")
    pool.create_thin("rt-77", MiB)
    assert s.cleanup() == ["rt-77"]
    assert s.cleanup() == []
    owned_matches_pool(s)
