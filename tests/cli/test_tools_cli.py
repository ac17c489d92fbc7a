"""The metadata-tool commands (check, repair, dump, restore, ls, delta, trim, metadata-size,
metadata-snap) run as an admin would: the installed console script as a subprocess, compared with
thin-provisioning-tools 0.9.0 byte for byte where they have the same command.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess

import pytest

from thinpool import Pool
from thinpool.metadata.walker import MetadataReader
from tests.cli.helpers import assert_one_line_error, fingerprint, tp
from tests.holder import pool_held_elsewhere
from tests.tptools import assert_checks_pass
from tests.tptools import (random_superblock, requires_tools, thin_check, thin_delta, thin_dump,
                           thin_ls, thin_restore, to_xml)

pytestmark = requires_tools

MiB = 1 << 20
BS = 64 * 1024
META_BLOCK = 4096

#: The thin_ls 0.9.0 fields compared here.
LS_FIELDS = ("DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS,MAPPED_SECTORS,EXCLUSIVE_BYTES,"
             "MAPPED,EXCLUSIVE,SHARED,TRANSACTION,CREATE_TIME,SNAP_TIME")


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()




def assert_thin_check_clean(path) -> None:
    assert_checks_pass(path)


# -- a pool built through the CLI -------------------------------------------------------------
#: Volume names -> device ids of the built pool (ids only increase: ``c`` does not reuse the
#: id of the deleted ``b``).
IDS = {"a": 1, "c": 6, "s2": 4, "s3": 5}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Pool ``demo`` built with the CLI only: ``a`` holds 17 MiB (272 blocks, so its mapping tree
    has an internal node and several leaves); ``s1`` snapshots ``a``, ``s2`` snapshots ``s1`` and
    ``s3`` snapshots ``s2``, each followed by writes to both sides; ``b`` (with data) and ``s1``
    are deleted; ``c`` is empty. Returns (home, pool directory)."""
    home = tmp_path_factory.mktemp("tools") / "home"
    rng = random.Random(1234)
    steps = [
        (["create", "demo", "--size", "64M"], b""),
        (["create", "demo/a", "--size", "32M"], b""),
        (["write", "demo/a"], rng.randbytes(17 * MiB)),
        (["create", "demo/b", "--size", "4M"], b""),
        (["write", "demo/b", "--offset", "1M"], rng.randbytes(3 * BS)),
        (["snapshot", "demo/a", "s1"], b""),
        (["write", "demo/s1", "--offset", "100K"], rng.randbytes(5 * BS)),
        (["write", "demo/a", "--offset", "10M"], rng.randbytes(2 * BS + 7)),
        (["snapshot", "demo/s1", "s2"], b""),
        (["write", "demo/s2", "--offset", "30M"], rng.randbytes(BS)),
        (["write", "demo/s1", "--offset", "5M"], rng.randbytes(3 * BS)),
        (["snapshot", "demo/s2", "s3"], b""),
        (["write", "demo/s3", "--offset", "1M"], rng.randbytes(BS)),
        (["delete", "demo/b"], b""),
        (["delete", "demo/s1"], b""),
        (["create", "demo/c", "--size", "1M"], b""),
    ]
    for args, data in steps:
        tp(home, *args, input=data, check=0)
    pool = home / "demo"
    with Pool.open(pool, read_only=True) as p:
        assert {v.name: v.dev_id for v in p.stat().volumes} == IDS
    return home, pool


