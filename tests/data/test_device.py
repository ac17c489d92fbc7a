"""DataDevice against real sparse files and a real loop device."""

from __future__ import annotations

import errno
import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from thinpool.data import device as device_mod
from thinpool.data.device import DataDevice
from thinpool.errors import (
    AlreadyExists,
    BusyError,
    InvalidArgument,
    NoDataSpace,
    NotFound,
    ReadOnlyError,
    ThinpoolError,
)

BS = 4096
NR = 64


def rand(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def allocated(path) -> int:
    """Bytes the file system has allocated for ``path``."""
    return os.stat(path).st_blocks * 512


@pytest.fixture
def path(tmp_path):
    return tmp_path / "data"


@pytest.fixture
def dev(path):
    with DataDevice.create_file(path, NR * BS, block_size=BS) as d:
        yield d


def fill(dev: DataDevice, seed: int = 1) -> bytes:
    data = rand(dev.nr_blocks * dev.block_size, seed)
    dev.write_blocks(0, data)
    dev.sync()
    return data


# --- create / open ----------------------------------------------------------------------------


def test_create_file_is_sparse_and_sized(dev, path):
    assert dev.size == NR * BS
    assert dev.nr_blocks == NR
    assert dev.block_size == BS
    assert not dev.is_block_device and not dev.read_only
    assert dev.path == str(path)
    st_ = os.stat(path)
    assert st_.st_size == NR * BS
    assert st_.st_blocks == 0
    assert stat.S_IMODE(st_.st_mode) == 0o600
    assert dev.read_blocks(0, NR) == bytes(NR * BS)


def test_create_file_default_block_size(tmp_path):
    with DataDevice.create_file(tmp_path / "d", 1 << 20) as d:
        assert d.block_size == 64 * 1024 and d.nr_blocks == 16


def test_create_refuses_existing(path):
    path.write_bytes(b"keep me")
    with pytest.raises(AlreadyExists, match="exists"):
        DataDevice.create_file(path, NR * BS, block_size=BS)
    assert path.read_bytes() == b"keep me"


def test_create_in_missing_directory(tmp_path):
    with pytest.raises(NotFound):
        DataDevice.create_file(tmp_path / "nope" / "data", BS, block_size=BS)


@pytest.mark.parametrize("size", [-1, 1.5, "4K", True])
def test_create_bad_size(tmp_path, size):
    with pytest.raises(InvalidArgument):
        DataDevice.create_file(tmp_path / "d", size, block_size=BS)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("block_size", [0, -512, 100, 513, 4097, 4096.0, True])
def test_bad_block_size(dev, path, block_size):
    with pytest.raises(InvalidArgument):
        DataDevice.open(path, block_size)


def test_open_existing_file(dev, path):
    data = fill(dev)
    dev.close()
    with DataDevice.open(path, BS) as d:
        assert d.nr_blocks == NR and not d.is_block_device
        assert d.read_blocks(0, NR) == data
    with DataDevice.open(path, 2 * BS) as d:
        assert d.nr_blocks == NR // 2
        assert d.read_blocks(1, 1) == data[2 * BS: 4 * BS]


def test_open_missing(tmp_path):
    with pytest.raises(NotFound):
        DataDevice.open(tmp_path / "missing", BS)


def test_open_rejects_directory_and_char_device(tmp_path):
    with pytest.raises(InvalidArgument, match="neither"):
        DataDevice.open(tmp_path, BS)
    with pytest.raises(InvalidArgument, match="neither"):
        DataDevice.open("/dev/null", BS)


def test_nr_blocks_ignores_partial_tail(path):
    with DataDevice.create_file(path, 10 * BS + 100, block_size=BS) as d:
        assert d.size == 10 * BS + 100 and d.nr_blocks == 10
        d.write_blocks(9, b"\xff" * BS)
        with pytest.raises(InvalidArgument):
            d.write_blocks(10, b"\xff" * BS)
    raw = path.read_bytes()
    assert len(raw) == 10 * BS + 100
    assert raw[-100:] == bytes(100)


# --- reads and writes -------------------------------------------------------------------------


def test_write_read_blocks(dev):
    data = fill(dev, seed=7)
    assert dev.read_blocks(0, NR) == data
    assert dev.read_blocks(5, 3) == data[5 * BS: 8 * BS]
    assert dev.read_blocks(NR - 1, 1) == data[-BS:]
    assert dev.read_blocks(3, 0) == b""
    new = rand(2 * BS, seed=8)
    dev.write_blocks(10, memoryview(bytearray(new)))
    assert dev.read_blocks(9, 4) == data[9 * BS: 10 * BS] + new + data[12 * BS: 13 * BS]


def test_sub_block_read_write(dev, path):
    data = fill(dev)
    dev.write(3, 100, b"hello")
    assert dev.read(3, 100, 5) == b"hello"
    assert dev.read(3, 0, BS) == data[3 * BS: 3 * BS + 100] + b"hello" + data[3 * BS + 105: 4 * BS]
    assert dev.read(3, BS - 1, 1) == data[4 * BS - 1: 4 * BS]
    assert dev.read(3, BS, 0) == b""
    dev.sync()
    assert path.read_bytes()[3 * BS + 100: 3 * BS + 105] == b"hello"


@pytest.mark.parametrize("offset, length", [(BS - 4, 5), (BS, 1), (0, BS + 1), (-1, 1), (0, -1)])
def test_sub_block_access_stays_in_its_block(dev, offset, length):
    with pytest.raises(InvalidArgument):
        dev.read(3, offset, length)
    if length >= 0:
        with pytest.raises(InvalidArgument):
            dev.write(3, offset, b"x" * length)
    assert dev.read_blocks(0, NR) == bytes(NR * BS)


def test_write_blocks_needs_whole_blocks(dev):
    for n in (1, BS - 1, BS + 1):
        with pytest.raises(InvalidArgument, match="whole number"):
            dev.write_blocks(0, b"x" * n)
    dev.write_blocks(0, b"")  # zero blocks is fine


@pytest.mark.parametrize(
    "call",
    [
        lambda d: d.read_blocks(NR - 1, 2),
        lambda d: d.read_blocks(NR, 0 + 1),
        lambda d: d.read_blocks(-1, 1),
        lambda d: d.read_blocks(0, -1),
        lambda d: d.read_blocks(1.0, 1),
        lambda d: d.read_blocks(True, 1),
        lambda d: d.read(NR, 0, 1),
        lambda d: d.write_blocks(NR - 1, b"\1" * 2 * BS),
        lambda d: d.write_blocks(NR, b"\1" * BS),
        lambda d: d.write(NR, 0, b"\1"),
        lambda d: d.zero_blocks(NR - 2, 3),
        lambda d: d.punch_blocks(NR, 1),
        lambda d: d.copy_blocks(0, NR - 1, 2),
        lambda d: d.copy_blocks(NR - 1, 0, 2),
        lambda d: d.copy_blocks(2**40, 0, 1),
    ],
)
def test_bounds_are_checked_before_io(dev, path, call):
    with pytest.raises(InvalidArgument):
        call(dev)
    dev.sync()
    assert os.stat(path).st_size == NR * BS
    assert allocated(path) == 0


def test_short_read_at_eof_is_zero_padded(dev, path):
    data = fill(dev)
    os.truncate(path, 10 * BS + 10)  # shrunk behind the device's back
    assert dev.read_blocks(9, 3) == data[9 * BS: 10 * BS + 10] + bytes(2 * BS - 10)
    assert dev.read(20, 0, 16) == bytes(16)


def test_sync_and_reopen(dev, path):
    data = rand(4 * BS, 3)
    dev.write_blocks(60, data)
    dev.sync()
    assert path.read_bytes()[60 * BS:] == data


def _count_syncs(monkeypatch, during=None) -> list[int]:
    """Count fdatasync calls; ``during()`` runs inside the first one (a write completing while
    the system call is under way, as a writer beside ``sync_ahead`` does)."""
    calls: list[int] = []
    real = os.fdatasync

    def fdatasync(fd):
        calls.append(fd)
        if during is not None and len(calls) == 1:
            during()
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    return calls


@pytest.mark.parametrize("how", ["write_blocks", "write_in_block", "zero_blocks", "copy_blocks"])
def test_a_change_completed_during_a_sync_is_synced_by_the_next(dev, monkeypatch, how):
    dev.write_blocks(0, rand(BS))
    change = {"write_blocks": lambda: dev.write_blocks(5, rand(BS, 2)),
              "write_in_block": lambda: dev.write_in_block(5, 10, b"x" * 100),
              "zero_blocks": lambda: dev.zero_blocks(0, 1),
              "copy_blocks": lambda: dev.copy_blocks(0, 7, 1)}[how]
    calls = _count_syncs(monkeypatch, during=change)
    dev.sync_ahead()
    assert len(calls) == 1
    dev.sync()                    # the change landed after the first call began: not covered
    assert len(calls) == 2
    dev.sync()                    # nothing new
    assert len(calls) == 2


@pytest.mark.parametrize("how", ["write_blocks", "write_in_block"])
def test_a_write_in_flight_when_a_sync_begins_is_synced_by_the_next(dev, monkeypatch, how):
    """A sync that begins while a write's system call is under way (another thread) does not
    cover it: the sync after the write must not be skipped."""
    calls = _count_syncs(monkeypatch)
    real = os.pwrite

    def pwrite(fd, data, offset):
        dev.sync_ahead()              # begins (and ends) before this write's bytes land
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    if how == "write_blocks":
        dev.write_blocks(3, rand(BS))
    else:
        dev.write_in_block(3, 0, b"y" * 100)
    monkeypatch.setattr(os, "pwrite", real)
    synced = len(calls)
    dev.sync()
    assert len(calls) == synced + 1


def test_sync_ahead_keeps_its_failure_for_the_next_sync(dev, monkeypatch):
    dev.write_blocks(0, rand(BS))

    def failing(fd):
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(os, "fdatasync", failing)
    dev.sync_ahead()                          # raises nothing ...
    monkeypatch.undo()
    calls = _count_syncs(monkeypatch)
    with pytest.raises(ThinpoolError, match="cannot sync"):
        dev.sync()                            # ... the next sync does, without a system call
    assert calls == []                        # (Linux may say "fine" for the lost pages)
    dev.sync()                                # then the device is still dirty: synced again
    assert len(calls) == 1


def test_sync_waits_for_a_sync_under_way(dev, monkeypatch):
    """A sync that finds nothing new must not return while another thread's fdatasync (which
    took the changes) is still running."""
    import threading
    dev.write_blocks(0, rand(BS))
    inside, release, order = threading.Event(), threading.Event(), []
    real = os.fdatasync

    def slow(fd):
        inside.set()
        release.wait(5)
        real(fd)
        order.append("first sync done")

    monkeypatch.setattr(os, "fdatasync", slow)
    t = threading.Thread(target=dev.sync_ahead)
    t.start()
    assert inside.wait(5)
    second = threading.Thread(target=lambda: (dev.sync(), order.append("second sync returned")))
    second.start()
    second.join(0.2)
    release.set()
    t.join(5)
    second.join(5)
    assert order == ["first sync done", "second sync returned"]


# --- zero and punch ---------------------------------------------------------------------------


def test_zero_blocks_punches_holes_in_files(dev, path):
    data = fill(dev)
    before = allocated(path)
    assert before >= NR * BS
    dev.zero_blocks(16, 16)
    dev.sync()
    assert allocated(path) <= before - 16 * BS
    assert dev.read_blocks(16, 16) == bytes(16 * BS)
    assert dev.read_blocks(0, 16) == data[: 16 * BS]
    assert dev.read_blocks(32, NR - 32) == data[32 * BS:]
    assert os.stat(path).st_size == NR * BS  # KEEP_SIZE
    dev.zero_blocks(0, 0)


def test_zero_blocks_falls_back_to_writing_zeros(dev, path, monkeypatch):
    data = fill(dev)

    def unsupported(*args):
        raise OSError(errno.EOPNOTSUPP, "nope")

    monkeypatch.setattr(device_mod, "_fallocate", unsupported)
    before = allocated(path)
    dev.zero_blocks(4, 50)
    dev.sync()
    assert dev.read_blocks(4, 50) == bytes(50 * BS)
    assert dev.read_blocks(0, 4) == data[: 4 * BS]
    assert dev.read_blocks(54, NR - 54) == data[54 * BS:]
    assert allocated(path) == before  # written, not punched


def test_zero_fallback_spans_several_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(device_mod, "_fallocate",
                        lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSYS, "no")))
    monkeypatch.setattr(device_mod, "_CHUNK", 3 * BS)
    monkeypatch.setattr(device_mod, "_ZEROS", bytes(3 * BS))
    with DataDevice.create_file(tmp_path / "d", 20 * BS, block_size=BS) as d:
        d.write_blocks(0, b"\xaa" * 20 * BS)
        d.zero_blocks(1, 17)
        assert d.read_blocks(0, 20) == b"\xaa" * BS + bytes(17 * BS) + b"\xaa" * 2 * BS


