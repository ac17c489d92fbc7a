"""runtime/layers.py: applying layer tars built with tarfile, entry type by entry type, the
whiteout rules, type replacement, traversal attacks, compressed and damaged layers, a large file
streamed. (The model-based property test, diff_layer and GNU tar: test_layers_model.py.)"""

from __future__ import annotations

import errno
import io
import os
import sys
import tarfile
import tracemalloc

import pytest

from thinpool.errors import InvalidArgument, InvalidLayer, MissingDependency
from thinpool.runtime.layers import LayerStats, apply_layer
from tests.runtime.layer_helpers import MTIME, E, can_mknod, compress, snapshot, tar_bytes, wh

NS = 1_000_000_000
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="applying layers sets owners and "
                                                          "makes devices: needs root")


def apply(root, entries, how=None):
    return apply_layer(root, io.BytesIO(compress(tar_bytes(entries), how)))


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    r.mkdir()
    return r


@pytest.fixture
def outside(tmp_path):
    """A sentinel tree beside the root that no layer may touch."""
    o = tmp_path / "outside"
    (o / "sub").mkdir(parents=True)
    (o / "secret").write_bytes(b"secret\n")
    (o / "sub" / "deep").write_bytes(b"deep\n")
    os.utime(o / "sub", ns=(MTIME * NS, MTIME * NS))
    os.utime(o, ns=(MTIME * NS, MTIME * NS))
    return o


# ---- the entry types ----

def test_regular_files_with_their_metadata(root):
    stats = apply(root, [
        E("bin/su", data=b"#!su\n", mode=0o4755, uid=0, gid=0, mtime=1000),
        E("bin/wall", data=b"w", mode=0o2755, uid=0, gid=5, mtime=2000),
        E("tmp", "dir", mode=0o1777),
        E("tmp/f", data=b"x" * 10000, mode=0o1640, uid=1000, gid=1001, mtime=3000),
        E("exact", data=b"e", pax={"mtime": "1700000000.123456789"}),
    ])
    assert stats == LayerStats(entries=5, bytes_written=5 + 1 + 10000 + 1)
    s = snapshot(root)
    assert s["bin/su"] == ("file", 0o4755, 0, 0, b"#!su\n", 1000 * NS)
    assert s["bin/wall"] == ("file", 0o2755, 0, 5, b"w", 2000 * NS)
    assert s["tmp"][:4] == ("dir", 0o1777, 0, 0)
    assert s["tmp/f"] == ("file", 0o1640, 1000, 1001, b"x" * 10000, 3000 * NS)
    assert s["exact"][5] == 1_700_000_000_123_456_789
    assert s["bin"][:4] == ("dir", 0o755, 0, 0)   # an implicit parent


def test_directory_metadata_is_set_after_its_content(root):
    apply(root, [E("d", "dir", mode=0o750, uid=7, gid=8, mtime=5000),
                 E("d/a", data=b"a"), E("d/sub", "dir", mode=0o700, mtime=6000),
                 E("d/sub/b", data=b"b"), E("d/c", data=b"c")])
    s = snapshot(root)
    assert s["d"] == ("dir", 0o750, 7, 8, None, 5000 * NS)
    assert s["d/sub"] == ("dir", 0o700, 0, 0, None, 6000 * NS)


def test_an_existing_directory_is_kept_with_the_new_metadata(root):
    apply(root, [E("d", "dir", mode=0o755, mtime=1000), E("d/lower", data=b"l")])
    stats = apply(root, [E("d", "dir", mode=0o700, uid=3, gid=4, mtime=9000),
                         E("d/upper", data=b"u")])
    assert stats.entries == 2
    s = snapshot(root)
    assert s["d"] == ("dir", 0o700, 3, 4, None, 9000 * NS)
    assert s["d/lower"][4] == b"l" and s["d/upper"][4] == b"u"


def test_the_root_entry_sets_the_roots_metadata(root):
    apply(root, [E("./", "dir", mode=0o711, uid=2, mtime=4000), E("./a", data=b"a")])
    assert snapshot(root)[""] == ("dir", 0o711, 2, 0, None, 4000 * NS)
    with pytest.raises(InvalidLayer, match="root can only be a directory"):
        apply(root, [E(".", "file")])


def test_symlinks_own_owner_and_mtime(root, outside):
    apply(root, [E("l", "symlink", link=str(outside / "secret"), uid=5, gid=6, mtime=1234),
                 E("rel", "symlink", link="../../nowhere", mtime=99)])
    s = snapshot(root)
    assert s["l"] == ("symlink", 0o777, 5, 6, str(outside / "secret"), 1234 * NS)
    assert s["rel"] == ("symlink", 0o777, 0, 0, "../../nowhere", 99 * NS)
    assert os.stat(outside / "secret").st_uid == 0       # lchown, not chown


