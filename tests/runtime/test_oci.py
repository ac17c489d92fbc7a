"""``oci.py`` without a daemon: what a layer tar holds for each kind of entry, and that an archive's
digests, diff_ids, chain IDs and index annotations are the ones its blobs give."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile

import pytest

from tests.runtime.oci import (BUSYBOX, Dir, File, Hardlink, Opaque, Symlink, Whiteout, build_image,
                               chain_ids, is_static_elf, layer_tar, oci_arch)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_layer_tar_entries():
    raw = layer_tar([File("/a/b/f.txt", b"hello", 0o600), Dir("/d", 0o700),
                     Symlink("/a/link", "b/f.txt"), Hardlink("/a/hard", "/a/b/f.txt"),
                     Whiteout("/etc/gone"), Opaque("/d")])
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        got = [(m.name, m.type, m.mode, m.linkname, m.size, m.uid, m.mtime)
               for m in tar.getmembers()]
        content = tar.extractfile("a/b/f.txt").read()
    t = 1_700_000_000
    assert got == [
        ("a", tarfile.DIRTYPE, 0o755, "", 0, 0, t),          # parents added, 0755
        ("a/b", tarfile.DIRTYPE, 0o755, "", 0, 0, t),
        ("a/b/f.txt", tarfile.REGTYPE, 0o600, "", 5, 0, t),
        ("d", tarfile.DIRTYPE, 0o700, "", 0, 0, t),
        ("a/link", tarfile.SYMTYPE, 0o777, "b/f.txt", 0, 0, t),
        ("a/hard", tarfile.LNKTYPE, 0o644, "a/b/f.txt", 0, 0, t),
        ("etc", tarfile.DIRTYPE, 0o755, "", 0, 0, t),
        ("etc/.wh.gone", tarfile.REGTYPE, 0o644, "", 0, 0, t),
        ("d/.wh..wh..opq", tarfile.REGTYPE, 0o644, "", 0, 0, t),
    ]
    assert content == b"hello"
    assert layer_tar([File("/x", b"1")]) == layer_tar([File("x", b"1")])     # deterministic


def test_layer_tar_rejects_dotdot():
    with pytest.raises(ValueError):
        layer_tar([File("/a/../b", b"")])


def test_build_image_digests(tmp_path):
    layers = [[File("/one", b"1")], [Whiteout("/one"), File("/two", b"2")]]
    img = build_image(tmp_path / "i.tar", "localhost/t/x:v1", layers, cmd=["/bin/true"])
    with tarfile.open(img.path) as tar:
        names = tar.getnames()
        blob = {n.split("/")[-1]: tar.extractfile(n).read() for n in names
                if n.startswith("blobs/sha256/") and tar.getmember(n).isfile()}
        layout = json.loads(tar.extractfile("oci-layout").read())
        index = json.loads(tar.extractfile("index.json").read())
    assert layout == {"imageLayoutVersion": "1.0.0"}
    assert all(sha(data) == "sha256:" + hexd for hexd, data in blob.items())
    (desc,) = index["manifests"]
    assert desc["digest"] == img.manifest_digest
    assert desc["annotations"] == {"io.containerd.image.name": "localhost/t/x:v1",
                                   "org.opencontainers.image.ref.name": "v1"}
    assert desc["platform"] == {"architecture": oci_arch(), "os": "linux"}
    manifest = json.loads(blob[img.manifest_digest.split(":")[1]])
    assert desc["size"] == len(blob[img.manifest_digest.split(":")[1]])
    assert manifest["config"]["digest"] == img.config_digest
    config = json.loads(blob[img.config_digest.split(":")[1]])
    assert config["config"]["Cmd"] == ["/bin/true"]
    assert config["os"] == "linux" and config["architecture"] == oci_arch()
    assert [d["digest"] for d in manifest["layers"]] == list(img.layer_digests)
    raws = [gzip.decompress(blob[d.split(":")[1]]) for d in img.layer_digests]
    assert config["rootfs"] == {"type": "layers", "diff_ids": [sha(r) for r in raws]}
    assert list(img.diff_ids) == [sha(layer_tar(entries)) for entries in layers]
    d0, d1 = img.diff_ids
    assert img.chain_ids == (d0, sha(f"{d0} {d1}".encode())) == chain_ids([d0, d1])
    again = build_image(tmp_path / "j.tar", "localhost/t/x:v1", layers, cmd=["/bin/true"])
    assert again.manifest_digest == img.manifest_digest


def test_is_static_elf(tmp_path):
    assert not is_static_elf("/bin/sh")              # dash or bash: dynamically linked
    (tmp_path / "x").write_bytes(b"#!/bin/sh\n")
    assert not is_static_elf(tmp_path / "x")
    assert not is_static_elf(tmp_path / "missing")
    if not os.path.exists("/var/lib/dpkg/info/busybox-static.list"):
        pytest.skip(f"no static {BUSYBOX} (Debian: busybox-static)")
    assert is_static_elf(BUSYBOX)
