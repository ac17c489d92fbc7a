"""The real-containerd harness itself, with containerd's stock ``overlayfs`` snapshotter (not
thinpool's): an image built by ``oci.py`` imports and runs with its whiteout and opaque directory
applied; containers of one image are isolated; four run at once; ``Containerd.stop`` leaves
nothing behind even after the daemon was SIGKILLed with a task running or failed to start, and
unmounts nested and busy mounts, yet spares processes not its own (the snapshotter's); and a proxy
snapshotter nobody listens on answers ``unavailable``.

Each test uses its own namespace (``ctr_namespace``), whose teardown fails when a task, container,
shim, mount, /run/containerd entry or cgroup directory of it is left. The tests that need their
own daemon start one and stop it in ``finally``, then check that nothing of it is left.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.runtime.containerd import (RUN_DIR, Containerd, assert_no_mounts, mounts_under,
                                     proc_table, skip_reason)

LAYERS_SCRIPT = r"""
test -f /etc/added.txt && echo "added=$(cat /etc/added.txt)"
test -e /etc/removeme && echo removeme=present || echo removeme=gone
test -e /data/lower.txt && echo lower=present || echo lower=gone
test -f /data/upper.txt && echo "upper=$(cat /data/upper.txt)"
echo etc: $(ls -A /etc)
echo data: $(ls -A /data)
echo bin: $(ls -A /bin | wc -l)
"""


def run_rm(c: Containerd, ns: str, ref: str, cid: str, script: str, *extra: str):
    return c.ctr("run", "--rm", "--snapshotter", "overlayfs", *extra, ref, cid,
                 "/bin/sh", "-c", script, namespace=ns)


def import_image(c: Containerd, ns: str, path: Path) -> None:
    c.ctr("images", "import", "--snapshotter", "overlayfs", "--all-platforms", str(path),
          namespace=ns)


def test_two_layer_image_runs_with_whiteout_and_opaque_dir(containerd, ctr_namespace,
                                                           two_layer_tar):
    import_image(containerd, ctr_namespace, two_layer_tar.path)
    refs = containerd.ctr("images", "ls", "-q", namespace=ctr_namespace).stdout.split()
    assert refs == [two_layer_tar.ref]
    r = run_rm(containerd, ctr_namespace, two_layer_tar.ref, "layers", LAYERS_SCRIPT)
    assert r.stdout.splitlines() == [
        "added=from layer 2",
        "removeme=gone",
        "lower=gone",
        "upper=upper",
        "etc: added.txt",            # no .wh.removeme either
        "data: upper.txt",           # no .wh..wh..opq, no lower.txt
        "bin: 16",                   # busybox and its 15 applets
    ]
    # the snapshots containerd made are named by the layers' chain IDs
    snaps = containerd.ctr("snapshots", "--snapshotter", "overlayfs", "ls",
                           namespace=ctr_namespace).stdout
    for chain_id in two_layer_tar.chain_ids:
        assert chain_id in snaps


def test_two_containers_of_one_image_see_only_their_own_files(containerd, ctr_namespace,
                                                              two_layer_tar):
    import_image(containerd, ctr_namespace, two_layer_tar.path)
    ids = ("left", "right")
    for cid in ids:
        containerd.ctr("run", "-d", "--snapshotter", "overlayfs", two_layer_tar.ref, cid,
                       "sleep", "60", namespace=ctr_namespace)
    for cid in ids:
        containerd.ctr("tasks", "exec", "--exec-id", "write", cid, "/bin/sh", "-c",
                       f"echo written-by-{cid} > /data/own-{cid} && sync",
                       namespace=ctr_namespace)
    for cid in ids:
        r = containerd.ctr("tasks", "exec", "--exec-id", "read", cid, "/bin/sh", "-c",
                           "ls -A /data; cat /data/own-*", namespace=ctr_namespace)
        assert r.stdout.splitlines() == [f"own-{cid}", "upper.txt", f"written-by-{cid}"]
    for cid in ids:
        containerd.ctr("tasks", "rm", "-f", cid, namespace=ctr_namespace)
        containerd.ctr("containers", "rm", cid, namespace=ctr_namespace)
    assert containerd.ctr("containers", "ls", "-q", namespace=ctr_namespace).stdout == ""
    # a new container of the image starts from the image again
    r = run_rm(containerd, ctr_namespace, two_layer_tar.ref, "again", "ls -A /data")
    assert r.stdout.split() == ["upper.txt"]


def test_four_containers_run_at_once(containerd, ctr_namespace, two_layer_tar, tmp_path,
                                     record_property):
    """Each container marks a shared bind-mounted directory, then waits (at most 20 s) until all
    four marks are there: all four must be running at the same time to print ``saw 4``."""
    import_image(containerd, ctr_namespace, two_layer_tar.path)
    shared = tmp_path / "shared"
    shared.mkdir()
    mount = ("--mount", f"type=bind,src={shared},dst=/shared,options=rbind:rw")

    def one(i: int):
        script = (f"touch /shared/c{i}; n=0; "
                  "while test $(ls -A /shared | wc -l) -lt 4 && test $n -lt 200; do "
                  "sleep 0.1; n=$((n+1)); done; "
                  f"echo c{i} saw $(ls -A /shared | wc -l) $(cat /etc/added.txt)")
        t0 = time.monotonic()
        r = run_rm(containerd, ctr_namespace, two_layer_tar.ref, f"par{i}", script, *mount)
        return r.stdout.strip(), time.monotonic() - t0

    t0 = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    record_property("four_parallel_seconds", round(time.monotonic() - t0, 3))
    assert [out for out, _s in results] == [f"c{i} saw 4 from layer 2" for i in range(4)]
    assert sorted(os.listdir(shared)) == ["c0", "c1", "c2", "c3"]


def test_namespace_cleanup_finds_a_running_task(containerd, ctr_namespace, two_layer_tar):
    """While a task runs, ``namespace_leftovers`` names its task, container, shim, the container's
    process, the rootfs mount, its runc state and shim socket under /run/containerd and its cgroup
    directories; ``clear_namespace`` then leaves none of them."""
    import_image(containerd, ctr_namespace, two_layer_tar.path)
    containerd.ctr("run", "-d", "--snapshotter", "overlayfs", two_layer_tar.ref, "long",
                   "sleep", "300", namespace=ctr_namespace)
    left = containerd.namespace_leftovers(ctr_namespace)
    kinds = {item.split()[0] for item in left}
    assert {"task", "container", "process", "mount", "run"} <= kinds
    assert "task long" in left and "container long" in left
    assert any(item.startswith("process ") and item.endswith(" sleep 300") for item in left)
    assert f"run entry {RUN_DIR / 'runc' / ctr_namespace / 'long'}" in left
    rootfs = containerd.state / "io.containerd.runtime.v2.task" / ctr_namespace / "long" / "rootfs"
    assert f"mount {rootfs}" in left
    containerd.clear_namespace(ctr_namespace)
    assert containerd.wait_namespace_clean(ctr_namespace) == []


needs_containerd = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))


def _alive(pid: int) -> bool:
    entry = proc_table().get(pid)
    return entry is not None and entry[1] not in ("Z", "X")


@needs_containerd
def test_stop_after_the_daemon_was_killed_with_a_task_running(two_layer_tar):
    """SIGKILL containerd while a task runs: the shim and the container's process outlive it
    (and keep the rootfs mounted); ``stop`` then kills them, unmounts, clears /run/containerd of
    them and removes the directory; a second ``stop`` does nothing."""
    ns = f"tpkill{os.getpid()}"
    c = Containerd()
    try:
        c.start()
        import_image(c, ns, two_layer_tar.path)
        c.ctr("run", "-d", "--snapshotter", "overlayfs", two_layer_tar.ref, "victim",
              "sleep", "300", namespace=ns)
        procs = c.processes(ns)
        assert len(procs) == 2          # the shim and sleep
        os.kill(c.pid, signal.SIGKILL)
        c.proc.wait(timeout=10)
        assert all(_alive(pid) for pid in procs)
        assert len(c.processes()) == 2
        assert c.run_entries(ns) != []
        assert any(str(c.dir) in line for line in open("/proc/mounts"))
    finally:
        c.stop()
    assert c.leftovers() == []
    assert not any(_alive(pid) for pid in procs)
    assert_no_mounts(c.dir)
    assert not (RUN_DIR / "runc" / ns).exists()
    assert not c.dir.exists()
    c.stop()                            # idempotent
    assert c.leftovers() == []


@needs_containerd
def test_stop_after_a_failed_start_and_without_start():
    """A daemon that cannot bind its socket exits at once: ``start`` raises with the log's tail
    and ``stop`` removes everything; ``stop`` without ``start`` removes the empty directory."""
    c = Containerd()
    try:
        os.mkdir(c.address)             # a non-empty directory where the socket must go
        Path(c.address, "keep").write_text("x")
        with pytest.raises(RuntimeError, match="containerd exited"):
            c.start(timeout=10)
    finally:
        c.stop()
    assert not c.dir.exists() and c.leftovers() == []
    d = Containerd()
    d.stop()
    d.stop()
    assert not d.dir.exists()


@needs_containerd
def test_stop_spares_a_process_that_only_names_the_snapshotter_socket():
    """The snapshotter's own process names ``snapshotter_socket`` (inside this instance's
    directory); it is not this instance's to kill."""
    c = Containerd()
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                          "--listen", c.snapshotter_socket])
    try:
        c.start()
        assert set(c.processes()) == {c.pid}
        c.stop()
        assert p.poll() is None
        assert c.leftovers() == []
    finally:
        c.stop(check=False)
        p.kill()
        p.wait(timeout=10)