def test_hard_links_share_the_inode(root):
    apply(root, [E("lower", data=b"lower", mode=0o600)])
    stats = apply(root, [E("a/f", data=b"F", mode=0o640, uid=9),
                         E("a/h", "hardlink", link="a/f", mode=0o777, uid=1),
                         E("./h2", "hardlink", link="./lower"),
                         E("s", "symlink", link="x"), E("hs", "hardlink", link="s"),
                         E("self", "hardlink", link="self")])
    assert stats.entries == 6
    f, h = os.lstat(root / "a/f"), os.lstat(root / "a/h")
    assert (f.st_ino, f.st_nlink) == (h.st_ino, 2)
    assert (h.st_mode & 0o7777, h.st_uid) == (0o640, 9)    # the link's own header is ignored
    assert os.lstat(root / "h2").st_ino == os.lstat(root / "lower").st_ino
    assert os.lstat(root / "hs").st_ino == os.lstat(root / "s").st_ino   # link to the symlink
    assert not (root / "self").exists()


def test_fifos_and_devices(root):
    entries = [E("p", "fifo", mode=0o620, uid=3, mtime=77)]
    if can_mknod(root):
        entries += [E("dev/null", "chr", mode=0o666, dev=(1, 3)),
                    E("dev/loop0", "blk", mode=0o660, gid=6, dev=(7, 0), mtime=88)]
    apply(root, entries)
    s = snapshot(root)
    assert s["p"] == ("fifo", 0o620, 3, 0, None, 77 * NS)
    if len(entries) > 1:
        assert s["dev/null"] == ("chr", 0o666, 0, 0, (1, 3), MTIME * NS)
        assert s["dev/loop0"] == ("blk", 0o660, 0, 6, (7, 0), 88 * NS)


def test_xattrs_on_files_and_directories(root):
    binary = bytes(range(256)).decode("utf-8", "surrogateescape")
    apply(root, [E("d", "dir", pax={"SCHILY.xattr.user.dir": "on dir"}),
                 E("d/f", data=b"f", pax={"SCHILY.xattr.user.bin": binary,
                                          "SCHILY.xattr.user.text": "héllo"})])
    assert os.getxattr(root / "d", "user.dir") == b"on dir"
    assert os.getxattr(root / "d/f", "user.bin") == bytes(range(256))
    assert os.getxattr(root / "d/f", "user.text") == "héllo".encode()


def test_unsupported_xattrs_are_counted_not_fatal(root, monkeypatch):
    real = os.setxattr

    def fake(target, name, value, *a, **kw):
        if name.startswith("trusted."):
            raise OSError(errno.EOPNOTSUPP, "not supported")
        if name.startswith("security."):
            raise OSError(errno.EPERM, "not permitted")
        return real(target, name, value, *a, **kw)

    monkeypatch.setattr(os, "setxattr", fake)
    stats = apply(root, [E("f", data=b"f", pax={"SCHILY.xattr.trusted.a": "1",
                                                  "SCHILY.xattr.security.b": "2",
                                                  "SCHILY.xattr.user.c": "3"}),
                         # user.* on a symlink: the kernel says EPERM
                         E("l", "symlink", link="f", pax={"SCHILY.xattr.user.d": "4"})])
    assert stats.xattrs_skipped == 3
    assert os.getxattr(root / "f", "user.c") == b"3"


def test_other_xattr_failures_propagate(root, monkeypatch):
    def fake(*a, **kw):
        raise OSError(errno.ENOSPC, "no space")

    monkeypatch.setattr(os, "setxattr", fake)
    with pytest.raises(OSError) as info:
        apply(root, [E("f", data=b"f", pax={"SCHILY.xattr.user.c": "3"})])
    assert info.value.errno == errno.ENOSPC and not isinstance(info.value, InvalidArgument)


def test_unsupported_entry_type(root):
    with pytest.raises(InvalidLayer, match="unsupported entry type") as info:
        apply(root, [E("ok", data=b"1"), E("weird", b"Z")])
    assert info.value.entry == "weird"


# ---- replacing entries of another type ----

def test_a_file_over_a_directory_removes_the_tree(root):
    apply(root, [E("d/sub/deep", data=b"x"), E("d/f", data=b"y")])
    apply(root, [E("d", data=b"now a file", mode=0o600)])
    assert snapshot(root)["d"][:5] == ("file", 0o600, 0, 0, b"now a file")
    assert sorted(os.listdir(root)) == ["d"]


