"""The snapshotter with real block devices: the export daemon's FUSE files under loop devices,
real mkfs.ext4, mount, e2fsck. Layers and containers as thin snapshots, as containerd would use
them; deferred removal of a mounted device; nothing left attached or mounted at the end (torn
down in ``finally``, then checked), both metadata checkers on the pool."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from thinpool import Pool
from thinpool.errors import BusyError
from thinpool.export.daemon import Daemon
from thinpool.runtime.snapshotter import DaemonDevices, RuntimeOptions, Snapshotter
from tests.export.test_fuse import MISSING, sh
from tests.tptools import assert_checks_pass, requires_tools

MiB = 1 << 20

pytestmark = [pytest.mark.skipif(MISSING is not None, reason=f"runtime device tests: {MISSING}"),
              requires_tools]


def _mounted_under(root: Path) -> list[str]:
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(str(root))]


def _loops_of(root: Path) -> list[str]:
    out = sh("losetup", "-a", "-O", "NAME,BACK-FILE", "-n", check=False).stdout
    return [line for line in out.splitlines() if str(root) in line]


@pytest.fixture
def runtime(tmp_path):
    pool = Pool.create(tmp_path / "p", data_size=1 << 30)
    daemon = Daemon(pool, tmp_path / "p")
    daemon.start()
    mounts: list[Path] = []
    try:
        snap = Snapshotter(pool, tmp_path / "p", DaemonDevices(daemon),
                           RuntimeOptions(base_size=256 * MiB))
        yield snap, mounts
    finally:
        for m in reversed(mounts):
            sh("umount", str(m), check=False)
        try:
            daemon.stop()
        finally:
            pool.close()
    assert _mounted_under(tmp_path) == [] and _loops_of(tmp_path) == []
    assert_checks_pass(tmp_path / "p" / "metadata")


def mount(snap, key, where: Path, mounts: list) -> Path:
    m = snap.mounts(key)[0]
    where.mkdir(exist_ok=True)
    sh("mount", "-t", m.type, *(["-o", ",".join(m.options)] if m.options else []), m.source,
       str(where))
    mounts.append(where)
    return where


def umount(where: Path, mounts: list) -> None:
    sh("umount", str(where))
    mounts.remove(where)


def test_layers_and_containers_share_blocks_and_stay_apart(runtime, tmp_path):
    snap, mounts = runtime
    base = snap.prepare("extract-1")
    assert base[0].type == "ext4" and base[0].source.startswith("/dev/loop")
    root = mount(snap, "extract-1", tmp_path / "m0", mounts)
    (root / "hello").write_text("from the base layer\n")
    (root / "big").write_bytes(os.urandom(4 * MiB))
    umount(root, mounts)
    snap.commit("layer-1", "extract-1")
    with pytest.raises(Exception):
        snap.mounts("layer-1")                 # committed: nothing to mount
    snap.prepare("c1", "layer-1")
    snap.prepare("c2", "layer-1")
    r1 = mount(snap, "c1", tmp_path / "m1", mounts)
    r2 = mount(snap, "c2", tmp_path / "m2", mounts)
    assert (r1 / "hello").read_text() == (r2 / "hello").read_text() == "from the base layer\n"
    (r1 / "only-c1").write_text("1")
    (r2 / "only-c2").write_text("2")
    with open(r1 / "big", "r+b") as f:         # 4 KiB in the middle of a big file
        f.seek(2 * MiB)
        f.write(b"x" * 4096)
    os.sync()
    assert not (r1 / "only-c2").exists() and not (r2 / "only-c1").exists()
    umount(r1, mounts)
    umount(r2, mounts)
    u1, u2 = snap.usage("c1"), snap.usage("c2")
    # c1 changed a block of the big file, its own file and the filesystem's metadata: a few
    # blocks, far less than the 4 MiB file (overlayfs would have copied it whole).
    assert 0 < u1.blocks < 4 * MiB // snap.pool.block_size and u2.blocks > 0
    view = snap.view("v", "layer-1")
    assert view[0].options[0] == "ro"
    rv = mount(snap, "v", tmp_path / "mv", mounts)
    assert (rv / "hello").exists() and not (rv / "only-c1").exists()
    with pytest.raises(OSError) as e:
        (rv / "new").write_text("no")
    assert e.value.errno == errno.EROFS
    umount(rv, mounts)
    free = snap.pool.stat().data_blocks_free
    snap.remove("c1")
    assert snap.pool.stat().data_blocks_free >= free + u1.blocks    # its own blocks came back
    layer_dev = snap.devices.attach(snap.records.snapshots["layer-1"]["volume"], read_only=True)
    assert sh("e2fsck", "-fn", layer_dev, check=False).returncode == 0
    snap.devices.detach(snap.records.snapshots["layer-1"]["volume"])
    for k in ("c2", "v", "layer-1"):
        snap.remove(k)
    assert snap.walk() == [] and snap.pool.volumes() == []


def test_a_mounted_device_is_removed_later(runtime, tmp_path):
    snap, mounts = runtime
    snap.prepare("a")
    root = mount(snap, "a", tmp_path / "ma", mounts)
    volume = snap.records.snapshots["a"]["volume"]
    snap.remove("a")                                    # deferred: the device is mounted
    assert [i.name for i in snap.walk()] == [] and volume in snap.pool.volumes()
    assert volume in snap.records.deferred
    assert snap.cleanup() == []                         # still mounted
    umount(root, mounts)
    assert snap.cleanup() == [volume]
    assert snap.pool.volumes() == []
    snap.configure(deferred_removal=False)
    snap.prepare("b")
    root = mount(snap, "b", tmp_path / "mb", mounts)
    with pytest.raises(BusyError):
        snap.remove("b")
    assert [i.name for i in snap.walk()] == ["b"]       # refused: nothing changed
    with pytest.raises(BusyError):
        snap.commit("b-done", "b")                      # mounted: cannot commit either
    umount(root, mounts)
    snap.commit("b-done", "b")
    snap.remove("b-done")


def test_min_free_space_with_real_filesystems(runtime, tmp_path):
    snap, mounts = runtime
    snap.configure(min_free_space=99)
    snap.prepare("a")                                   # an empty pool is 100% free
    root = mount(snap, "a", tmp_path / "ma", mounts)
    (root / "f").write_bytes(os.urandom(16 * MiB))
    umount(root, mounts)
    snap.commit("l", "a")
    with pytest.raises(Exception, match="below the minimum of 99%"):
        snap.prepare("b", "l")
    assert [i.name for i in snap.walk()] == ["l"]
    snap.remove("l")
