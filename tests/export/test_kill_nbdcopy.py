"""SIGKILL of the serving daemon during an ``nbdcopy`` into a volume whose blocks a snapshot
shares (so the copy's writes break the sharing: copy-on-write while the process dies).

First ``nbdcopy --flush`` fills the volume with A and completes (all of it durable); a snapshot
is taken (the command goes to the daemon); a second nbdcopy starts writing B and the daemon is
killed at a random moment. Afterwards, as the kill left the pool: both checkers pass; the
snapshot reads exactly A; every 4 KiB of the volume reads as A or as B (a write in flight may
have landed, partly), never as zeros or anything else; and a new ``thinpool serve`` serves it."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time

import pytest

from tests.cli.helpers import tp
from tests.export.test_serve_cli import kill_pid, state_pid
from tests.tptools import assert_checks_pass, requires_tools

pytestmark = [requires_tools,
              pytest.mark.skipif(shutil.which("nbdcopy") is None,
                                 reason="nbdcopy not installed (Debian libnbd-bin)")]

SIZE = 32 << 20
CHUNK = 4096


@pytest.mark.parametrize("seed", [1, 2])
def test_kill_during_nbdcopy_onto_shared_blocks(home, tmp_path, seed):
    rng = random.Random(seed)
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(rng.randbytes(SIZE))
    b.write_bytes(rng.randbytes(SIZE))
    tp(home, "create", "p", "--size", "128M", check=0)
    tp(home, "create", "p/v", "--size", str(SIZE), check=0)
    pool = home / "p"
    uri = f"nbd+unix:///v?socket={pool / 'nbd.sock'}"
    copy = None
    try:
        tp(home, "serve", "p", "--daemon", check=0)
        subprocess.run(["nbdcopy", "--flush", str(a), uri], check=True, timeout=120)
        tp(home, "snapshot", "p/v", "s", check=0)
        pid = state_pid(pool)
        copy = subprocess.Popen(["nbdcopy", "--request-size=65536", str(b), uri],
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.02, 0.25))
        os.kill(pid, signal.SIGKILL)
        copy.wait(60)
        deadline = time.monotonic() + 10
        while state_pid(pool) is not None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        if copy is not None and copy.poll() is None:
            copy.kill()
        kill_pid(state_pid(pool))
    assert_checks_pass(pool / "metadata")
    tp(home, "check", "p", check=0)
    want_a, want_b = a.read_bytes(), b.read_bytes()
    assert tp(home, "read", "p/s", check=0).stdout == want_a
    got = tp(home, "read", "p/v", check=0).stdout
    assert len(got) == SIZE
    landed = 0
    for off in range(0, SIZE, CHUNK):
        piece = got[off:off + CHUNK]
        if piece == want_b[off:off + CHUNK]:
            landed += 1
        else:
            assert piece == want_a[off:off + CHUNK], f"offset {off}: neither A nor B"
    # a new server takes over the dead one's files
    try:
        tp(home, "serve", "p", "--daemon", check=0)
        r = subprocess.run(["nbdcopy", uri, str(tmp_path / "out")], timeout=120)
        assert r.returncode == 0 and (tmp_path / "out").read_bytes() == got
        tp(home, "serve", "p", "--stop", check=0)
    finally:
        kill_pid(state_pid(pool))
    assert_checks_pass(pool / "metadata")
