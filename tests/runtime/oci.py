"""OCI image archives for the container-runtime tests, written with the standard library only.

``build_image(path, ref, layers)`` writes one tar file at ``path`` in the OCI image layout
(``oci-layout``, ``index.json``, ``blobs/sha256/<hex>``) that ``ctr images import`` accepts: each
layer is a gzip-compressed tar, the image config lists the uncompressed tars' sha256 as
``rootfs.diff_ids``, and the index's single manifest descriptor carries the annotations
``io.containerd.image.name`` (the full ``ref``, the name ``ctr`` shows and runs) and
``org.opencontainers.image.ref.name`` (its tag). The result is deterministic: the same layers give
the same digests (every mtime is fixed, owners are root).

A layer is a list of entries: ``File``, ``Dir``, ``Symlink``, ``Hardlink``, ``Whiteout`` (a
``.wh.NAME`` entry: NAME is deleted from the layers below) and ``Opaque`` (a ``DIR/.wh..wh..opq``
marker: DIR hides what the layers below had in it). Paths are absolute or relative to the image's
root, without ``..``. A parent directory not listed is added as a 0755 directory before its first
child, as image builders do.

``busybox_layer()`` is a runnable first layer made of the host's static busybox (Debian's
``busybox-static``); it raises ``MissingTool`` when there is none. ``two_layer_image(path, ref)``
adds a second layer over it with a new file, a whiteout and an opaque directory (see its
docstring for what a container must see).

A failure midway (an unreadable busybox, a full disk) raises and may leave a partial file at
``path``: the archive is written in one pass straight to it; nothing else is written anywhere.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

__all__ = [
    "File", "Dir", "Symlink", "Hardlink", "Whiteout", "Opaque", "Entry", "Image", "MissingTool",
    "build_image", "layer_tar", "busybox_layer", "two_layer_image", "is_static_elf", "oci_arch",
    "chain_ids", "BUSYBOX", "APPLETS",
]

MTIME = 1_700_000_000            # every entry's mtime: a fixed instant keeps the digests stable
BUSYBOX = "/bin/busybox"         # where Debian's busybox-static installs its binary
APPLETS = ("sh", "ls", "cat", "echo", "test", "mkdir", "touch", "rm", "dd", "sync", "sleep",
           "stat", "wc", "head", "true")

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


class MissingTool(RuntimeError):
    """What an image needs from the host is not there (the message names the Debian package)."""


@dataclass(frozen=True)
class File:
    path: str
    content: bytes = b""
    mode: int = 0o644


@dataclass(frozen=True)
class Dir:
    path: str
    mode: int = 0o755


@dataclass(frozen=True)
class Symlink:
    path: str
    target: str                  # stored as given: relative to the link's directory, or absolute


@dataclass(frozen=True)
class Hardlink:
    path: str
    target: str                  # a path in the same layer (absolute or relative to the root)


@dataclass(frozen=True)
class Whiteout:
    path: str                    # the path to delete; the tar gets DIR/.wh.NAME


@dataclass(frozen=True)
class Opaque:
    path: str                    # the directory to make opaque; the tar gets PATH/.wh..wh..opq


Entry = File | Dir | Symlink | Hardlink | Whiteout | Opaque


@dataclass(frozen=True)
class Image:
    """What ``build_image`` wrote: digests are ``sha256:<hex>`` strings; ``chain_ids[i]`` is the
    chain ID of layers 0..i (the name containerd gives the committed snapshot of that layer)."""
    path: Path
    ref: str
    manifest_digest: str
    config_digest: str
    layer_digests: tuple[str, ...]
    diff_ids: tuple[str, ...]
    chain_ids: tuple[str, ...]


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _rel(path: str) -> str:
    p = PurePosixPath("/" + path.lstrip("/"))
    parts = p.parts[1:]
    if not parts or any(part in ("..", ".") for part in parts):
        raise ValueError(f"bad layer path {path!r}")
    return "/".join(parts)


def _info(name: str, type_: bytes, mode: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.mode = mode
    ti.mtime = MTIME
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    return ti


def layer_tar(entries: list[Entry]) -> bytes:
    """The uncompressed tar of one layer, in the order given (missing parent directories first)."""
    buf = io.BytesIO()
    seen: set[str] = set()
    listed = {_rel(e.path) for e in entries if isinstance(e, Dir)}
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def parents(rel: str) -> None:
            parts = rel.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in seen and d not in listed:
                    seen.add(d)
                    tar.addfile(_info(d, tarfile.DIRTYPE, 0o755))

        for e in entries:
            rel = _rel(e.path)
            if isinstance(e, Whiteout):
                head, _, base = rel.rpartition("/")
                rel = f"{head}/.wh.{base}" if head else f".wh.{base}"
                ti = _info(rel, tarfile.REGTYPE, 0o644)
            elif isinstance(e, Opaque):
                rel = f"{rel}/.wh..wh..opq"
                ti = _info(rel, tarfile.REGTYPE, 0o644)
            elif isinstance(e, Dir):
                ti = _info(rel, tarfile.DIRTYPE, e.mode)
            elif isinstance(e, File):
                ti = _info(rel, tarfile.REGTYPE, e.mode)
                ti.size = len(e.content)
            elif isinstance(e, Symlink):
                ti = _info(rel, tarfile.SYMTYPE, 0o777)
                ti.linkname = e.target
            elif isinstance(e, Hardlink):
                ti = _info(rel, tarfile.LNKTYPE, 0o644)
                ti.linkname = _rel(e.target)
            else:
                raise TypeError(f"not a layer entry: {e!r}")
            parents(rel)
            seen.add(rel)
            tar.addfile(ti, io.BytesIO(e.content) if isinstance(e, File) else None)
    return buf.getvalue()


def oci_arch(machine: str | None = None) -> str:
    """The OCI architecture name of this machine (``platform.machine()``'s, or ``machine``'s)."""
    m = machine or platform.machine()
    return {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
            "armv7l": "arm", "armv6l": "arm", "i686": "386", "i386": "386", "ppc64le": "ppc64le",
            "s390x": "s390x", "riscv64": "riscv64"}.get(m, m)


def chain_ids(diff_ids: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The OCI chain IDs: ChainID(L0) = DiffID(L0); ChainID(Ln) = sha256(ChainID(Ln-1) + " " +
    DiffID(Ln))."""
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else _digest(f"{out[-1]} {d}".encode()))
    return tuple(out)