@pytest.mark.parametrize("code, error", [(errno.EIO, ThinpoolError), (errno.ENOSPC, NoDataSpace)])
def test_zero_blocks_reports_real_failures(dev, monkeypatch, code, error):
    def failing(*args):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(device_mod, "_fallocate", failing)
    with pytest.raises(error) as info:
        dev.zero_blocks(0, 1)
    assert info.value.__cause__.errno == code
    with pytest.raises(error):
        dev.punch_blocks(0, 1)


def test_punch_blocks_releases_space(dev, path):
    data = fill(dev)
    before = allocated(path)
    assert dev.punch_blocks(8, 8) is True
    dev.sync()
    assert allocated(path) <= before - 8 * BS
    assert dev.read_blocks(8, 8) == bytes(8 * BS)  # files: holes read as zeros
    assert dev.read_blocks(0, 8) == data[: 8 * BS]
    assert dev.read_blocks(16, NR - 16) == data[16 * BS:]
    assert dev.punch_blocks(0, 0) is True


@pytest.mark.parametrize("code", [errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL])
def test_punch_blocks_unsupported_returns_false(dev, monkeypatch, code):
    data = fill(dev)

    def unsupported(*args):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(device_mod, "_fallocate", unsupported)
    assert dev.punch_blocks(0, NR) is False
    assert dev.read_blocks(0, NR) == data


