"""The command line keeps an admin's data safe (issue 11), each finding as a real process.

* a pool's own files (data, metadata, names, pool.json; by device and inode, so symlinks, hard
  links and ``./`` paths are caught) are refused as outputs and as another pool's --data;
* a given data file is never grown; sizes are capped at what a block device can address and
  rounded *up* (a volume to a sector, a pool to a block) with a notice;
* every failure is typed: a missing directory, a full stdout, a reader that went away, SIGINT
  and SIGTERM each have their documented exit code and one line;
* destructive steps (shrinking a volume, overwriting a non-empty output) ask on a terminal and
  need --yes otherwise.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests.cli.helpers import (
    THINPOOL,
    assert_one_line_error,
    clean_env,
    default_sigint,
    fingerprint,
    tp,
    tp_terminal,
)
from tests.tptools import assert_checks_pass, requires_tools
from thinpool import Pool

MiB = 1 << 20
BS = 64 * 1024


@pytest.fixture
def demo(home):
    with Pool.create(home / "demo", data_size=4 * MiB) as pool:
        pool.create_thin("vol0", MiB).write(0, b"hello" * 1000)
    return home / "demo"


def _stat(home, target):
    return json.loads(tp(home, "stat", target, "--json", check=0).stdout)


# -- 1. a pool's own files -------------------------------------------------------------------
@requires_tools
@pytest.mark.parametrize("how", ["direct", "dot-path", "symlink", "hard-link"])
@pytest.mark.parametrize("which", ["data", "metadata", "names.json", "pool.json"])
def test_export_onto_a_pool_file_is_refused(home, demo, tmp_path, which, how):
    target = demo / which
    if how == "dot-path":
        path = f"{demo}/./../demo/{which}"
    elif how == "symlink":
        path = tmp_path / "link"
        path.symlink_to(target)
    elif how == "hard-link":
        path = tmp_path / "hard"
        os.link(target, path)
    else:
        path = target
    before = fingerprint(demo)
    r = tp(home, "export", "demo/vol0", str(path))
    assert_one_line_error(r, 2, "pool 'demo'", "destroy the pool")
    assert fingerprint(demo) == before
    assert_checks_pass(demo / "metadata")


@requires_tools
@pytest.mark.parametrize("argv", [
    ["dump", "demo", "-o", "{P}/metadata"],
    ["dump", "demo", "-o", "{P}/new.xml"],                     # a new file in a pool's directory
    ["restore", "-i", "{X}", "-o", "{P}/data"],
    ["restore", "-i", "{X}", "-o", "{P}/metadata"],
    ["repair", "-i", "demo", "-o", "{P}/data"],
    ["repair", "-i", "demo", "-o", "{P}/pool.json"],
])
def test_tool_outputs_onto_a_pool_file_are_refused(home, demo, tmp_path, argv):
    xml = tmp_path / "d.xml"
    tp(home, "dump", "demo", "-o", str(xml), check=0)
    argv = [a.replace("{P}", str(demo)).replace("{X}", str(xml)) for a in argv]
    before = fingerprint(demo)
    r = tp(home, *argv)
    assert_one_line_error(r, 2, "pool 'demo'")
    assert fingerprint(demo) == before
    assert sorted(p.name for p in demo.iterdir()) == sorted(before)
    assert_checks_pass(demo / "metadata")


@requires_tools
def test_a_data_file_belongs_to_one_pool_only(home, demo, tmp_path):
    """Before: create P2 --data P1's data grew it, and both pools handed out the same blocks."""
    before = fingerprint(demo)
    size = (demo / "data").stat().st_size
    link = tmp_path / "data-link"
    link.symlink_to(demo / "data")
    for data in (demo / "data", link):
        r = tp(home, "create", "p2", "--data", str(data), "--size", "8M")
        assert_one_line_error(r, 5, "data of pool 'demo'")
    meta = tmp_path / "m.img"
    meta.write_bytes(b"")
    os.truncate(meta, 4 * MiB)
    ext = tmp_path / "ext.img"
    ext.write_bytes(b"")
    os.truncate(ext, 4 * MiB)
    r = tp(home, "create", "p3", "--data", str(ext), "--metadata", str(demo / "metadata"))
    assert_one_line_error(r, 5, "metadata of pool 'demo'")
    assert (demo / "data").stat().st_size == size
    assert fingerprint(demo) == before
    assert not (home / "p2").exists() and not (home / "p3").exists()
    # One external file used by a pool is refused for the next one as well.
    tp(home, "create", "p4", "--data", str(ext), "--metadata", str(meta), check=0)
    r = tp(home, "create", "p5", "--data", str(ext))
    assert_one_line_error(r, 5, "pool 'p4'")
    assert_checks_pass(demo / "metadata")