def build_image(path: str | os.PathLike, ref: str, layers: list[list[Entry]], *,
                cmd: tuple[str, ...] | list[str] = ("/bin/sh",),
                env: tuple[str, ...] | list[str] = ("PATH=/usr/local/sbin:/usr/local/bin:"
                                                    "/usr/sbin:/usr/bin:/sbin:/bin",),
                arch: str | None = None) -> Image:
    """Write the OCI image archive of ``layers`` (bottom first) named ``ref`` (e.g.
    ``localhost/thinpool/two:1``) at ``path``; ``cmd`` is the config's default ``Cmd``."""
    if not layers:
        raise ValueError("an image needs at least one layer")
    arch = arch or oci_arch()
    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> str:
        d = _digest(data)
        blobs[d] = data
        return d

    diff_ids, layer_descs = [], []
    for entries in layers:
        raw = layer_tar(entries)
        gz = gzip.compress(raw, compresslevel=6, mtime=0)
        diff_ids.append(_digest(raw))
        layer_descs.append({"mediaType": MT_LAYER, "digest": blob(gz), "size": len(gz)})
    config = {
        "created": "2023-11-14T22:13:20Z",
        "architecture": arch,
        "os": "linux",
        "config": {"Cmd": list(cmd), "Env": list(env), "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2023-11-14T22:13:20Z", "created_by": f"thinpool tests layer {i}"}
                    for i in range(len(layers))],
    }
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    config_desc = {"mediaType": MT_CONFIG, "digest": blob(config_bytes), "size": len(config_bytes)}
    manifest = {"schemaVersion": 2, "mediaType": MT_MANIFEST, "config": config_desc,
                "layers": layer_descs}
    manifest_bytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    manifest_digest = blob(manifest_bytes)
    name, _, tag = ref.rpartition(":")
    if not name or "/" in tag:
        tag = "latest"
    index = {
        "schemaVersion": 2, "mediaType": MT_INDEX,
        "manifests": [{
            "mediaType": MT_MANIFEST, "digest": manifest_digest, "size": len(manifest_bytes),
            "platform": {"architecture": arch, "os": "linux"},
            "annotations": {"io.containerd.image.name": ref,
                            "org.opencontainers.image.ref.name": tag},
        }],
    }
    files = [("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode()),
             ("index.json", json.dumps(index, sort_keys=True).encode())]
    files += [(f"blobs/sha256/{d.split(':', 1)[1]}", data) for d, data in sorted(blobs.items())]
    path = Path(path)
    with tarfile.open(path, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("blobs", "blobs/sha256"):
            tar.addfile(_info(d, tarfile.DIRTYPE, 0o755))
        for name_, data in files:
            ti = _info(name_, tarfile.REGTYPE, 0o644)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    return Image(path=path, ref=ref, manifest_digest=manifest_digest,
                 config_digest=config_desc["digest"],
                 layer_digests=tuple(d["digest"] for d in layer_descs),
                 diff_ids=tuple(diff_ids), chain_ids=chain_ids(diff_ids))


def is_static_elf(path: str | os.PathLike) -> bool:
    """True when ``path`` is an ELF executable without a program interpreter (statically linked)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if len(head) < 64 or head[:4] != b"\x7fELF":
                return False
            is64, little = head[4] == 2, head[5] == 1
            e = "<" if little else ">"
            if is64:
                phoff, = struct.unpack_from(e + "Q", head, 32)
                phentsize, phnum = struct.unpack_from(e + "HH", head, 54)
            else:
                phoff, = struct.unpack_from(e + "I", head, 28)
                phentsize, phnum = struct.unpack_from(e + "HH", head, 42)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    for i in range(phnum):
        p_type, = struct.unpack_from(e + "I", table, i * phentsize)
        if p_type == 3:          # PT_INTERP: needs a dynamic loader, which the image lacks
            return False
    return phnum > 0


def busybox_layer(busybox: str | os.PathLike = BUSYBOX) -> list[Entry]:
    """A runnable first layer: the static busybox at /bin/busybox, symlinks /bin/<applet> ->
    busybox for ``APPLETS``, directories /etc /data /tmp (1777) /proc /sys /dev /root (0700), and
    the files /etc/removeme and /data/lower.txt (which ``two_layer_image`` hides again)."""
    if not is_static_elf(busybox):
        raise MissingTool(f"{busybox} is missing or not statically linked "
                          "(Debian package busybox-static)")
    entries: list[Entry] = [Dir("/bin"), File("/bin/busybox", Path(busybox).read_bytes(), 0o755)]
    entries += [Symlink(f"/bin/{a}", "busybox") for a in APPLETS]
    entries += [Dir("/etc"), Dir("/data"), Dir("/tmp", 0o1777), Dir("/proc"), Dir("/sys"),
                Dir("/dev"), Dir("/root", 0o700),
                File("/etc/removeme", b"removed by layer 2\n"),
                File("/data/lower.txt", b"from layer 1\n")]
    return entries


def two_layer_image(path: str | os.PathLike, ref: str) -> Image:
    """busybox, then a layer that adds /etc/added.txt ("from layer 2\\n"), whites out
    /etc/removeme, makes /data opaque (so /data/lower.txt is gone) and adds /data/upper.txt
    ("upper\\n"). A container of it sees /etc/added.txt and /data/upper.txt only."""
    second: list[Entry] = [File("/etc/added.txt", b"from layer 2\n"), Whiteout("/etc/removeme"),
                           Dir("/data"), Opaque("/data"), File("/data/upper.txt", b"upper\n")]
    return build_image(path, ref, [busybox_layer(), second])
