"""The one error hierarchy of thinpool.

Every error the library raises on purpose is a :class:`ThinpoolError`. Each class carries the CLI
exit code it maps to (``exit_code``), so the command line turns any of them into one readable line
and that code without knowing the class. Errors keep their evidence as attributes (the block, the
expected and found values) so tools and tests can inspect them, not only read the message.

Exit codes (see DESIGN.md): 0 success, 1 failure, 2 bad usage or argument, 3 metadata corrupt,
4 out of space, 5 busy. The command line adds 130 (SIGINT), 141 (stdout's reader went away) and
143 (SIGTERM): see ``thinpool.cli.EXIT_CODES``.
"""

from __future__ import annotations


class ThinpoolError(Exception):
    """Base class of every error thinpool raises on purpose."""

    exit_code = 1


class InvalidArgument(ThinpoolError, ValueError):
    """A caller passed a value the library cannot accept (bad size, name, offset, block size)."""

    exit_code = 2


class InvalidLayer(InvalidArgument):
    """An image layer tar that is malformed or unsafe to apply (thinpool.runtime.layers): a bad
    header or compressed stream, an entry that would write outside the root (an absolute path,
    ``..``, a symbolic link as a parent), a hard link to a missing path. ``entry`` is the tar
    entry's name as written in the tar (None when the tar broke between entries) and ``reason``
    what is wrong with it; the message says both."""

    def __init__(self, entry: str | None, reason: str):
        where = f"layer entry {entry!r}" if entry is not None else "layer"
        super().__init__(f"{where}: {reason}")
        self.entry = entry
        self.reason = reason


class NotFound(ThinpoolError, LookupError):
    """A pool, volume or device id that does not exist."""

    exit_code = 1


class AlreadyExists(ThinpoolError):
    """A pool, volume or device id that exists already."""

    exit_code = 1


class OutOfRange(InvalidArgument):
    """An I/O request that reaches past the end of a volume."""


class VolumeReadOnly(InvalidArgument):
    """A change to the content of a volume marked read-only (``Pool.set_read_only``, as LVM's
    ``lvchange -p r``): a write, discard, resize, or a revert or merge onto it. Nothing was
    changed. ``volume`` is its name, ``pool`` the pool's; the message names the command that
    makes it writable."""

    def __init__(self, pool: str, volume: str, what: str):
        super().__init__(f"volume {pool}/{volume} is read-only: {what} refused, nothing was "
                         f"changed; make it writable with "
                         f"'thinpool configure {pool}/{volume} --read-write'")
        self.pool = pool
        self.volume = volume
        self.what = what


class ReadOnlyError(ThinpoolError):
    """A write was attempted on a pool opened read-only or in a degraded mode."""

    exit_code = 1


class BusyError(ThinpoolError):
    """The pool is locked by another process, or a device is in use."""

    exit_code = 5

    def __init__(self, message: str, holder_pid: int | None = None):
        super().__init__(message)
        self.holder_pid = holder_pid


class NoSpace(ThinpoolError):
    """Base for running out of space."""

    exit_code = 4


class NoDataSpace(NoSpace):
    """No free data block is left in the pool for a write that needs one."""


class NoMetadataSpace(NoSpace):
    """No free metadata block is left for the current transaction."""


class DeviceIOError(ThinpoolError):
    """The operating system failed an I/O on one of a pool's devices (EIO and the like).

    Keeps the evidence: ``device`` (its path), ``operation`` (``read``, ``write``, ``sync``,
    ``punch``, ...), ``block`` (the 4 KiB metadata block or the data block, None for a sync) and
    ``errno``. The OSError itself is chained as ``__cause__``."""

    exit_code = 1

    def __init__(self, message: str, *, device: str, operation: str, block: int | None = None,
                 errno: int | None = None):
        super().__init__(message)
        self.device = device
        self.operation = operation
        self.block = block
        self.errno = errno


class MetadataIOError(DeviceIOError):
    """An I/O error on the metadata device: the pool cannot trust its metadata operations any
    more and degrades (read-only with NEEDS_CHECK, as the kernel's ``metadata_operation_failed``)."""


class MetadataError(ThinpoolError):
    """The metadata is damaged or not dm-thin metadata at all."""

    exit_code = 3


class PoolDamaged(ThinpoolError):
    """One of a pool's own files other than its metadata is damaged or missing: its data device
    is shorter than the metadata says, or no copy of its configuration is readable. The message
    names the file and what to do; ``path`` is the file."""

    exit_code = 3

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


class CorruptBlock(MetadataError):
    """A metadata block failed validation: which block, which kind, which check."""

    def __init__(self, block: int, kind: str, check: str, detail: str = ""):
        msg = f"metadata block {block} ({kind}): {check}"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)
        self.block = block
        self.kind = kind
        self.check = check
        self.detail = detail


class ChecksumMismatch(CorruptBlock):
    """A block's stored checksum differs from the one computed over its bytes."""

    def __init__(self, block: int, kind: str, expected: int, got: int):
        super().__init__(block, kind, "bad checksum", f"stored {expected:#010x}, computed {got:#010x}")
        self.expected = expected
        self.got = got


class IncompatibleMetadata(MetadataError):
    """Valid-looking metadata that this implementation must not open (feature flags, version)."""


class MissingDependency(ThinpoolError, ImportError):
    """An optional part of thinpool needs a package or program that is not installed: the
    message names it and how to install it (``pip install 'thinpool[fuse]'``, a Debian
    package). ``what`` is the missing package or program."""

    exit_code = 1

    def __init__(self, message: str, what: str):
        super().__init__(message)
        self.what = what


class ExportError(ThinpoolError):
    """Setting up or tearing down an export failed: a FUSE mount, a loop device, a host program
    the exports run (``losetup``, ``umount``). The message says which step failed and what was
    left behind (normally nothing: the steps done are undone first). When a host program failed
    its ``argv``, ``returncode`` (None when it timed out) and ``stderr`` are kept."""

    exit_code = 1

    def __init__(self, message: str, *, argv: list[str] | None = None,
                 returncode: int | None = None, stderr: str = ""):
        super().__init__(message)
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr
