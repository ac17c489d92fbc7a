"""SIGKILL of ``thinpool snapshotter serve`` while containerd drives it: a stream of ``ctr
snapshots prepare``, ``commit`` and ``rm`` runs against it and the process is killed at a
random moment (three rounds, different moments), then started again over what the kill left.
After each restart: the pool passes both checkers; thinpool's records own exactly its runtime
volumes (no thin device orphaned, none missing); and containerd's view of the snapshots and
thinpool's agree (after containerd's garbage collector has run: it removes asynchronously what
containerd deleted from its own records). The dead process's FUSE files and loop devices are
swept by the new one. Everything is stopped by pid in ``finally``."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from thinpool import Pool
from thinpool.runtime import records as rec
from tests.cli.helpers import THINPOOL, clean_env, tp
from tests.export.test_fuse import MISSING, sh
from tests.tptools import assert_checks_pass, requires_tools

pytestmark = [pytest.mark.skipif(MISSING is not None, reason=f"thinpool snapshotter: {MISSING}"),
              requires_tools]

SN = ("snapshots", "--snapshotter", "thinpool")


def _start(home: Path, sock: str) -> subprocess.Popen:
    log = open(home / "snapshotter.log", "ab")
    p = subprocess.Popen([*THINPOOL, "--home", str(home), "snapshotter", "serve", "p",
                          "--socket", sock], stdout=log, stderr=subprocess.STDOUT,
                         env=clean_env())
    deadline = time.monotonic() + 30
    while not os.path.exists(sock):
        assert p.poll() is None, (home / "snapshotter.log").read_text()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return p


def _stop(p: subprocess.Popen | None, sig=signal.SIGTERM) -> None:
    if p is not None and p.poll() is None:
        p.send_signal(sig)
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _containerd_view(c, ns) -> set[str]:
    out = c.ctr(*SN, "ls", namespace=ns).stdout.splitlines()[1:]
    return {line.split()[0] for line in out if line.strip()}


def _thinpool_view(home: Path, ns: str) -> set[str]:
    ls = json.loads(tp(home, "runtime", "ls", "p", "--json", check=0).out)
    # containerd's keys reach the snapshotter as NAMESPACE/SEQ/KEY
    return {s["key"].split("/", 2)[2] for s in ls["snapshots"] if s["key"].startswith(f"{ns}/")}


def _owned_and_volumes(home: Path) -> tuple[set[str], set[str], list]:
    with open(home / "p" / rec.FILE_NAME) as f:
        doc = json.load(f)
    owned = {s["volume"] for s in doc["snapshots"].values()} | set(doc["deferred"])
    owned |= {p["volume"] for p in doc["pending"]}
    vols = {v["name"] for v in json.loads(tp(home, "stat", "p", "--json", check=0).out)["volumes"]}
    return owned, {v for v in vols if v.startswith(rec.SNAPSHOT_PREFIX)}, doc["pending"]


def test_kill_during_prepare_commit_remove(containerd, ctr_namespace):
    ns = ctr_namespace
    sock = str(containerd.snapshotter_socket)
    home = Path(tempfile.mkdtemp(prefix="tpk-", dir="/tmp"))
    proc = None
    rng = random.Random(7)
    try:
        tp(home, "create", "p", "--size", "4G", check=0)
        tp(home, "runtime", "configure", "p", "--base-size", "256M", check=0)
        proc = _start(home, sock)
        containerd.wait_snapshotter()
        containerd.ctr(*SN, "prepare", "base-w", namespace=ns)
        containerd.ctr(*SN, "commit", "base", "base-w", namespace=ns)
        n = 0
        for round_ in range(3):
            stop = threading.Event()

            def work(first: int) -> None:
                i = first
                while not stop.is_set():
                    for args in (("prepare", f"w{i}", "base"), ("commit", f"l{i}", f"w{i}"),
                                 ("prepare", f"x{i}", f"l{i}"), ("rm", f"x{i}"),
                                 ("rm", f"l{i}")):
                        if stop.is_set():
                            return
                        containerd.ctr(*SN, *args, namespace=ns, check=False, timeout=30)
                    i += 1

            t = threading.Thread(target=work, args=(n * 1000,), daemon=True)
            t.start()
            time.sleep(rng.uniform(0.3, 2.0))
            _stop(proc, signal.SIGKILL)             # in the middle of whatever it was doing
            stop.set()
            t.join(60)
            n += 1
            with Pool.open(home / "p", read_only=True) as pool:    # as the kill left it
                assert pool.volumes() is not None
            assert_checks_pass(home / "p" / "metadata")
            proc = _start(home, sock)
            containerd.wait_snapshotter()
            # thinpool's records own exactly its runtime volumes (read when containerd's
            # asynchronous removals, e.g. of wait_snapshotter's probe, have settled).
            deadline = time.monotonic() + 30
            while True:
                owned, runtime_vols, pending = _owned_and_volumes(home)
                if runtime_vols == owned and pending == []:
                    break
                assert time.monotonic() < deadline, (round_, runtime_vols, owned, pending)
                time.sleep(0.2)
            # containerd's view and thinpool's agree once its garbage collector has removed what
            # containerd itself no longer has (a removal schedules a collection).
            containerd.ctr(*SN, "prepare", f"gc{round_}", "base", namespace=ns)
            containerd.ctr(*SN, "rm", f"gc{round_}", namespace=ns)
            deadline = time.monotonic() + 30
            while _containerd_view(containerd, ns) != _thinpool_view(home, ns):
                assert time.monotonic() < deadline, (round_, _containerd_view(containerd, ns),
                                                     _thinpool_view(home, ns))
                time.sleep(0.2)
        # clean up through containerd: leaves first, as often as it takes
        for _ in range(10):
            left = _containerd_view(containerd, ns)
            if not left:
                break
            for key in left:
                containerd.ctr(*SN, "rm", key, namespace=ns, check=False)
    finally:
        _stop(proc)
        for line in sh("losetup", "-a", "-n", check=False).stdout.splitlines():
            if str(home) in line:
                sh("losetup", "-d", line.split(":")[0], check=False)
        with open("/proc/self/mounts") as f:
            stale = [ln.split()[1] for ln in f if ln.split()[1].startswith(str(home))]
        for m in sorted(stale, key=len, reverse=True):
            sh("umount", "-l", m, check=False)
    try:
        assert str(home) not in sh("losetup", "-a", "-n", check=False).stdout
        with open("/proc/self/mounts") as f:
            assert str(home) not in f.read()
        assert_checks_pass(home / "p" / "metadata")
    finally:
        import shutil
        shutil.rmtree(home, ignore_errors=True)
