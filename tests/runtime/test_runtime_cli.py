"""The seed's workflow on the command line, without containerd: ``image import`` of layer tars
(whiteouts and an opaque directory), ``container create|mount|unmount|delete``, data volumes
that outlive containers, ``runtime ls|usage|cleanup|configure``; real FUSE files, loop devices
and ext4. Each command runs in the pool's serving process, started for it and gone once nothing
is attached; after the test no loop device, mount or server of the test is left (torn down in
``finally`` by pid), and both checkers pass on the pool."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

from tests.cli.helpers import assert_one_line_error, tp
from tests.export.test_fuse import MISSING, sh
from tests.export.test_serve_cli import kill_pid, state_pid
from tests.tptools import assert_checks_pass, requires_tools

MiB = 1 << 20

pytestmark = [pytest.mark.skipif(MISSING is not None, reason=f"runtime CLI tests: {MISSING}"),
              requires_tools]


@pytest.fixture
def home():
    """A short home directory (the serving process's socket paths must stay under 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="tpr-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def layer(path: Path, entries: list[tuple[str, bytes | None]], gz: bool = False) -> Path:
    """A layer tar: (name, content) files, (name, None) directories."""
    with tarfile.open(path, "w:gz" if gz else "w") as t:
        for name, data in entries:
            ti = tarfile.TarInfo(name)
            if data is None:
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                t.addfile(ti)
            else:
                ti.size, ti.mode = len(data), 0o644
                t.addfile(ti, io.BytesIO(data))
    return path


@pytest.fixture
def layers(tmp_path):
    l1 = layer(tmp_path / "l1.tar", [("etc", None), ("etc/removeme", b"old"), ("data", None),
                                     ("data/lower.txt", b"lower"), ("big", b"B" * (8 * MiB))])
    l2 = layer(tmp_path / "l2.tar.gz", [("etc/.wh.removeme", b""), ("etc/added.txt", b"from layer 2"),
                                        ("data/.wh..wh..opq", b""), ("data/upper.txt", b"upper")],
               gz=True)
    return l1, l2


def _wait_unserved(pool: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while (pool / "exports.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (pool / "exports.json").exists(), "the serving process did not stop"


def _cleanup(home: Path, mounts: list[Path]) -> None:
    """After a failure: unmount the test's filesystems, kill the serving process by pid, detach
    its loop devices and unmount its (dead) FUSE files."""
    for m in reversed(mounts):
        sh("umount", str(m), check=False)
    kill_pid(state_pid(home / "p"))
    out = sh("losetup", "-a", "-O", "NAME,BACK-FILE", "-n", check=False).stdout
    for line in out.splitlines():
        if str(home) in line:
            sh("losetup", "-d", line.split()[0], check=False)
    with open("/proc/self/mounts") as f:
        stale = [line.split()[1] for line in f if line.split()[1].startswith(str(home))]
    for m in sorted(stale, key=len, reverse=True):
        sh("umount", "-l", m, check=False)


def test_images_containers_and_volumes(home, tmp_path, layers):
    l1, l2 = layers
    mounts: list[Path] = []
    try:
        tp(home, "create", "p", "--size", "2G", check=0)
        tp(home, "runtime", "configure", "p", "--base-size", "512M", check=0)
        r = tp(home, "image", "import", "p", "img", str(l1), str(l2), check=0)
        assert r.out.count("unpacked sha256:") == 2
        r = tp(home, "image", "import", "p", "base", str(l1), check=0)
        assert r.out.count("shared sha256:") == 1            # the same first layer: shared
        _wait_unserved(home / "p")
        for c in ("c1", "c2"):
            tp(home, "container", "create", "p", c, "--image", "img", check=0)
        tp(home, "volume", "create", "p", "data", "--size", "64M", check=0)
        m1, m2 = tmp_path / "m1", tmp_path / "m2"
        m1.mkdir()
        m2.mkdir()
        tp(home, "container", "mount", "p/c1", str(m1), "--volume", "data:/srv", check=0)
        mounts += [m1, m1 / "srv"]
        tp(home, "container", "mount", "p/c2", str(m2), check=0)
        mounts.append(m2)
        assert (m1 / "etc/added.txt").read_text() == "from layer 2"
        assert not (m1 / "etc/removeme").exists()                   # whiteout
        assert sorted(p.name for p in (m1 / "data").iterdir()) == ["upper.txt"]   # opaque
        assert (m1 / "big").stat().st_size == 8 * MiB
        (m1 / "mine").write_text("c1")
        (m2 / "mine").write_text("c2")
        (m1 / "srv" / "kept").write_text("data volume")
        assert (m1 / "mine").read_text() == "c1" and (m2 / "mine").read_text() == "c2"
        ls = json.loads(tp(home, "runtime", "ls", "p", "--json", check=0).out)
        keys = {s["key"]: s for s in ls["snapshots"]}
        assert keys["containers/c1"]["device"].startswith("/dev/loop")
        assert keys["containers/c1"]["kind"] == "active"
        assert [i["name"] for i in ls["images"]] == ["base", "img"]
        assert [v["name"] for v in ls["volumes"]] == ["data"]
        # In use: the layer has children, the mounted data volume is busy.
        top = next(i["top"] for i in ls["images"] if i["name"] == "img")
        assert_one_line_error(tp(home, "volume", "delete", "p", "data"), 5, "in use")
        tp(home, "container", "unmount", "p/c1", check=0)
        mounts = [m for m in mounts if m.parent != m1 and m != m1]
        tp(home, "container", "unmount", "p/c2", check=0)
        mounts.remove(m2)
        _wait_unserved(home / "p")
        usage = {u["key"]: u for u in json.loads(tp(home, "runtime", "usage", "p", "--json",
                                                    check=0).out)}
        assert 0 < usage["containers/c1"]["blocks"] < 8 * MiB // (64 * 1024)
        before = json.loads(tp(home, "stat", "p", "--json", check=0).out)["data_blocks_free"]
        tp(home, "container", "delete", "p/c1", check=0)
        after = json.loads(tp(home, "stat", "p", "--json", check=0).out)["data_blocks_free"]
        assert after >= before + usage["containers/c1"]["blocks"]
        # The data volume outlives the container: mounted into c2, its file is there.
        tp(home, "container", "mount", "p/c2", str(m2), "--volume", "data:/srv", check=0)
        mounts += [m2, m2 / "srv"]
        assert (m2 / "srv" / "kept").read_text() == "data volume"
        tp(home, "container", "unmount", "p/c2", check=0)
        mounts = [m for m in mounts if m != m2 and m.parent != m2]
        assert_one_line_error(tp(home, "container", "create", "p", "c3", "--image", "nope"), 1,
                              "image 'nope' does not exist")
        tp(home, "container", "delete", "p/c2", check=0)
        tp(home, "image", "delete", "p", "img", "--layers", check=0)
        ls = json.loads(tp(home, "runtime", "ls", "p", "--json", check=0).out)
        assert top not in {s["key"] for s in ls["snapshots"]}
        assert [i["name"] for i in ls["images"]] == ["base"]
        assert tp(home, "runtime", "cleanup", "p", check=0).out.startswith("deleted 0 volume")
        _wait_unserved(home / "p")
    finally:
        _cleanup(home, mounts)
    out = sh("losetup", "-a", "-n", check=False).stdout
    assert str(home) not in out
    with open("/proc/self/mounts") as f:
        assert str(tmp_path) not in f.read()
    assert_checks_pass(home / "p" / "metadata")


def test_bad_layers_leave_no_image(home, tmp_path, layers):
    l1, _ = layers
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar" * 100)
    evil = layer(tmp_path / "evil.tar", [("../outside", b"x")])
    try:
        tp(home, "create", "p", "--size", "1G", check=0)
        tp(home, "runtime", "configure", "p", "--base-size", "256M", check=0)
        for path in (bad, evil):
            r = tp(home, "image", "import", "p", "img", str(l1), str(path))
            assert r.returncode == 2, (r.out, r.stderr)
            assert r.stderr.startswith("thinpool: ") and "Traceback" not in r.stderr
        assert not (tmp_path.parent / "outside").exists()
        _wait_unserved(home / "p")
        ls = json.loads(tp(home, "runtime", "ls", "p", "--json", check=0).out)
        assert ls["images"] == []
        # The first layer is complete and stays (shared by a later import); nothing else.
        assert [s["kind"] for s in ls["snapshots"]] == ["committed"]
        # Its volume is the runtime's: the volume commands refuse to change it behind its back.
        vol = ls["snapshots"][0]["volume"]
        for args in (("delete", f"p/{vol}"), ("rename", f"p/{vol}", "x"),
                     ("revert", f"p/{vol}", vol)):
            assert_one_line_error(tp(home, *args), 5, "belongs to the container runtime",
                                  "snapshot 'sha256:")
        assert vol in json.dumps(json.loads(tp(home, "stat", "p", "--json", check=0).out))
        r = tp(home, "runtime", "configure", "p", "--min-free-space", "100")
        assert_one_line_error(r, 2, "percentage")
    finally:
        _cleanup(home, [])
    assert_checks_pass(home / "p" / "metadata")
