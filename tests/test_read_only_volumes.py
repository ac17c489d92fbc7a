"""Read-only volumes and snapshots (as LVM's ``lvchange -p r``), through the library.

The flag lives in the names registry only (never in the dm-thin metadata): set atomically in both
copies, carried by a snapshot's own pending record, refused changes leave every file as it was,
and names files from before the field load with every volume writable."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from thinpool import Pool
from thinpool import records
from thinpool.errors import InvalidArgument, ReadOnlyError, VolumeReadOnly
from tests.tptools import assert_checks_pass, requires_tools

BS = 64 * 1024


def files(root):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.iterdir()) if p.is_file()}


def names_doc(root):
    return json.loads((root / "names.json").read_text())


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "demo"
    with Pool.create(r, data_size=64 * BS) as pool:
        v = pool.create_thin("vol0", 8 * BS)
        v.write(0, b"A" * (2 * BS))
        v.write(5 * BS + 7, b"tail")
        pool.snapshot("vol0", "backup", read_only=True)
    return r


def content(pool, name):
    return pool.volume(name).read(0, 8 * BS)


def model():
    b = bytearray(8 * BS)
    b[:2 * BS] = b"A" * (2 * BS)
    b[5 * BS + 7:5 * BS + 11] = b"tail"
    return bytes(b)


def test_read_only_snapshot_refuses_writes_and_discards(root):
    with Pool.open(root) as pool:
        snap = pool.volume("backup")
        assert snap.read_only is True
        assert pool.volume("vol0").read_only is False
        with pytest.raises(VolumeReadOnly) as ei:
            snap.write(0, b"nope")
        e = ei.value
        assert isinstance(e, InvalidArgument) and e.exit_code == 2
        assert (e.pool, e.volume, e.what) == ("demo", "backup", "write")
        assert "demo/backup" in str(e)
        assert "thinpool configure demo/backup --read-write" in str(e)
        with pytest.raises(VolumeReadOnly, match="discard refused"):
            snap.discard(0, 2 * BS)
        with pytest.raises(VolumeReadOnly, match="resize refused"):
            pool.resize_volume("backup", 16 * BS)
        assert content(pool, "backup") == model()
        assert pool.volume("backup").size == 8 * BS
        # The origin stays writable and its snapshot keeps the old bytes.
        pool.volume("vol0").write(0, b"B" * 10)
        assert content(pool, "backup") == model()
        assert pool.volume("vol0").read(0, 11) == b"B" * 10 + b"A"


def test_refusals_leave_every_file_byte_identical(root):
    with Pool.open(root) as pool:
        pool.set_read_only("vol0", True)
    before = files(root)
    with Pool.open(root) as pool:
        vol, snap = pool.volume("vol0"), pool.volume("backup")
        vol.read(0, 100)                       # the lookup cache holds block 0: the fast path
        for call in (lambda: vol.write(0, b"x"), lambda: vol.write(3 * BS, b"y" * BS),
                     lambda: vol.discard(0, 8 * BS), lambda: snap.write(0, b"z"),
                     lambda: pool.resize_volume("vol0", 4 * BS),
                     lambda: pool.revert("vol0", "backup")):
            with pytest.raises(VolumeReadOnly):
                call()
        assert pool.stat().data_blocks_used == 3
    assert files(root) == before


def test_fast_path_write_into_an_exclusive_block_is_refused(tmp_path):
    with Pool.create(tmp_path / "p", data_size=16 * BS) as pool:
        v = pool.create_thin("v", 4 * BS)
        v.write(0, b"1" * BS)
        pool.commit()
        v.write(10, b"22")                     # in place: the lock-free fast path
        assert v.read(0, 12) == b"1" * 10 + b"22"
        pool.set_read_only("v", True)
        with pytest.raises(VolumeReadOnly):
            v.write(10, b"33")
        assert v.read(0, 12) == b"1" * 10 + b"22"
        pool.set_read_only("v", False)
        v.write(10, b"44")
        assert v.read(0, 12) == b"1" * 10 + b"44"


def test_flag_survives_reopen_and_can_be_cleared(root):
    with Pool.open(root) as pool:
        assert pool.set_read_only("vol0", True).read_only is True
        assert [(v.name, v.read_only) for v in pool.stat().volumes] == [
            ("vol0", True), ("backup", True)]
    with Pool.open(root, read_only=True) as pool:
        assert [(v.name, v.read_only) for v in pool.stat().volumes] == [
            ("vol0", True), ("backup", True)]
    assert names_doc(root)["volumes"]["vol0"]["read_only"] is True
    with Pool.open(root) as pool:
        pool.set_read_only("backup", False)
        pool.set_read_only("vol0", False)
        pool.volume("backup").write(0, b"now writable")
    with Pool.open(root) as pool:
        assert [(v.name, v.read_only) for v in pool.stat().volumes] == [
            ("vol0", False), ("backup", False)]
        assert pool.volume("backup").read(0, 12) == b"now writable"
        assert content(pool, "vol0") == model()
    # Writable volumes are written without the field, as before it existed.
    assert all("read_only" not in e for e in names_doc(root)["volumes"].values())


def test_set_read_only_changes_no_metadata_and_keeps_uncommitted_writes(root):
    meta = (root / "metadata").read_bytes()
    with Pool.open(root) as pool:
        trans = pool.stat().transaction_id
        pool.set_read_only("vol0", True)
        assert pool.stat().transaction_id == trans
        assert (root / "metadata").read_bytes() == meta
    with Pool.open(root) as pool:
        pool.set_read_only("vol0", False)
        pool.volume("vol0").write(7 * BS, b"pending")      # not committed yet
        pool.set_read_only("backup", False)
        assert pool.volume("vol0").read(7 * BS, 7) == b"pending"
    with Pool.open(root) as pool:
        assert pool.volume("vol0").read(7 * BS, 7) == b"pending"


def test_snapshots_of_a_read_only_volume_delete_and_rename(root):
    with Pool.open(root) as pool:
        w = pool.snapshot("backup", "work")
        assert w.read_only is False
        w.write(0, b"changed")
        r = pool.snapshot("backup", "frozen", read_only=True)
        assert r.read_only is True
        assert content(pool, "backup") == model()
        assert pool.rename("frozen", "frozen2").read_only is True
        pool.delete("frozen2")
        pool.delete("backup")
        assert pool.volumes() == ["vol0", "work"]
        assert pool.volume("work").read(0, 8) == b"changedA"


def test_merge_and_revert_onto_a_read_only_volume_are_refused(root):
    with Pool.open(root) as pool:
        pool.set_read_only("vol0", True)
        pool.set_read_only("backup", False)
        pool.volume("backup").write(0, b"snapdata")
    before = files(root)
    with Pool.open(root) as pool:
        with pytest.raises(VolumeReadOnly, match="merge of snapshot 'backup'") as ei:
            pool.merge("backup")
        assert ei.value.volume == "vol0"
        with pytest.raises(VolumeReadOnly, match="revert to snapshot 'backup'"):
            pool.revert("vol0", "backup")
        assert pool.volumes() == ["vol0", "backup"]
    assert files(root) == before
    with Pool.open(root) as pool:
        # A read-only snapshot merged into a writable origin: the origin stays writable.
        pool.set_read_only("vol0", False)
        pool.set_read_only("backup", True)
        vol = pool.merge("backup")
        assert vol.name == "vol0" and vol.read_only is False
        assert vol.read(0, 9) == b"snapdataA"


def test_bad_values_and_read_only_pool(root):
    with Pool.open(root) as pool:
        with pytest.raises(InvalidArgument):
            pool.set_read_only("vol0", "yes")
        with pytest.raises(InvalidArgument):
            pool.snapshot("vol0", "x", read_only=1)
        assert pool.volumes() == ["vol0", "backup"]
    with Pool.open(root, read_only=True) as pool:
        with pytest.raises(ReadOnlyError):
            pool.set_read_only("vol0", True)
        with pytest.raises(VolumeReadOnly):       # the volume's flag, even on a read-only handle
            pool.volume("backup").check_writable()
        pool.volume("vol0").check_writable()


def test_old_names_file_without_the_field_loads_writable(root):
    with Pool.open(root) as pool:
        pool.set_read_only("vol0", True)
    # As a version before the field wrote it: one file, no "copies", no "read_only".
    doc = names_doc(root)
    doc.pop("copies")
    for e in doc["volumes"].values():
        e.pop("read_only", None)
    (root / "names.json").write_text(json.dumps(doc))
    (root / "names.copy.json").unlink()
    with Pool.open(root) as pool:
        assert [(v.name, v.read_only) for v in pool.stat().volumes] == [
            ("vol0", False), ("backup", False)]
        pool.volume("backup").write(0, b"old file")
        assert pool.volume("backup").read(0, 8) == b"old file"
    assert (root / "names.copy.json").exists()


def test_a_malformed_flag_makes_that_copy_damaged(root):
    doc = names_doc(root)
    doc["volumes"]["backup"]["read_only"] = "yes"
    (root / "names.json").write_text(json.dumps(doc))
    with Pool.open(root) as pool:
        assert any("names.json is damaged" in n for n in pool.notes), pool.notes
        assert pool.volume("backup").read_only is True        # from the intact copy


def test_read_only_snapshot_interrupted_before_the_names_caught_up(root, tmp_path):
    """The snapshot's pending record carries the flag: a crash after its commit, before the
    names file caught up, still opens with the snapshot read-only."""
    pool = Pool.open(root)
    try:
        pool.snapshot("vol0", "ro2", read_only=True)
        pending = names_doc(root)["pending"]
        assert pending["op"] == "snapshot" and pending["read_only"] is True
        crashed = tmp_path / "crashed"
        shutil.copytree(root, crashed)       # the files as a crash now would leave them
    finally:
        pool.close()
    with Pool.open(crashed) as p2:
        assert any("rolled forward an interrupted snapshot of 'ro2'" in n for n in p2.notes)
        assert p2.volume("ro2").read_only is True
        with pytest.raises(VolumeReadOnly):
            p2.volume("ro2").write(0, b"x")
        assert content(p2, "ro2") == model()


@pytest.mark.parametrize("fail_at", [1, 2])
def test_set_read_only_interrupted_between_the_copies(root, monkeypatch, fail_at):
    """A kill during the names write: before the primary is replaced (the old flag) or between
    the primary and the copy (the new one: the primary is newer). Never a mix, never lost."""
    real, calls = records._replace, []

    def crashing(target, d, text):
        calls.append(target)
        if len(calls) == fail_at:
            raise KeyboardInterrupt
        real(target, d, text)

    pool = Pool.open(root)
    try:
        monkeypatch.setattr(records, "_replace", crashing)
        with pytest.raises(KeyboardInterrupt):
            pool.set_read_only("vol0", True)
        monkeypatch.setattr(records, "_replace", real)
        assert pool.volume("vol0").read_only is False      # memory kept the old flag
    finally:
        pool._close_parts()                                 # as a crash: nothing more written
    assert not [p for p in root.iterdir() if p.name.startswith(".")]   # no temp file left
    with Pool.open(root) as pool:
        assert pool.volume("vol0").read_only is (fail_at == 2)
        assert content(pool, "vol0") == model()


@requires_tools
def test_both_checkers_pass(root):
    with Pool.open(root) as pool:
        pool.set_read_only("vol0", True)
        pool.snapshot("vol0", "w").write(BS, b"w" * BS)
        with pytest.raises(VolumeReadOnly):
            pool.volume("vol0").discard(0, BS)
    assert_checks_pass(root / "metadata")
