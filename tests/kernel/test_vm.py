"""The kernel VM harness's own tests: a few cheap ones of its parts (no VM), and five boots: the
tools and modules inside, a thin pool the kernel makes and thinpool reads, a failing job, a job
killed at its timeout, and the kernel's own words in dmesg."""

from __future__ import annotations

import gzip
import lzma
import os
import random
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.kernel import vm as vm_module
from tests.kernel.vm import (KernelVM, Missing, VMTimeout, extract_vmlinux,
                             lz4_legacy_decompress, module_load_order, skip_reason, write_newc)
from tests.tptools import TOOLS_AVAILABLE, thin_check, thin_dump

MiB = 1 << 20
BLOCK = 64 * 1024                 # the pools' data block: 128 sectors


def _sample(n: int, seed: int = 1) -> bytes:
    """Compressible bytes with short and long repeats (the LZ4 decoder's both match paths)."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < n:
        r = rng.random()
        if r < 0.3:
            out += rng.randbytes(rng.randint(1, 300))
        elif r < 0.6 and out:
            start = rng.randrange(len(out))
            out += out[start:start + rng.randint(4, 5000)]
        else:
            out += bytes([rng.randrange(256)]) * rng.randint(1, 2000)
    return bytes(out[:n])


def _fake_bzimage(payload: bytes, header: bool = True) -> bytes:
    """A bzImage shape: a setup sector with the boot header, then the payload."""
    setup = bytearray(1024)                   # boot sector + setup_sects=1
    if header:
        setup[0x1F1] = 1
        setup[0x202:0x206] = b"HdrS"
        struct.pack_into("<H", setup, 0x206, 0x20F)
        struct.pack_into("<II", setup, 0x248, 16, len(payload))
    return bytes(setup) + b"\xaa" * 16 + payload + b"\0" * 100


ELF = b"\x7fELF\x02\x01\x01" + _sample(300_000, seed=2)


@pytest.mark.parametrize("kind", ["gzip", "xz"])
@pytest.mark.parametrize("header", [True, False])
def test_extract_vmlinux(kind, header):
    packed = gzip.compress(ELF) if kind == "gzip" else lzma.compress(ELF, format=lzma.FORMAT_XZ)
    if kind == "xz":
        packed += struct.pack("<I", len(ELF))      # the kernel's build appends the size
    out, found = extract_vmlinux(_fake_bzimage(packed, header))
    assert (out, found) == (ELF, kind)


def test_extract_vmlinux_refuses_a_wrong_size_and_no_payload():
    packed = lzma.compress(ELF, format=lzma.FORMAT_XZ) + struct.pack("<I", len(ELF) + 1)
    with pytest.raises(ValueError, match="the image says"):
        extract_vmlinux(_fake_bzimage(packed))
    with pytest.raises(ValueError, match="no compressed ELF"):
        extract_vmlinux(_fake_bzimage(b"plain bytes"))


@pytest.mark.skipif(shutil.which("lz4") is None, reason="no lz4 command (Debian: lz4)")
def test_lz4_legacy_against_the_lz4_command():
    data = _sample(9 * MiB)                   # more than one 8 MiB legacy block
    packed = subprocess.run(["lz4", "-l", "-9", "-c"], input=data, capture_output=True,
                            check=True).stdout
    assert lz4_legacy_decompress(packed) == data
    # the kernel's payload: the frame, then the uncompressed size
    assert lz4_legacy_decompress(packed + struct.pack("<I", len(data))) == data
    with pytest.raises(ValueError):
        lz4_legacy_decompress(packed[:len(packed) // 2])


@pytest.mark.skipif(not os.path.exists("/bin/busybox"), reason="no busybox (Debian: busybox-static)")
def test_write_newc_unpacks_with_cpio(tmp_path):
    import io
    import stat
    buf = io.BytesIO()
    write_newc(buf, [("/d", stat.S_IFDIR | 0o755, b""),
                     ("/d/f", stat.S_IFREG | 0o644, b"hello\n" * 3),
                     ("/d/odd", stat.S_IFREG | 0o755, b"x"),
                     ("/d/l", stat.S_IFLNK | 0o777, b"f")])
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["/bin/busybox", "cpio", "-i", "-d"], input=buf.getvalue(), cwd=out,
                   check=True, capture_output=True)
    assert (out / "d/f").read_bytes() == b"hello\n" * 3
    assert (out / "d/odd").read_bytes() == b"x" and os.access(out / "d/odd", os.X_OK)
    assert os.readlink(out / "d/l") == "f"


def test_skip_reason_names_the_package(monkeypatch):
    if os.geteuid() != 0:
        assert "root" in skip_reason()
        return
    monkeypatch.setattr(vm_module, "QEMU", "qemu-system-none")
    monkeypatch.setattr(vm_module, "BUSYBOX", "/nonexistent/busybox")
    reason = skip_reason()
    assert "(Debian: qemu-system-x86)" in reason and "(Debian: busybox-static)" in reason


class _FakeApt:
    """apt-get/apt-cache as a machine without the package would answer; 'download' leaves a
    file that is no package when ``bogus_deb``."""

    def __init__(self, bogus_deb: bool) -> None:
        self.bogus_deb = bogus_deb
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        self.calls.append(args)
        if args[:2] == ("apt-cache", "depends"):
            return subprocess.CompletedProcess(args, 0, "linux-image-cloud-amd64\n"
                                               "  Depends: linux-image-0.0.0-1-cloud-amd64\n", "")
        if "download" in args:
            if self.bogus_deb:
                (cwd / "linux-image-0.0.0-1-cloud-amd64_0.0.0-1_amd64.deb").write_bytes(b"no")
                return subprocess.CompletedProcess(args, 0, "", "")
            return subprocess.CompletedProcess(args, 100, "", "E: Unable to locate package")
        return subprocess.CompletedProcess(args, 0, "", "")


@pytest.mark.parametrize("bogus_deb", [False, True])
def test_a_failed_preparation_says_why_and_leaves_nothing(tmp_path, monkeypatch, bogus_deb):
    if skip_reason():
        pytest.skip(skip_reason())
    vm = KernelVM(cache=tmp_path / "cache")
    apt = _FakeApt(bogus_deb)
    monkeypatch.setattr(vm, "_apt", apt)
    with pytest.raises(Missing) as info:
        vm.prepare()
    if bogus_deb:
        assert "dpkg-deb -x" in str(info.value)
    else:
        assert "cannot be downloaded" in str(info.value) and "Unable to locate" in str(info.value)
        assert ("apt-get", "update", "-qq") in apt.calls        # tried again after an update
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".lock"]


def test_module_load_order(kernel_vm):
    names = [p.name for p in module_load_order(kernel_vm.kernel_dir / "modules",
                                               ["virtio_pci", "virtio_blk", "dm-thin-pool"])]
    assert names == ["virtio_ring.ko", "virtio_pci_modern_dev.ko", "virtio_pci_legacy_dev.ko",
                     "virtio.ko", "virtio_pci.ko", "virtio_blk.ko", "dm-bio-prison.ko",
                     "dm-mod.ko", "dm-bufio.ko", "libcrc32c.ko", "dm-persistent-data.ko",
                     "dm-thin-pool.ko"]


# ---------------------------------------------------------------------------------------------
# Boots
# ---------------------------------------------------------------------------------------------

def _sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def test_tools_modules_and_disks(kernel_vm, tmp_path):
    scratch = _sparse(tmp_path / "scratch.img", 3 * MiB)
    r = kernel_vm.run("""
        dmsetup version
        cat /proc/modules
        echo "scratch: $(blockdev --getsize64 /dev/tp/scratch) $(readlink /dev/tp/scratch)"
        thin_check -V
        """, {"scratch": scratch}, timeout=90)
    assert r.returncode == 0, r.stderr
    assert "Driver version:    4." in r.stdout and "Library version:" in r.stdout
    modules = {line.split()[0] for line in r.stdout.splitlines() if " Live " in line}
    assert {"dm_thin_pool", "dm_persistent_data", "dm_bufio", "dm_mod", "virtio_blk"} <= modules
    assert f"scratch: {3 * MiB} /dev/vd" in r.stdout
    assert any("device-mapper: ioctl" in line for line in r.dmesg)
    assert r.stdout.rstrip().splitlines()[-1].strip()[0].isdigit()       # thin_check's version
    assert "tp-vm: job done: exit 0" in r.console
    assert 0 < r.seconds < 90


@pytest.mark.skipif(not TOOLS_AVAILABLE, reason="no thin_check (Debian: thin-provisioning-tools)")
def test_pool_made_by_the_kernel_reads_on_the_host(kernel_vm, tmp_path):
    from thinpool import Pool
    meta = _sparse(tmp_path / "meta.img", 8 * MiB)
    data = _sparse(tmp_path / "data.img", 64 * MiB)
    pattern = random.Random(7).randbytes(100 * 1024)          # 25 sectors of 4 KiB
    sectors = 64 * MiB // 512
    r = kernel_vm.run(f"""
        set -e
        dmsetup create pool --table "0 {sectors} thin-pool /dev/tp/meta /dev/tp/data 128 0"
        dmsetup message /dev/mapper/pool 0 "create_thin 0"
        dmsetup create thin --table "0 {16 * MiB // 512} thin /dev/mapper/pool 0"
        dd if=pattern of=/dev/mapper/thin bs=4096 seek=257 conv=fsync 2>/dev/null
        dmsetup status pool
        dmsetup remove thin
        dmsetup remove pool
        thin_check /dev/tp/meta
        """, {"meta": meta, "data": data}, timeout=120, files={"pattern": pattern})
    assert r.returncode == 0, r.stderr
    status = r.stdout.splitlines()[0].split()
    assert status[:4] == ["0", str(sectors), "thin-pool", "0"]        # transaction id 0
    assert status[5] == "2/1024"                                       # two data blocks mapped
    # the host's oracle and thinpool's own reader see what the kernel committed
    check = thin_check(meta)
    assert check.returncode == 0, check.stderr
    assert '<device dev_id="0" mapped_blocks="2"' in thin_dump(meta)
    with Pool.open_files(meta, data) as pool:
        assert pool.volumes() == ["0"]
        vol = pool.volume("0")
        assert vol.size == 18 * BLOCK                      # up to its highest mapped block
        got = vol.read(MiB, 2 * BLOCK)
    # the kernel zeroed the unwritten parts of both blocks it provisioned
    assert got == bytes(4096) + pattern + bytes(2 * BLOCK - 4096 - len(pattern))


def test_failing_job_reports_exit_code_and_stderr(kernel_vm):
    r = kernel_vm.run("""
        echo partial
        echo note > "$RESULTS/note.txt"
        dmsetup remove no-such-device
        echo "it broke" >&2
        exit 7
        """, timeout=90)
    assert r.returncode == 7
    assert r.stdout == "partial\n"
    assert "it broke" in r.stderr and "no-such-device" in r.stderr
    assert r.files == {"note.txt": b"note\n"}
    assert "tp-vm: job done: exit 7" in r.console


def test_hanging_job_is_killed_at_its_timeout(kernel_vm):
    tmp = Path(tempfile.gettempdir())
    before = set(tmp.glob("tpvm-*"))
    with pytest.raises(VMTimeout) as info:
        kernel_vm.run("echo started > /dev/console; sleep 600", timeout=15)
    e = info.value
    assert 15 <= e.seconds < 25
    assert "tp-vm: job start" in e.console and "started" in e.console
    assert "still ran after 15 s" in str(e)
    # killed and reaped (a reaped pid has no /proc entry until it is reused)
    assert e.pid is not None
    try:
        cmdline = Path(f"/proc/{e.pid}/cmdline").read_bytes()
    except FileNotFoundError:
        cmdline = b""
    assert b"qemu" not in cmdline
    assert set(tmp.glob("tpvm-*")) == before


def test_dmesg_has_the_kernels_words(kernel_vm, tmp_path):
    meta = _sparse(tmp_path / "meta.img", 8 * MiB)
    data = _sparse(tmp_path / "data.img", 64 * MiB)
    sectors = 64 * MiB // 512
    r = kernel_vm.run(f"""
        dmsetup create pool --table "0 {sectors} thin-pool /dev/tp/meta /dev/tp/data 128 0"
        dmsetup remove pool
        if dmsetup create pool --table "0 {sectors} thin-pool /dev/tp/meta /dev/tp/data 256 0"
        then echo "loaded with another block size"; exit 1; fi
        echo refused
        """, {"meta": meta, "data": data}, timeout=90)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "refused"
    text = r.dmesg_text()
    assert "changing the data block size (from 128 to 256) is not supported" in text
    assert "Error creating metadata object" in text
