"""A throw-away VM with a real Linux kernel's device-mapper, for the real-kernel tests.

Contract
--------
``KernelVM(cache=None, package=None).prepare()`` fills, once per machine, a cache directory
(``$THINPOOL_TEST_KERNEL_CACHE``, else ``/var/cache/thinpool-test-kernel`` as root, else
``$XDG_CACHE_HOME/thinpool-test-kernel``) with one folder per kernel package
(``<package>_<version>/``: ``vmlinux``, ``config``, ``modules/`` — the package's
``lib/modules/<release>`` tree — and ``release``) and ``initramfs-<hash>.cpio.gz`` files. The kernel
is Debian's cloud kernel: the newest one already in the cache, else the one
``linux-image-cloud-amd64`` depends on now, fetched with ``apt-get download`` (after ``apt-get
update`` when the package lists do not know it) and unpacked with ``dpkg-deb -x``; ``vmlinux`` is
the uncompressed ELF taken out of the package's ``vmlinuz`` by :func:`extract_vmlinux` (LZ4 legacy,
gzip, xz, lzma, bzip2 or zstd, found by the bzImage header and the payload's magic). The
initramfs (gzip'd newc cpio written here) holds the host's static busybox, ``dmsetup`` and
``pdata_tools`` (``thin_check``, ``thin_dump``, ...; only when installed) with the libraries
``ldd`` names, the kernel modules ``modules`` needs in the order their ``.modinfo`` ``depends=``
give, and the ``/init`` script below; its name carries a hash of what went in, so another version of
this file builds its own. Preparation holds ``<cache>/.lock`` (``flock``) so that two test runs
do not fill the cache at once. Everything is built in a ``.tmp-*`` folder or file inside the cache
and renamed into place when complete: a failure midway (no network, a full disk, a kill) leaves
no half kernel behind, only (after a kill) a ``.tmp-*`` entry that the next preparation
removes. A problem that makes the VM impossible here (a missing tool, a kernel package that cannot
be downloaded) raises :class:`Missing`, whose message names what is missing;
:func:`skip_reason` checks the host tools without preparing anything.

``run(job_script, disks=None, timeout=60.0, files=None, results_size=64 MiB)`` boots a fresh VM (qemu's TCG: KVM does
not work on this kind of machine): ``qemu-system-x86_64 -accel tcg -cpu max -m 512M -nographic
-nic none -no-reboot -bios qboot.rom -kernel vmlinux -initrd initramfs``. Each ``disks`` entry
``NAME: path`` (a raw file, size a multiple of 512) becomes a writable virtio-blk disk with
``serial=NAME``, seen inside as ``/dev/tp/NAME`` (a symlink to its ``/dev/vdX``). The job goes in
as a tar on a read-only disk (``job.sh`` and ``files``, unpacked into ``/job``, the job's working
directory); the init script runs ``sh job.sh`` with stdin from ``/dev/null``, ``DM_DISABLE_UDEV=1``
(``dmsetup`` then makes its own ``/dev/mapper`` nodes) and ``RESULTS=/out/files``, then writes
a tar of the job's exit code, stdout, stderr, the kernel's ``dmesg`` and whatever the job left in
``$RESULTS`` to a results disk, syncs and powers off. The console (the serial line) carries only
the kernel's errors and ``tp-vm:`` progress lines. ``run`` returns a :class:`Result`; it raises
:class:`VMTimeout` when the VM is still running at ``timeout`` seconds (it is then killed by pid)
and :class:`VMError` when the VM ended without results (a boot failure, a panic, a job that
powered the VM off, results larger than ``results_size``); both carry the console. Each run
works in its own temporary directory (the job and results disks, the console log), removed in
``finally`` together with the qemu process, which is always killed by pid and reaped there:
nothing of a run is left behind, whatever happens. Files given as ``disks`` keep what the VM
wrote to them (with a kill, whatever reached them by then).

Names: disk names are 1-20 characters of ``[A-Za-z0-9_.-]`` (virtio-blk's serial holds 20 bytes)
and must not start with ``tp-`` (the job and results disks' serials).
"""

from __future__ import annotations

import bz2
import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import io
import logging
import lzma
import os
import re
import shutil
import signal
import stat
import struct
import subprocess
import tarfile
import tempfile
import time
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path