@requires_tools
def test_a_given_data_file_is_never_grown(home, tmp_path):
    data = tmp_path / "d.img"
    data.write_bytes(b"")
    os.truncate(data, 2 * MiB)
    r = tp(home, "create", "p", "--data", str(data), "--size", "8M")
    assert_one_line_error(r, 2, "more than --data", "truncate -s")
    assert data.stat().st_size == 2 * MiB and not (home / "p").exists()
    # Without --size: all of it, in whole blocks, with a notice when it is not whole.
    os.truncate(data, 2 * MiB + 1000)
    r = tp(home, "create", "p", "--data", str(data), check=0)
    assert "using 2 MiB (32 blocks of 64 KiB)" in r.stderr
    assert data.stat().st_size == 2 * MiB + 1000
    assert _stat(home, "p")["data_blocks_total"] == 32
    assert_checks_pass(home / "p" / "metadata")


# -- 2. raw errors ---------------------------------------------------------------------------
@requires_tools
def test_huge_volume_size_is_refused(home, demo):
    before = fingerprint(demo)
    r = tp(home, "create", "demo/big", "--size", "99999999999999999999P")
    assert_one_line_error(r, 2, "maximum of 9223372036854775296 bytes")
    r = tp(home, "resize", "demo/vol0", "--size", str(2**63))
    assert_one_line_error(r, 2, "maximum")
    assert fingerprint(demo) == before
    # The maximum itself works, to its last byte.
    top = 2**63 - 512
    tp(home, "create", "demo/top", "--size", str(top), check=0)
    tp(home, "write", "demo/top", "--offset", str(top - 1), input=b"z", check=0)
    assert tp(home, "read", "demo/top", "--offset", str(top - 1), check=0).stdout == b"z"
    assert_one_line_error(tp(home, "export", "demo/top", str(demo.parent / "top.img")), 2,
                          "File too large")
    assert not (demo.parent / "top.img").exists()
    assert_checks_pass(demo / "metadata")


def test_export_into_a_missing_directory(home, demo, tmp_path):
    r = tp(home, "export", "demo/vol0", str(tmp_path / "missing" / "x.img"))
    assert_one_line_error(r, 2, "No such file or directory")


def test_read_into_a_full_device_is_out_of_space(home, demo):
    with open("/dev/full", "wb") as full:
        r = subprocess.run([*THINPOOL, "--home", str(home), "read", "demo/vol0"], stdout=full,
                           stderr=subprocess.PIPE, env=clean_env(), timeout=60, check=False)
    err = r.stderr.decode()
    assert r.returncode == 4 and err.count("\n") == 1 and "stdout" in err, (r.returncode, err)
    # A report line after the work is done does not fail the command: a warning instead.
    with open("/dev/full", "wb") as full:
        r = subprocess.run([*THINPOOL, "--home", str(home), "create", "demo/v2", "--size", "1M"],
                           stdout=full, stderr=subprocess.PIPE, env=clean_env(), timeout=60, check=False)
    assert r.returncode == 0 and b"created volume demo/v2" in r.stderr, r.stderr
    assert "v2" in [v["name"] for v in _stat(home, "demo")["volumes"]]


