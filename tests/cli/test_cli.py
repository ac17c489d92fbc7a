"""The ``thinpool`` command line, run as a subprocess (the installed console script).

Every command, its ``--json`` shape, its exit code for success and for each kind of bad input,
and that a failed command leaves the pool byte for byte as it was (and ``thin_check`` happy).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from thinpool import Pool
from tests.cli.helpers import (THINPOOL, assert_one_line_error, clean_env, fingerprint, tp,
                               tp_terminal)
from tests.holder import pool_held_elsewhere
from tests.tptools import assert_checks_pass
from tests.tptools import requires_tools

MiB = 1 << 20
BS = 64 * 1024


@pytest.fixture
def demo(home):
    """Pool ``demo`` (16 MiB) with ``vol0`` (1 MiB, first 100 KiB random) and its snapshot ``snap0``."""
    data = random.Random(7).randbytes(100 * 1024)
    with Pool.create(home / "demo", data_size=16 * MiB) as pool:
        pool.create_thin("vol0", MiB).write(0, data)
        pool.snapshot("vol0", "snap0")
    return data




def check_metadata(pool_dir) -> None:
    assert_checks_pass(pool_dir / "metadata")


# -- a whole session -----------------------------------------------------------------------
@requires_tools
def test_admin_session(home):
    r = tp(home, "create", "demo", "--size", "1G", check=0)
    assert "created pool demo" in r.out and "1 GiB" in r.out
    r = tp(home, "create", "demo/vol0", "--size", "100G", check=0)
    assert "created volume demo/vol0 of 100 GiB" in r.out
    # LVM's overcommit warning: the sum of volume sizes and the pool size.
    assert "warning" in r.stderr and "overcommitted" in r.stderr
    assert "100 GiB" in r.stderr and "1 GiB" in r.stderr
    tp(home, "write", "demo/vol0", input="hello from thinpool\n", check=0)
    r = tp(home, "snapshot", "demo/vol0", "snap0", check=0)
    assert "demo/snap0" in r.out and "200 GiB" in r.stderr
    tp(home, "write", "demo/vol0", input="HELLO", check=0)
    assert tp(home, "read", "demo/snap0", "--length", "20", check=0).stdout == b"hello from thinpool\n"
    assert tp(home, "read", "demo/vol0", "--length", "20", check=0).stdout == b"HELLO from thinpool\n"

    r = tp(home, "stat", "demo", check=0)
    for text in ("block size", "64 KiB", "data", "128 KiB used of 1 GiB", "metadata",
                 "transaction id", "mode", "write", "vol0", "snap0", "100 GiB", "dev id", "origin"):
        assert text in r.out, (text, r.out)
    snap_row = next(line for line in r.out.splitlines() if line.split()[:1] == ["snap0"])
    assert snap_row.split()[1] == "2" and snap_row.split()[-1] == "vol0"

    doc = json.loads(tp(home, "stat", "demo", "--json", check=0).stdout)
    with Pool.open(home / "demo", read_only=True) as pool:
        want = pool.stat().as_dict()
    # stat adds the sizes in bytes of the block counts
    byte_keys = {"data_size": "data_blocks_total", "data_used": "data_blocks_used",
                 "data_free": "data_blocks_free"}
    assert set(doc) == set(want) | set(byte_keys) | {"metadata_size", "metadata_used", "served"}
    for k, blocks in byte_keys.items():
        assert doc.pop(k) == want[blocks] * BS
    assert (doc.pop("metadata_size"), doc.pop("metadata_used")) == \
        (want["metadata_blocks_total"] * 4096, want["metadata_blocks_used"] * 4096)
    assert doc.pop("served") is None                                   # no thinpool serve
    assert [(v.pop("served"), v.pop("attached")) for v in doc["volumes"]] == [(False, None)] * 2
    want["mode"] = "write"           # the pool's mode, not the read-only handle's
    # stat adds thin_ls's accounting per volume: the write after the snapshot broke the sharing,
    # and each volume's lineage.
    assert [(v.pop("exclusive_blocks"), v.pop("shared_blocks"), v.pop("exclusive_bytes"),
             v.pop("shared_bytes")) for v in doc["volumes"]] == [(1, 0, BS, 0), (1, 0, BS, 0)]
    assert [(v.pop("ancestors"), v.pop("descendants")) for v in doc["volumes"]] == \
        [([], ["snap0"]), (["vol0"], [])]
    assert doc == want
    assert doc["data_blocks_used"] == 2 and doc["block_size"] == BS
    assert [(v["name"], v["dev_id"], v["size"], v["origin"]) for v in doc["volumes"]] == \
        [("vol0", 1, 100 << 30, None), ("snap0", 2, 100 << 30, "vol0")]

    vdoc = json.loads(tp(home, "stat", "demo/snap0", "--json", check=0).stdout)
    assert vdoc == {"pool": "demo", "block_size": BS, **want["volumes"][1],
                    "exclusive_blocks": 1, "shared_blocks": 0, "exclusive_bytes": BS,
                    "shared_bytes": 0, "ancestors": ["vol0"], "descendants": [], "served": False,
                    "attached": None}
    r = tp(home, "stat", "demo/snap0", check=0)
    assert "volume demo/snap0" in r.out and "107374182400 bytes" in r.out and "vol0" in r.out

    r = tp(home, "list", check=0)
    names = [line.split()[0] for line in r.out.splitlines()[2:]]
    assert names == ["demo", "demo/vol0", "demo/snap0"]
    ldoc = json.loads(tp(home, "list", "--json", check=0).stdout)
    assert [p["name"] for p in ldoc] == ["demo"]
    assert ldoc[0]["data_size"] == 1 << 30 and ldoc[0]["data_used"] == 2 * BS
    assert [(v["name"], v["size"], v["mapped_bytes"], v["origin"]) for v in ldoc[0]["volumes"]] == \
        [("vol0", 100 << 30, BS, None), ("snap0", 100 << 30, BS, "vol0")]
    check_metadata(home / "demo")


@requires_tools
def test_resize_delete_destroy(home, demo):
    r = tp(home, "resize", "demo", "--size", "32M", "--metadata-size", "4M", check=0)
    assert "16 MiB to 32 MiB" in r.out
    r = tp(home, "resize", "demo/vol0", "--size", "2M", check=0)
    assert "1 MiB to 2 MiB" in r.out
    doc = json.loads(tp(home, "stat", "demo", "--json", check=0).stdout)
    assert doc["data_blocks_total"] * BS == 32 * MiB          # committed: a new process sees it
    assert doc["metadata_blocks_total"] * 4096 == 4 * MiB
    assert doc["volumes"][0]["size"] == 2 * MiB
    r = tp(home, "resize", "demo/vol0", "--size", "64K")    # shrinking drops data: asks first
    assert_one_line_error(r, 1, "Shrink volume demo/vol0", "--yes")
    assert tp(home, "read", "demo/vol0", "--length", "100K", check=0).stdout == demo
    r = tp(home, "resize", "demo/vol0", "--size", "64K", "--yes", check=0)
    assert "discarded" in r.stderr
    assert tp(home, "read", "demo/vol0", check=0).stdout == demo[:BS]
    assert tp(home, "read", "demo/snap0", "--length", "100K", check=0).stdout == demo
    check_metadata(home / "demo")

    r = tp(home, "delete", "demo/vol0", check=0)
    assert "deleted volume demo/vol0" in r.out
    doc = json.loads(tp(home, "stat", "demo", "--json", check=0).stdout)
    assert [v["name"] for v in doc["volumes"]] == ["snap0"]
    assert doc["volumes"][0]["origin"] is None
    check_metadata(home / "demo")

    code, _, shown = tp_terminal(home, "destroy", "demo", answer=b"n\n")
    assert code == 1 and "[y/N]" in shown and "not confirmed" in shown, shown
    assert (home / "demo" / "metadata").exists()
    r = tp(home, "destroy", "demo", input="y\n")       # piped input is not an answer
    assert_one_line_error(r, 1, "--yes")
    assert (home / "demo" / "metadata").exists()
    code, _, shown = tp_terminal(home, "destroy", "demo", answer=b"y\n")
    assert code == 0, shown
    assert not (home / "demo").exists()
    assert json.loads(tp(home, "list", "--json", check=0).stdout) == []


def test_create_pool_options_and_external_files(home, tmp_path):
    tp(home, "create", "big", "--size", "1G", "--block-size", "256K", "--metadata-size", "4MiB",
       check=0)
    doc = json.loads(tp(home, "stat", "big", "--json", check=0).stdout)
    assert doc["block_size"] == 256 * 1024
    assert doc["data_blocks_total"] == 4096
    assert doc["metadata_blocks_total"] == 1024
    d, m = tmp_path / "data.img", tmp_path / "meta.img"
    for path, size in ((d, 8 * MiB), (m, 4 * MiB)):
        with open(path, "wb") as f:
            f.truncate(size)
    tp(home, "create", "ext", "--data", str(d), "--metadata", str(m), check=0)
    doc = json.loads(tp(home, "stat", "ext", "--json", check=0).stdout)
    assert doc["data_blocks_total"] == 8 * MiB // BS
    assert os.path.samefile(doc["data_path"], d) and os.path.samefile(doc["metadata_path"], m)
    both = json.loads(tp(home, "stat", "--json", check=0).stdout)
    assert [p["name"] for p in both] == ["big", "ext"]
    r = tp(home, "stat", check=0)
    assert "pool big" in r.out and "pool ext" in r.out
    r = tp(home, "destroy", "ext", "--yes", check=0)
    assert d.exists() and m.exists() and not (home / "ext").exists()   # given files are kept
    assert str(d) in r.stderr


def test_python_dash_m_and_help(home):
    r = subprocess.run([sys.executable, "-m", "thinpool", "--home", str(home), "--help"],
                       capture_output=True, text=True, env=clean_env(), timeout=60)
    assert r.returncode == 0
    for cmd in ("create", "snapshot", "stat", "list", "delete", "destroy", "resize", "write",
                "read", "import", "export"):
        assert f"  {cmd} " in r.stdout, cmd


# -- failures: one line, the right exit code, nothing changed --------------------------------
BAD = [
    # (id, args, stdin, exit code, words the message must have)
    ("pool-exists", ["create", "demo", "--size", "1G"], b"", 1, ["demo", "exists"]),
    ("size-unit", ["create", "new", "--size", "12Q"], b"", 2, ["12Q"]),
    ("size-negative", ["create", "new", "--size", "-5G"], b"", 2, ["-5G"]),
    ("size-malformed", ["create", "new", "--size", "1.5.5G"], b"", 2, ["1.5.5G"]),
    ("block-size", ["create", "new", "--size", "1G", "--block-size", "100K"], b"", 2,
     ["block size", "64 KiB"]),
    ("below-one-block", ["create", "new", "--size", "1000"], b"", 2, ["smaller than one"]),
    ("pool-name", ["create", "..", "--size", "1G"], b"", 2, ["pool name"]),
    ("volume-name", ["create", "demo/a/b", "--size", "1G"], b"", 2, ["volume name"]),
    ("volume-size", ["create", "demo/v", "--size", "12Q"], b"", 2, ["12Q"]),
    ("volume-exists", ["create", "demo/vol0", "--size", "1M"], b"", 1, ["vol0", "exists"]),
    ("volume-pool-option", ["create", "demo/v", "--size", "1M", "--block-size", "64K"], b"", 2,
     ["--block-size"]),
    ("unknown-pool", ["create", "nope/v", "--size", "1M"], b"", 1, ["nope", "thinpool list"]),
    ("snapshot-exists", ["snapshot", "demo/vol0", "snap0"], b"", 1, ["snap0", "exists"]),
    ("snapshot-unknown", ["snapshot", "demo/nope", "s"], b"", 1, ["nope"]),
    ("stat-unknown-pool", ["stat", "nope"], b"", 1, ["nope"]),
    ("stat-unknown-volume", ["stat", "demo/nope", "--json"], b"", 1, ["nope"]),
    ("delete-unknown", ["delete", "demo/nope"], b"", 1, ["nope"]),
    ("delete-pool", ["delete", "demo"], b"", 2, ["POOL/NAME"]),
    ("shrink-pool", ["resize", "demo", "--size", "8M"], b"", 2, ["cannot shrink"]),
    ("resize-bad-size", ["resize", "demo/vol0", "--size", "-5G"], b"", 2, ["leaves nothing"]),
    ("write-past-end", ["write", "demo/vol0", "--offset", "1048570"], b"0123456789", 2,
     ["past", "end"]),
    ("write-offset-past-end", ["write", "demo/vol0", "--offset", "2M"], b"x", 2, ["past the end"]),
    ("read-past-end", ["read", "demo/vol0", "--offset", "1M", "--length", "1"], b"", 2,
     ["past the end"]),
    ("read-unknown", ["read", "demo/nope"], b"", 1, ["nope"]),
    ("destroy-unconfirmed", ["destroy", "demo"], b"", 1, ["--yes"]),
    ("unknown-command", ["frobnicate"], b"", 2, ["frobnicate"]),
    ("missing-argument", ["create"], b"", 2, ["POOL"]),
]


@requires_tools
@pytest.mark.parametrize("args,stdin,code,words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_fails_cleanly_and_changes_nothing(home, demo, args, stdin, code, words):
    before = fingerprint(home / "demo")
    r = tp(home, *args, input=stdin)
    if args[0] == "destroy":     # the question, then the one-line refusal
        r.stderr = r.stderr.split("[y/N]: ", 1)[-1].lstrip("\n")
    assert_one_line_error(r, code, *words)
    assert r.stdout == b""
    assert fingerprint(home / "demo") == before
    assert sorted(p.name for p in home.iterdir()) == ["demo"]     # no half-made pool
    check_metadata(home / "demo")


@requires_tools
def test_import_larger_than_volume_changes_nothing(home, demo, tmp_path):
    big = tmp_path / "big.img"
    big.write_bytes(b"x" * (MiB + 1))
    before = fingerprint(home / "demo")
    r = tp(home, "import", "demo/vol0", str(big))
    assert_one_line_error(r, 2, "larger than volume", "thinpool resize")
    assert fingerprint(home / "demo") == before
    check_metadata(home / "demo")


@requires_tools
def test_locked_pool_is_busy_and_names_the_holder(home, demo):
    before = fingerprint(home / "demo")
    with pool_held_elsewhere(home / "demo") as holder:
        for args, stdin in ((["create", "demo/x", "--size", "1M"], b""),
                            (["write", "demo/vol0"], b"data"), (["snapshot", "demo/vol0", "s"], b"")):
            r = tp(home, *args, input=stdin)
            assert_one_line_error(r, 5, f"process {holder.pid}", "demo", "--wait")
        r = tp(home, "create", "demo/x", "--size", "1M", "--wait=0.2")
        assert_one_line_error(r, 5, f"process {holder.pid}", "waited 0.2 s")
        # Readers go on beside the writer, and say that what they show is its last commit.
        for args in (["stat", "demo"], ["list"], ["read", "demo/vol0", "--length", "4"],
                     ["dump", "demo"], ["check", "demo"], ["ls", "demo"]):
            r = tp(home, *args, check=0)
            assert f"process {holder.pid}" in r.stderr and "last commit" in r.stderr, args
        assert [p["name"] for p in json.loads(tp(home, "list", "--json", check=0).out)] == ["demo"]
    assert fingerprint(home / "demo") == before
    check_metadata(home / "demo")
    tp(home, "stat", "demo", check=0)        # free again


def test_corrupt_pool_is_exit_3_and_can_still_be_destroyed(home, demo):
    with open(home / "demo" / "metadata", "r+b") as f:
        f.write(b"\xff" * 512)                  # the superblock no longer checks out
    assert_one_line_error(tp(home, "stat", "demo"), 3, "demo")
    r = tp(home, "destroy", "demo", "--yes", check=0)
    assert "warning" in r.stderr and not (home / "demo").exists()


def test_unexpected_error_is_one_line_unless_debug(home, demo):
    code = ("import sys, thinpool.cli.info as info\n"
            "def boom(pool): raise RuntimeError('boom')\n"
            "info.pool_stat = boom\n"
            "from thinpool.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    run = [sys.executable, "-c", code, "--home", str(home)]
    r = subprocess.run([*run, "stat", "demo"], capture_output=True, text=True, env=clean_env(),
                       timeout=60)
    assert_one_line_error(r, 1, "RuntimeError: boom", "--debug")
    r = subprocess.run([*run, "--debug", "stat", "demo"], capture_output=True, text=True,
                       env=clean_env(), timeout=60)
    assert r.returncode == 1 and "Traceback" in r.stderr and "boom" in r.stderr


# -- data in and out ------------------------------------------------------------------------
@requires_tools
def test_write_read_offsets_and_sizes(home, demo):
    payload = random.Random(3).randbytes(3 * BS + 123)
    r = tp(home, "write", "demo/vol0", "--offset", "1s", input=payload, check=0)
    assert f"wrote {len(payload)} bytes" in r.out
    assert tp(home, "read", "demo/vol0", "--offset", "512", "--length", str(len(payload)),
              check=0).stdout == payload
    whole = tp(home, "read", "demo/vol0", check=0).stdout
    assert len(whole) == MiB
    assert whole[:512] == demo[:512] and whole[512:512 + len(payload)] == payload
    # Up to the very last byte is fine; sizes in any unit.
    tp(home, "write", "demo/vol0", "--offset", "1023.5KiB", input=b"z" * 512, check=0)
    assert tp(home, "read", "demo/vol0", "--offset", "0.5k", "--length", "1s",
              check=0).stdout == payload[:512]
    assert tp(home, "read", "demo/vol0", "--offset", "1048064", check=0).stdout == b"z" * 512
    assert tp(home, "read", "demo/snap0", "--length", "100K", check=0).stdout == demo
    check_metadata(home / "demo")


def _sparse_source(path, size: int) -> bytes:
    """A file with holes, random runs (some unaligned), explicit zero runs and a short tail."""
    rng = random.Random(11)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in ((100, 5000), (3 * BS, 2 * BS), (20 * BS + 777, 3000),
                       (size - 4096 - 5, 4096 + 5)):
            f.seek(off)
            f.write(rng.randbytes(n))
        f.seek(10 * BS)
        f.write(bytes(4 * BS))          # written zeros: data to SEEK_DATA, but all zero
    return path.read_bytes()


@requires_tools
def test_import_export_round_trip_is_sparse(home, tmp_path):
    size = 40 * BS + 12345              # not a whole number of blocks
    src = tmp_path / "src.img"
    want = _sparse_source(src, size)
    with Pool.create(home / "p", data_size=16 * MiB) as pool:
        vol = pool.create_thin("v", size)
        vol.write(0, b"\xee" * size)    # stale data everywhere: import must leave none of it
    r = tp(home, "import", "p/v", str(src), check=0)
    assert "imported" in r.out and r.stderr == ""          # no progress bar off a terminal
    nonzero_blocks = sum(1 for b in range(0, size, BS) if any(want[b:b + BS]))
    doc = json.loads(tp(home, "stat", "p/v", "--json", check=0).stdout)
    assert doc["mapped_blocks"] == nonzero_blocks          # zero runs and holes not written
    out = tmp_path / "out.img"
    out.write_bytes(b"old contents")                       # export replaces it (--yes)
    r = tp(home, "export", "p/v", str(out), "--yes", check=0)
    assert r.stderr == ""
    assert out.read_bytes() == want
    nonzero_pages = sum(1 for p in range(0, size, 4096) if any(want[p:p + 4096]))
    assert out.stat().st_blocks * 512 <= nonzero_pages * 4096
    check_metadata(home / "p")
    # Into a larger volume: its first len(FILE) bytes are the file.
    tp(home, "create", "p/w", "--size", "4M", check=0)
    tp(home, "import", "p/w", str(src), check=0)
    assert tp(home, "read", "p/w", "--length", str(size), check=0).stdout == want


@requires_tools
def test_progress_bar_only_on_a_terminal(home, demo, tmp_path):
    master, slave = os.openpty()
    try:
        r = subprocess.run([*THINPOOL, "--home", str(home), "export", "demo/vol0",
                            str(tmp_path / "x.img")], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=slave, env=clean_env(), timeout=60)
        os.close(slave)
        slave = -1
        seen = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert r.returncode == 0
    text = seen.decode(errors="replace")
    assert "export demo/vol0" in text and "MiB" in text
    assert (tmp_path / "x.img").read_bytes()[:len(demo)] == demo
