"""``thinpool attach`` / ``detach`` as a user runs them: a volume as /dev/loopN through the
pool's thinpool serve (started by attach when none runs, gone after the last detach), ext4 on
it, a snapshot taken while it is attached (the command goes to the server), the snapshot
attached read-only showing the files as they were, detach refused while mounted (exit 5) and a
volume in use refused for delete (exit 5). Mounts, loop devices and the server are torn down in
``finally`` (filesystem, then detach, then the server by pid); the pool passes both checkers."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.cli.helpers import assert_one_line_error, tp
from tests.export.test_fuse import MISSING, _umount, sh
from tests.export.test_serve_cli import kill_pid, state_pid
from tests.tptools import assert_checks_pass, requires_tools

pytestmark = [requires_tools,
              pytest.mark.skipif(MISSING is not None, reason=f"FUSE tests: {MISSING}")]


def _loops_under(root) -> list[str]:
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(root) in line]


def test_attach_mkfs_snapshot_detach(home, tmp_path):
    tp(home, "create", "p", "--size", "256M", check=0)
    tp(home, "create", "p/v", "--size", "64M", check=0)
    pool = home / "p"
    mounts, pid = [], None
    try:
        r = tp(home, "attach", "p/v", check=0)
        loop = r.out.strip()
        pid = state_pid(pool)
        assert loop.startswith("/dev/loop") and pid is not None
        assert r.stderr == ""                   # the hint is for a terminal only
        sh("mkfs.ext4", "-q", loop)
        m = tmp_path / "m"
        m.mkdir()
        sh("mount", loop, str(m))
        mounts.append(m)
        (m / "hello").write_text("before\n")
        os.sync()
        doc = json.loads(tp(home, "stat", "p/v", "--json", check=0).stdout)
        assert doc["attached"] == loop
        assert_one_line_error(tp(home, "detach", "p/v"), 5, "mounted")
        assert_one_line_error(tp(home, "delete", "p/v"), 5, f"attached as {loop}")
        _umount(m)
        mounts.remove(m)
        # a snapshot while attached: the command goes to the server holding the pool
        tp(home, "snapshot", "p/v", "s", check=0)
        sh("mount", loop, str(m))
        mounts.append(m)
        (m / "hello").write_text("after\n")
        _umount(m)
        mounts.remove(m)
        r = tp(home, "attach", "p/s", "--read-only", "--json", check=0)
        snap_loop = json.loads(r.stdout)["loop_device"]
        assert snap_loop != loop
        s = tmp_path / "s"
        s.mkdir()
        sh("mount", "-o", "ro,noload", snap_loop, str(s))
        mounts.append(s)
        assert (s / "hello").read_text() == "before\n"
        _umount(s)
        mounts.remove(s)
        sh("e2fsck", "-fn", snap_loop)
        sh("e2fsck", "-fn", loop)
        r = tp(home, "detach", snap_loop, check=0)          # by its loop device
        assert r.out.strip() == f"detached p/s from {snap_loop}"
        assert state_pid(pool) == pid                       # p/v is still attached
        tp(home, "detach", "p/v", check=0)
        assert state_pid(pool) is None                      # the server attach started is gone
        assert_one_line_error(tp(home, "detach", "p/v"), 1, "not attached")
        assert_one_line_error(tp(home, "detach", "/dev/loop-nope"), 1, "not a volume attached")
    finally:
        for where in reversed(mounts):
            _umount(where)
        if state_pid(pool) is not None:
            for vol in ("s", "v"):
                tp(home, "detach", f"p/{vol}")
        kill_pid(state_pid(pool) or pid)
    assert _loops_under(home) == []
    tp(home, "check", "p", check=0)
    assert_checks_pass(pool / "metadata")