__all__ = ["KernelVM", "Result", "VMError", "VMTimeout", "Missing", "skip_reason",
           "default_cache_dir", "extract_vmlinux", "lz4_legacy_decompress", "read_modinfo",
           "module_load_order", "write_newc"]

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
QBOOT = "/usr/share/qemu/qboot.rom"
BUSYBOX = "/bin/busybox"
META_PACKAGE = "linux-image-cloud-amd64"
#: Modules the VM loads (with what they depend on): virtio disks and dm-thin.
DEFAULT_MODULES = ("virtio_pci", "virtio_blk", "dm_thin_pool")
#: Binaries copied into the initramfs when installed (with their libraries).
OPTIONAL_TOOLS = ("pdata_tools",)
PDATA_LINKS = ("thin_check", "thin_dump", "thin_restore", "thin_repair", "thin_ls", "thin_delta",
               "thin_rmap", "thin_metadata_size", "thin_trim")
JOB_SERIAL = "tp-job"
RESULTS_SERIAL = "tp-results"
RESULTS_SIZE = 64 << 20
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,20}")
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/local/bin", "/usr/bin", "/bin")


class Missing(Exception):
    """Something the VM needs is not on this machine; the message names it."""


class VMError(Exception):
    """The VM ended without results. ``console`` is what it printed; ``seconds`` how long it
    ran; ``pid`` qemu's process id (None when qemu did not start)."""

    def __init__(self, message: str, console: str = "", seconds: float = 0.0,
                 pid: int | None = None) -> None:
        tail = "\n".join(console.splitlines()[-40:])
        super().__init__(f"{message}\n--- console (last lines) ---\n{tail}" if tail else message)
        self.console = console
        self.seconds = seconds
        self.pid = pid          # qemu's, killed and reaped before this was raised


class VMTimeout(VMError):
    """The VM still ran at the timeout and was killed."""


@dataclasses.dataclass
class Result:
    """What a job left: its exit code, output, the kernel's log, the files it put in
    ``$RESULTS`` (by path relative to it), the console, and the seconds from qemu's start to its
    exit."""

    returncode: int
    stdout: str
    stderr: str
    dmesg: list[str]
    seconds: float
    console: str = ""
    files: dict[str, bytes] = dataclasses.field(default_factory=dict)

    def dmesg_text(self) -> str:
        return "\n".join(self.dmesg)


# ---------------------------------------------------------------------------------------------
# Host checks and the cache
# ---------------------------------------------------------------------------------------------

def _which(name: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN])
    return shutil.which(name, path=path)


