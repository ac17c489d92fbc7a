"""Disk images (qcow2, vmdk, vdi) into and out of volumes, through qemu-img and NBD.

qemu-img reads and writes the image formats; the volume is reached through an
:class:`~thinpool.export.nbd.NBDServer` run in this process on a private Unix socket (a fresh
directory of its own, removed afterwards), serving only that volume:

* :func:`import_image`: ``qemu-img convert -n -f FMT -O raw IMAGE nbd+unix:///VOL?socket=...``.
  Zero ranges arrive as WRITE_ZEROES, which unmap, so the volume stays as sparse as the image
  (with ``target_is_zero`` they are not even sent: for a new, empty volume).
* :func:`export_image`: ``qemu-img convert -f raw nbd+unix:///... -O FMT FILE``. qemu reads the
  volume's ``base:allocation`` and leaves unprovisioned ranges out of the image.

:func:`image_info` asks ``qemu-img info --output=json`` for an image's format and virtual size.
Errors: :class:`~thinpool.errors.NotFound` without qemu-img (naming the Debian package),
:class:`~thinpool.errors.InvalidArgument` for an image qemu-img cannot read,
:class:`~thinpool.errors.NoDataSpace` when the pool filled up, ThinpoolError with qemu-img's own
message otherwise. A failed import leaves the volume partly written (what was written stays, as
with any interrupted write; the caller does not commit it); a failed export leaves the output
file partly written (the caller writes to a temporary file). Nothing here prints.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from thinpool.errors import InvalidArgument, NoDataSpace, NotFound, ThinpoolError

from .nbd import NBDServer
from .state import nbd_uri

if TYPE_CHECKING:
    from thinpool.pool import Pool

#: Formats qemu-img converts for us (raw is the CLI's own sparse-aware path).
FORMATS = ("qcow2", "vmdk", "vdi")


@dataclass(frozen=True)
class ImageInfo:
    format: str
    virtual_size: int


def qemu_img() -> str:
    path = shutil.which("qemu-img")
    if path is None:
        raise NotFound("qemu-img is not installed (Debian package qemu-utils); it is needed "
                       "for qcow2, vmdk and vdi images")
    return path


def image_info(path) -> ImageInfo:
    """Format and virtual size of the image at ``path`` (``qemu-img info``)."""
    r = subprocess.run([qemu_img(), "info", "--output=json", str(path)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise InvalidArgument(f"qemu-img cannot read {path}: {_last_line(r.stderr)}")
    try:
        doc = json.loads(r.stdout)
        return ImageInfo(str(doc["format"]), int(doc["virtual-size"]))
    except (ValueError, KeyError, TypeError):
        raise InvalidArgument(f"qemu-img info said nothing readable about {path}") from None


@contextmanager
def private_server(pool: "Pool", volume: str, read_only: bool) -> Iterator[str]:
    """An NBD server of ``volume`` alone on a socket in a new private directory; yields its
    URI. Stopped (and the directory removed) when the block ends."""
    d = tempfile.mkdtemp(prefix="thinpool-nbd-")
    try:
        server = NBDServer(pool, read_only=read_only, exports=[volume], commit_interval=None)
        sock = server.listen_unix(Path(d) / "s")
        with server:
            yield nbd_uri(volume, sock)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def import_image(pool: "Pool", volume: str, image, fmt: str, *,
                 target_is_zero: bool = False) -> None:
    """Convert ``image`` (format ``fmt``) into ``volume``, which must be at least its virtual
    size. ``target_is_zero``: the volume reads as zeros already (a new one)."""
    with private_server(pool, volume, read_only=False) as uri:
        argv = [qemu_img(), "convert", "-n", "-f", fmt, "-O", "raw",
                *(["--target-is-zero"] if target_is_zero else []), str(image), uri]
        _run(argv, f"importing {image}")
    pool.commit()


def export_image(pool: "Pool", volume: str, out, fmt: str) -> None:
    """Convert ``volume`` into a new image file ``out`` of format ``fmt``."""
    with private_server(pool, volume, read_only=True) as uri:
        _run([qemu_img(), "convert", "-f", "raw", "-O", fmt, uri, str(out)],
             f"exporting to {out}")


def _run(argv: list[str], doing: str) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if r.returncode == 0:
        return
    why = _last_line(r.stderr)
    if "No space left" in r.stderr:
        raise NoDataSpace(f"{doing}: the pool ran out of data space ({why})")
    raise ThinpoolError(f"{doing}: qemu-img failed: {why}")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"
