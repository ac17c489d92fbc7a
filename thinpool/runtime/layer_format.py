"""What an OCI / Docker image layer tar is made of, declared once for the reader and the writer.

The layer's own format is tar (POSIX pax, as ``tarfile`` reads and writes it), optionally
compressed; on top of tar the OCI image spec adds only names: a whiteout ``DIR/.wh.NAME`` and the
opaque marker ``DIR/.wh..wh..opq``. This module holds those names, the magic bytes that tell a
compressed layer from a plain one, the pax keys thinpool reads and writes (``SCHILY.xattr.*``,
``mtime``), the normalization of entry names, and :class:`LayerStats`. No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal, InvalidOperation

from thinpool.errors import InvalidLayer

# ---- names and bytes of the format ----------------------------------------------------------

WHITEOUT_PREFIX = ".wh."                 # DIR/.wh.NAME removes DIR/NAME of the lower layers
WHITEOUT_META_PREFIX = ".wh..wh."        # reserved for markers (aufs left .wh..wh.plnk and such)
OPAQUE_MARKER = ".wh..wh..opq"           # DIR/.wh..wh..opq: DIR keeps nothing of the lower layers

PAX_XATTR_PREFIX = "SCHILY.xattr."       # pax key of an extended attribute (GNU tar, Go, Docker)
PAX_MTIME = "mtime"                      # pax key of the modification time, "SECONDS[.FRACTION]"
PAX_ATIME = "atime"

TAR_BLOCK = 512                          # a tar header is one block
USTAR_MAGIC_OFFSET = 257                 # a ustar/pax/GNU header has "ustar" here
USTAR_MAGIC = b"ustar"

# Compressed layers, told apart by their first bytes. OCI layers are plain, gzip or zstd;
# Docker's legacy layers may also be bzip2 or xz.
COMPRESSION_MAGIC: tuple[tuple[str, bytes], ...] = (
    ("gzip", b"\x1f\x8b"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
    ("bzip2", b"BZh"),
    ("xz", b"\xfd7zXZ\x00"),
)

IMPLICIT_DIR_MODE = 0o755   # a missing parent directory is created with this mode, owned by us
PERMISSION_BITS = 0o7777    # the mode bits an entry sets: rwx for all, setuid, setgid, sticky
NS = 1_000_000_000


@dataclass
class LayerStats:
    """What one :func:`apply_layer` or :func:`diff_layer` did.

    ``entries``: entries created or updated (files, directories, links, devices, FIFOs, the root
    directory), whiteouts not included; ``bytes_written``: content bytes of regular files (their
    size, holes included); ``whiteouts``: ``.wh.NAME`` entries; ``opaque_dirs``: opaque markers;
    ``xattrs_skipped``: extended attributes the filesystem refused as unsupported (``apply``)."""

    entries: int = 0
    bytes_written: int = 0
    whiteouts: int = 0
    opaque_dirs: int = 0
    xattrs_skipped: int = 0


def normalize_name(name: str, entry: str | None = None) -> str:
    """The path of a tar entry name relative to the root, ``"a/b"``, or ``""`` for the root.

    Leading ``./`` (any number of them), empty components and ``.`` components and a trailing
    ``/`` are dropped. Refused with :class:`InvalidLayer`: an absolute name, a ``..`` component
    anywhere (even one that would stay inside), an empty name. ``entry`` is the name to report
    (the entry's own name when ``name`` is a hard link's target)."""
    entry = name if entry is None else entry
    if name == "":
        raise InvalidLayer(entry, "empty name")
    if name.startswith("/"):
        raise InvalidLayer(entry, f"absolute path {name!r}: a layer's names are relative to its root")
    parts = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise InvalidLayer(entry, f"'..' in {name!r}: a layer may not name a parent directory")
        parts.append(part)
    return "/".join(parts)


def whiteout_victim(base: str, entry: str) -> str | None:
    """For an entry's last name component: None when it is no whiteout, ``""`` for the opaque
    marker, else the name the whiteout removes. ``.wh.``, ``.wh..`` and ``.wh...`` (naming the
    directory itself or its parent) are refused."""
    if not base.startswith(WHITEOUT_PREFIX):
        return None
    if base == OPAQUE_MARKER:
        return ""
    victim = base[len(WHITEOUT_PREFIX):]
    if victim in ("", ".", ".."):
        raise InvalidLayer(entry, f"whiteout {base!r} names no sibling")
    return victim


def pax_time_ns(value: str | None) -> int | None:
    """A pax time ("1700000000.123456789", "-1.5") in nanoseconds, exactly; None if absent or
    unreadable (the header's whole seconds are used then)."""
    if value is None:
        return None
    try:
        return int((Decimal(value) * NS).to_integral_value(rounding=ROUND_FLOOR))
    except (InvalidOperation, ValueError):
        return None


def ns_to_pax_time(ns: int) -> str:
    """Nanoseconds as the exact pax time string (inverse of :func:`pax_time_ns`)."""
    sign = "-" if ns < 0 else ""
    whole, frac = divmod(abs(ns), NS)
    return f"{sign}{whole}.{frac:09d}" if frac else f"{sign}{whole}"
