"""Container root filesystems: thinpool's snapshotter (a thin snapshot of an image layer, ext4 on
the volume's FUSE file under a loop device) against real overlayfs on the host's file system
(workloads 14a-14c of the table; the container-runtime issue asks for them, with no targets).

The image layer, made once per module: thinpool's side is a parentless snapshotter ``prepare``
(a new thin volume, ``mkfs.ext4`` through its device), mounted, a 256 MiB file of random bytes
written into it, ``sync``, unmounted, ``commit`` as ``layer``; overlayfs's side is the same file
(the same bytes) in a plain directory of the same file system the pool's files live on (pytest's
basetemp), used as ``lowerdir``.

* **14a, a 4 KiB change to a big file of the lower layer**: per round, thinpool's side prepares a
  fresh container snapshot of the layer (``prepare c-N parent=layer``) and mounts its device;
  overlayfs's side mounts ``-t overlay -o lowerdir=L,upperdir=U,workdir=W`` with a fresh
  upper and work dir. Timed on both sides (the same function): open the file ``r+b``
  (unbuffered), seek to 128 MiB, write 4 KiB, ``fsync``, close. thinpool's ext4 writes one block
  and its journal; the flush reaches the pool as a commit, and the pool copies the 64 KiB block
  the 4 KiB land in (copy-on-write). overlayfs copies the whole file up into the upper dir when
  it is opened for writing, and the ``fsync`` writes all of it to disk. Not timed: preparing and
  mounting before, unmounting and removing after, and a ``sync`` before each timed part (so
  neither side pays for the write-back the other left). The lower file is in the page cache on
  both sides (just written; the pool's data file holds thinpool's copy).
* **14b, the bytes that change used** (a value, not a time; unit KiB): thinpool's side is
  ``Snapshotter.usage(c-N).size`` after the unmount, the blocks the container adds to its layer
  (the changed block, the journal's and the file system's own blocks that the mount, the change
  and the unmount wrote; 64 KiB each); overlayfs's side is the upper dir after the change,
  ``du``-like (``st_blocks * 512`` of the dir and everything in it): the copied-up file. Medians
  of the rounds of 14a, from the same rounds.
* **14c, a container's root filesystem ready from the prepared layer**: thinpool's side, timed:
  ``prepare r-N parent=layer`` (a thin snapshot and a commit of the pool, then its device: FUSE
  file + ``losetup``), ``mounts``, ``mount -t ext4 DEVICE DIR``. overlayfs's side, timed: make
  the fresh upper and work dirs (what its snapshotter's prepare makes), ``mount -t overlay``.
  Both mounts are the ``mount`` program; the mount point directories are made before, not timed;
  unmount and remove after, not timed. Starting a whole container (containerd, a shim, runc) is
  another benchmark's, not this one's.

The sides alternate, one overlayfs round before each thinpool round (``_util.alternate``;
thinpool's rounds are pytest-benchmark's, with one warm-up round each side that is not counted):
14a 5 rounds, 14c 10. Ratios are overlayfs / thinpool (> 1: thinpool better). Needs root,
``/dev/fuse``, ``/dev/loop-control``, overlayfs (``/proc/filesystems``; ``modprobe overlay`` is
tried), the ``fuse`` extra, ``mount``, ``losetup`` and ``mkfs.ext4``; skipped otherwise with the
reason. Everything mounted, attached or started is torn down in ``finally`` (the mounts last
made first, then the snapshotter's devices through the daemon, ``Daemon.stop``,
``Pool.close``), and the fixture then checks that nothing under its directory is still mounted or
attached. Run it pinned: ``python -m bench -k runtime_cow`` (the FUSE threads are in the
benchmark's own process, the host programs are its children).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import pytest

from thinpool import Pool

from ._util import MiB, alternate, find_tool, need_tool, remove, run, tag

FILE = "big"
FILE_SIZE = 256 * MiB
OFFSET = 128 * MiB               # the middle of the file
CHANGE = os.urandom(4096)        # the 4 KiB written
BASE_SIZE = 512 * MiB            # the layer's volume (the snapshotter's base size)
POOL_DATA = 2 << 30
LAYER = "layer"
ROUNDS = 5                       # 14a/14b
READY_ROUNDS = 10                # 14c

CHANGE_ROW = "14a. container: 4 KiB changed in a 256 MiB lower-layer file + fsync vs overlayfs"
BYTES_ROW = "14b. container: bytes used by that 4 KiB change vs overlayfs's upper dir"
READY_ROW = "14c. container root filesystem ready from an image layer vs overlayfs mount"


# -- what the machine needs --------------------------------------------------------------------
def _have_overlay() -> bool:
    try:
        with open("/proc/filesystems") as f:
            return any(line.split()[-1:] == ["overlay"] for line in f)
    except OSError:
        return False


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "not root: FUSE mounts, loop devices and overlayfs mounts need root"
    for dev in ("/dev/fuse", "/dev/loop-control"):
        if not os.path.exists(dev):
            return f"{dev} is missing"
    if not _have_overlay():
        modprobe = find_tool("modprobe")
        if modprobe is not None:
            import subprocess
            subprocess.run([modprobe, "overlay"], capture_output=True, check=False)
        if not _have_overlay():
            return ("overlayfs is not available (not in /proc/filesystems, and `modprobe overlay` "
                    f"{'failed' if modprobe else 'is not installed'})")
    try:
        import thinpool.export.fuse  # noqa: F401
    except ImportError as e:          # MissingDependency is an ImportError
        return str(e)
    return None


def _mounted_under(root: Path) -> list[str]:
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(str(root))]


def _loops_under(root: Path) -> list[str]:
    import subprocess
    out = subprocess.run([need_tool("losetup", "util-linux"), "-a", "-n", "-O", "NAME,BACK-FILE"],
                         capture_output=True, text=True, check=False).stdout
    return [line for line in out.splitlines() if str(root) in line]


# -- the parts of a round ----------------------------------------------------------------------
def _change(path: Path) -> None:
    """The timed change of 14a: 4 KiB in the middle of the file, made durable."""
    with open(path, "r+b", buffering=0) as f:
        f.seek(OFFSET)
        f.write(CHANGE)
        os.fsync(f.fileno())


def _disk_usage(root: Path) -> int:
    """``du -s --block-size=1``: the bytes allocated to ``root`` and everything under it."""
    total = os.lstat(root).st_blocks * 512
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


class Rig:
    """The pool's snapshotter with its layer, the overlayfs lower dir, and every mount made (so
    that the fixture can undo them, last made first)."""

    def __init__(self, tmp: Path, snap, lower: Path):
        self.tmp = tmp
        self.snap = snap
        self.lower = lower
        self.mounted: list[Path] = []
        self._n = 0
        self._mount = need_tool("mount", "mount")
        self._umount = need_tool("umount", "mount")

    def name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}-{self._n}"

    def mount(self, fs_type: str, source: str, target: Path, options: list[str]) -> Path:
        run([self._mount, "-t", fs_type, *(["-o", ",".join(options)] if options else []),
             source, str(target)])
        self.mounted.append(target)
        return target

    def umount(self, target: Path) -> None:
        run([self._umount, str(target)])
        self.mounted.remove(target)

    def umount_all(self) -> None:
        for target in sorted(reversed(self.mounted), key=lambda p: len(p.parts), reverse=True):
            try:
                self.umount(target)
            except AssertionError:
                run([self._umount, "-l", str(target)])     # last resort: detach it lazily
                self.mounted.remove(target)

    # thinpool
    def thin_mount(self, key: str, where: Path) -> Path:
        """``mounts`` of snapshot ``key`` mounted at ``where``."""
        m = self.snap.mounts(key)[0]
        return self.mount(m.type, m.source, where, m.options)

    def thin_ready(self, key: str, where: Path) -> Path:
        """14c's timed part: a container snapshot of the layer, its device mounted."""
        self.snap.prepare(key, LAYER)
        return self.thin_mount(key, where)

    def thin_done(self, key: str, where: Path) -> int:
        """Unmount and remove a container snapshot; the bytes it had added to the layer."""
        self.umount(where)
        used = self.snap.usage(key).size
        self.snap.remove(key)
        where.rmdir()
        return used

    # overlayfs
    def overlay_dirs(self, name: str) -> Path:
        top = self.tmp / name
        (top / "merged").mkdir(parents=True)
        return top

    def overlay_mount(self, top: Path) -> Path:
        """Fresh upper and work dirs in ``top``, overlayfs mounted at ``top/merged``."""
        (top / "upper").mkdir()
        (top / "work").mkdir()
        return self.mount("overlay", "overlay", top / "merged",
                          [f"lowerdir={self.lower}", f"upperdir={top / 'upper'}",
                           f"workdir={top / 'work'}"])

    def overlay_done(self, top: Path) -> None:
        self.umount(top / "merged")
        remove(top)


