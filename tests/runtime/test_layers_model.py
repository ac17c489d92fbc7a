"""runtime/layers.py against a model, diff_layer's round trip, and GNU tar as a second opinion
(it lists and compares our diff tars, extracts our layers alike, and its own archives, sparse
files included, apply back to the tree they came from).

The model is a dict path -> node that applies the rules of the module docstring (entries in
order; a whiteout removes what this layer did not write; directory metadata at the end, also when
the layer fails midway). Hypothesis applies sequences of random layers to both and compares the
trees (kind, permission bits, owner, content, link target, mtime of non-directories) after each
layer, refused ones included (what a refused layer leaves is as the docstring says, and the next
layer is applied over it)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from thinpool.errors import InvalidArgument
from thinpool.runtime.layers import LayerStats, apply_layer, diff_layer
from tests.runtime.layer_helpers import E, can_mknod, snapshot, tar_bytes, wh

NS = 1_000_000_000
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="applying layers sets owners and "
                                                          "makes devices: needs root")


# ---- the model ----

class Refused(Exception):
    pass


@dataclass(frozen=True)
class Node:
    kind: str
    mode: int
    uid: int = 0
    gid: int = 0
    data: bytes | str | None = None
    mtime: int | None = None     # ns; None for directories (not compared)

    def view(self):
        return (self.kind, self.mode, self.uid, self.gid, self.data, self.mtime)


class Model:
    def __init__(self):
        self.tree: dict[str, Node] = {}   # the root is implicit

    def children(self, rel: str) -> list[str]:
        pre = rel + "/" if rel else ""
        return [k for k in self.tree if k.startswith(pre) and "/" not in k[len(pre):]]

    def drop(self, rel: str) -> None:
        for k in [k for k in self.tree if k == rel or k.startswith(rel + "/")]:
            del self.tree[k]

    def apply(self, entries: list[E]) -> bool:
        """False when the layer is refused (the tree is then as the real one is left)."""
        self.written, self.parents, self.pending = set(), set(), {}
        try:
            for e in entries:
                self.entry(e)
            return True
        except Refused:
            return False
        finally:
            for rel, (mode, uid, gid) in self.pending.items():
                if rel in self.tree and self.tree[rel].kind == "dir":
                    self.tree[rel] = replace(self.tree[rel], mode=mode, uid=uid, gid=gid)

    def resolve_parents(self, parts: list[str], *, create: bool) -> bool:
        for i in range(len(parts) - 1):
            p = "/".join(parts[:i + 1])
            n = self.tree.get(p)
            if n is None:
                if not create:
                    return False
                self.tree[p] = Node("dir", 0o755)
            elif n.kind == "symlink":
                raise Refused
            elif n.kind != "dir":
                if not create:
                    return False
                raise Refused
        return True

    def clear(self, rel: str, *, for_dir: bool) -> bool:
        n = self.tree.get(rel)
        if n is None:
            return False
        if n.kind == "dir":
            if for_dir:
                return True
            self.drop(rel)
            for k in [k for k in self.pending if k == rel or k.startswith(rel + "/")]:
                del self.pending[k]
        else:
            del self.tree[rel]
        return False

    def remove_lower(self, rel: str) -> None:
        n = self.tree.get(rel)
        if n is None:
            return
        if rel not in self.written and rel not in self.parents:
            self.drop(rel)
        elif n.kind == "dir":
            for child in self.children(rel):
                self.remove_lower(child)

    def entry(self, e: E) -> None:
        rel = e.name.removeprefix("./")
        parts = rel.split("/")
        base = parts[-1]
        if base.startswith(".wh."):
            if not self.resolve_parents(parts, create=False):
                return
            d = "/".join(parts[:-1])
            if base == ".wh..wh..opq":
                for child in self.children(d):
                    self.remove_lower(child)
            else:
                self.remove_lower(f"{d}/{base[4:]}" if d else base[4:])
            return
        self.written.add(rel)
        for i in range(1, len(parts)):
            self.parents.add("/".join(parts[:i]))
        self.resolve_parents(parts, create=True)
        meta = dict(uid=e.uid, gid=e.gid, mtime=e.mtime * NS)
        if e.kind == "file":
            self.clear(rel, for_dir=False)
            self.tree[rel] = Node("file", e.mode, data=e.data, **meta)
        elif e.kind == "dir":
            if not self.clear(rel, for_dir=True):
                self.tree[rel] = Node("dir", 0o700)
            self.pending[rel] = (e.mode, e.uid, e.gid)
        elif e.kind == "symlink":
            self.clear(rel, for_dir=False)
            self.tree[rel] = Node("symlink", 0o777, data=e.link, **meta)
        elif e.kind == "fifo":
            self.clear(rel, for_dir=False)
            self.tree[rel] = Node("fifo", e.mode, **meta)
        elif e.kind == "hardlink":
            if e.link == rel:
                return
            tparts = e.link.split("/")
            if not self.resolve_parents(tparts, create=False):
                raise Refused
            target = self.tree.get(e.link)
            if target is None or target.kind == "dir":
                raise Refused
            self.clear(rel, for_dir=False)
            if e.link not in self.tree:
                raise Refused
            self.tree[rel] = self.tree[e.link]

    def view(self) -> dict[str, tuple]:
        return {k: n.view() for k, n in self.tree.items()}


def real_view(root: Path) -> dict[str, tuple]:
    return snapshot(root, root_meta=False, dir_mtimes=False)


# ---- random layers ----

component = st.sampled_from(["a", "b", "c"])
paths = st.lists(component, min_size=1, max_size=3).map("/".join)
dirs = st.lists(component, min_size=0, max_size=2).map("/".join)
modes = st.sampled_from([0o644, 0o755, 0o600, 0o4755, 0o2750, 0o1777, 0o400])
ids = st.sampled_from([0, 1000])
mtimes = st.sampled_from([0, 1_000_000_000, 1_600_000_000])
dot = st.sampled_from(["", "./"])


def _in(d: str, name: str) -> str:
    return f"{d}/{name}" if d else name


files = st.builds(lambda p, data, m, u, g, t, pre: E(pre + p, "file", data=data, mode=m, uid=u,
                                                     gid=g, mtime=t),
                 paths, st.binary(max_size=12), modes, ids, ids, mtimes, dot)
directories = st.builds(lambda p, m, u, g, pre: E(pre + p, "dir", mode=m, uid=u, gid=g),
                        paths, modes, ids, ids, dot)
symlinks = st.builds(lambda p, t, u, tm: E(p, "symlink", link=t, uid=u, mtime=tm),
                     paths, st.sampled_from(["a", "b/c", "../x", "/etc"]), ids, mtimes)
# A hard link's target is mostly "#N": the Nth of the paths that can be linked to when the layer
# is applied (see resolve_links), else a random path, which is often missing (a refused layer).
hardlinks = st.builds(lambda p, t: E(p, "hardlink", link=t), paths,
                      st.one_of(*[st.integers(0, 30).map(lambda i: f"#{i}")] * 4, paths))
fifos = st.builds(lambda p, m, u, t: E(p, "fifo", mode=m, uid=u, mtime=t), paths, modes, ids,
                  mtimes)
whiteouts = st.builds(lambda d, n: wh(_in(d, ".wh." + n)), dirs, component)
opaques = st.builds(lambda d: wh(_in(d, ".wh..wh..opq")), dirs)
# one_of picks its branches evenly: repeats weigh them (files and directories most, then
# whiteouts; links, which often make a later entry refused, least)
entries = st.one_of(files, files, files, directories, directories, directories, whiteouts,
                    whiteouts, opaques, symlinks, hardlinks, fifos)
layers = st.lists(st.lists(entries, max_size=10), min_size=1, max_size=5)


def resolve_links(layer: list[E], root: Path) -> list[E]:
    """The layer with each "#N" hard link target replaced by one of the non-directories now in
    root or written by an earlier entry of the layer."""
    targets = sorted(k for k, n in snapshot(root, root_meta=False).items() if n[0] != "dir")
    out = []
    for e in layer:
        if e.kind == "hardlink" and e.link.startswith("#"):
            e = replace(e, link=targets[int(e.link[1:]) % len(targets)] if targets else "a")
        out.append(e)
        if e.kind in ("file", "symlink", "fifo", "hardlink") and ".wh." not in e.name:
            targets.append(e.name.removeprefix("./"))
    return out

SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(layers)
def test_apply_layer_matches_the_model(layer_list):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = Model()
        for layer in layer_list:
            layer = resolve_links(layer, root)
            ok = model.apply(layer)
            try:
                apply_layer(root, io.BytesIO(tar_bytes(layer)))
                applied = True
            except InvalidArgument:
                applied = False
            assert applied == ok
            assert real_view(root) == model.view()   # after a refusal too: the next goes on


# ---- diff_layer ----

def copy_tree(src: Path, dst: Path) -> None:
    """A faithful copy (modes, owners, times to the ns, hard links, xattrs) by GNU cp."""
    subprocess.run(["cp", "-a", "--", str(src), str(dst)], check=True)


def diff_and_apply(tmp: Path, lower: Path, upper: Path) -> tuple[bytes, Path, LayerStats]:
    out = io.BytesIO()
    stats = diff_layer(lower, upper, out)
    again = tmp / "again"
    copy_tree(lower, again)
    apply_layer(again, io.BytesIO(out.getvalue()))
    return out.getvalue(), again, stats


def full(root: Path) -> dict[str, tuple]:
    return snapshot(root, xattrs=True)


@SETTINGS
@given(layers, layers)
def test_diff_layer_round_trip_after_random_layers(below, above):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lower, upper = tmp / "lower", tmp / "upper"
        lower.mkdir()
        for layer in below:
            try:
                apply_layer(lower, io.BytesIO(tar_bytes(resolve_links(layer, lower))))
            except InvalidArgument:
                pass    # what it left is as good a tree as any
        copy_tree(lower, upper)
        for layer in above:
            try:
                apply_layer(upper, io.BytesIO(tar_bytes(resolve_links(layer, upper))))
            except InvalidArgument:
                pass    # what it left is as good a tree as any
        _, again, _ = diff_and_apply(tmp, lower, upper)
        assert full(again) == full(upper)


def build_lower(root: Path, *, devices: bool) -> None:
    root.mkdir()
    entries = [
        E("etc", "dir", mtime=100), E("etc/passwd", data=b"root:x:0:0\n", mtime=101),
        E("etc/shadow", data=b"secret", mode=0o600, mtime=102),
        E("etc/hosts", data=b"127.0.0.1 localhost\n", mtime=103),
        E("usr/bin/tool", data=b"\x7fELF" + bytes(5000), mode=0o755, mtime=104),
        E("usr/bin/link", "symlink", link="tool", mtime=105),
        E("usr/bin/hard", "hardlink", link="usr/bin/tool"),
        E("var/cache/big", "dir", mtime=106), E("var/cache/big/a", data=b"a" * 100),
        E("var/cache/big/sub/b", data=b"b"), E("tmp", "dir", mode=0o1777, mtime=107),
        E("run/p", "fifo", mtime=108), E("typed", data=b"file becomes dir"),
        E("typed2", "dir"), E("typed2/x", data=b"dir becomes link"),
        E("same", data=b"same size", mtime=200),
        E("attrs", data=b"a", pax={"SCHILY.xattr.user.k": "v1"}),
    ]
    if devices:
        entries.append(E("dev/null", "chr", mode=0o666, dev=(1, 3)))
    apply_layer(root, io.BytesIO(tar_bytes(entries)))


def mutate(upper: Path, *, devices: bool) -> None:
    (upper / "etc/hosts").write_bytes(b"127.0.0.1 localhost changed\n")
    os.chmod(upper / "etc/shadow", 0o640)
    os.chown(upper / "etc/passwd", 0, 42)
    os.unlink(upper / "usr/bin/link")
    os.symlink("/usr/bin/tool", upper / "usr/bin/link")
    shutil.rmtree(upper / "var/cache/big")
    os.unlink(upper / "typed")
    (upper / "typed").mkdir()
    (upper / "typed/inside").write_bytes(b"in")
    shutil.rmtree(upper / "typed2")
    os.symlink("nowhere", upper / "typed2")
    (upper / "new/deep").mkdir(parents=True)
    (upper / "new/deep/file").write_bytes(b"new" * 1000)
    os.link(upper / "new/deep/file", upper / "new/peer")
    os.mkfifo(upper / "new/fifo")
    os.chmod(upper / "tmp", 0o1770)
    # same size, content changed, mtime put back to a whole second: only content tells
    t = os.stat(upper / "same").st_mtime_ns
    (upper / "same").write_bytes(b"SAME SIZE")
    os.utime(upper / "same", ns=(t, t))
    os.setxattr(upper / "attrs", "user.k", b"v2")
    os.utime(upper / "new/deep/file", ns=(1, 1_234_567_891_234_567_891))
    os.unlink(upper / "run/p")
    if devices:
        os.unlink(upper / "dev/null")
        os.mknod(upper / "dev/null", 0o666 | 0o020000, os.makedev(1, 5))


def test_diff_layer_round_trip_by_hand(tmp_path):
    devices = can_mknod(tmp_path)
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    build_lower(lower, devices=devices)
    copy_tree(lower, upper)
    mutate(upper, devices=devices)
    data, again, stats = diff_and_apply(tmp_path, lower, upper)
    assert full(again) == full(upper)
    names = [m.name for m in tarfile.open(fileobj=io.BytesIO(data))]
    assert "var/cache/.wh.big" in names and "run/.wh.p" in names
    assert "etc/passwd" in names and "usr/bin/tool" not in names and "etc" in names
    assert names[0] == "." and names.index("var/cache") < names.index("var/cache/.wh.big")
    assert stats.whiteouts == 2
    out2 = io.BytesIO()
    diff_layer(lower, upper, out2)
    assert out2.getvalue() == data                              # deterministic
    empty = io.BytesIO()
    assert diff_layer(upper, again, empty) == LayerStats()      # nothing left to say


def test_diff_refuses_whiteout_names_and_non_directories(tmp_path):
    (tmp_path / "l").mkdir()
    (tmp_path / "u").mkdir()
    (tmp_path / "u/.wh.x").write_bytes(b"")
    with pytest.raises(InvalidArgument, match="whiteout"):
        diff_layer(tmp_path / "l", tmp_path / "u", io.BytesIO())
    with pytest.raises(InvalidArgument):
        diff_layer(tmp_path / "l", tmp_path / "u/.wh.x", io.BytesIO())


# ---- GNU tar ----

needs_tar = pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar not installed")


@needs_tar
def test_gnu_tar_lists_the_diff_as_tarfile_does_and_finds_no_difference(tmp_path):
    devices = can_mknod(tmp_path)
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    lower.mkdir()
    build_lower(upper, devices=devices)
    mutate(upper, devices=devices)
    layer = tmp_path / "layer.tar"
    with open(layer, "wb") as f:
        diff_layer(lower, upper, f)
    listed = subprocess.run(["tar", "-tvf", str(layer), "--numeric-owner", "--full-time"],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    members = list(tarfile.open(layer))
    assert len(listed) == len(members)
    marks = {tarfile.REGTYPE: "-", tarfile.DIRTYPE: "d", tarfile.SYMTYPE: "l",
             tarfile.LNKTYPE: "h", tarfile.CHRTYPE: "c", tarfile.FIFOTYPE: "p"}
    for line, m in zip(listed, members):
        assert line[0] == marks[m.type]
        assert f" {m.uid}/{m.gid} " in line
        name = m.name + "/" if m.isdir() else m.name
        assert f" {name}" in line
    # tar -d compares every member (content, mode, owner, mtime, link target) with the tree
    subprocess.run(["tar", "-df", str(layer), "-C", str(upper), "--numeric-owner"],
                   check=True, capture_output=True)


@needs_tar
def test_gnu_tar_extracts_a_plain_layer_as_apply_layer_does(tmp_path):
    entries = [E("d", "dir", mode=0o750, uid=3, mtime=10), E("d/f", data=b"f", mode=0o4755),
               E("d/l", "symlink", link="f", uid=4, mtime=11), E("d/h", "hardlink", link="d/f"),
               E("d/sub", "dir", mode=0o1777, mtime=12), E("d/sub/p", "fifo", mode=0o600),
               E("e", "dir", mtime=13), E("e/x", data=b"x" * 3000, uid=1000, gid=1000,
                                          pax={"SCHILY.xattr.user.a": "b",
                                               "mtime": "14.123456789"})]
    layer = tmp_path / "layer.tar"
    layer.write_bytes(tar_bytes(entries))
    ours, gnu = tmp_path / "ours", tmp_path / "gnu"
    ours.mkdir()
    gnu.mkdir()
    apply_layer(ours, layer)
    subprocess.run(["tar", "-xpf", str(layer), "-C", str(gnu), "--same-owner", "--numeric-owner",
                    "--xattrs", "--xattrs-include=*"], check=True)
    assert snapshot(ours, root_meta=False, xattrs=True) == snapshot(gnu, root_meta=False,
                                                                     xattrs=True)


@needs_tar
def test_a_tree_archived_by_gnu_tar_applies_back_to_the_same_tree(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    build_lower(src, devices=can_mknod(tmp_path))
    mutate(src, devices=can_mknod(tmp_path))
    with open(src / "sparse", "wb") as f:           # GNU tar's own sparse entries
        f.truncate(8 << 20)
        f.seek(3 << 20)
        f.write(b"middle")
    os.setxattr(src / "etc", "user.dir", b"d")
    os.utime(src / "etc", ns=(0, 123_456_789_123))
    for fmt in ("pax", "gnu"):
        layer = tmp_path / f"{fmt}.tar"
        subprocess.run(["tar", f"--format={fmt}", "--sparse", "--xattrs", "--xattrs-include=*",
                        "--numeric-owner", "-cf", str(layer), "-C", str(src), "."], check=True)
        dst.mkdir()
        apply_layer(dst, layer)
        want = snapshot(src, xattrs=fmt == "pax", mtimes=fmt == "pax")
        assert snapshot(dst, xattrs=fmt == "pax", mtimes=fmt == "pax") == want
        shutil.rmtree(dst)