# --- copy -------------------------------------------------------------------------------------


def test_zero_around_a_hole_writes_nothing(tmp_path):
    """A block that is a hole already reads as zeros: only the caller's own write lands (one
    4 KiB page of the 64 KiB block gets space; zeros written around it would take all 64)."""
    big = 64 * 1024
    path = tmp_path / "big"
    with DataDevice.create_file(path, 8 * big, block_size=big) as d:
        d.zero_around(5, 100, 200)
        d.write(5, 100, b"x" * 100)
        d.sync()
        assert d.read_blocks(5, 1) == bytes(100) + b"x" * 100 + bytes(big - 200)
    assert 0 < allocated(path) < big


def test_zero_around_stale_bytes(dev):
    """A block holding old bytes (an aborted transaction's, say) gets zeros around the range."""
    old = fill(dev)
    dev.zero_around(7, 1000, 3000)
    got = dev.read_blocks(7, 1)
    assert got[:1000] == bytes(1000) and got[3000:] == bytes(BS - 3000)
    assert got[1000:3000] == old[7 * BS + 1000: 7 * BS + 3000]      # the caller writes this
    assert dev.read_blocks(6, 1) == old[6 * BS: 7 * BS]             # neighbours untouched
    assert dev.read_blocks(8, 1) == old[8 * BS: 9 * BS]
    dev.zero_around(9, 0, BS)                                       # whole block: no-op
    assert dev.read_blocks(9, 1) == old[9 * BS: 10 * BS]