def test_a_directory_over_a_file_and_links_over_things(root):
    apply(root, [E("f", data=b"file"), E("d/x", data=b"x"), E("target", "dir"),
                 E("target/t", data=b"t"), E("l", "symlink", link="target")])
    apply(root, [E("f", "dir", mode=0o700), E("f/inside", data=b"i"),
                 E("d", "symlink", link="elsewhere"),
                 E("l", data=b"plain")])                # replaces the link, not through it
    s = snapshot(root)
    assert s["f"][:2] == ("dir", 0o700) and s["f/inside"][4] == b"i"
    assert s["d"][0] == "symlink" and "d/x" not in s
    assert s["l"][:5] == ("file", 0o644, 0, 0, b"plain")
    assert s["target/t"][4] == b"t"


def test_a_rewritten_file_does_not_change_its_hard_link_peers(root):
    apply(root, [E("a", data=b"old"), E("b", "hardlink", link="a")])
    apply(root, [E("a", data=b"new")])
    assert (root / "a").read_bytes() == b"new" and (root / "b").read_bytes() == b"old"


# ---- whiteouts ----

def lower_tree(root):
    apply(root, [E("d", "dir"), E("d/x", data=b"x"), E("d/y", data=b"y"),
                 E("d/sub", "dir"), E("d/sub/z", data=b"z"), E("f", data=b"f"),
                 E("keep", data=b"k")])


def test_whiteouts_remove_lower_files_and_trees(root):
    lower_tree(root)
    stats = apply(root, [wh("d/.wh.x"), wh(".wh.f"), wh("d/.wh.sub"), wh(".wh.missing"),
                         wh("nodir/.wh.x"), wh("f/.wh.under-a-file")])
    assert stats == LayerStats(entries=0, whiteouts=6)
    assert sorted(snapshot(root)) == ["", "d", "d/y", "keep"]


@pytest.mark.parametrize("marker_first", [True, False])
def test_opaque_directory_keeps_only_this_layers_entries(root, marker_first):
    lower_tree(root)
    own = [E("d", "dir", mode=0o700), E("d/new", data=b"n"), E("d/sub", "dir"),
           E("d/sub/new2", data=b"n2"), E("d/y", data=b"y2")]
    marker = [wh("d/.wh..wh..opq")]
    entries = marker + own if marker_first else own[:2] + marker + own[2:]
    stats = apply(root, entries)
    assert (stats.opaque_dirs, stats.entries) == (1, 5)
    s = snapshot(root)
    assert sorted(k for k in s if k.startswith("d")) == ["d", "d/new", "d/sub", "d/sub/new2", "d/y"]
    assert s["d/y"][4] == b"y2" and s["d"][1] == 0o700
    assert s["f"][4] == b"f"


def test_opaque_marker_after_entries_written_beneath_without_their_own_entry(root):
    lower_tree(root)
    apply(root, [E("d/sub/new", data=b"n"), wh("d/.wh..wh..opq")])
    assert sorted(k for k in snapshot(root) if k.startswith("d")) == ["d", "d/sub", "d/sub/new"]


def test_opaque_root_and_whiteouts_of_this_layers_own_paths(root):
    lower_tree(root)
    apply(root, [E("n1", data=b"1"), wh(".wh..wh..opq"), E("n2", data=b"2"),
                 wh(".wh.n1"), E("d/w", data=b"w"), wh(".wh.d")])
    assert sorted(snapshot(root)) == ["", "d", "d/w", "n1", "n2"]


def test_other_tools_markers_are_skipped_and_bad_whiteouts_refused(root):
    stats = apply(root, [E(".wh..wh.plnk", "dir"), E(".wh..wh.plnk/1", data=b"x"),
                         E(".wh..wh.aufs", data=b"")])
    assert stats == LayerStats() and os.listdir(root) == []
    for bad in ("d/.wh.", "d/.wh..", "d/.wh...", ".wh.x/y"):
        with pytest.raises(InvalidLayer):
            apply(root, [wh(bad)])


# ---- traversal attacks ----

