"""Starting a container through the real containerd: thinpool's snapshotter against containerd's
own overlayfs snapshotter (workload 15 of the table; the container-runtime issue asks for it,
with no target).

A private containerd (``tests/runtime/containerd.py``, everything under a temporary directory)
with thinpool's proxy snapshotter (``thinpool snapshotter serve POOL --socket S``, a process of
its own, foreground), and one image (``tests/runtime/oci.py``: static busybox and a second layer)
imported once into each snapshotter. Each round, timed: ``ctr run --rm --snapshotter NAME IMAGE
ID /bin/true``: the snapshot of the image's top layer prepared and mounted, the shim and runc
started, the process run, the task and the container removed. thinpool's side prepares a thin
snapshot, attaches its block device (FUSE file + loop device) and containerd mounts its ext4;
overlayfs's side makes two directories and mounts an overlay. The sides alternate (one overlayfs
round before each thinpool round); 10 rounds, 1 warm-up. Needs root, containerd, runc, a static
busybox, /dev/fuse, the ``fuse`` and ``runtime`` extras; skipped otherwise with the reason.
containerd, its shims and the snapshotter are stopped by pid in ``finally``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from ._util import alternate, tag, thinpool_argv

ROUNDS = 10
START = "15. ctr run --rm IMAGE /bin/true vs containerd's overlayfs snapshotter"


@pytest.fixture(scope="module")
def runtime():
    from tests.runtime.containerd import Containerd, skip_reason
    from tests.runtime.oci import MissingTool, two_layer_image
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    try:
        import grpc  # noqa: F401
        import thinpool.export.fuse  # noqa: F401
    except ImportError as e:
        pytest.skip(f"the runtime and fuse extras are needed: {e}")
    home = Path(tempfile.mkdtemp(prefix="tpbs-", dir="/tmp"))
    c = Containerd()
    snap = None
    try:
        try:
            image = two_layer_image(home / "image.tar", "localhost/bench/start:1")
        except MissingTool as e:
            pytest.skip(str(e))
        c.start()
        tp = [*thinpool_argv(), "--home", str(home)]
        subprocess.run([*tp, "create", "p", "--size", "4G"], check=True, capture_output=True)
        subprocess.run([*tp, "runtime", "configure", "p", "--base-size", "1G"], check=True,
                       capture_output=True)
        snap = subprocess.Popen([*tp, "snapshotter", "serve", "p", "--socket",
                                 str(c.snapshotter_socket)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not os.path.exists(c.snapshotter_socket):
            assert snap.poll() is None and time.monotonic() < deadline, "no snapshotter"
            time.sleep(0.05)
        c.wait_snapshotter()
        for name in ("thinpool", "overlayfs"):
            c.ctr("images", "import", "--snapshotter", name, "--all-platforms", str(image.path),
                  namespace="bench", timeout=120)
        yield c, image.ref
    finally:
        try:
            c.clear_namespace("bench")
        except Exception:                    # noqa: BLE001 - stop() below sweeps up regardless
            pass
        if snap is not None and snap.poll() is None:
            snap.send_signal(signal.SIGTERM)
            try:
                snap.wait(60)
            except subprocess.TimeoutExpired:
                snap.kill()
                snap.wait()
        c.stop(check=False)
        import shutil
        shutil.rmtree(home, ignore_errors=True)


def test_container_start(benchmark, runtime):
    c, ref = runtime
    n = iter(range(10 ** 6))

    def start(snapshotter: str) -> float:
        t0 = time.perf_counter()
        c.ctr("run", "--rm", "--snapshotter", snapshotter, ref, f"{snapshotter}-{next(n)}",
              "/bin/true", namespace="bench", timeout=120)
        return time.perf_counter() - t0

    setup, times = alternate(lambda: start("overlayfs"))
    benchmark.pedantic(start, args=("thinpool",), setup=setup, rounds=ROUNDS, warmup_rounds=1)
    tag(benchmark, START, "thinpool", "ms", label="thinpool snapshotter (ext4, FUSE + loop)")
    tag(benchmark, START, "baseline", "ms", label="containerd overlayfs", times=times[1:])