@pytest.mark.parametrize("lo, hi", [(-1, 10), (10, 5), (0, BS + 1)])
def test_zero_around_bad_range(dev, lo, hi):
    with pytest.raises(InvalidArgument):
        dev.zero_around(1, lo, hi)


def test_zero_around_on_a_block_device(loop):
    devpath, backing = loop
    with open(backing, "r+b") as f:
        f.write(b"\xee" * (4 * BS))
        f.flush()
        os.fsync(f.fileno())
    with DataDevice.open(devpath, BS) as d:
        d.zero_around(2, 10, 20)
        got = d.read_blocks(2, 1)
        assert got[:10] == bytes(10) and got[20:] == bytes(BS - 20) and got[10:20] == b"\xee" * 10


def test_copy_blocks(dev):
    data = fill(dev, seed=11)
    dev.copy_blocks(0, 40, 8)
    dev.copy_blocks(50, 2, 1)
    dev.copy_blocks(5, 5, 0)
    expect = bytearray(data)
    expect[40 * BS: 48 * BS] = data[: 8 * BS]
    expect[2 * BS: 3 * BS] = data[50 * BS: 51 * BS]
    assert dev.read_blocks(0, NR) == expect


def test_copy_blocks_from_a_hole(dev):
    dev.write_blocks(10, rand(4 * BS))
    dev.copy_blocks(0, 10, 4)
    assert dev.read_blocks(10, 4) == bytes(4 * BS)


