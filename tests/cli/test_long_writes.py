"""Writes and imports as an admin runs them: a full pool stops them at once with an exact account,
long ones commit as they go, and the writer lock is not held while stdin is still coming."""

from __future__ import annotations

import random
import signal
import subprocess
import sys


from tests.cli.helpers import THINPOOL, assert_one_line_error, clean_env, tp
from tests.tptools import assert_checks_pass, requires_tools

BS = 64 * 1024
MiB = 1 << 20


def _pool(home, size="1M", vol="10M"):
    tp(home, "create", "demo", "--size", size, check=0)
    tp(home, "create", "demo/v", "--size", vol, check=0)


@requires_tools
def test_a_write_into_a_full_pool_fails_at_once_and_keeps_what_fit(home):
    _pool(home)                                        # 16 blocks; the default timeout is 60 s
    data = random.Random(1).randbytes(3 * MiB)
    r = tp(home, "write", "demo/v", "--offset", "100", input=data)
    assert_one_line_error(r, 4, "wrote 1048476 bytes", "offsets 100 to 1048576",
                          "33 more data block(s)", "--offset 1048576", "thinpool resize demo")
    got = tp(home, "read", "demo/v", "--length", str(MiB), check=0).stdout
    assert got == bytes(100) + data[:MiB - 100]        # committed, exactly what it said
    assert_checks_pass(home / "demo" / "metadata")
    # Grown, the rest goes in where it said.
    tp(home, "resize", "demo", "--size", "4M", check=0)
    tp(home, "write", "demo/v", "--offset", str(MiB), input=data[MiB - 100:], check=0)
    assert tp(home, "read", "demo/v", "--length", str(3 * MiB + 100), check=0).stdout == \
        bytes(100) + data


@requires_tools
def test_an_import_into_a_full_pool_keeps_an_exact_prefix(home, tmp_path):
    _pool(home)
    tp(home, "write", "demo/v", "--offset", str(MiB - BS), input=b"\xee" * BS, check=0)
    src = tmp_path / "img"
    data = bytearray(random.Random(2).randbytes(3 * MiB))
    data[2 * BS:3 * BS] = bytes(BS)                    # a zero block: left unmapped
    src.write_bytes(data)
    r = tp(home, "import", "demo/v", str(src))
    assert_one_line_error(r, 4, "out of data space", "run the import again")
    at = int(r.stderr.split("offsets 0 to ")[1].split(")")[0])
    assert at % BS == 0 and at >= 15 * BS
    got = tp(home, "read", "demo/v", "--length", str(3 * MiB), check=0).stdout
    assert got[:at] == data[:at]
    assert_checks_pass(home / "demo" / "metadata")


def test_write_takes_the_writer_lock_only_once_its_input_is_in(home):
    _pool(home, size="4M")
    w = subprocess.Popen([*THINPOOL, "--home", str(home), "write", "demo/v"], env=clean_env(),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        w.stdin.write(b"first part ")
        w.stdin.flush()
        # While its input is still open, other writers and readers go on.
        tp(home, "create", "demo/other", "--size", "1M", check=0)
        tp(home, "stat", "demo", check=0)
        w.stdin.write(b"and the rest")
        w.stdin.close()
        assert w.wait(30) == 0, w.stderr.read()
    finally:
        if w.poll() is None:
            w.kill()
            w.wait()
    assert tp(home, "read", "demo/v", "--length", "23", check=0).stdout == b"first part and the rest"


_KILL_AFTER_COMMITS = """
import os, signal, sys
import thinpool.cli.data as data
from thinpool.pool import Pool
from thinpool.volume import Volume
data.COMMIT_BYTES = 1 << 20              # commit every MiB
data.CHUNK = 256 << 10
commits, real_commit, real_write = [0], Pool.commit, Volume.write
def commit(self, wait=True):
    ok = real_commit(self, wait)
    commits[0] += ok
    return ok
def write(self, offset, buf):
    real_write(self, offset, buf)
    if commits[0] >= 3 and offset >= 5 * (1 << 20):
        os.kill(os.getpid(), signal.SIGKILL)   # written, not committed: as a crash
Pool.commit, Volume.write = commit, write
from thinpool.cli import main
sys.exit(main(sys.argv[1:]))
"""


@requires_tools
def test_a_killed_import_keeps_a_committed_prefix_and_check_finds_the_rest(home, tmp_path):
    _pool(home, size="16M", vol="16M")
    old = random.Random(3).randbytes(8 * MiB)
    tp(home, "write", "demo/v", input=old, check=0)
    src = tmp_path / "img"
    new = bytearray(random.Random(4).randbytes(8 * MiB))
    new[BS:2 * BS] = bytes(BS)            # zero in the file: unmapped in the volume up to there
    src.write_bytes(new)
    tp(home, "snapshot", "demo/v", "keep", check=0)   # so the import's writes take new blocks
    r = subprocess.run([sys.executable, "-c", _KILL_AFTER_COMMITS, "--home", str(home),
                        "import", "demo/v", str(src)], env=clean_env(), capture_output=True,
                       timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    got = tp(home, "read", "demo/v", "--length", str(8 * MiB), check=0).stdout
    # Some prefix of the file, committed; the old content after it.
    at = next(i for i in range(0, 8 * MiB, BS) if got[i:i + BS] != new[i:i + BS])
    assert at >= 3 * MiB and got[at:] == old[at:]
    assert got[BS:2 * BS] == bytes(BS)
    assert tp(home, "read", "demo/keep", "--length", str(8 * MiB), check=0).stdout == old
    assert_checks_pass(home / "demo" / "metadata")
    # The uncommitted writes hold host space in free blocks: check says so, trim gives it back.
    r = tp(home, "check", "demo", check=0)
    assert "no mapping owns" in r.out + r.stderr and "thinpool trim demo" in r.out + r.stderr
    tp(home, "trim", "demo", check=0)
    r = tp(home, "check", "demo", check=0)
    assert "no mapping owns" not in r.out + r.stderr


def test_list_json_keeps_a_pool_that_does_not_open(home):
    import json
    _pool(home)
    tp(home, "create", "other", "--size", "1M", check=0)
    with open(home / "other" / "metadata", "r+b") as f:
        f.write(b"\xff" * 512)
    r = tp(home, "list", "--json")
    assert r.returncode == 3
    doc = {p["name"]: p for p in json.loads(r.out)}
    assert set(doc) == {"demo", "other"}
    assert doc["other"]["exit_code"] == 3 and "damaged" in doc["other"]["error"]
    assert doc["demo"]["volumes"][0]["name"] == "v"
    r = tp(home, "list", check=3)
    assert "other" in r.out and "demo/v" in r.out and "damaged" in r.stderr
    r = tp(home, "list", "-o", "name,mode", "--separator", ":", check=3)
    assert "other:does not open" in r.out.splitlines()