def test_cli_pool_matches_the_real_tools(built):
    home, pool = built
    meta = pool / "metadata"
    before = fingerprint(pool)

    dumped = tp(home, "dump", "demo", check=0).out
    assert dumped == thin_dump(meta)
    assert dumped.count("<device ") == len(IDS)

    for extra in ([], ["--no-headers"]):
        r = tp(home, "ls", "demo", "-o", LS_FIELDS, *extra, check=0)
        assert r.out == thin_ls(meta, "-o", LS_FIELDS, *extra)
        assert r.stderr == ""

    r = tp(home, "ls", "demo", check=0)
    header = r.out.splitlines()[0].split()
    assert header[:2] == ["DEV", "NAME"]
    rows = [line.split() for line in r.out.splitlines()[1:]]
    assert [(int(row[0]), row[1]) for row in rows] == sorted((i, n) for n, i in IDS.items())

    for left, right, verbose in (("a", "s2", []), ("a", "s2", ["--verbose"]), ("s2", "s3", []),
                                 ("s3", "a", ["--verbose"]), ("a", "c", [])):
        r = tp(home, "delta", "demo", "--snap1", left, "--snap2", right, *verbose, check=0)
        want = thin_delta(meta, "--thin1", str(IDS[left]), "--thin2", str(IDS[right]), *verbose)
        assert r.out == want, (left, right, verbose)

    r = tp(home, "check", "demo", check=0)
    assert "clean" in r.out
    doc = json.loads(tp(home, "check", "demo", "--json", check=0).stdout)
    assert doc["clean"] is True

    # stat's exclusive/shared counts are thin_ls's.
    st = json.loads(tp(home, "stat", "demo", "--json", check=0).stdout)
    want = {int(line.split()[0]): (int(line.split()[1]), int(line.split()[2]))
            for line in thin_ls(meta, "--no-headers", "-o",
                                "DEV,EXCLUSIVE_BLOCKS,SHARED_BLOCKS").splitlines()}
    assert {v["dev_id"]: (v["exclusive_blocks"], v["shared_blocks"]) for v in st["volumes"]} == want
    assert any(e > 0 for e, _ in want.values()) and any(s > 0 for _, s in want.values())
    assert fingerprint(pool) == before          # every command above only read


def test_read_only_commands_change_nothing(built):
    home, pool = built
    before = fingerprint(pool)
    meta_before = sha(pool / "metadata")
    for args in (["check", "demo", "-q"], ["dump", "demo", "--format", "json", "--dev-id", "a"],
                 ["ls", "demo", "--json"],
                 ["delta", "demo", "--snap1", "a", "--snap2", "s3", "--format", "json"],
                 ["stat", "demo/s2"], ["list"]):
        tp(home, *args, check=0)
        assert sha(pool / "metadata") == meta_before, args
    assert fingerprint(pool) == before


# -- raw metadata files -----------------------------------------------------------------------
@pytest.mark.parametrize("seed", [3, 26])
def test_raw_metadata_file_matches_the_real_tools(tmp_path, seed):
    rng = random.Random(seed)
    sb = random_superblock(rng, max_devices=5, max_mappings=2000)
    while len(sb.devices) < 2:
        sb = random_superblock(rng, max_devices=5, max_mappings=2000)
    meta = thin_restore(to_xml(sb), tmp_path / "meta.img")
    home = tmp_path / "home"

    assert tp(home, "dump", str(meta), check=0).out == thin_dump(meta)
    for extra in ([], ["--no-headers"]):
        assert tp(home, "ls", str(meta), "-o", LS_FIELDS, *extra, check=0).out == \
            thin_ls(meta, "-o", LS_FIELDS, *extra)
    r = tp(home, "ls", str(meta), check=0)
    assert "NAME" not in r.out.splitlines()[0]
    ids = sorted(sb.devices)
    for left, right, verbose in ((ids[0], ids[1], []), (ids[-1], ids[0], []),
                                 (ids[-1], ids[0], ["--verbose"])):
        r = tp(home, "delta", str(meta), "--thin1", str(left), "--thin2", str(right), *verbose,
               check=0)
        assert r.out == thin_delta(meta, "--thin1", str(left), "--thin2", str(right), *verbose)
    assert tp(home, "check", str(meta), "-q", check=0).out == ""


