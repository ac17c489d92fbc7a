"""A volume as a block device: its FUSE file with a loop device over it (thinpool.export.fuse).

Real parts only: a real FUSE mount served by a thread of this process, real loop devices, the
real mkfs.ext4, mount, fstrim and e2fsck. Every loop device, mount and attachment a test makes is
torn down in ``finally`` in the safe order (filesystem, loop device, FUSE), and a module fixture
sweeps up after a test that failed halfway; the last test checks that nothing under the test
run's temporary directory is left attached or mounted. The pools pass both checkers afterwards.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
import shutil
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

from thinpool import Pool
from thinpool.errors import BusyError, ExportError, InvalidArgument, MissingDependency
from tests.tptools import assert_checks_pass, requires_tools

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20
BS = 64 * 1024
_SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _missing() -> str | None:
    """What this machine lacks for the FUSE tests (None: nothing)."""
    if os.geteuid() != 0:
        return "not root: FUSE mounts and loop devices need root"
    for dev in ("/dev/fuse", "/dev/loop-control"):
        if not os.path.exists(dev):
            return f"{dev} is missing (no FUSE or loop support in this kernel or container)"
    for tool, pkg in (("losetup", "util-linux"), ("fstrim", "util-linux"), ("mount", "mount"),
                      ("umount", "mount"), ("mkfs.ext4", "e2fsprogs"), ("e2fsck", "e2fsprogs")):
        if shutil.which(tool, path=_SBIN) is None:
            return f"{tool} not found: install the Debian package {pkg}"
    try:
        import thinpool.export.fuse  # noqa: F401
    except MissingDependency as e:
        return str(e)
    return None


MISSING = _missing()
needs_host = pytest.mark.skipif(MISSING is not None, reason=f"FUSE tests: {MISSING}")


def sh(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    exe = shutil.which(argv[0], path=_SBIN) or argv[0]
    r = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, (argv, r.returncode, r.stdout, r.stderr)
    return r


def _umount(where: Path) -> None:
    if sh("umount", str(where), check=False).returncode != 0:
        sh("umount", "-l", str(where), check=False)


@contextmanager
def mounted(device: str, where: Path, *options: str):
    """``mount [options] DEVICE WHERE``, unmounted again on the way out."""
    where.mkdir(exist_ok=True)
    sh("mount", *options, device, str(where))
    try:
        yield where
    finally:
        _umount(where)


@contextmanager
def attached(pool: Pool, name: str, run_dir: Path, read_only: bool = False):
    from thinpool.export.fuse import attach
    a = attach(pool, name, read_only=read_only, run_dir=run_dir)
    try:
        yield a
    finally:
        a.close()


def _mounts() -> list[tuple[str, str, str]]:
    """(mountpoint, fstype, source) of every mount, from /proc/self/mountinfo."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            out.append((fields[4].replace("\\040", " "), fields[sep + 1], fields[sep + 2]))
    return out


def _sweep(root: str) -> list[str]:
    """Tear down, in the safe order, whatever is mounted or attached under ``root``; what was
    found. Only a test that failed halfway leaves anything."""
    found = []
    for where, fstype, _ in reversed(_mounts()):          # filesystems on loop devices first
        if where.startswith(root) and not fstype.startswith("fuse"):
            found.append(f"mount {where}")
            _umount(Path(where))
    for line in sh("losetup", "-a", check=False).stdout.splitlines():
        if root in line:
            dev = line.split(":", 1)[0]
            found.append(f"loop {line}")
            sh("losetup", "-d", dev, check=False)
    for _ in range(200):
        if root not in sh("losetup", "-a", check=False).stdout:
            break
        threading.Event().wait(0.02)
    for where, fstype, _ in reversed(_mounts()):
        if where.startswith(root) and fstype.startswith("fuse"):
            found.append(f"fuse {where}")
            _umount(Path(where))
    return found


@pytest.fixture(scope="module", autouse=True)
def sweep(tmp_path_factory):
    yield
    if MISSING is None:
        _sweep(str(tmp_path_factory.getbasetemp()))


@pytest.fixture
def pool(tmp_path):
    p = Pool.create(tmp_path / "pool", data_size=512 * MiB)
    try:
        yield p
    finally:
        p.close()


def _files(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.iterdir()) if p.is_file()}


def _fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """fallocate(2) with a mode (Python has only posix_fallocate); 0 or the errno."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, mode, offset, length) == 0:
        return 0
    return ctypes.get_errno()


def _caught_signals() -> int:
    """The process's caught-signals mask (SigCgt in /proc/self/status), SIGHUP and SIGTERM."""
    with open("/proc/self/status") as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    return mask & ((1 << (1 - 1)) | (1 << (15 - 1)))


