"""``thinpool serve`` as a user runs it (the console script): foreground and --daemon, --stop,
the busy message other writers get, stat showing what is served, and import/export of qcow2,
vmdk and vdi images. Every server a test starts is stopped, and killed by pid in ``finally``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.cli.helpers import THINPOOL, assert_one_line_error, clean_env, tp
from tests.tptools import assert_checks_pass, requires_tools

pytestmark = requires_tools


@pytest.fixture
def pool(home):
    tp(home, "create", "p", "--size", "256M", check=0)
    tp(home, "create", "p/v", "--size", "32M", check=0)
    tp(home, "create", "p/w", "--size", "32M", check=0)
    return home / "p"


def kill_pid(pid: int | None) -> None:
    if pid:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def state_pid(pool: Path) -> int | None:
    try:
        return json.loads((pool / "exports.json").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def start_foreground(home: Path, *args: str) -> tuple[subprocess.Popen, list[str]]:
    p = subprocess.Popen([*THINPOOL, "--home", str(home), "serve", "p", *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env())
    uris = []
    for _ in range(8):
        line = p.stdout.readline().decode()
        if not line:
            break
        uris.append(line.strip())
        if len(uris) >= 2 and all(u.startswith("nbd") for u in uris):
            break
    return p, uris


def test_foreground_serve_stops_cleanly_on_sigterm(home, pool):
    p, uris = start_foreground(home)
    try:
        sock = pool / "nbd.sock"
        assert uris == [f"nbd+unix:///v?socket={sock}", f"nbd+unix:///w?socket={sock}"], uris
        assert (pool / "serve.pid").read_text().strip() == str(p.pid)
        state = json.loads((pool / "exports.json").read_text())
        assert state["pid"] == p.pid and state["socket"] == str(sock)
        assert state["volumes"] == [
            {"name": "v", "read_only": False, "nbd": True, "attached": None},
            {"name": "w", "read_only": False, "nbd": True, "attached": None}]
        if shutil.which("qemu-io"):
            r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x42 0 64k", uris[0]],
                               capture_output=True, timeout=60)
            assert r.returncode == 0, r.stderr
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == 0
        assert "stopped serving pool p" in p.stderr.read().decode()
    finally:
        kill_pid(p.pid)
        p.wait()
    for name in ("serve.pid", "exports.json", "nbd.sock", "control.sock"):
        assert not (pool / name).exists(), name
    if shutil.which("qemu-io"):
        assert tp(home, "read", "p/v", "--length", "4", check=0).stdout == b"\x42" * 4
    assert_checks_pass(pool / "metadata")


def test_daemon_start_busy_stat_stop(home, pool):
    r = tp(home, "serve", "p", "--daemon", "--listen", "0", "--read-only", "--export", "v")
    pid = state_pid(pool)
    try:
        assert r.returncode == 0, r.stderr
        lines = r.out.splitlines()
        assert lines[0] == f"nbd+unix:///v?socket={pool / 'nbd.sock'}"
        assert lines[1].startswith("nbd://127.0.0.1:") and lines[1].endswith("/v")
        assert "in the background" in r.stderr and pid is not None
        # other writers (but the volume commands thinpool serve runs for them, see
        # test_forward.py): exit 5, naming thinpool serve and --stop
        r = tp(home, "write", "p/v", input=b"x")
        assert_one_line_error(r, 5, "being served by thinpool serve", f"process {pid}",
                              "thinpool serve p --stop")
        r = tp(home, "serve", "p")
        assert_one_line_error(r, 5, "thinpool serve p --stop")
        r = tp(home, "serve", "p", "--daemon")
        assert_one_line_error(r, 5, "thinpool serve p --stop")
        # stat: the pool's served line, the column, the JSON keys
        out = tp(home, "stat", "p", check=0).out
        assert f"thinpool serve (pid {pid})" in out and "served" in out
        doc = json.loads(tp(home, "stat", "p", "--json", check=0).stdout)
        assert doc["served"]["pid"] == pid and doc["served"]["read_only"] is True
        assert doc["served"]["tcp"].startswith("127.0.0.1:")
        assert [(v["name"], v["served"], v["attached"]) for v in doc["volumes"]] == \
            [("v", True, None), ("w", False, None)]
        # attach without the FUSE export (or as it is): a one-line answer, not a traceback
        from thinpool.export.state import ask
        answer = ask(pool, {"op": "attach", "volume": "nope"})
        assert answer["ok"] is False and answer["exit_code"] in (1, 5)
        assert ask(pool, {"op": "status"})["pid"] == pid
        assert ask(pool, {"op": "bogus"})["exit_code"] == 2
        r = tp(home, "serve", "p", "--stop", check=0)
        assert f"process {pid}" in r.out
    finally:
        kill_pid(pid)
    assert not (pool / "exports.json").exists()
    assert json.loads(tp(home, "stat", "p", "--json", check=0).stdout)["served"] is None
    assert_one_line_error(tp(home, "serve", "p", "--stop"), 1, "not being served")
    assert_checks_pass(pool / "metadata")


def test_stale_files_are_replaced_and_bad_options(home, pool):
    (pool / "exports.json").write_text(json.dumps({"pid": 999999, "volumes": []}))
    (pool / "serve.pid").write_text("999999\n")
    import socket as socket_mod
    s = socket_mod.socket(socket_mod.AF_UNIX)
    s.bind(str(pool / "nbd.sock"))            # a socket nobody listens on: stale
    s.close()
    assert json.loads(tp(home, "stat", "p", "--json", check=0).stdout)["served"] is None
    r = tp(home, "serve", "p", "--daemon")
    pid = state_pid(pool)
    try:
        assert r.returncode == 0, r.stderr
        assert pid != 999999 and (pool / "serve.pid").read_text().strip() == str(pid)
        tp(home, "serve", "p", "--stop", check=0)
    finally:
        kill_pid(pid)
    assert_one_line_error(tp(home, "serve", "p", "--listen", "nope"), 2, "--listen")
    assert_one_line_error(tp(home, "serve", "p", "--commit-interval", "0"), 2)
    r = tp(home, "serve", "p", "--daemon", "--export", "missing")
    assert_one_line_error(r, 1, "missing")
    assert not (pool / "exports.json").exists()
    not_a_socket = pool.parent / "plain"
    not_a_socket.write_text("keep me")
    r = tp(home, "serve", "p", "--daemon", "--socket", str(not_a_socket))
    assert_one_line_error(r, 2, "not a socket")
    assert not_a_socket.read_text() == "keep me"


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vdi"])
def test_import_export_images(home, pool, tmp_path, fmt):
    if shutil.which("qemu-img") is None or shutil.which("qemu-io") is None:
        pytest.skip("qemu-img/qemu-io are not installed (Debian package qemu-utils)")
    src = tmp_path / f"src.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(src), "40M"], check=True)
    subprocess.run(["qemu-io", "-f", fmt, "-c", "write -P 0x5a 4M 1M", "-c",
                    "write -P 0x6b 30M 64k", str(src)], check=True, capture_output=True)
    r = tp(home, "import", "p/img", str(src), "--create", check=0)
    assert f"imported {fmt} image" in r.out
    doc = json.loads(tp(home, "stat", "p/img", "--json", check=0).stdout)
    assert doc["size"] == 40 << 20 and doc["mapped_bytes"] == (1 << 20) + (64 << 10)
    assert tp(home, "read", "p/img", "--offset", "4M", "--length", "3",
              check=0).stdout == b"\x5a" * 3
    out = tmp_path / f"out.{fmt}"
    tp(home, "export", "p/img", str(out), "--format", fmt, check=0)
    cmp = subprocess.run(["qemu-img", "compare", "-f", fmt, "-F", fmt, str(src), str(out)],
                         capture_output=True, text=True)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    assert os.stat(out).st_blocks * 512 < 8 << 20            # stays sparse
    # existing output needs --yes; a pool's own file is refused; into an existing volume
    assert_one_line_error(tp(home, "export", "p/img", str(out), "--format", fmt), 1, "--yes")
    assert_one_line_error(tp(home, "export", "p/img", str(pool / "data"), "--format", fmt), 2)
    assert_one_line_error(tp(home, "import", "p/v", str(src)), 2, "larger than volume")
    tp(home, "create", "p/big", "--size", "64M", check=0)
    tp(home, "import", "p/big", str(src), check=0)
    assert tp(home, "read", "p/big", "--offset", "30M", "--length", "2",
              check=0).stdout == b"\x6b" * 2
    assert_one_line_error(tp(home, "import", "p/img", str(src), "--create"), 1, "exists already")
    assert_checks_pass(pool / "metadata")