# -- dump and restore -------------------------------------------------------------------------
def test_dump_restore_round_trips(built, tmp_path):
    home, pool = built
    want = thin_dump(pool / "metadata")

    js = tmp_path / "demo.json"
    tp(home, "dump", "demo", "--format", "json", "-o", str(js), check=0)
    doc = json.loads(js.read_text())
    assert {"superblock", "devices"} <= set(doc)
    out = tmp_path / "from-json.meta"
    r = tp(home, "restore", "-i", str(js), "-o", str(out), check=0)
    assert f"restored {len(IDS)} device(s)" in r.out
    assert thin_dump(out) == want
    assert_thin_check_clean(out)

    xml = tmp_path / "demo.xml"
    xml.write_text(want)
    out2 = tmp_path / "from-xml.meta"
    tp(home, "restore", "-i", str(xml), "-o", str(out2), check=0)
    assert thin_dump(out2) == want
    assert_thin_check_clean(out2)
    tp(home, "check", str(out2), "-q", check=0)

    # A random pool from the real tools' XML, into an existing (zeroed) file.
    text = to_xml(random_superblock(random.Random(5), max_devices=4, max_mappings=1500))
    src = tmp_path / "random.xml"
    src.write_text(text)
    out3 = tmp_path / "random.meta"
    with open(out3, "wb") as f:
        f.truncate(8 * MiB)
    tp(home, "restore", "-i", str(src), "-o", str(out3), check=0)
    assert thin_dump(out3) == thin_dump(thin_restore(text, tmp_path / "by-tools.meta"))