def _read_direct(device: str, offset: int, length: int) -> bytes:
    """Read a block device with O_DIRECT (no page cache of the loop device in the way)."""
    buf = mmap.mmap(-1, length)
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    try:
        n = os.preadv(fd, [buf], offset)
    finally:
        os.close(fd)
    return bytes(buf[:n])


def _assert_unwritable(a) -> None:
    """A read-only attachment: its file refuses a write open (a read-only mount), its loop
    device refuses the write itself (a read-only block device may be opened for writing)."""
    with pytest.raises(OSError) as e:
        os.close(os.open(a.file, os.O_WRONLY))
    assert e.value.errno == errno.EROFS
    fd = os.open(a.loop_device, os.O_WRONLY)
    try:
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"x" * 512, 0)
        assert e.value.errno in (errno.EPERM, errno.EROFS, errno.EACCES)
    finally:
        os.close(fd)


# -- without a host ------------------------------------------------------------------------------
def test_import_without_mfusepy_is_a_typed_error():
    code = ("import sys; sys.modules['mfusepy'] = None\n"
            "try:\n    import thinpool.export.fuse\n"
            "except ImportError as e:\n"
            "    print(type(e).__name__, e.exit_code, e.what, e)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("MissingDependency 1 mfusepy "), r.stdout
    assert "pip install 'thinpool[fuse]'" in r.stdout


# -- the file ------------------------------------------------------------------------------------
@needs_host
@requires_tools
def test_the_file_behaves_as_a_block_device(tmp_path, pool):
    size = 8 * MiB + 512
    vol = pool.create_thin("vol", size)
    caught = _caught_signals()
    with attached(pool, "vol", tmp_path / "run") as a:
        # libfuse took SIGHUP and SIGTERM over; attach gave them back (a SIGTERM still ends us).
        assert _caught_signals() == caught
        assert a.mountpoint == (tmp_path / "run" / "vol").resolve()
        assert (a.volume, a.read_only) == ("vol", False)
        assert os.listdir(a.mountpoint) == ["vol"]
        st = os.stat(a.file)
        assert (st.st_size, st.st_blocks) == (size, 0)
        assert Path(f"/sys/block/{Path(a.loop_device).name}/loop/dio").read_text().strip() == "1"
        data = os.urandom(100 * 1024)
        fd = os.open(a.file, os.O_RDWR)
        try:
            assert os.pwrite(fd, data, 1000) == len(data)
            assert vol.read(1000, len(data)) == data                  # it went to the volume
            assert os.stat(a.file).st_blocks == vol.mapped_blocks * BS // 512 == 2 * BS // 512
            # Another path changes the volume: the file and the loop device see it at once.
            vol.write(0, b"\x5a" * 4096)
            assert os.pread(fd, 4096, 0) == b"\x5a" * 4096
            assert _read_direct(a.loop_device, 0, 4096) == b"\x5a" * 4096
            # The end: short reads, EFBIG at the end, a write over it writes what fits.
            assert os.pread(fd, 4096, size) == b""
            assert os.pread(fd, 4096, size - 100) == bytes(100)
            with pytest.raises(OSError) as e:
                os.pwrite(fd, b"x", size)
            assert e.value.errno == errno.EFBIG
            assert os.pwrite(fd, b"y" * 1024, size - 512) == 512
            assert vol.read(size - 512, 512) == b"y" * 512
            # Truncating to another size is refused; to its own size it is a no-op.
            os.truncate(a.file, size)
            for length in (0, size + 512):
                with pytest.raises(OSError) as e:
                    os.ftruncate(fd, length)
                assert e.value.errno == errno.EPERM
            # fallocate: punch a hole = discard; zero range = provisioned zeros; others refused.
            before = vol.mapped_blocks
            assert _fallocate(fd, 3, 0, 2 * BS) == 0
            assert vol.read(0, 2 * BS) == bytes(2 * BS)
            assert vol.mapped_blocks == before - 2
            assert _fallocate(fd, 17, 4 * BS, 3 * BS) == 0
            assert vol.mapped_blocks == before + 1 and vol.read(4 * BS, 3 * BS) == bytes(3 * BS)
            assert _fallocate(fd, 3, size - 512, 10 * BS) == 0        # cut at the end
            assert vol.read(size - 512, 512) == bytes(512)
            for mode in (0, 1, 2, 0x10, 0x08 | 0x01):
                assert _fallocate(fd, mode, 0, BS) == errno.EOPNOTSUPP, mode
            # fsync commits the pool.
            os.pwrite(fd, b"durable", 9 * BS)
            assert pool.metadata.has_changes()
            os.fsync(fd)
            assert not pool.metadata.has_changes()
        finally:
            os.close(fd)
        # O_TRUNC is ignored, as on a block device (dd without conv=notrunc works).
        fd = os.open(a.file, os.O_WRONLY | os.O_TRUNC)
        os.close(fd)
        assert os.stat(a.file).st_size == size and vol.read(9 * BS, 7) == b"durable"
        # Nothing else can be made in the filesystem; statfs describes the pool.
        with pytest.raises(OSError) as e:
            (a.mountpoint / "other").write_bytes(b"")
        assert e.value.errno == errno.EPERM
        sv = os.statvfs(a.mountpoint)
        st = pool.stat()
        assert (sv.f_frsize, sv.f_blocks, sv.f_bfree) == (BS, st.data_blocks_total,
                                                          st.data_blocks_free)
        assert a.failures == []
    assert a.closed and not a.mountpoint.exists()
    a.close()                                           # idempotent
    pool.close()
    assert_checks_pass(tmp_path / "pool" / "metadata")


@needs_host
@requires_tools
def test_out_of_data_space_is_enospc(tmp_path):
    with Pool.create(tmp_path / "pool", data_size=1 * MiB, error_if_no_space=True) as pool:
        pool.create_thin("vol", 4 * MiB)
        with attached(pool, "vol", tmp_path / "run") as a:
            fd = os.open(a.file, os.O_WRONLY)
            try:
                with pytest.raises(OSError) as e:
                    for i in range(4):
                        os.pwrite(fd, b"\x01" * MiB, i * MiB)
                assert e.value.errno == errno.ENOSPC
            finally:
                os.close(fd)
            assert any(code == errno.ENOSPC and "NoDataSpace" in what
                       for _, code, what in a.failures), a.failures
    assert_checks_pass(tmp_path / "pool" / "metadata")


@needs_host
@requires_tools
def test_a_read_only_volume_gives_a_read_only_file_and_loop(tmp_path, pool):
    vol = pool.create_thin("vol", 4 * MiB)
    vol.write(0, b"kept")
    pool.set_read_only("vol", True)
    with attached(pool, "vol", tmp_path / "run", read_only=False) as a:
        assert a.read_only
        assert Path(f"/sys/block/{Path(a.loop_device).name}/ro").read_text().strip() == "1"
        _assert_unwritable(a)
        assert _read_direct(a.loop_device, 0, 4096)[:4] == b"kept"
    pool.close()
    assert_checks_pass(tmp_path / "pool" / "metadata")


# -- a filesystem on the loop device -------------------------------------------------------------
@needs_host
@requires_tools
def test_ext4_on_the_loop_device_snapshots_fstrim_and_teardown(tmp_path, pool):
    pool.create_thin("vol", 128 * MiB)
    run = tmp_path / "run"
    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    with attached(pool, "vol", run) as a:
        sh("mkfs.ext4", "-q", "-F", a.loop_device)
        with mounted(a.loop_device, m1):
            for i in range(5):
                (m1 / f"file{i}").write_bytes(os.urandom(MiB + i * 4096))
            sh("sync")
            # The safe order is enforced: not while a filesystem on the device is mounted.
            with pytest.raises(BusyError) as e:
                a.close()
            assert str(m1) in str(e.value) and e.value.exit_code == 5
        with mounted(a.loop_device, m1, "-o", "ro"):
            before = _files(m1)
        assert len(before) == 5

        # A snapshot while the origin is attached: the file reads through the pool.
        pool.snapshot("vol", "snap")
        with attached(pool, "snap", run, read_only=True) as b:
            assert b.read_only
            with mounted(b.loop_device, m2, "-o", "ro,noload"):
                assert _files(m2) == before
            _assert_unwritable(b)

            # Change the origin; then fstrim gives freed space back to the pool.
            with mounted(a.loop_device, m1):
                (m1 / "file0").write_bytes(b"changed")
                (m1 / "file1").unlink()
                (m1 / "new").write_bytes(os.urandom(4096))
                (m1 / "scratch").write_bytes(os.urandom(16 * MiB))
                sh("sync")
                used = pool.stat().data_blocks_used
                (m1 / "scratch").unlink()
                sh("sync")
                sh("fstrim", str(m1))
                pool.commit()
                assert pool.stat().data_blocks_used <= used - 15 * MiB // BS
                after = _files(m1)
            assert after["file0"] != before["file0"] and "file1" not in after

            # The snapshot's device reads as it was (a fresh mount: nothing cached).
            with mounted(b.loop_device, m2, "-o", "ro,noload"):
                assert _files(m2) == before
        assert b.closed and a.failures == [] and b.failures == []
    # Both filesystems are clean, checked through fresh read-only attachments.
    for name in ("vol", "snap"):
        with attached(pool, name, run, read_only=True) as c:
            r = sh("e2fsck", "-fn", c.loop_device, check=False)
            assert r.returncode == 0, (name, r.stdout, r.stderr)
    with attached(pool, "vol", run, read_only=True) as c, mounted(c.loop_device, m1, "-o", "ro"):
        assert _files(m1) == after
    pool.close()
    assert_checks_pass(tmp_path / "pool" / "metadata")


# -- through the serving daemon ------------------------------------------------------------------
@needs_host
@requires_tools
def test_the_serving_daemon_attaches_and_detaches(tmp_path):
    """``thinpool serve --daemon`` holds the pool; its control requests attach and detach a
    volume with this module (the command line's attach/detach will ask the same)."""
    import json
    import signal
    import tempfile
    from tests.cli.helpers import tp
    from thinpool.export.state import ask
    home = Path(tempfile.mkdtemp(prefix="tpf-", dir="/tmp"))  # (a socket path is short)
    pid = None
    try:
        tp(home, "create", "p", "--size", "256M", check=0)
        tp(home, "create", "p/v", "--size", "64M", check=0)
        tp(home, "serve", "p", "--daemon", check=0)
        pid = json.loads((home / "p" / "exports.json").read_text())["pid"]
        answer = ask(home / "p", {"op": "attach", "volume": "v"})
        assert answer["ok"], answer
        dev = answer["loop_device"]
        sh("mkfs.ext4", "-q", "-F", dev)
        with mounted(dev, tmp_path / "m"):
            (tmp_path / "m" / "hello").write_bytes(b"hello")
            answer = ask(home / "p", {"op": "detach", "volume": "v"})
            assert (answer["ok"], answer["exit_code"]) == (False, 5) and "mounted on" in \
                answer["error"]
        assert ask(home / "p", {"op": "detach", "volume": "v"})["ok"]
        assert dev not in sh("losetup", "-a").stdout
        tp(home, "serve", "p", "--stop", check=0)
        pid = None
        assert_checks_pass(home / "p" / "metadata")
    finally:
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _sweep(str(home))
        shutil.rmtree(home, ignore_errors=True)


# -- failures ------------------------------------------------------------------------------------
def _fuse_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("thinpool-fuse")]