def _is_static(path: str) -> bool:
    """True for an ELF without a program interpreter (ldd's 'not a dynamic executable')."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2:
                return False
            phoff, = struct.unpack_from("<Q", head, 0x20)
            phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3   # PT_INTERP
               for i in range(phnum))


def skip_reason() -> str | None:
    """Why the VM cannot run on this machine (naming the Debian package), or None. Does not
    look at the kernel: :meth:`KernelVM.prepare` raises :class:`Missing` for that."""
    if os.geteuid() != 0:
        return "the kernel VM tests need root (apt-get download/update of the kernel, the cache)"
    missing = []
    if _which(QEMU) is None or not os.path.exists(QBOOT):
        missing.append(f"{QEMU} and {QBOOT} (Debian: qemu-system-x86)")
    if not (os.path.exists(BUSYBOX) and _is_static(os.path.realpath(BUSYBOX))):
        missing.append(f"a static {BUSYBOX} (Debian: busybox-static)")
    if _which("dmsetup") is None:
        missing.append("dmsetup (Debian: dmsetup)")
    for tool in ("apt-get", "apt-cache", "dpkg-deb", "ldd"):
        if _which(tool) is None:
            missing.append(f"{tool} (a Debian host)")
    return "missing " + "; ".join(missing) if missing else None


def default_cache_dir() -> Path:
    env = os.environ.get("THINPOOL_TEST_KERNEL_CACHE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/thinpool-test-kernel")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "thinpool-test-kernel"


# ---------------------------------------------------------------------------------------------
# vmlinuz -> vmlinux
# ---------------------------------------------------------------------------------------------

_LZ4_LEGACY = b"\x02\x21\x4c\x18"
_MAGICS = (  # (magic, name) of the compressors the kernel's bzImage may use
    (_LZ4_LEGACY, "lz4"),
    (b"\x1f\x8b\x08", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"BZh", "bzip2"),
    (b"\x5d\x00\x00", "lzma"),
)


def lz4_legacy_decompress(data: bytes | memoryview) -> bytes:
    """Decompress LZ4's legacy frame (magic 0x184C2102, then blocks of a 4-byte little-endian
    compressed size and an LZ4 block each), as the kernel's ``lz4 -l`` writes it; frames may
    follow each other, and four bytes left after the last block are the kernel's size trailer.
    Raises ValueError on a truncated frame or a damaged block."""
    src = memoryview(data)
    if bytes(src[:4]) != _LZ4_LEGACY:
        raise ValueError("not an LZ4 legacy frame")
    out = bytearray()
    i = 4
    while i + 4 < len(src):      # four bytes left over: the kernel's size trailer
        size, = struct.unpack_from("<I", src, i)
        if bytes(src[i:i + 4]) == _LZ4_LEGACY:      # another frame follows: lz4's -l output
            i += 4
            continue
        if size == 0 or size > len(src) - i - 4:
            raise ValueError(f"truncated LZ4 legacy frame: a {size}-byte block at {i}, "
                             f"{len(src) - i - 4} bytes left")
        _lz4_block(src[i + 4:i + 4 + size], out)
        i += 4 + size
    return bytes(out)


def _lz4_block(src: memoryview, out: bytearray) -> None:
    i, n = 0, len(src)
    try:
        while i < n:
            token = src[i]
            i += 1
            lit = token >> 4
            if lit == 15:
                while True:
                    c = src[i]
                    i += 1
                    lit += c
                    if c != 255:
                        break
            out += src[i:i + lit]
            i += lit
            if i >= n:           # the last sequence has literals only
                break
            off = src[i] | (src[i + 1] << 8)
            i += 2
            length = token & 15
            if length == 15:
                while True:
                    c = src[i]
                    i += 1
                    length += c
                    if c != 255:
                        break
            length += 4
            start = len(out) - off
            if off == 0 or start < 0:
                raise ValueError(f"LZ4 match offset {off} outside the output")
            if off >= length:
                out += out[start:start + length]
            else:                # overlapping: the last `off` bytes repeat
                pattern = out[start:]
                out += (pattern * (length // off + 1))[:length]
    except IndexError:
        raise ValueError("truncated LZ4 block") from None


def _zstd(payload: bytes) -> bytes:
    try:
        import zstandard
    except ImportError:
        zstandard = None
    if zstandard is not None:
        return zstandard.ZstdDecompressor().decompressobj().decompress(payload)
    tool = _which("zstd")
    if tool is None:
        raise Missing("zstd to unpack the kernel (Debian: zstd, or pip's zstandard)")
    return subprocess.run([tool, "-dc"], input=payload, capture_output=True).stdout


def _decompress(kind: str, payload: bytes) -> bytes:
    if kind == "lz4":
        return lz4_legacy_decompress(payload)
    if kind == "gzip":
        return zlib.decompressobj(wbits=31).decompress(payload)
    if kind == "xz":
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    if kind == "lzma":
        return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(payload)
    if kind == "bzip2":
        return bz2.BZ2Decompressor().decompress(payload)
    if kind == "zstd":
        return _zstd(payload)
    raise ValueError(kind)


def extract_vmlinux(image: bytes) -> tuple[bytes, str]:
    """The uncompressed ELF kernel inside a bzImage (``vmlinuz``), and the compressor's name.

    The payload is where the x86 boot header says (``setup_sects``, ``payload_offset``,
    ``payload_length``: boot protocol 2.08 and later) and its compressor is told by its magic;
    an image without such a header is searched for each magic in turn, as the kernel tree's
    ``scripts/extract-vmlinux`` does. The result must be an ELF file and, when the payload ends
    with the uncompressed size (as the kernel's build appends it), exactly that long. Raises
    ValueError when no payload decompresses to an ELF, or the header's one to another size."""
    candidates: list[tuple[int, int | None]] = []
    if len(image) > 0x250 and image[0x202:0x206] == b"HdrS":
        version, = struct.unpack_from("<H", image, 0x206)
        if version >= 0x208:
            setup = image[0x1F1] or 4
            off, length = struct.unpack_from("<II", image, 0x248)
            candidates.append(((setup + 1) * 512 + off, length))
    for magic, _ in _MAGICS:
        pos = image.find(magic)
        while pos >= 0 and len(candidates) < 64:
            candidates.append((pos, None))
            pos = image.find(magic, pos + 1)
    errors = []
    for start, length in candidates:
        payload = image[start:] if length is None else image[start:start + length]
        kind = next((k for m, k in _MAGICS if payload.startswith(m)), None)
        if kind is None:
            continue
        try:
            out = _decompress(kind, payload)
        except (ValueError, OSError, EOFError, lzma.LZMAError, zlib.error) as e:
            errors.append(f"{kind} at {start}: {e}")
            continue
        if not out.startswith(b"\x7fELF"):
            continue
        if length is not None and length >= 4:
            want, = struct.unpack_from("<I", payload, length - 4)
            if want != len(out):     # the header's payload, damaged: no guessing past it
                raise ValueError(f"the {kind} payload at {start} gives {len(out)} bytes, "
                                 f"the image says {want}")
        return out, kind
    raise ValueError("no compressed ELF kernel found in the image" +
                     (f" ({'; '.join(errors[:5])})" if errors else ""))


# ---------------------------------------------------------------------------------------------
# Kernel modules
# ---------------------------------------------------------------------------------------------

def read_modinfo(path: Path) -> dict[str, list[str]]:
    """The ``key=value`` strings of a ``.ko``'s ``.modinfo`` section (an ELF64 little-endian
    object), each key with its values in order."""
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ValueError(f"{path}: not an ELF64 module")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        base = shoff + i * shentsize
        name, = struct.unpack_from("<I", data, base)
        offset, size = struct.unpack_from("<QQ", data, base + 0x18)
        return name, offset, size

    _, stroff, _ = section(shstrndx)
    info: dict[str, list[str]] = {}
    for i in range(shnum):
        name, offset, size = section(i)
        end = data.index(b"\0", stroff + name)
        if data[stroff + name:end] != b".modinfo":
            continue
        for item in data[offset:offset + size].split(b"\0"):
            key, sep, value = item.decode("utf-8", "replace").partition("=")
            if sep:
                info.setdefault(key, []).append(value)
    return info


def _modname(name: str) -> str:
    return name.replace("-", "_")


def module_load_order(modules_dir: Path, wanted: Iterable[str]) -> list[Path]:
    """The ``.ko`` files to ``insmod`` for ``wanted`` (module names, ``-`` or ``_``), each after
    the modules its ``depends=`` names. Modules built into the kernel (``modules.builtin``) are
    left out. Raises Missing for a module the tree has neither as a file nor built in."""
    modules_dir = Path(modules_dir)
    files = {_modname(p.name[:-3]): p for p in modules_dir.rglob("*.ko")}
    builtin = set()
    with contextlib.suppress(FileNotFoundError):
        for line in (modules_dir / "modules.builtin").read_text().split():
            builtin.add(_modname(Path(line).name.removesuffix(".ko")))
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = _modname(name)
        if name in seen or name in builtin:
            return
        if name in chain:
            raise ValueError(f"module dependency cycle: {' -> '.join(chain + (name,))}")
        path = files.get(name)
        if path is None:
            raise Missing(f"no kernel module {name} in {modules_dir}")
        for deps in read_modinfo(path).get("depends", []):
            for dep in filter(None, deps.split(",")):
                visit(dep, chain + (name,))
        seen.add(name)
        order.append(path)

    for name in wanted:
        visit(name, ())
    return order


# ---------------------------------------------------------------------------------------------
# newc cpio
# ---------------------------------------------------------------------------------------------

def write_newc(out, entries: Iterable[tuple[str, int, bytes | int]]) -> None:
    """Write a newc (``070701``) cpio archive of ``(path, mode, content)`` entries to the binary
    file ``out``: a regular file's content is its bytes, a symlink's the target as bytes, a
    character or block device's an ``os.makedev`` number; directories have ``b""``. Owner root,
    mtime 0, one inode number per entry; the trailer is added."""
    def header(ino: int, mode: int, size: int, name: bytes, rdev: int = 0) -> bytes:
        fields = (ino, mode, 0, 0, 1, 0, size, 0, 0, os.major(rdev), os.minor(rdev),
                  len(name) + 1, 0)
        return b"070701" + b"".join(b"%08X" % v for v in fields)

    def pad(n: int) -> bytes:
        return b"\0" * (-n % 4)

    ino = 1
    for path, mode, content in entries:
        name = path.lstrip("/").encode()
        rdev = content if isinstance(content, int) else 0
        body = b"" if isinstance(content, int) else content
        h = header(ino, mode, len(body), name, rdev) + name + b"\0"
        out.write(h + pad(len(h)) + body + pad(len(body)))
        ino += 1
    h = header(0, 0, 0, b"TRAILER!!!") + b"TRAILER!!!\0"
    out.write(h + pad(len(h)))


def _ldd(binary: str) -> list[str]:
    """The shared libraries (absolute paths, the loader included) ``ldd`` lists for binary."""
    r = subprocess.run(["ldd", binary], capture_output=True, text=True)
    if r.returncode != 0:
        if "not a dynamic executable" in r.stdout + r.stderr:
            return []
        raise Missing(f"ldd {binary} failed: {r.stderr.strip()}")
    libs = []
    for line in r.stdout.splitlines():
        m = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if m:
            libs.append(m.group(1))
        elif "=>" in line and "not found" in line:
            raise Missing(f"{binary} needs {line.strip()}")
    return libs


# ---------------------------------------------------------------------------------------------
# The init script
# ---------------------------------------------------------------------------------------------

INIT = r"""#!/bin/busybox sh
# thinpool's kernel VM: load the modules, name the disks by serial, run /job/job.sh, write the
# results tar to the results disk, power off. Progress goes to the console as 'tp-vm:' lines.
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin DM_DISABLE_UDEV=1 HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /tmp /run /root /out/files /job /dev/tp
say() { echo "tp-vm: $*" > /dev/console; }
off() { sync; poweroff -f; sleep 5; reboot -f; }
fail() { say "FAIL: $*"; off; }
say "init"
@INSMOD@
want=$(sed -n 's/.*tp\.disks=\([^ ]*\).*/\1/p' /proc/cmdline | tr , ' ')
i=0
while :; do
    for b in /sys/block/vd*; do
        [ -e "$b/serial" ] || continue
        s=$(cat "$b/serial")
        [ -n "$s" ] && [ ! -e "/dev/tp/$s" ] && ln -s "/dev/${b##*/}" "/dev/tp/$s"
    done
    ok=1
    for n in $want; do [ -e "/dev/tp/$n" ] || ok=0; done
    [ $ok = 1 ] && break
    i=$((i + 1))
    [ $i -gt 100 ] && fail "disks missing: want $want, have $(ls /dev/tp | tr '\n' ' ')"
    sleep 0.1
done
tar -xf /dev/tp/@JOB@ -C /job || fail "cannot unpack the job"
say "job start"
cd /job
RESULTS=/out/files sh ./job.sh </dev/null >/out/stdout 2>/out/stderr
rc=$?
cd /
echo $rc > /out/rc
say "job done: exit $rc"
dmesg > /out/dmesg
(cd /out && tar -cf /dev/tp/@RESULTS@ rc stdout stderr dmesg files) || fail "cannot write the results"
off
"""


# ---------------------------------------------------------------------------------------------
# The VM
# ---------------------------------------------------------------------------------------------

class KernelVM:
    """A prepared kernel, modules and initramfs, and a way to boot them for one job each."""

    def __init__(self, cache: Path | None = None, *, package: str | None = None,
                 modules: Iterable[str] = DEFAULT_MODULES, memory: str = "512M",
                 append: str = "") -> None:
        self.cache = Path(cache) if cache is not None else default_cache_dir()
        self.package = package          # e.g. linux-image-6.1.0-57-cloud-amd64; None: current
        self.modules = tuple(modules)
        self.memory = memory
        self.append = append            # more kernel command line
        self.kernel_dir: Path | None = None
        self.release: str | None = None
        self.vmlinux: Path | None = None
        self.initramfs: Path | None = None
        self.module_files: list[Path] = []

    # -- preparation ---------------------------------------------------------------------------
    def prepare(self) -> "KernelVM":
        """Make sure the cache holds the kernel and this initramfs (see the module's docstring);
        idempotent and quick once done. Raises Missing."""
        reason = skip_reason()
        if reason:
            raise Missing(reason)
        self.cache.mkdir(parents=True, exist_ok=True)
        with open(self.cache / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._remove_stale_temps()
                self.kernel_dir = self._kernel()
                self.release = (self.kernel_dir / "release").read_text().strip()
                self.vmlinux = self.kernel_dir / "vmlinux"
                self.module_files = module_load_order(self.kernel_dir / "modules", self.modules)
                self.initramfs = self._initramfs()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return self

    def _remove_stale_temps(self) -> None:
        for p in self.cache.glob(".tmp-*"):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()

    def _complete_kernels(self) -> list[Path]:
        return sorted((p for p in self.cache.iterdir()
                       if p.is_dir() and not p.name.startswith(".")
                       and (p / "release").exists() and (p / "vmlinux").exists()),
                      key=lambda p: p.stat().st_mtime)

    def _kernel(self) -> Path:
        have = self._complete_kernels()
        if self.package is not None:
            mine = [p for p in have if p.name.split("_")[0] == self.package]
            if mine:
                return mine[-1]
        elif have:
            return have[-1]
        return self._download()

    def _apt(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C")
        return subprocess.run(list(args), capture_output=True, text=True, cwd=cwd, env=env)

    def _apt_update(self) -> None:
        u = self._apt("apt-get", "update", "-qq")
        if u.returncode != 0:
            raise Missing(f"the kernel package: apt-get update failed: {u.stderr.strip()[-300:]}")

    def _current_package(self) -> str | None:
        r = self._apt("apt-cache", "depends", META_PACKAGE)
        m = re.search(r"Depends:\s*(linux-image-\S+)", r.stdout)
        return m.group(1) if m else None

    def _download(self) -> Path:
        """Download and unpack the kernel package (``self.package`` or the current cloud
        kernel), trying once more after ``apt-get update`` (lists missing or stale)."""
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.cache))
        try:
            error = ""
            for attempt in range(2):
                if attempt:
                    self._apt_update()
                package = self.package or self._current_package()
                if package is None:
                    error = f"apt-cache does not know {META_PACKAGE}"
                    continue
                r = self._apt("apt-get", "-o", "APT::Sandbox::User=root", "download", package,
                              cwd=tmp)
                debs = list(tmp.glob("*.deb"))
                if r.returncode == 0 and len(debs) == 1:
                    return self._unpack(debs[0], tmp)
                error = f"apt-get download {package}: {r.stderr.strip()[-300:]}"
                for deb in debs:
                    deb.unlink()
            raise Missing(f"the kernel package cannot be downloaded ({error})")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _unpack(self, deb: Path, tmp: Path) -> Path:
        root = tmp / "root"
        x = subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], capture_output=True,
                           text=True)
        if x.returncode != 0:
            raise Missing(f"the kernel: dpkg-deb -x {deb.name} failed: {x.stderr.strip()}")
        vmlinuz = sorted((root / "boot").glob("vmlinuz-*"))
        trees = sorted((root / "lib" / "modules").glob("*"))
        if not vmlinuz or not trees:
            raise Missing(f"the kernel: {deb.name} has no boot/vmlinuz-* or lib/modules/*")
        out = tmp / "kernel"
        out.mkdir()
        vmlinux, kind = extract_vmlinux(vmlinuz[0].read_bytes())
        (out / "vmlinux").write_bytes(vmlinux)
        for config in (root / "boot").glob("config-*"):
            shutil.copyfile(config, out / "config")
        os.rename(trees[0], out / "modules")
        (out / "compression").write_text(kind + "\n")
        (out / "release").write_text(trees[0].name + "\n")
        final = self.cache / deb.name.removesuffix(".deb").removesuffix("_amd64")
        if final.exists():
            shutil.rmtree(final)
        os.rename(out, final)
        return final

    def _init_script(self) -> str:
        lines = []
        for path in self.module_files:
            name = path.name
            lines.append(f'insmod /lib/modules/{name} || fail "insmod {name}"')
        return (INIT.replace("@INSMOD@", "\n".join(lines))
                .replace("@JOB@", JOB_SERIAL).replace("@RESULTS@", RESULTS_SERIAL))

    def _initramfs_files(self) -> list[tuple[str, str]]:
        """(path inside, path on the host) of the binaries and libraries."""
        files = [("/bin/busybox", os.path.realpath(BUSYBOX))]
        binaries = [("/sbin/dmsetup", _which("dmsetup"))]
        for tool in OPTIONAL_TOOLS:
            found = _which(tool)
            if found:
                binaries.append((f"/sbin/{tool}", found))
        for inside, host in binaries:
            files.append((inside, host))
            for lib in _ldd(host):
                files.append((lib, lib))
        for path in self.module_files:
            files.append((f"/lib/modules/{path.name}", str(path)))
        seen, unique = set(), []
        for inside, host in files:
            if inside not in seen:
                seen.add(inside)
                unique.append((inside, host))
        return unique

    def _initramfs(self) -> Path:
        files = self._initramfs_files()
        init = self._init_script()
        h = hashlib.sha256(init.encode())
        for inside, host in files:
            st = os.stat(host)
            h.update(f"{inside}\0{host}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        path = self.cache / f"initramfs-{h.hexdigest()[:16]}.cpio.gz"
        if path.exists():
            os.utime(path)
            return path
        have_pdata = any(inside == "/sbin/pdata_tools" for inside, _ in files)
        entries: list[tuple[str, int, bytes | int]] = []
        dirs = {"/dev", "/proc", "/sys", "/tmp", "/run", "/root", "/etc", "/bin", "/sbin",
                "/usr", "/usr/bin", "/usr/sbin", "/lib/modules"}
        for inside, _ in files:
            parent = os.path.dirname(inside)
            while parent not in ("/", ""):
                dirs.add(parent)
                parent = os.path.dirname(parent)
        for d in sorted(dirs):
            entries.append((d, stat.S_IFDIR | 0o755, b""))
        entries.append(("/dev/console", stat.S_IFCHR | 0o600, os.makedev(5, 1)))
        entries.append(("/dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3)))
        for inside, host in files:
            entries.append((inside, stat.S_IFREG | 0o755, Path(host).read_bytes()))
        if have_pdata:
            for link in PDATA_LINKS:
                entries.append((f"/sbin/{link}", stat.S_IFLNK | 0o777, b"pdata_tools"))
        entries.append(("/init", stat.S_IFREG | 0o755, init.encode()))
        tmp = self.cache / f".tmp-{path.name}"
        try:
            with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0,
                                                       compresslevel=6) as gz:
                write_newc(gz, entries)
            os.rename(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self._prune_initramfs(keep=path)
        return path

    def _prune_initramfs(self, keep: Path, days: float = 7) -> None:
        """Remove initramfs files not used for ``days`` (another version of this file may still
        use a newer one)."""
        now = time.time()
        for p in self.cache.glob("initramfs-*.cpio.gz"):
            if p != keep and now - p.stat().st_mtime > days * 86400:
                with contextlib.suppress(OSError):
                    p.unlink()

    # -- running -------------------------------------------------------------------------------
    def qemu_command(self, disks: Mapping[str, Path], job_disk: Path,
                     results_disk: Path) -> list[str]:
        if self.vmlinux is None or self.initramfs is None:
            raise RuntimeError("KernelVM.prepare() first")
        serials = [JOB_SERIAL, RESULTS_SERIAL, *disks]
        cmd = [_which(QEMU) or QEMU, "-accel", "tcg", "-cpu", "max", "-m", self.memory,
               "-smp", "1", "-nographic", "-nic", "none", "-no-reboot", "-bios", QBOOT,
               "-kernel", str(self.vmlinux), "-initrd", str(self.initramfs),
               "-append", f"console=ttyS0 quiet panic=-1 tp.disks={','.join(serials)} "
                          f"{self.append}".strip()]
        drives = [(JOB_SERIAL, job_disk, True), (RESULTS_SERIAL, results_disk, False)]
        drives += [(name, Path(p), False) for name, p in disks.items()]
        for i, (serial, path, ro) in enumerate(drives):
            spec = f"file={path},format=raw,if=none,id=d{i},cache=writeback"
            if ro:
                spec += ",readonly=on"
            cmd += ["-drive", spec, "-device", f"virtio-blk-pci,drive=d{i},serial={serial}"]
        return cmd

    def run(self, job_script: str, disks: Mapping[str, Path] | None = None,
            timeout: float = 60.0, *, files: Mapping[str, bytes | Path] | None = None,
            results_size: int = RESULTS_SIZE) -> Result:
        """Boot a fresh VM, run ``job_script`` (a shell script) in it, return its Result (see the
        module's docstring). Raises VMTimeout, VMError, ValueError (a bad disk name or size)."""
        if self.vmlinux is None:
            self.prepare()
        disks = dict(disks or {})
        for name, path in disks.items():
            if not _NAME.fullmatch(name) or name.startswith("tp-"):
                raise ValueError(f"disk name {name!r}: 1-20 of [A-Za-z0-9_.-], not tp-*")
            size = os.stat(path).st_size
            if size == 0 or size % 512:
                raise ValueError(f"disk {name}: {path} is {size} bytes, not a multiple of 512")
        work = Path(tempfile.mkdtemp(prefix="tpvm-"))
        proc = None
        console_path = work / "console"
        started = time.monotonic()
        try:
            job_disk = work / "job.tar"
            _write_job(job_disk, job_script, files or {})
            results_disk = work / "results.img"
            with open(results_disk, "wb") as f:
                f.truncate(results_size)
            cmd = self.qemu_command(disks, job_disk, results_disk)
            log.debug("kernel VM: %s", " ".join(cmd))
            with open(console_path, "wb") as console:
                started = time.monotonic()
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=console,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill(proc)
                seconds = time.monotonic() - started
                raise VMTimeout(f"the kernel VM still ran after {timeout:g} s and was killed "
                                f"(pid {proc.pid})", _read_text(console_path), seconds, proc.pid) from None
            seconds = time.monotonic() - started
            console_text = _read_text(console_path)
            log.info("kernel VM: exit %s after %.1f s", proc.returncode, seconds)
            if proc.returncode != 0:
                raise VMError(f"qemu exited with {proc.returncode}", console_text, seconds,
                              proc.pid)
            try:
                return _read_results(results_disk, console_text, seconds)
            except VMError as e:
                e.pid = proc.pid
                raise
        finally:
            if proc is not None:
                _kill(proc)
            shutil.rmtree(work, ignore_errors=True)


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the process by pid unless it has exited; reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", "replace").replace("\r\n", "\n")
    except FileNotFoundError:
        return ""


def _write_job(path: Path, script: str, files: Mapping[str, bytes | Path]) -> None:
    def add(tar: tarfile.TarFile, name: str, data: bytes, mode: int) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = mode
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        add(tar, "job.sh", script.encode(), 0o755)
        for name, content in files.items():
            if name == "job.sh" or name.startswith("/") or ".." in Path(name).parts:
                raise ValueError(f"job file name {name!r}")
            data = Path(content).read_bytes() if isinstance(content, (str, Path)) else content
            add(tar, name, bytes(data), 0o644)
    size = os.stat(path).st_size
    with open(path, "r+b") as f:     # a whole number of sectors and of tar records
        f.truncate(size + (-size % 10240))


def _read_results(path: Path, console: str, seconds: float) -> Result:
    with open(path, "rb") as f:
        if f.read(512).strip(b"\0") == b"":
            raise VMError("the kernel VM ended without writing results", console, seconds)
        f.seek(0)
        got: dict[str, bytes] = {}
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for member in tar:
                    if member.isfile():
                        data = tar.extractfile(member)
                        got[member.name.removeprefix("./")] = data.read() if data else b""
        except tarfile.TarError as e:
            raise VMError(f"the results disk holds no readable tar: {e}", console,
                          seconds) from None
    if "rc" not in got:
        raise VMError("the results have no exit code", console, seconds)

    def text(name: str) -> str:
        return got.get(name, b"").decode("utf-8", "replace")

    return Result(
        returncode=int(text("rc").strip()),
        stdout=text("stdout"),
        stderr=text("stderr"),
        dmesg=text("dmesg").splitlines(),
        seconds=seconds,
        console=console,
        files={k.removeprefix("files/"): v for k, v in got.items() if k.startswith("files/")},
    )