def _bad_dumps(good_xml: str, good_json: str) -> dict[str, bytes]:
    lines = good_xml.splitlines(keepends=True)
    js = json.loads(good_json)
    no_devices = {k: v for k, v in js.items() if k != "devices"}
    no_nr = json.loads(good_json)
    del no_nr["superblock"]["nr_data_blocks"]
    past = "".join(lines[:2] + ['    <single_mapping origin_block="1000" data_block="99999999"'
                                ' time="0"/>\n'] + lines[2:])
    return {
        "truncated-xml": good_xml[: len(good_xml) // 2].encode(),
        "unknown-element": "".join(lines[:2] + ['    <frobnicate origin_block="1"/>\n']
                                   + lines[2:]).encode(),
        "data-block-past-end": past.encode(),
        "random-bytes": random.Random(9).randbytes(5000),
        "empty": b"",
        "json-missing-devices": json.dumps(no_devices).encode(),
        "json-missing-nr-data-blocks": json.dumps(no_nr).encode(),
    }


BAD_WORDS = {
    "truncated-xml": ["XML"], "unknown-element": ["frobnicate"],
    "data-block-past-end": ["99999999", "past the end"], "random-bytes": [], "empty": [],
    "json-missing-devices": ["devices"], "json-missing-nr-data-blocks": ["nr_data_blocks"],
}


@pytest.fixture(scope="module")
def small_dumps(tmp_path_factory):
    """XML and JSON dumps of a tiny pool whose device 1 maps virtual block 0 to data block 0."""
    d = tmp_path_factory.mktemp("small")
    with Pool.create(d / "p", data_size=4 * MiB) as pool:
        pool.create_thin("v", MiB).write(0, b"x" * (BS + 1))
        pool.snapshot("v", "s")
    meta = str(d / "p" / "metadata")
    return thin_dump(meta), tp(d / "home", "dump", meta, "--format", "json", check=0).out


@pytest.mark.parametrize("case", list(BAD_WORDS))
def test_restore_refuses_bad_dumps(tmp_path, small_dumps, case):
    bad = _bad_dumps(*small_dumps)[case]
    src = tmp_path / "bad.dump"
    src.write_bytes(bad)
    home = tmp_path / "home"

    # A new output file is never made.
    out = tmp_path / "new.meta"
    r = tp(home, "restore", "-i", str(src), "-o", str(out))
    assert_one_line_error(r, 2, *BAD_WORDS[case])
    assert r.stdout == b""
    assert not out.exists()

    # An existing output (here valid metadata) is left byte for byte as it was: the whole dump is
    # parsed before the output is touched. (One XML and one JSON case, to keep the file fast.)
    if case not in ("data-block-past-end", "json-missing-nr-data-blocks"):
        return
    existing = thin_restore(small_dumps[0], tmp_path / "existing.meta")
    before = sha(existing)
    r = tp(home, "restore", "-i", str(src), "-o", str(existing))
    assert_one_line_error(r, 2, *BAD_WORDS[case])
    assert sha(existing) == before
    assert_thin_check_clean(existing)


def _write(path, text: str):
    path.write_text(text)
    return path


def test_restore_into_too_small_output_leaves_no_valid_looking_metadata(tmp_path):
    # 20000 scattered single mappings need ~80 leaves; 64 KiB of metadata is 16 blocks.
    n = 20000
    lines = ['<superblock uuid="" time="0" transaction="1" flags="0" version="2" '
             f'data_block_size="128" nr_data_blocks="{2 * n}">',
             '  <device dev_id="1" mapped_blocks="0" transaction="0" creation_time="0" snap_time="0">']
    lines += [f'    <single_mapping origin_block="{3 * i}" data_block="{2 * i}" time="0"/>'
              for i in range(n)]
    lines += ["  </device>", "</superblock>"]
    src = _write(tmp_path / "big.xml", "\n".join(lines) + "\n")
    home = tmp_path / "home"
    out = tmp_path / "tiny.meta"
    r = tp(home, "restore", "-i", str(src), "-o", str(out), "--metadata-size", "64K")
    assert_one_line_error(r, 4, "too small")
    # The new file it made is removed again: nothing half written is left behind.
    assert not out.exists()

    # The same into an existing small file: the superblock is zeroed there too.
    existing = tmp_path / "existing.meta"
    with open(existing, "wb") as f:
        f.truncate(64 * 1024)
    assert_one_line_error(tp(home, "restore", "-i", str(src), "-o", str(existing)), 4)
    assert thin_check(existing).returncode != 0


# -- damage and repair ------------------------------------------------------------------------
def _leaf_blocks(meta, dev_id: int) -> list[int]:
    """Block numbers of the leaves of device ``dev_id``'s mapping tree, in key order."""
    with MetadataReader(str(meta)) as r:
        tree = r.mapping_tree
        root = r.roots()[dev_id]
        out, stack = [], [root]
        while stack:
            b = stack.pop()
            n = tree.node(b)
            if n.is_leaf:
                out.append(b)
            else:
                stack.extend(int(v) for v in n.values[: n.nr].tolist()[::-1])
        return out


def test_damaged_leaf_is_found_and_repaired(built, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    shutil.copytree(built[1], home / "demo")
    meta = home / "demo" / "metadata"
    leaves = _leaf_blocks(meta, IDS["a"])
    assert len(leaves) >= 2                       # a real leaf, not the root
    victim = leaves[-1]
    with open(meta, "r+b") as f:
        f.seek(victim * META_BLOCK + 1000)
        byte = f.read(1)
        f.seek(victim * META_BLOCK + 1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert thin_check(meta).returncode != 0

    r = tp(home, "check", "demo")
    assert r.returncode == 3, (r.out, r.stderr)
    assert f"block {victim}" in r.out and "Traceback" not in r.stderr
    r = tp(home, "check", "demo", "--json")
    assert r.returncode == 3
    doc = json.loads(r.stdout)
    assert doc["clean"] is False
    assert victim in [f["block"] for f in doc["findings"]]
    assert tp(home, "check", "demo", "-q").stdout == b""

    damaged = sha(meta)
    out = tmp_path / "repaired.meta"
    r = tp(home, "repair", "-i", "demo", "-o", str(out), check=0)
    assert str(out) in r.out
    assert sha(meta) == damaged                   # repair never writes its input
    assert_thin_check_clean(out)
    tp(home, "check", str(out), check=0)
    # Everything below the other leaves survives: the repaired dump still has every device.
    assert thin_dump(out).count("<device ") == len(IDS)

    out2 = tmp_path / "repaired2.meta"
    doc = json.loads(tp(home, "repair", "-i", str(meta), "-o", str(out2), "--json",
                        check=0).stdout)
    assert isinstance(doc, dict)
    assert_thin_check_clean(out2)

    # A pool whose superblock is damaged does not open, but check still examines it.
    with open(meta, "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff\xff\xff")
    r = tp(home, "check", "demo", "--json")
    assert r.returncode == 3 and r.stderr == "", r.stderr
    assert 0 in [f["block"] for f in json.loads(r.stdout)["findings"]]


# -- metadata-size ----------------------------------------------------------------------------
def _thin_metadata_size(*args: str) -> int:
    tool = shutil.which("thin_metadata_size", path=os.pathsep.join(
        [os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    if tool is None:
        pytest.skip("thin_metadata_size is not installed")
    r = subprocess.run([tool, *args, "-u", "b", "-n"], capture_output=True, text=True, check=True)
    return int(r.stdout.split()[0])


@pytest.mark.parametrize("ours,theirs", [
    (("64K", "1T", "1000"), ("64k", "1t", "1000")),
    (("1M", "10G", "1"), ("1m", "10g", "1")),
    (("128K", "100T", "65536"), ("128k", "100t", "65536")),
    (("64K", "100M", "1"), ("64k", "100m", "1")),
    (("512K", "3T", "7"), ("512k", "3t", "7")),
])
def test_metadata_size_matches_thin_metadata_size(tmp_path, ours, theirs):
    b, s, m = ours
    r = tp(tmp_path, "metadata-size", "-b", b, "-s", s, "-m", m, "--json", check=0)
    doc = json.loads(r.stdout)
    tb, ts, tm = theirs
    assert doc["metadata_size"] == _thin_metadata_size("-b", tb, "-s", ts, "-m", tm)
    assert doc["max_thins"] == int(m)
    if ours[0] == "64K":
        r = tp(tmp_path, "metadata-size", "-b", b, "-s", s, "-m", m, check=0)
        assert f"({doc['metadata_size']} bytes)" in r.out


# -- a held metadata snapshot beside a writer -------------------------------------------------
def test_metadata_snap_beside_a_writer(tmp_path):
    home = tmp_path / "home"
    rng = random.Random(4)
    tp(home, "create", "demo", "--size", "16M", check=0)
    tp(home, "create", "demo/v", "--size", "2M", check=0)
    tp(home, "write", "demo/v", input=rng.randbytes(5 * BS), check=0)
    tp(home, "snapshot", "demo/v", "s", check=0)
    tp(home, "write", "demo/s", "--offset", "64K", input=rng.randbytes(BS), check=0)
    r = tp(home, "metadata-snap", "reserve", "demo", check=0)
    assert "holding a metadata snapshot" in r.out
    at_reserve = tp(home, "dump", "demo", check=0).out
    # The pool goes on after the reservation; the held snapshot does not.
    tp(home, "write", "demo/v", "--offset", "1M", input=rng.randbytes(2 * BS), check=0)
    tp(home, "create", "demo/w", "--size", "1M", check=0)
    meta = home / "demo" / "metadata"
    live = thin_dump(meta)
    assert live != at_reserve

    with pool_held_elsewhere(home / "demo") as holder:
        r = tp(home, "dump", "-m", "demo", check=0)
        assert r.out == thin_dump(meta, "-m")
        # The pool as it was at the reservation; like the kernel's copy, the held superblock has
        # no data space map, so both tools print nr_data_blocks="0".
        held = r.out.splitlines(keepends=True)
        then = at_reserve.splitlines(keepends=True)
        assert held[1:] == then[1:]
        assert held[0] == then[0].replace('nr_data_blocks="256"', 'nr_data_blocks="0"')
        r = tp(home, "ls", "-m", "demo", "-o", LS_FIELDS, check=0)
        assert r.out == thin_ls(meta, "-m", "-o", LS_FIELDS)
        r = tp(home, "delta", "-m", "demo", "--snap1", "1", "--snap2", "2", "--verbose", check=0)
        assert r.out == thin_delta(meta, "-m", "--thin1", "1", "--thin2", "2", "--verbose")
        r = tp(home, "dump", "demo", check=0)         # the live pool, at its last commit
        assert r.out == live and f"process {holder.pid}" in r.stderr
    assert holder.exitcode == 0
    r = tp(home, "metadata-snap", "release", "demo", check=0)
    assert "released" in r.out
    assert_thin_check_clean(meta)
    tp(home, "check", "demo", "-q", check=0)
    assert "metadata_snap=" not in thin_dump(meta).splitlines()[0]
    r = tp(home, "dump", "-m", "demo")          # nothing held any more
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1


# -- trim -------------------------------------------------------------------------------------
def test_trim_gives_space_back(tmp_path):
    """Freed blocks are hole-punched when the commit that frees them is durable, so ``delete``
    already gives a deleted volume's data back; trim gives back what such punching never reached,
    here the rest of a fully allocated data file handed to ``create --data``."""
    home = tmp_path / "home"
    data = tmp_path / "data.img"
    data.write_bytes(b"\xa5" * (32 * MiB))          # every byte allocated on the host
    tp(home, "create", "demo", "--data", str(data), check=0)
    tp(home, "create", "demo/keep", "--size", "1M", check=0)
    keep = random.Random(1).randbytes(BS)
    tp(home, "write", "demo/keep", input=keep, check=0)
    tp(home, "create", "demo/v", "--size", "8M", check=0)
    tp(home, "write", "demo/v", input=random.Random(2).randbytes(8 * MiB), check=0)
    full = os.stat(data).st_blocks
    assert full * 512 >= 32 * MiB
    tp(home, "delete", "demo/v", check=0)
    before = os.stat(data).st_blocks
    assert before <= full

    r = tp(home, "trim", "demo", check=0)
    assert "trimmed 511 free block(s)" in r.out
    after = os.stat(data).st_blocks
    assert after < before
    assert after * 512 <= 2 * BS                    # only the kept volume's block is left
    doc = json.loads(tp(home, "trim", "demo", "--json", check=0).stdout)
    assert set(doc) == {"free_blocks", "runs", "supported", "bytes_released", "block_size"}
    assert doc["block_size"] == BS and doc["free_blocks"] == 511 and doc["supported"] is True
    assert doc["bytes_released"] == 0               # nothing left to give back
    assert os.stat(data).st_blocks == after
    assert tp(home, "read", "demo/keep", "--length", "64K", check=0).stdout == keep
    assert_thin_check_clean(home / "demo" / "metadata")


# -- usage errors -----------------------------------------------------------------------------
def test_usage_errors(built):
    home, pool = built
    before = fingerprint(pool)
    r = tp(home, "ls", "demo", "-o", "DEV,BOGUS")
    assert_one_line_error(r, 2, "BOGUS")
    assert r.stdout == b""
    r = tp(home, "delta", "demo", "--snap1", "a", "--snap2", "nope")
    assert_one_line_error(r, 1, "nope")
    assert r.stdout == b""
    r = tp(home, "check", "/nonexistent")
    assert_one_line_error(r, 1, "/nonexistent")
    r = tp(home, "dump", "demo", "--dev-id", "nope")
    assert_one_line_error(r, 1, "nope")
    r = tp(home, "restore", "-i", "/nonexistent.xml", "-o", str(home / "x.meta"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1
    assert not (home / "x.meta").exists()
    assert fingerprint(pool) == before
