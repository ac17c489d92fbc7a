"""A pool's own records (issue 11): names and pool.json survive the loss or damage of one file;
losing every copy of the names is loud and can be undone by renaming; a short data device is not
"metadata damage"; damage a reader finds stops writes until a check, but a reader whose view a
writer's commit made stale marks nothing.

Each test fails on the commit before these records were kept twice (names then lived in one
file, whose loss silently renamed volumes to their ids, and a reader forgot what it found)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.crash.harness import Recorder, crash_image, snapshot_files, write_files
from tests.tools.helpers import device_roots, flip_bit
from tests.tptools import assert_checks_pass, requires_tools
from thinpool import Pool
from thinpool.errors import AlreadyExists, CorruptBlock, MetadataError, ReadOnlyError
from thinpool.metadata.thin_metadata import ThinMetadata

BS = 64 * 1024
MiB = 1 << 20


def _pool(d: Path) -> dict:
    """Volumes a (written), s (a snapshot of a) and b; returns what stat must keep saying."""
    with Pool.create(d, data_size=16 * MiB) as p:
        a = p.create_thin("a", 8 * MiB)
        a.write(0, b"a" * (3 * BS))
        p.snapshot("a", "s")
        p.create_thin("b", 5 * MiB + 7)
        p.volume("b").write(BS, b"b" * 100)
        return _names(p)


def _names(p: Pool) -> dict:
    return {v.name: (v.dev_id, v.size, v.origin) for v in p.stat().volumes}


def _contents(p: Pool) -> dict:
    return {n: p.volume(n).read(0, p.volume(n).size) for n in p.volumes()}


DAMAGE = {
    "deleted": lambda f: f.unlink(),
    "garbage": lambda f: f.write_bytes(b"\x00garbage{"),
    "cut in half": lambda f: f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2]),
    "wrong shape": lambda f: f.write_text(json.dumps({"volumes": {"a": {"size": 1}}})),
}


@requires_tools
@pytest.mark.parametrize("how", sorted(DAMAGE))
@pytest.mark.parametrize("which", ["names.json", "names.copy.json"])
def test_one_damaged_names_copy_loses_no_name_size_or_origin(tmp_path, which, how):
    d = tmp_path / "p"
    want = _pool(d)
    DAMAGE[how](d / which)
    with Pool.open(d, read_only=True) as p:
        assert _names(p) == want and not p.guessed_names()
        assert any(str(d / which) in n for n in p.notes), p.notes
    with Pool.open(d) as p:                                   # the writer rewrites it
        assert _names(p) == want
        assert any("rewritten" in n for n in p.notes), p.notes
    a, b = (json.loads((d / f).read_text()) for f in ("names.json", "names.copy.json"))
    assert a == b and set(a["volumes"]) == {"a", "s", "b"}
    if how != "deleted":                                      # never overwritten: kept aside
        assert (d / f"{which}.damaged").exists()
    with Pool.open(d) as p:
        assert _names(p) == want and not p.notes
    assert_checks_pass(d / "metadata")


@pytest.mark.parametrize("which", ["pool.json", "pool.copy.json"])
def test_one_damaged_pool_json_copy_is_survived(tmp_path, which):
    d = tmp_path / "p"
    with Pool.create(d, data_size=16 * MiB, no_space_timeout=3.5) as p:
        p.create_thin("a", MiB).write(0, b"x")
    (d / which).write_text("{")
    with Pool.open(d, read_only=True) as p:
        assert p.options.no_space_timeout == 3.5 and p.volumes() == ["a"]
        assert any(str(d / which) in n for n in p.notes), p.notes
    with Pool.open(d) as p:
        assert any("rewrote both copies" in n for n in p.notes), p.notes
    assert (d / f"{which}.damaged").read_text() == "{"
    cfg = {f: json.loads((d / f).read_text()) for f in ("pool.json", "pool.copy.json")}
    assert cfg["pool.json"] == cfg["pool.copy.json"]
    assert cfg["pool.json"]["options"]["no_space_timeout"] == 3.5


def test_every_names_copy_lost_is_loud_and_renaming_undoes_it(tmp_path):
    d = tmp_path / "p"
    want = _pool(d)
    with Pool.open(d, read_only=True) as p:
        data = _contents(p)
    (d / "names.json").unlink()
    (d / "names.copy.json").write_text("not json")
    with Pool.open(d, read_only=True) as p:
        assert any("every copy of the names is gone" in n for n in p.notes), p.notes
        assert sorted(p.guessed_names()) == ["1", "2", "3"]
        assert all(v.guessed for v in p.stat().volumes)
    with Pool.open(d) as p:
        assert sorted(p.guessed_names()) == ["1", "2", "3"]
        for name, (dev, size, _) in want.items():
            p.rename(str(dev), name)
            if p.volume(name).size != size:
                p.resize_volume(name, size)
        assert not p.guessed_names()
    assert (d / "names.copy.json.damaged").read_text() == "not json"
    with Pool.open(d, read_only=True) as p:
        assert {n: v[:2] for n, v in _names(p).items()} == {n: v[:2] for n, v in want.items()}
        assert _contents(p) == data and not p.notes


def test_rename_carries_snapshots_and_refuses_clashes(tmp_path):
    d = tmp_path / "p"
    _pool(d)
    with Pool.open(d) as p, pytest.raises(AlreadyExists) as e:
        p.rename("a", "b")
    with Pool.open(d) as p:
        assert "exists already" in str(e.value)
        p.rename("a", "root")
        assert _names(p)["s"][2] == "root"
    with Pool.open(d, read_only=True) as p:
        assert p.volumes() == ["root", "s", "b"]
        assert p.volume("root").read(0, 3) == b"aaa"


def test_a_short_data_device_is_named_and_is_not_metadata_damage(tmp_path):
    from thinpool.errors import PoolDamaged
    d = tmp_path / "p"
    _pool(d)
    os.truncate(d / "data", MiB)
    with pytest.raises(PoolDamaged) as e:
        Pool.open(d, read_only=True)
    msg = str(e.value)
    assert not isinstance(e.value, MetadataError)
    assert e.value.exit_code == 3
    for part in (str(d / "data"), "1048576 bytes", "16777216 bytes", "truncate -s 16777216"):
        assert part in msg, msg
    assert "metadata is damaged" not in msg
    assert not (d / "needs-check.json").exists()


def _damage_a(d: Path) -> None:
    flip_bit(d / "metadata", device_roots(d / "metadata")[1], 100)


@requires_tools
def test_damage_a_reader_finds_stops_writes_until_a_clean_check(tmp_path):
    d = tmp_path / "p"
    _pool(d)
    good = tmp_path / "good"
    shutil.copyfile(d / "metadata", good)
    _damage_a(d)
    with Pool.open(d, read_only=True) as p:
        with pytest.raises(MetadataError):
            p.volume("a").read(0, BS)
        assert p.stat().needs_check                         # this reader knows
    assert "block" in json.loads((d / "needs-check.json").read_text())["reason"]
    with Pool.open(d) as p:                                  # the next writer honours it
        with pytest.raises(ReadOnlyError):
            p.volume("b").write(0, b"on top of damage")
        assert p.metadata.needs_check
    m = ThinMetadata.open(d / "metadata", read_only=True)
    assert m.needs_check                                     # NEEDS_CHECK is in the superblock
    m.close()
    shutil.copyfile(good, d / "metadata")                    # repaired (without the flag) ...
    with Pool.open(d) as p:
        with pytest.raises(ReadOnlyError):                   # ... the marker still stops writes
            p.volume("b").write(0, b"x")
        p.clear_needs_check()                                # what a clean check does
        p.volume("b").write(0, b"after the check")
    assert not (d / "needs-check.json").exists()
    assert_checks_pass(d / "metadata")


def test_a_reader_whose_view_a_commit_made_stale_marks_nothing(tmp_path):
    """What a reader sees after a writer's commit may be a block reused since: unconfirmed
    damage (the committed superblock is not the one the reader's view was built from) marks
    nothing; the same report with the view still current marks the pool."""
    d = tmp_path / "p"
    _pool(d)
    p = Pool.open(d, read_only=True)
    try:
        err = CorruptBlock(11, "btree node", "bad checksum")
        meta = ThinMetadata.open(d / "metadata")               # a writer (beside the lock)
        meta.create_thin(77)
        meta.set_transaction_id(meta.trans_id + 1)
        meta.commit()
        meta.close()
        assert p.report_damage(err) is False
        assert not (d / "needs-check.json").exists() and not p.stat().needs_check
    finally:
        p.close()
    with Pool.open(d, read_only=True) as p:                   # a current view: confirmed
        assert p.report_damage(err) is True
    assert (d / "needs-check.json").exists()


def test_a_crash_at_any_point_of_a_names_write_keeps_a_usable_copy(tmp_path):
    """Every prefix of the system calls of a create and a rename (the state between the two
    copies' renames included): the pool opens with the volume in or out, never a guessed name."""
    d = tmp_path / "p"
    _pool(d)
    initial = snapshot_files(d)
    with Recorder(d) as rec, Pool.open(d) as p:
        p.create_thin("new", MiB)
        p.rename("b", "bee")
    replaces = [i for i, e in enumerate(rec.events) if e.kind == "replace"]
    assert len(replaces) >= 4
    allowed = [{"a", "s", "b"}, {"a", "s", "b", "new"}, {"a", "s", "bee", "new"}]
    for k in range(len(rec.events) + 1):
        root = tmp_path / "crash"
        write_files(crash_image(initial, rec.events, k, "drop", None), root)
        with Pool.open(root) as p:
            assert set(p.volumes()) in allowed, (k, p.volumes(), p.notes)
            assert not p.guessed_names(), (k, p.notes)
        a, b = (json.loads((root / f).read_text()) for f in ("names.json", "names.copy.json"))
        assert a == b, k
