"""Images without containerd: layer tars unpacked into a chain of committed thin snapshots.

:func:`import_image` does what containerd does when it unpacks an image into a snapshotter:
for each layer (an OCI / Docker layer tar: plain, gzip or zstd), from the base up,

* its diff id (sha256 of the uncompressed tar) and chain id (the first layer's diff id; then
  ``sha256(parent_chain + " " + diff_id)``, as the OCI image spec defines it) are computed;
* if a committed snapshot ``sha256:<chain id>`` exists already, the layer is there (shared with
  every image that has the same layers below it) and is skipped;
* else an active snapshot of the layer below is prepared, mounted on a temporary directory, the
  tar applied to it (:func:`thinpool.runtime.layers.apply_layer`: whiteouts and opaque
  directories of the layer remove what the layers below had), unmounted and committed as
  ``sha256:<chain id>``.

Then the image's record names its top layer (:meth:`Snapshotter.set_image
<thinpool.runtime.snapshotter.Snapshotter.set_image>`). A failure midway removes the snapshot
being filled (and unmounts it); the layers committed before stay (they are complete and
reusable), the image record is not written, and the error goes up.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

from thinpool.errors import InvalidArgument, NotFound, ThinpoolError

from .filesystem import mount, unmount
from .snapshotter import Snapshotter

_CHUNK = 1 << 20


@dataclass
class LayerResult:
    diff_id: str
    chain_id: str
    key: str            # the committed snapshot: "sha256:<chain id>"
    reused: bool


def diff_id(path: Path) -> str:
    """``sha256:<hex>`` of the layer's uncompressed tar (decompressed as
    :func:`~thinpool.runtime.layer_stream.decoded_layer` does for unpacking)."""
    from .layer_stream import decoded_layer
    h = hashlib.sha256()
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise NotFound(f"layer {path} does not exist") from None
    except OSError as e:
        raise InvalidArgument(f"cannot read layer {path}: {e.strerror}") from None
    with f:
        decoded = decoded_layer(f)
        while True:
            chunk = decoded.read(_CHUNK)
            if not chunk:
                break
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def chain_id(parent_chain: str | None, diff: str) -> str:
    if parent_chain is None:
        return diff
    return "sha256:" + hashlib.sha256(f"{parent_chain} {diff}".encode()).hexdigest()


def import_image(snap: Snapshotter, name: str, layers: list[Path],
                 work_dir: Path | None = None) -> list[LayerResult]:
    from .layers import apply_layer

    if not layers:
        raise InvalidArgument("an image needs at least one layer")
    if name in snap.records.images:
        raise ThinpoolError(f"image {name!r} exists already; remove it first "
                            f"('thinpool image delete POOL {name}')")
    for p in layers:
        if not Path(p).is_file():
            raise NotFound(f"layer {p} does not exist or is not a file")
    results: list[LayerResult] = []
    parent, chain = "", None
    for i, path in enumerate(layers):
        d = diff_id(Path(path))
        chain = chain_id(chain, d)
        key = chain
        if key in snap.records.snapshots:
            results.append(LayerResult(d, chain, key, reused=True))
            parent = key
            continue
        tmp = f"import/{name}/{i}/{secrets.token_hex(4)}"
        mounts = snap.prepare(tmp, parent)
        where = Path(tempfile.mkdtemp(prefix="thinpool-layer-", dir=work_dir))
        mounted = False
        try:
            mount(mounts[0], where)
            mounted = True
            apply_layer(where, Path(path))
            os.sync()
            unmount(where)
            mounted = False
            snap.commit(key, tmp)
        except BaseException:
            try:
                if mounted:
                    unmount(where)
                snap.remove(tmp)
            except ThinpoolError:
                pass              # left for the snapshotter's reconcile / cleanup
            raise
        finally:
            try:
                where.rmdir()
            except OSError:
                pass
        results.append(LayerResult(d, chain, key, reused=False))
        parent = key
    snap.set_image(name, parent, [r.key for r in results])
    return results