def _left_under(root: Path) -> list[str]:
    mounts = [m for m, _, _ in _mounts() if m.startswith(str(root))]
    loops = [line for line in sh("losetup", "-a").stdout.splitlines() if str(root) in line]
    return mounts + loops


@needs_host
def test_a_failure_midway_leaves_nothing_behind(tmp_path, pool, monkeypatch):
    from thinpool.export import fuse, loop
    pool.create_thin("vol", 4 * MiB)
    run = tmp_path / "run"
    threads = _fuse_threads()

    def no_loop(path, *, read_only):
        raise ExportError("losetup failed (made to fail by the test)")

    monkeypatch.setattr(loop, "attach_loop", no_loop)
    with pytest.raises(ExportError, match="made to fail"):
        fuse.attach(pool, "vol", read_only=False, run_dir=run)
    assert _left_under(tmp_path) == [] and _fuse_threads() == threads
    assert list(run.iterdir()) == []                       # the mountpoint it made is gone
    monkeypatch.undo()

    def no_fuse(*args, **kwargs):
        raise RuntimeError(1)

    monkeypatch.setattr(fuse, "FUSE", no_fuse)
    with pytest.raises(ExportError, match="mounting the FUSE file"):
        fuse.attach(pool, "vol", read_only=False, run_dir=run)
    assert _left_under(tmp_path) == [] and list(run.iterdir()) == []
    monkeypatch.undo()

    # A run directory that cannot be made: a clear error before anything is mounted.
    (tmp_path / "afile").write_bytes(b"")
    with pytest.raises(InvalidArgument, match="run directory"):
        fuse.attach(pool, "vol", read_only=False, run_dir=tmp_path / "afile")
    # Attached twice: busy, and the first attachment goes on working.
    with attached(pool, "vol", run) as a:
        with pytest.raises(BusyError, match="attached already"):
            fuse.attach(pool, "vol", read_only=True, run_dir=run)
        assert os.stat(a.file).st_size == 4 * MiB
        assert _read_direct(a.loop_device, 0, 4096) == bytes(4096)
    assert _left_under(tmp_path) == [] and _fuse_threads() == threads


@needs_host
def test_nothing_is_left_attached_or_mounted(tmp_path_factory):
    """Last in this module: no loop device is bound to a file under the test run's temporary
    directory (``losetup -a``), nothing is mounted there, no FUSE thread runs."""
    root = str(tmp_path_factory.getbasetemp())
    left = [line for line in sh("losetup", "-a").stdout.splitlines() if root in line]
    left += [m for m, _, _ in _mounts() if m.startswith(root)]
    assert left == [] and _fuse_threads() == []