ATTACKS = {
    "dotdot": lambda o: [E("../outside/evil", data=b"pwned")],
    "dotdot inside": lambda o: [E("a/../../outside/evil", data=b"pwned")],
    "dotdot dir": lambda o: [E("x/..", "dir")],
    "absolute": lambda o: [E(str(o / "evil"), data=b"pwned")],
    "absolute dir": lambda o: [E(str(o / "sub"), "dir", mode=0o777)],
    "symlink parent": lambda o: [E("a", "symlink", link=str(o)), E("a/evil", data=b"pwned")],
    "relative symlink parent": lambda o: [E("a", "symlink", link="../outside"),
                                          E("a/sub/evil", data=b"pwned")],
    "symlink chain": lambda o: [E("b", "symlink", link=str(o)), E("a", "symlink", link="b"),
                                E("a/evil", data=b"pwned")],
    "symlink parent dir": lambda o: [E("a", "symlink", link=str(o)), E("a/sub", "dir", mode=0o777)],
    "symlink parent symlink": lambda o: [E("a", "symlink", link=str(o)),
                                         E("a/secret", "symlink", link="x")],
    "symlink parent fifo": lambda o: [E("a", "symlink", link=str(o)), E("a/p", "fifo")],
    "hardlink dotdot": lambda o: [E("h", "hardlink", link="../outside/secret")],
    "hardlink absolute": lambda o: [E("h", "hardlink", link=str(o / "secret"))],
    "hardlink via symlink": lambda o: [E("a", "symlink", link=str(o)),
                                       E("h", "hardlink", link="a/secret")],
    "hardlink to dir": lambda o: [E("d", "dir"), E("h", "hardlink", link="d")],
    "hardlink missing": lambda o: [E("h", "hardlink", link="nothing")],
    "whiteout via symlink": lambda o: [E("a", "symlink", link=str(o)), wh("a/.wh.secret")],
    "opaque via symlink": lambda o: [E("a", "symlink", link=str(o)), wh("a/.wh..wh..opq")],
    "whiteout dotdot": lambda o: [wh("../outside/.wh.secret")],
    "whiteout parent": lambda o: [wh("x/.wh..")],
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_traversal_attacks_are_refused_and_touch_nothing_outside(tmp_path, root, outside, attack):
    before = snapshot(outside)
    neighbours = sorted(os.listdir(tmp_path))
    with pytest.raises(InvalidArgument) as info:
        apply(root, ATTACKS[attack](outside))
    assert isinstance(info.value, InvalidLayer) and info.value.entry is not None
    assert info.value.entry in str(info.value)
    assert snapshot(outside) == before
    assert sorted(os.listdir(tmp_path)) == neighbours


def test_a_symlink_parent_is_refused_even_inside_the_root(root):
    apply(root, [E("real", "dir"), E("in", "symlink", link="real")])
    with pytest.raises(InvalidLayer, match="symbolic link"):
        apply(root, [E("in/f", data=b"x")])
    assert os.listdir(root / "real") == []


def test_a_file_entry_replaces_a_symlink_to_outside(root, outside):
    before = snapshot(outside)
    apply(root, [E("a", "symlink", link=str(outside / "secret")),
                 E("d", "symlink", link=str(outside))])
    apply(root, [E("a", data=b"mine"), E("d", "dir", mode=0o777), E("d/x", data=b"x")])
    assert snapshot(outside) == before
    assert snapshot(root)["a"][0] == "file" and snapshot(root)["d"][0] == "dir"


def test_a_failure_midway_leaves_what_came_before(root):
    with pytest.raises(InvalidLayer) as info:
        apply(root, [E("d", "dir", mode=0o710, mtime=4242), E("d/a", data=b"a"),
                     E("b", data=b"b"), E("../evil", data=b"x"), E("c", data=b"c")])
    assert info.value.entry == "../evil"
    s = snapshot(root)
    assert sorted(s) == ["", "b", "d", "d/a"]
    assert s["d"] == ("dir", 0o710, 0, 0, None, 4242 * NS)     # its metadata was set anyway


# ---- streams: compression, damage, size ----

ALL = [E("d", "dir", mode=0o700, mtime=10), E("d/f", data=b"hello" * 1000, mtime=20),
       E("d/l", "symlink", link="f"), E("d/h", "hardlink", link="d/f"), wh("d/.wh.gone")]


@pytest.mark.parametrize("how", [None, "gzip", "bzip2", "xz"])
def test_compressed_layers_are_detected_by_magic(tmp_path, how):
    results = []
    for i, source in enumerate(("bytes", "path")):
        root = tmp_path / f"r{i}"
        root.mkdir()
        data = compress(tar_bytes(ALL), how)
        if source == "path":
            (tmp_path / "layer").write_bytes(data)
            stats = apply_layer(root, tmp_path / "layer")
        else:
            stats = apply_layer(root, io.BytesIO(data))
        assert stats == LayerStats(entries=4, bytes_written=5000, whiteouts=1)
        results.append(snapshot(root, root_meta=False))
    assert results[0] == results[1] and results[0]["d"][:2] == ("dir", 0o700)


def test_zstd_layer(root):
    pytest.importorskip("zstandard")
    assert apply(root, ALL, "zstd").entries == 4
    assert (root / "d/f").read_bytes() == b"hello" * 1000


def test_zstd_without_the_module(root, monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)
    data = b"\x28\xb5\x2f\xfd" + bytes(600)
    with pytest.raises(MissingDependency, match="zstandard"):
        apply_layer(root, io.BytesIO(data))


def test_gnu_and_ustar_formats(root):
    apply(root, [E("a" * 120 + "/f", data=b"long")])     # pax path
    apply_layer(root, io.BytesIO(tar_bytes([E("b" * 120 + "/g", data=b"gnu")], tarfile.GNU_FORMAT)))
    apply_layer(root, io.BytesIO(tar_bytes([E("u/h", data=b"u")], tarfile.USTAR_FORMAT)))
    assert (root / ("a" * 120) / "f").read_bytes() == b"long"
    assert (root / ("b" * 120) / "g").read_bytes() == b"gnu"
    assert (root / "u/h").read_bytes() == b"u"


def damaged_layers():
    good = tar_bytes([E("first", data=b"1" * 3000), E("second", data=b"2" * 100)])
    second = good.index(b"second")
    hdr = bytearray(good)
    hdr[second + 148:second + 156] = b"0000000\x00"        # the second header's checksum
    gz = compress(good, "gzip")
    crc = bytearray(gz)
    crc[-8] ^= 0xFF
    return {
        "garbage": b"this is not a tar at all, not even close" * 40,
        "empty": b"",
        "truncated content": good[:1500],
        "no end blocks": good[:second - 0],
        "bad second header": bytes(hdr),
        "truncated gzip": gz[:len(gz) // 2],
        "gzip crc": bytes(crc),
        "bad gzip": b"\x1f\x8b" + b"\x00" * 600,
    }


@pytest.mark.parametrize("name", sorted(damaged_layers()))
def test_damaged_layers_are_invalid(root, name):
    with pytest.raises(InvalidLayer):
        apply_layer(root, io.BytesIO(damaged_layers()[name]))


class FailingSource(io.RawIOBase):
    def __init__(self, data: bytes, fail_at: int):
        self.data, self.pos, self.fail_at = data, 0, fail_at

    def readable(self):
        return True

    def readinto(self, b):
        if self.pos >= self.fail_at:
            raise OSError(errno.EIO, "source broke")
        n = min(len(b), self.fail_at - self.pos, len(self.data) - self.pos)
        b[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n


@pytest.mark.parametrize("how", [None, "gzip"])
def test_an_error_reading_the_source_stays_an_oserror(root, how):
    data = compress(tar_bytes([E(f"f{i}", data=os.urandom(20000)) for i in range(10)]), how)
    with pytest.raises(OSError) as info:
        apply_layer(root, FailingSource(data, len(data) // 2))
    assert info.value.errno == errno.EIO and not isinstance(info.value, InvalidArgument)


class PatternFile(io.RawIOBase):
    """``size`` bytes: runs of 1 MiB of zeros and 1 MiB of a pattern, never held at once."""

    def __init__(self, size: int):
        self.size, self.pos = size, 0

    def readable(self):
        return True

    def readinto(self, b):
        n = min(len(b), self.size - self.pos, (1 << 20) - self.pos % (1 << 20))
        if self.pos // (1 << 20) % 2:
            b[:n] = bytes([self.pos // (1 << 20) % 251]) * n
        else:
            b[:n] = bytes(n)
        self.pos += n
        return n


@pytest.mark.parametrize("how", [None, "gzip"])
def test_a_large_file_is_streamed(tmp_path, root, how):
    size = 64 << 20
    layer = tmp_path / "big.tar"
    with open(layer, "wb") as f, tarfile.open(fileobj=f, mode="w|gz" if how else "w|") as tf:
        ti = tarfile.TarInfo("big")
        ti.size = size
        tf.addfile(ti, io.BufferedReader(PatternFile(size), 1 << 16))
    tracemalloc.start()
    try:
        stats = apply_layer(root, layer)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert stats.bytes_written == size
    assert peak < 4 << 20, f"peak {peak} bytes"
    st = os.stat(root / "big")
    assert st.st_size == size and st.st_blocks * 512 < size * 3 // 4    # zero runs are holes
    want = PatternFile(size)
    with open(root / "big", "rb") as f:
        while chunk := f.read(1 << 20):
            assert chunk == want.read(len(chunk))

