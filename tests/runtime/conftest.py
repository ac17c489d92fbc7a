"""Fixtures of the container-runtime tests that drive a real containerd (``containerd.py``).

``containerd`` (session): a started private ``Containerd`` whose proxy snapshotter ``thinpool``
points at ``containerd.snapshotter_socket`` (a fixed path inside its temporary directory; nobody
listens there until a snapshotter fixture starts one and calls ``containerd.wait_snapshotter()``).
Skipped, naming what is missing, when not root or when containerd, ctr, runc or the runc shim are
not installed. Stopped in ``finally``; the teardown fails when anything of it is left (processes,
mounts, /run/containerd entries, cgroup directories, the directory).

``ctr_namespace`` (function): a namespace name unique to the test; afterwards every task,
container and image in it is removed, then the namespace, and the teardown fails when a shim, a
mount, a /run/containerd entry or a cgroup directory of it remains.

``two_layer_tar`` (session): the archive of ``oci.two_layer_image`` (ref ``TWO_LAYER_REF``);
skipped when there is no static busybox (Debian: busybox-static).
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.runtime.containerd import Containerd, assert_no_mounts, skip_reason
from tests.runtime.oci import Image, MissingTool, two_layer_image

TWO_LAYER_REF = "localhost/thinpool/two-layer:test"
_counter = itertools.count(1)


@pytest.fixture(scope="session")
def containerd():
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    c = Containerd()
    try:
        c.start()
        yield c
    finally:
        c.stop()
        assert c.proc is None or c.proc.poll() is not None
        assert_no_mounts(c.dir)


@pytest.fixture
def ctr_namespace(containerd, request):
    name = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name).strip("-")[:40].strip("-")
    ns = f"tp{os.getpid()}-{next(_counter)}-{name}"
    try:
        yield ns
    finally:
        containerd.clear_namespace(ns)
        assert containerd.wait_namespace_clean(ns) == []
        assert_no_mounts(containerd.state / "io.containerd.runtime.v2.task" / ns)


@pytest.fixture(scope="session")
def two_layer_tar() -> Image:
    d = Path(tempfile.mkdtemp(prefix="tpimg-", dir="/tmp"))
    try:
        try:
            image = two_layer_image(d / "two-layer.tar", TWO_LAYER_REF)
        except MissingTool as e:
            pytest.skip(str(e))
        yield image
    finally:
        shutil.rmtree(d, ignore_errors=True)
