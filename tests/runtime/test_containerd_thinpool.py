"""thinpool as containerd's snapshotter, for real: ``thinpool snapshotter serve`` (a process of
its own, started once for the module and stopped by pid in ``finally``) behind the private
containerd of conftest.py, images imported and containers run with ``--snapshotter thinpool``.

What is checked, each against containerd's own view and thinpool's: an image's layers become
committed thin snapshots named by their chain ids and a container sees the second layer's file,
not the whited-out one and not the opaque directory's old content; two containers of one image
see only their own files; ``ctr snapshots usage`` reports what ``thinpool runtime usage`` counts;
a container's snapshot committed and mounted as the root of a new container has its changes;
removing containers gives their blocks back to the pool; four containers run at once. At the
end nothing of thinpool is left attached or mounted, and both checkers pass on the pool."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.cli.helpers import THINPOOL, clean_env, tp
from tests.export.test_fuse import MISSING, sh
from tests.tptools import assert_checks_pass, requires_tools

pytestmark = [pytest.mark.skipif(MISSING is not None, reason=f"thinpool snapshotter: {MISSING}"),
              requires_tools]

LAYERS_SCRIPT = ("cat /etc/added.txt; echo; test -e /etc/removeme && echo removeme || "
                 "echo no-removeme; ls -A /data")


@pytest.fixture(scope="module")
def snapshotter(containerd):
    """(home, process): pool ``p`` served to containerd at its snapshotter socket."""
    home = Path(tempfile.mkdtemp(prefix="tpc-", dir="/tmp"))
    proc = None
    try:
        tp(home, "create", "p", "--size", "8G", check=0)
        tp(home, "runtime", "configure", "p", "--base-size", "1G", check=0)
        log = open(home / "snapshotter.log", "wb")
        proc = subprocess.Popen([*THINPOOL, "--home", str(home), "snapshotter", "serve", "p",
                                 "--socket", str(containerd.snapshotter_socket)],
                                stdout=log, stderr=subprocess.STDOUT, env=clean_env())
        deadline = time.monotonic() + 30
        while not os.path.exists(containerd.snapshotter_socket):
            assert proc.poll() is None, (home / "snapshotter.log").read_text()
            assert time.monotonic() < deadline, "the snapshotter did not listen"
            time.sleep(0.05)
        containerd.wait_snapshotter()
        yield home, proc
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        out = sh("losetup", "-a", "-n", check=False).stdout
        for line in out.splitlines():
            if str(home) in line:
                sh("losetup", "-d", line.split(":")[0], check=False)
    try:
        assert proc.returncode == 0, (home / "snapshotter.log").read_text()[-3000:]
        assert str(home) not in sh("losetup", "-a", "-n", check=False).stdout
        with open("/proc/self/mounts") as f:
            assert str(home) not in f.read()
        assert_checks_pass(home / "p" / "metadata")
    finally:
        import shutil
        shutil.rmtree(home, ignore_errors=True)


def _import(c, ns, tar) -> None:
    c.ctr("images", "import", "--snapshotter", "thinpool", "--all-platforms", str(tar.path),
          namespace=ns, timeout=120)


def _runtime(home) -> dict:
    return json.loads(tp(home, "runtime", "ls", "p", "--json", check=0).out)


def _free(home) -> int:
    return json.loads(tp(home, "stat", "p", "--json", check=0).out)["data_blocks_free"]


def _wait_gone(home, suffixes: tuple[str, ...], timeout: float = 30.0) -> None:
    """containerd removes snapshots asynchronously (its garbage collector): wait for it."""
    deadline = time.monotonic() + timeout
    while any(s["key"].endswith(suffixes) for s in _runtime(home)["snapshots"]):
        assert time.monotonic() < deadline, _runtime(home)
        time.sleep(0.1)


def test_image_layers_are_thin_snapshots_and_containers_see_them(containerd, ctr_namespace,
                                                                 two_layer_tar, snapshotter):
    home, _ = snapshotter
    ns = ctr_namespace
    _import(containerd, ns, two_layer_tar)
    keys = {s["key"]: s for s in _runtime(home)["snapshots"]}
    committed = [k for k, s in keys.items() if s["kind"] == "committed" and k.startswith(ns)]
    for chain in two_layer_tar.chain_ids:
        assert any(k.endswith(chain) for k in committed), (chain, committed)
    r = containerd.ctr("run", "--rm", "--snapshotter", "thinpool", two_layer_tar.ref, "layers",
                       "/bin/sh", "-c", LAYERS_SCRIPT, namespace=ns, timeout=120)
    assert r.stdout.split() == ["from", "layer", "2", "no-removeme", "upper.txt"]


def test_containers_are_isolated_usage_agrees_and_blocks_come_back(containerd, ctr_namespace,
                                                                   two_layer_tar, snapshotter):
    home, _ = snapshotter
    ns = ctr_namespace
    _import(containerd, ns, two_layer_tar)
    free_before = _free(home)
    for cid in ("left", "right"):
        containerd.ctr("run", "-d", "--snapshotter", "thinpool", two_layer_tar.ref, cid,
                       "sleep", "60", namespace=ns, timeout=120)
    for cid in ("left", "right"):
        containerd.ctr("tasks", "exec", "--exec-id", "w", cid, "/bin/sh", "-c",
                       f"dd if=/dev/zero of=/data/own-{cid} bs=64k count=32 2>/dev/null; "
                       f"echo {cid} > /data/who; sync", namespace=ns)
    for cid in ("left", "right"):
        r = containerd.ctr("tasks", "exec", "--exec-id", "r", cid, "/bin/sh", "-c",
                           "ls -A /data; cat /data/who", namespace=ns)
        assert r.stdout.split() == [f"own-{cid}", "upper.txt", "who", cid]
    # containerd's usage of each container's snapshot is thinpool's count of its own blocks.
    ours = {u["key"]: u for u in json.loads(tp(home, "runtime", "usage", "p", "--json",
                                               check=0).out)}
    for cid in ("left", "right"):
        # (thinpool's keys carry containerd's namespace and a number: NS/N/ID)
        snap_key = next(k for k in ours if k.startswith(f"{ns}/") and k.endswith(f"/{cid}"))
        out = containerd.ctr("snapshots", "--snapshotter", "thinpool", "usage", cid,
                             namespace=ns).stdout.split()
        # KEY SIZE INODES, then: ID, the size as ctr prints it (value, unit), the inodes
        assert out[3] == cid, out
        size = ours[snap_key]["size"]
        assert size >= 32 * 64 * 1024
        assert abs(_ctr_size(out[4], out[5]) - size) <= 0.05 * size, (out, ours[snap_key])
    for cid in ("left", "right"):
        containerd.ctr("tasks", "rm", "-f", cid, namespace=ns)
        containerd.ctr("containers", "rm", cid, namespace=ns)
    _wait_gone(home, ("/left", "/right"))
    assert _free(home) >= free_before - 2      # (the filesystems' journals may keep a block)


def _ctr_size(value: str, unit: str) -> float:
    """A size as ctr prints it: a rounded value and an IEC unit ("2.6 MiB")."""
    return float(value) * {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[unit]


def test_a_committed_container_runs_with_its_changes(containerd, ctr_namespace, two_layer_tar,
                                                     snapshotter, tmp_path):
    home, _ = snapshotter
    ns = ctr_namespace
    _import(containerd, ns, two_layer_tar)
    containerd.ctr("run", "--snapshotter", "thinpool", two_layer_tar.ref, "builder", "/bin/sh",
                   "-c", "echo built > /etc/built.txt; rm /data/upper.txt; sync", namespace=ns,
                   timeout=120)
    containerd.ctr("tasks", "rm", "-f", "builder", namespace=ns, check=False)
    sn = ("snapshots", "--snapshotter", "thinpool")
    containerd.ctr(*sn, "commit", "built-layer", "builder", namespace=ns)
    containerd.ctr("containers", "rm", "builder", namespace=ns)
    containerd.ctr(*sn, "prepare", "next-root", "built-layer", namespace=ns)
    root = tmp_path / "root"
    root.mkdir()
    mounts = containerd.ctr(*sn, "mounts", str(root), "next-root", namespace=ns).stdout.strip()
    assert mounts.startswith("mount -t ext4 /dev/loop"), mounts
    sh("mount", "-t", "ext4", mounts.split()[3], str(root))    # (ctr prints an empty "-o")
    try:
        r = containerd.ctr("run", "--rm", "--rootfs", str(root), "from-commit", "/bin/sh", "-c",
                           "cat /etc/built.txt; ls -A /data", namespace=ns, timeout=120)
        assert r.stdout.split() == ["built"]
    finally:
        sh("umount", str(root), check=False)
    containerd.ctr(*sn, "rm", "next-root", namespace=ns)
    containerd.ctr(*sn, "rm", "built-layer", namespace=ns)


def test_four_containers_at_once(containerd, ctr_namespace, two_layer_tar, snapshotter):
    ns = ctr_namespace
    _import(containerd, ns, two_layer_tar)

    def one(i: int) -> str:
        return containerd.ctr("run", "--rm", "--snapshotter", "thinpool", two_layer_tar.ref,
                              f"par{i}", "/bin/sh", "-c", f"echo c{i} $(cat /etc/added.txt)",
                              namespace=ns, timeout=180).stdout.strip()

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(one, range(4))) == [f"c{i} from layer 2" for i in range(4)]