@pytest.mark.parametrize("src, dst, count", [(0, 0, 1), (0, 3, 4), (3, 0, 4), (10, 12, 5)])
def test_copy_blocks_refuses_overlap(dev, src, dst, count):
    with pytest.raises(InvalidArgument, match="overlap"):
        dev.copy_blocks(src, dst, count)


def test_copy_blocks_without_copy_file_range(dev, monkeypatch):
    monkeypatch.delattr(os, "copy_file_range", raising=False)
    monkeypatch.setattr(device_mod, "_CHUNK", 3 * BS)  # several fallback steps
    data = fill(dev, seed=12)
    dev.copy_blocks(1, 30, 10)
    assert dev.read_blocks(30, 10) == data[BS: 11 * BS]


@pytest.mark.parametrize("code", [errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP])
def test_copy_blocks_falls_back_and_remembers(dev, monkeypatch, code):
    calls = []

    def refusing(*args):
        calls.append(args)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "copy_file_range", refusing)
    data = fill(dev, seed=13)
    dev.copy_blocks(0, 20, 5)
    dev.copy_blocks(30, 50, 5)
    assert len(calls) == 1  # not retried once refused
    assert dev.read_blocks(20, 5) == data[: 5 * BS]
    assert dev.read_blocks(50, 5) == data[30 * BS: 35 * BS]


def test_copy_blocks_loops_on_short_copies(dev, monkeypatch):
    real = os.copy_file_range
    sizes = []

    def stingy(src, dst, count, offset_src=None, offset_dst=None):
        sizes.append(count)
        return real(src, dst, min(count, 1000), offset_src, offset_dst)

    monkeypatch.setattr(os, "copy_file_range", stingy)
    data = fill(dev, seed=14)
    dev.copy_blocks(3, 33, 7)
    assert len(sizes) > 7 * BS // 1000
    assert dev.read_blocks(33, 7) == data[3 * BS: 10 * BS]


def test_copy_blocks_real_error_is_raised(dev, monkeypatch):
    def broken(*args):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "copy_file_range", broken)
    with pytest.raises(ThinpoolError) as info:
        dev.copy_blocks(0, 1, 1)
    assert info.value.__cause__.errno == errno.EIO