@needs_containerd
def test_stop_unmounts_nested_and_busy_mounts():
    """Mounts under the directory go deepest first; one held busy by a process that is not this
    instance's (its working directory is there) goes with ``umount -l``."""
    c = Containerd()
    outer, inner = c.state / "outer", c.state / "outer" / "inner"
    holder = None
    try:
        outer.mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(outer)], check=True)
        inner.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(inner)], check=True)
        holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                  cwd=inner)
        assert mounts_under(c.dir) == [str(outer), str(inner)]
        busy = subprocess.run(["umount", str(inner)], capture_output=True)
        assert busy.returncode != 0                 # busy: plain umount fails
        c.stop()
        assert holder.poll() is None                # not ours: not killed
    finally:
        c.stop(check=False)
        if holder is not None:
            holder.kill()
            holder.wait(timeout=10)
    assert mounts_under(c.dir) == [] and not c.dir.exists()
    assert_no_mounts(c.dir)


def _prepare(c: Containerd, ns: str, key: str):
    t0 = time.monotonic()
    r = c.ctr("snapshots", "--snapshotter", "thinpool", "prepare", key, namespace=ns,
              check=False, timeout=30)
    return r, time.monotonic() - t0


@needs_containerd
def test_proxy_snapshotter_nobody_listens_on_is_unavailable(two_layer_tar, record_property):
    """What containerd 1.6.20 does with a proxy snapshotter nobody listens on (observed here):

    * ``ctr plugins ls`` shows ``thinpool`` ``ok`` with no socket file at all: it dials lazily.
    * The first call that reaches the backend (Prepare) fails after about 1 s, containerd's dial
      timeout, with ``ctr: connection error: desc = "transport: Error while dialing dial
      unix:///PATH: timeout": unavailable``; the next ones fail at once (about 10 ms) with the
      same cached error while gRPC backs off.
    * With a socket file that nobody accepts on (bound, then closed), the error becomes ``dial
      unix PATH: connect: connection refused": unavailable`` after the next redial (about 1 s).
    * ``ctr snapshots ls``, ``usage`` (with no snapshots) and ``info`` of an unknown key never reach
      the backend: containerd answers them from its own metadata (empty, empty, not found).
    * ``ctr images import --snapshotter thinpool`` fails in "failed to prepare extraction
      snapshot" with the same error, yet the image stays listed; overlayfs keeps working.
    """
    ns = f"tpunav{os.getpid()}"
    c = Containerd()
    try:
        c.start()
        assert not os.path.exists(c.snapshotter_socket)
        plugins = c.ctr("plugins", "ls").stdout.splitlines()
        assert any(line.split()[:2] == ["io.containerd.snapshotter.v1", "thinpool"]
                   and line.split()[-1] == "ok" for line in plugins)
        first, first_s = _prepare(c, ns, "k1")
        again, again_s = _prepare(c, ns, "k2")
        record_property("first_unavailable_seconds", round(first_s, 3))
        record_property("next_unavailable_seconds", round(again_s, 3))
        for r in (first, again):
            assert r.returncode != 0
            assert r.stderr.strip().endswith(": unavailable"), r.stderr
            assert f"dial unix://{c.snapshotter_socket}: timeout" in r.stderr, r.stderr
        assert first_s < 5.0 and again_s < first_s
        for args in (("ls",), ("usage",)):
            r = c.ctr("snapshots", "--snapshotter", "thinpool", *args, namespace=ns)
            assert len(r.stdout.strip().splitlines()) == 1, r.stdout     # the header only
        r = c.ctr("snapshots", "--snapshotter", "thinpool", "info", "nokey", namespace=ns,
                  check=False)
        assert r.returncode != 0 and "not found" in r.stderr, r.stderr

        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(c.snapshotter_socket)
        s.close()                       # the file stays; nobody listens
        t0 = time.monotonic()
        while True:
            r, _ = _prepare(c, ns, "k3")
            assert r.returncode != 0 and r.stderr.strip().endswith(": unavailable"), r.stderr
            if "connect: connection refused" in r.stderr:
                break
            assert time.monotonic() - t0 < 15.0, r.stderr
            time.sleep(0.05)
        record_property("refused_after_seconds", round(time.monotonic() - t0, 3))

        r = c.ctr("images", "import", "--snapshotter", "thinpool", str(two_layer_tar.path),
                  namespace=ns, check=False)
        assert r.returncode != 0, r.stdout
        assert "failed to prepare extraction snapshot" in r.stderr, r.stderr
        assert r.stderr.strip().endswith(": unavailable"), r.stderr
        assert c.ctr("images", "ls", "-q", namespace=ns).stdout.split() == [two_layer_tar.ref]
        import_image(c, ns, two_layer_tar.path)
        out = run_rm(c, ns, two_layer_tar.ref, "still", "cat /etc/added.txt").stdout
        assert out == "from layer 2\n"
        with pytest.raises(AssertionError, match="not reachable.*: unavailable"):
            c.wait_snapshotter(timeout=1.0)
    finally:
        c.stop()
    assert c.leftovers() == []
    assert_no_mounts(c.dir)