def _build_layer(rig: Rig) -> None:
    """The same 256 MiB of random bytes as the lower dir's file and as the layer's."""
    rig.lower.mkdir()
    with open(rig.lower / FILE, "wb") as f:
        for _ in range(FILE_SIZE // MiB):
            f.write(os.urandom(MiB))
        os.fsync(f.fileno())
    rig.snap.prepare("extract")
    where = rig.tmp / "m-extract"
    where.mkdir()
    rig.thin_mount("extract", where)
    with open(rig.lower / FILE, "rb") as src, open(where / FILE, "wb") as dst:
        while chunk := src.read(4 * MiB):
            dst.write(chunk)
        os.fsync(dst.fileno())
    os.sync()
    rig.umount(where)
    where.rmdir()
    rig.snap.commit(LAYER, "extract")
    os.sync()


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    need_tool("mkfs.ext4", "e2fsprogs")
    need_tool("losetup", "util-linux")
    from thinpool.export.daemon import Daemon
    from thinpool.runtime.snapshotter import DaemonDevices, RuntimeOptions, Snapshotter

    tmp = tmp_path_factory.mktemp("runtime_cow")
    pool_dir = tmp / "pool"
    pool = Pool.create(pool_dir, data_size=POOL_DATA)
    daemon = r = None
    try:
        d = Daemon(pool, pool_dir)
        d.start()                           # (undoes itself if it fails)
        daemon = d
        snap = Snapshotter(pool, pool_dir, DaemonDevices(daemon),
                           RuntimeOptions(base_size=BASE_SIZE))
        r = Rig(tmp, snap, tmp / "lower")
        _build_layer(r)
        yield r
    finally:
        try:
            if r is not None:
                r.umount_all()
        finally:
            try:
                if daemon is not None:
                    try:
                        for volume in reversed(list(daemon.attachments)):
                            daemon.detach_volume(volume)
                    finally:
                        daemon.stop()
            finally:
                pool.close()
        left = _mounted_under(tmp) + _loops_under(tmp)
        if not left:
            remove(tmp)
        assert not left, f"left mounted or attached: {left}"


# -- the benchmarks --------------------------------------------------------------------------------
@pytest.mark.benchmark(group="14a/b runtime: 4 KiB change in a lower-layer file")
def test_runtime_cow_change(benchmark, rig):
    thin_bytes: list[int] = []
    overlay_bytes: list[int] = []
    current: dict = {}

    def overlay_round() -> float:
        top = rig.overlay_dirs(rig.name("ovl"))
        merged = rig.overlay_mount(top)
        try:
            os.sync()
            t0 = time.perf_counter()
            _change(merged / FILE)
            elapsed = time.perf_counter() - t0
            copied = top / "upper" / FILE
            assert copied.stat().st_size == FILE_SIZE, "overlayfs did not copy the file up"
            overlay_bytes.append(_disk_usage(top / "upper"))
        finally:
            rig.overlay_done(top)
        return elapsed

    def thin_setup():
        key = rig.name("c")
        where = rig.tmp / f"m-{key}"
        where.mkdir()
        rig.snap.prepare(key, LAYER)
        rig.thin_mount(key, where)
        current.update(key=key, where=where)
        os.sync()
        return (where / FILE,), {}

    def thin_teardown(path):
        thin_bytes.append(rig.thin_done(current["key"], current["where"]))

    setup, overlay_times = alternate(overlay_round, thin_setup)
    benchmark.pedantic(_change, setup=setup, teardown=thin_teardown, rounds=ROUNDS,
                       warmup_rounds=1)
    tag(benchmark, CHANGE_ROW, "thinpool", "ms", label="thin snapshot of the layer, ext4")
    tag(benchmark, CHANGE_ROW, "baseline", "ms", label="overlayfs, fresh upper (copy-up)",
        times=overlay_times[1:])
    thin_bytes, overlay_bytes = thin_bytes[1:], overlay_bytes[1:]
    benchmark.extra_info["bytes_used"] = {"thinpool": thin_bytes, "overlayfs": overlay_bytes}
    if thin_bytes and overlay_bytes:      # (not with --benchmark-disable: one round, no teardown)
        tag(benchmark, BYTES_ROW, "thinpool", "KiB", label="Snapshotter.usage after umount",
            value=statistics.median(thin_bytes) / 1024)
        tag(benchmark, BYTES_ROW, "baseline", "KiB", label="overlayfs upper dir (du)",
            value=statistics.median(overlay_bytes) / 1024)


@pytest.mark.benchmark(group="14c runtime: container root filesystem ready")
def test_runtime_cow_ready(benchmark, rig):
    def overlay_round() -> float:
        top = rig.overlay_dirs(rig.name("ovr"))
        try:
            os.sync()
            t0 = time.perf_counter()
            rig.overlay_mount(top)
            elapsed = time.perf_counter() - t0
        finally:
            if top / "merged" in rig.mounted:
                rig.overlay_done(top)
            else:
                remove(top)
        return elapsed

    def thin_setup():
        key = rig.name("r")
        where = rig.tmp / f"m-{key}"
        where.mkdir()
        os.sync()
        return (key, where), {}

    def thin_teardown(key, where):
        rig.thin_done(key, where)

    setup, overlay_times = alternate(overlay_round, thin_setup)
    benchmark.pedantic(rig.thin_ready, setup=setup, teardown=thin_teardown, rounds=READY_ROUNDS,
                       warmup_rounds=1)
    tag(benchmark, READY_ROW, "thinpool", "ms", label="prepare + mounts + mount (ext4)")
    tag(benchmark, READY_ROW, "baseline", "ms", label="upper/work dirs + mount -t overlay",
        times=overlay_times[1:])