# --- grow -------------------------------------------------------------------------------------


def test_grow(dev, path):
    data = fill(dev)
    dev.grow(NR * BS)  # same size: no-op
    dev.grow(2 * NR * BS + 123)
    assert dev.size == 2 * NR * BS + 123
    assert dev.nr_blocks == 2 * NR
    assert os.stat(path).st_size == 2 * NR * BS + 123
    assert allocated(path) < NR * BS + 16 * BS  # still sparse
    assert dev.read_blocks(0, NR) == data
    assert dev.read_blocks(NR, NR) == bytes(NR * BS)
    dev.write_blocks(2 * NR - 1, b"\x5a" * BS)
    assert dev.read_blocks(2 * NR - 1, 1) == b"\x5a" * BS


def test_grow_never_shrinks(dev, path):
    with pytest.raises(InvalidArgument, match="shrink"):
        dev.grow(NR * BS - 1)
    with pytest.raises(InvalidArgument):
        dev.grow(-1)
    assert dev.size == NR * BS and os.stat(path).st_size == NR * BS


# --- read-only, closed --------------------------------------------------------------------------


def test_read_only(dev, path):
    data = fill(dev)
    dev.close()
    with DataDevice.open(path, BS, read_only=True) as ro:
        assert ro.read_only
        assert ro.read_blocks(0, NR) == data
        for call in (lambda: ro.write_blocks(0, bytes(BS)), lambda: ro.write(0, 0, b"x"),
                     lambda: ro.zero_blocks(0, 1), lambda: ro.punch_blocks(0, 1),
                     lambda: ro.copy_blocks(0, 1, 1), lambda: ro.grow(2 * NR * BS)):
            with pytest.raises(ReadOnlyError):
                call()
        ro.sync()
    assert path.read_bytes() == data


def test_closed(dev):
    dev.close()
    dev.close()
    assert dev.closed
    assert "closed" in repr(dev)
    for call in (lambda: dev.read_blocks(0, 1), lambda: dev.write_blocks(0, bytes(BS)),
                 lambda: dev.sync(), lambda: dev.grow(2 * NR * BS)):
        with pytest.raises(ThinpoolError, match="closed"):
            call()


def test_context_manager_closes(path):
    with DataDevice.create_file(path, BS, block_size=BS) as d:
        assert not d.closed
    assert d.closed


# --- model ------------------------------------------------------------------------------------

MODEL_BLOCKS = 12
block = st.integers(min_value=0, max_value=MODEL_BLOCKS - 1)
op = st.one_of(
    st.tuples(st.just("write"), block, st.integers(1, 3), st.integers(0, 2**32)),
    st.tuples(st.just("sub"), block, st.integers(0, BS - 1), st.binary(min_size=0, max_size=64)),
    st.tuples(st.just("zero"), block, st.integers(0, 3)),
    st.tuples(st.just("punch"), block, st.integers(0, 3)),
    st.tuples(st.just("copy"), block, block, st.integers(0, 3)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, max_size=15))
def test_against_a_bytearray_model(ops):
    model = bytearray(MODEL_BLOCKS * BS)
    with tempfile.TemporaryDirectory() as tmp:
        with DataDevice.create_file(os.path.join(tmp, "d"), MODEL_BLOCKS * BS, BS) as d:
            for kind, b, *args in ops:
                if kind == "write":
                    count, seed = args
                    count = min(count, MODEL_BLOCKS - b)
                    data = rand(count * BS, seed)
                    d.write_blocks(b, data)
                    model[b * BS: (b + count) * BS] = data
                elif kind == "sub":
                    off, data = args
                    data = data[: BS - off]
                    d.write(b, off, data)
                    model[b * BS + off: b * BS + off + len(data)] = data
                elif kind in ("zero", "punch"):
                    count = min(args[0], MODEL_BLOCKS - b)
                    getattr(d, f"{kind}_blocks")(b, count)
                    model[b * BS: (b + count) * BS] = bytes(count * BS)
                else:
                    dst, count = args
                    count = min(count, MODEL_BLOCKS - b, MODEL_BLOCKS - dst)
                    if count and b < dst + count and dst < b + count:
                        with pytest.raises(InvalidArgument):
                            d.copy_blocks(b, dst, count)
                        continue
                    d.copy_blocks(b, dst, count)
                    model[dst * BS: (dst + count) * BS] = model[b * BS: (b + count) * BS]
                assert d.read_blocks(0, MODEL_BLOCKS) == model


