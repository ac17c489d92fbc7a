"""Opening an image layer as a tar stream: the compression told by magic bytes, the errors told
apart.

:func:`open_layer_tar` reads the first block of the caller's stream, puts it back in front of the
rest, and returns a :class:`tarfile.TarFile` in stream mode (``r|``: read once, in order, never
seeking back) over the stream decompressed as its magic bytes say: gzip, zstd (only when the
``zstandard`` module is importable, else :class:`~thinpool.errors.MissingDependency`), bzip2, xz,
or none. Nothing is read ahead beyond what tarfile and the decompressor buffer.

Errors are told apart so that the caller can name them: a damaged or truncated compressed stream
is an :class:`~thinpool.errors.InvalidLayer` (entry None), while an OSError of the caller's own
stream (EIO on the source file) passes through the decompressor as the OSError it was. tarfile
quietly ends a stream at a bad or truncated header; :class:`StrictTarInfo` records that on the
TarFile (``layer_error``) for the caller to refuse the layer.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import tarfile
from typing import BinaryIO

from thinpool.errors import InvalidLayer, MissingDependency
from thinpool.runtime.layer_format import (
    COMPRESSION_MAGIC,
    TAR_BLOCK,
    USTAR_MAGIC,
    USTAR_MAGIC_OFFSET,
)


def open_layer_tar(stream: BinaryIO) -> tuple[tarfile.TarFile, Decoded]:
    """The layer in ``stream`` as a TarFile in stream mode, and the decoded stream under it
    (read it to its end after the tar to have a compressed stream's checksum checked)."""
    decoded = decoded_layer(stream)
    try:
        tf = tarfile.open(fileobj=decoded, mode="r|", tarinfo=StrictTarInfo)
    except tarfile.TarError as e:
        inside = "" if decoded.what == "tar" else f" in the {decoded.what} stream"
        raise InvalidLayer(None, f"no tar{inside}: {e}") from None
    return tf, decoded


class _SourceError(Exception):
    """An OSError of the layer's own source, carried through a decompressor untouched."""

    def __init__(self, error: OSError):
        super().__init__(str(error))
        self.error = error


class _Source:
    """The caller's stream with its first bytes (read to find the format) put back in front."""

    def __init__(self, head: bytes, rest: BinaryIO):
        self._head = head
        self._rest = rest

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        try:
            if not self._head:
                return self._rest.read(n)
            head, self._head = self._head, b""
            if n is None or n < 0:
                return head + self._rest.read()
            if n < len(head):
                head, self._head = head[:n], head[n:]
                return head
            return head + self._rest.read(n - len(head))
        except OSError as e:
            raise _SourceError(e) from e


class Decoded:
    """The decompressed layer: a damaged or truncated compressed stream is an InvalidLayer, an
    error reading the source stays the OSError it was."""

    def __init__(self, inner, what: str):
        self._inner = inner
        self.what = what

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        try:
            return self._inner.read(n)
        except _SourceError as e:
            raise e.error from None
        except (InvalidLayer, MemoryError):
            raise
        except Exception as e:  # only the decompressor's own errors get here
            raise InvalidLayer(None, f"damaged {self.what} stream: {e}") from e


def _read_upto(stream: BinaryIO, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        data = stream.read(n - got)
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def _zstd_reader(src: _Source):
    try:
        import zstandard
    except ImportError:
        raise MissingDependency("a zstd-compressed layer needs the zstandard module: "
                                "pip install zstandard", what="zstandard") from None
    return zstandard.ZstdDecompressor().stream_reader(src, read_across_frames=True,
                                                      closefd=False)


def decoded_layer(stream: BinaryIO) -> Decoded:
    """The layer as a tar stream, decompressed as its first bytes say (also for a caller that
    only wants the uncompressed bytes: an image's diff id is their sha256)."""
    head = _read_upto(stream, TAR_BLOCK)
    if not head:
        raise InvalidLayer(None, "the layer is empty (0 bytes): not a tar")
    src = _Source(head, stream)
    if head[USTAR_MAGIC_OFFSET:USTAR_MAGIC_OFFSET + len(USTAR_MAGIC)] == USTAR_MAGIC:
        return Decoded(src, "tar")
    kind = next((name for name, magic in COMPRESSION_MAGIC if head.startswith(magic)), None)
    if kind == "gzip":
        return Decoded(gzip.GzipFile(fileobj=src, mode="rb"), kind)
    if kind == "bzip2":
        return Decoded(bz2.BZ2File(src), kind)
    if kind == "xz":
        return Decoded(lzma.LZMAFile(src), kind)
    if kind == "zstd":
        return Decoded(_zstd_reader(src), kind)
    return Decoded(src, "tar")


class StrictTarInfo(tarfile.TarInfo):
    """tarfile ends a stream quietly at a bad or truncated header after the first; this remembers
    the error on the TarFile so that apply_layer can refuse the layer."""

    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except tarfile.EOFHeaderError:      # the end-of-archive block: the proper end
            raise
        except tarfile.EmptyHeaderError:
            tf.layer_error = "truncated: the data ends without the end-of-archive block"
            raise
        except tarfile.HeaderError as e:
            tf.layer_error = f"bad tar header: {e}"
            raise