def test_reader_going_away_is_quiet_141(home, demo):
    tp(home, "create", "demo/big", "--size", "64M", check=0)
    p = subprocess.Popen([*THINPOOL, "--home", str(home), "read", "demo/big"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env())
    p.stdout.read(10)
    p.stdout.close()                               # as `| head -c 10` does
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 141 and err == "", err


def test_closed_stdout(home, demo):
    # `>&-`: the shell closes descriptor 1 before it runs thinpool
    r = subprocess.run(["sh", "-c", 'exec "$@" >&-', "sh", *THINPOOL, "--home", str(home),
                        "read", "demo/vol0"], stderr=subprocess.PIPE, env=clean_env(),
                       timeout=60, check=False)
    err = r.stderr.decode()
    assert r.returncode == 1 and "closed" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("sig,code,word", [(signal.SIGINT, 130, "interrupted"),
                                            (signal.SIGTERM, 143, "terminated")])
def test_signal_mid_run(home, demo, sig, code, word):
    """The write spools stdin first: the signal lands while it waits for more input."""
    before = fingerprint(demo)
    default_sigint()
    p = subprocess.Popen([*THINPOOL, "--home", str(home), "write", "demo/vol0"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=clean_env())
    p.stdin.write(b"x" * 1000)
    p.stdin.flush()
    _wait_for_stdin_read(p)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == code and err.decode() == f"thinpool: {word}\n", (p.returncode, err)
    assert fingerprint(demo) == before


def _wait_for_stdin_read(p, timeout=30.0):
    """Until process ``p`` sleeps reading its stdin pipe (inside the command: a write spools
    its input before it takes the pool's lock)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{p.pid}/wchan") as f:
                if "pipe_read" in f.read():
                    return
        except OSError:
            pass
        assert p.poll() is None, p.communicate()
        time.sleep(0.02)
    raise AssertionError("the command never read its input")


def test_sigint_at_a_question_is_130(home, demo, tmp_path):
    out = tmp_path / "x.img"
    out.write_bytes(b"keep me")
    code, _, shown = tp_terminal(home, "export", "demo/vol0", str(out), answer=signal.SIGINT)
    assert code == 130 and "interrupted" in shown, shown
    assert out.read_bytes() == b"keep me"


# -- 4. sizes are rounded up, with a notice --------------------------------------------------
@requires_tools
def test_sizes_are_rounded_up_with_a_notice(home):
    r = tp(home, "create", "a", "--size", "100K", check=0)
    assert r.stderr == "thinpool: pool size rounded up to 128 KiB (2 blocks of 64 KiB)\n"
    assert _stat(home, "a")["data_blocks_total"] == 2
    assert (home / "a" / "data").stat().st_size == 128 * 1024
    r = tp(home, "create", "b", "--size", "1G", "--block-size", "192K", check=0)
    assert "rounded up to 1 GiB (5462 blocks of 192 KiB)" in r.stderr
    assert _stat(home, "b")["data_blocks_total"] * 192 * 1024 >= 1 << 30
    assert_one_line_error(tp(home, "create", "c", "--size", "10K"), 2, "smaller than one data block")
    assert not (home / "c").exists()
    r = tp(home, "create", "a/v", "--size", "1000", check=0)
    assert "volume size rounded up to 1 KiB (1024 bytes" in r.stderr
    assert _stat(home, "a/v")["size"] == 1024
    r = tp(home, "resize", "a/v", "--size", "1500", check=0)
    assert _stat(home, "a/v")["size"] == 1536
    r = tp(home, "resize", "a", "--size", "130K", check=0)
    assert "rounded up to 192 KiB (3 blocks" in r.stderr
    assert _stat(home, "a")["data_blocks_total"] == 3
    assert_checks_pass(home / "a" / "metadata")


# -- 5. destructive steps ask ----------------------------------------------------------------
@requires_tools
def test_destructive_steps_need_yes_without_a_terminal(home, demo, tmp_path):
    before = fingerprint(demo)
    r = tp(home, "resize", "demo/vol0", "--size", "64K")
    assert_one_line_error(r, 1, "Shrink volume demo/vol0", "--yes")
    assert fingerprint(demo) == before
    existing = tmp_path / "existing"
    existing.write_bytes(b"precious")
    xml = tmp_path / "d.xml"
    tp(home, "dump", "demo", "-o", str(xml), check=0)
    for argv in (["export", "demo/vol0", str(existing)], ["dump", "demo", "-o", str(existing)],
                 ["restore", "-i", str(xml), "-o", str(existing)],
                 ["repair", "-i", "demo", "-o", str(existing)]):
        assert_one_line_error(tp(home, *argv), 1, "Overwrite file", "--yes")
        assert existing.read_bytes() == b"precious"
    assert fingerprint(demo) == before
    # On a terminal it asks; "y" goes ahead.
    code, _, shown = tp_terminal(home, "resize", "demo/vol0", "--size", "64K", answer=b"y\n")
    assert code == 0 and "Shrink volume demo/vol0 from 1 MiB to 64 KiB" in shown, shown
    assert _stat(home, "demo/vol0")["size"] == BS
    r = tp(home, "export", "demo/vol0", str(existing), "--yes", check=0)
    assert existing.read_bytes() == (b"hello" * 1000).ljust(BS, b"\0")
    assert_checks_pass(demo / "metadata")


def test_an_interrupt_wrapped_on_its_way_is_still_130(home, demo, monkeypatch, capsys):
    """Python wraps a Ctrl-C that lands in a class body's ``__set_name__`` (a module imported
    lazily mid-command) in a RuntimeError; it is still an interrupt."""
    import thinpool.cli.info as info
    from thinpool.cli import main

    def landed_in_an_import(pool):
        class Field:
            def __set_name__(self, owner, name):
                raise KeyboardInterrupt

        class Registry:            # noqa: F841 - raises while it is made
            volumes = Field()

    monkeypatch.setattr(info, "pool_stat", landed_in_an_import)
    assert main(["--home", str(home), "stat", "demo"]) == 130
    assert capsys.readouterr().err == "thinpool: interrupted\n"