# --- a real block device ----------------------------------------------------------------------

LOOP_SIZE = 8 << 20


@pytest.fixture
def loop(tmp_path):
    """A loop device over a sparse 8 MiB file: yields (device path, backing file path)."""
    if shutil.which("losetup") is None:
        pytest.skip("losetup not found (util-linux is not installed)")
    if os.geteuid() != 0:
        pytest.skip("losetup needs root to attach a loop device")
    backing = tmp_path / "backing"
    with open(backing, "wb") as f:
        f.truncate(LOOP_SIZE)
    try:
        out = subprocess.run(["losetup", "-f", "--show", str(backing)], check=True,
                             capture_output=True, text=True, timeout=30)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"losetup -f --show failed (no free /dev/loop* or no loop support): "
                    f"{getattr(exc, 'stderr', '') or exc}")
    devpath = out.stdout.strip()
    try:
        yield devpath, backing
    finally:
        subprocess.run(["losetup", "-d", devpath], check=False, capture_output=True, timeout=30)


def test_loop_open(loop):
    devpath, _ = loop
    with DataDevice.open(devpath, BS) as d:
        assert d.is_block_device
        assert d.size == LOOP_SIZE
        assert d.nr_blocks == LOOP_SIZE // BS
        assert "block device" in repr(d)


def test_loop_size_without_ioctl(loop, monkeypatch):
    devpath, _ = loop
    real_ioctl = device_mod.fcntl.ioctl

    def no_getsize(fd, request, *args):
        if request == device_mod.BLKGETSIZE64:
            raise OSError(errno.ENOTTY, "no")
        return real_ioctl(fd, request, *args)

    monkeypatch.setattr(device_mod.fcntl, "ioctl", no_getsize)
    with DataDevice.open(devpath, BS, read_only=True) as d:
        assert d.size == LOOP_SIZE


def test_loop_io_reaches_the_backing_file(loop):
    devpath, backing = loop
    with DataDevice.open(devpath, BS) as d:
        data = rand(8 * BS, 21)
        d.write_blocks(100, data)
        d.write(200, 7, b"sub-block")
        d.sync()
        assert d.read_blocks(100, 8) == data
        assert d.read(200, 7, 9) == b"sub-block"
        with pytest.raises(InvalidArgument):
            d.read_blocks(d.nr_blocks - 1, 2)
    raw = backing.read_bytes()
    assert raw[100 * BS: 108 * BS] == data
    assert raw[200 * BS + 7: 200 * BS + 16] == b"sub-block"


def test_loop_zero_copy_punch(loop):
    devpath, _ = loop
    with DataDevice.open(devpath, BS) as d:
        data = rand(32 * BS, 22)
        d.write_blocks(0, data)
        d.zero_blocks(4, 4)  # BLKZEROOUT
        assert d.read_blocks(0, 12) == data[: 4 * BS] + bytes(4 * BS) + data[8 * BS: 12 * BS]
        d.copy_blocks(16, 1000, 16)  # copy_file_range refuses block devices: pread/pwrite
        assert d.read_blocks(1000, 16) == data[16 * BS:]
        assert isinstance(d.punch_blocks(20, 4), bool)  # BLKDISCARD
        assert d.read_blocks(16, 4) == data[16 * BS: 20 * BS]
        assert d.read_blocks(24, 8) == data[24 * BS:]


def test_loop_zero_falls_back_without_blkzeroout(loop, monkeypatch):
    devpath, _ = loop
    real_ioctl = device_mod.fcntl.ioctl

    def no_zeroout(fd, request, *args):
        if request in (device_mod.BLKZEROOUT, device_mod.BLKDISCARD):
            raise OSError(errno.EOPNOTSUPP, "no")
        return real_ioctl(fd, request, *args)

    with DataDevice.open(devpath, BS) as d:
        d.write_blocks(0, b"\x77" * 8 * BS)
        monkeypatch.setattr(device_mod.fcntl, "ioctl", no_zeroout)
        d.zero_blocks(2, 3)
        assert d.read_blocks(0, 8) == b"\x77" * 2 * BS + bytes(3 * BS) + b"\x77" * 3 * BS
        assert d.punch_blocks(0, 1) is False
        assert d.read_blocks(0, 1) == b"\x77" * BS


def test_loop_cannot_be_resized(loop):
    devpath, _ = loop
    with DataDevice.open(devpath, BS) as d:
        d.grow(LOOP_SIZE)  # already that size: fine
        with pytest.raises(InvalidArgument, match="cannot resize a block device"):
            d.grow(2 * LOOP_SIZE)
        with pytest.raises(InvalidArgument):
            d.grow(LOOP_SIZE - BS)
        assert d.size == LOOP_SIZE


def test_loop_grown_outside_is_accepted(loop):
    devpath, backing = loop
    with DataDevice.open(devpath, BS) as d:
        os.truncate(backing, 2 * LOOP_SIZE)
        subprocess.run(["losetup", "-c", devpath], check=True, capture_output=True, timeout=30)
        d.grow(2 * LOOP_SIZE)
        assert d.size == 2 * LOOP_SIZE and d.nr_blocks == 2 * LOOP_SIZE // BS


def test_loop_is_opened_exclusively(loop):
    devpath, _ = loop
    with DataDevice.open(devpath, BS):
        with pytest.raises(BusyError):
            DataDevice.open(devpath, BS)
        with DataDevice.open(devpath, BS, read_only=True) as ro:
            assert ro.size == LOOP_SIZE


EARLY_WRITEBACK_SCRIPT = r"""
import sys
from thinpool.data.device import DataDevice, WRITEBACK_BYTES
dev = DataDevice.create_file(sys.argv[1], 4 * WRITEBACK_BYTES, 65536)
chunk = b"x" * (1 << 20)
for i in range(2 * WRITEBACK_BYTES // len(chunk)):       # two thresholds' worth, 1 MiB writes
    dev.write_span(i * 16, 0, chunk)
for i in range(WRITEBACK_BYTES // 4096):                 # and one of 4 KiB in-place writes
    dev.write_in_block(2 * WRITEBACK_BYTES // 65536 + i // 16, (i % 16) * 4096, chunk[:4096])
dev.sync()
dev.close()
"""


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed (Debian: strace)")
def test_writes_start_their_write_back_early(tmp_path):
    """Every WRITEBACK_BYTES written, the write-back of the device's dirty pages is started (one
    sync_file_range with SYNC_FILE_RANGE_WRITE, seen by strace), so a commit's fdatasync finds
    the data on its way; the one fdatasync still comes, and the bytes are what was written."""
    path = tmp_path / "data"
    log = tmp_path / "strace.log"
    subprocess.run(["strace", "-f", "-qq", "-o", str(log), "-e", "trace=sync_file_range,fdatasync",
                    sys.executable, "-c", EARLY_WRITEBACK_SCRIPT, str(path)], check=True)
    calls = [line.split(None, 1)[1] for line in log.read_text().splitlines() if "(" in line]
    starts = [c for c in calls if c.startswith("sync_file_range(")]
    assert len(starts) == 3, calls
    assert all(c.endswith(", 0, 0, SYNC_FILE_RANGE_WRITE) = 0") for c in starts), starts
    assert sum(c.startswith("fdatasync(") for c in calls) == 1, calls
    with open(path, "rb") as f:
        assert f.read(1 << 20) == b"x" * (1 << 20)
