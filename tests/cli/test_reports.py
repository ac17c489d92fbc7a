"""lvs-style reports of list and stat: -o, +FIELD, --units, --nosuffix, --noheadings,
--separator, --sort, -o help; and list --json carrying what stat --json says of each pool.

The oracle for every printed number is the same command's --json (exact integers)."""

from __future__ import annotations

import json

import pytest

from tests.cli.helpers import tp

MiB = 1 << 20


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """(Made once: every test here only reads.) demo: vol0 (3 blocks written, 1 of them later shared), snap of vol0 (read-only), a
    snapshot of snap; other: one volume."""
    home = tmp_path_factory.mktemp("reports") / "home"
    tp(home, "create", "demo", "--size", "16M", "--block-size", "64K", check=0)
    tp(home, "create", "demo/vol0", "--size", "4M", check=0)
    tp(home, "write", "demo/vol0", input=b"a" * (3 * 65536), check=0)
    tp(home, "snapshot", "demo/vol0", "snap", "--read-only", check=0)
    tp(home, "write", "demo/vol0", "--offset", "64K", input=b"b" * 65536, check=0)
    tp(home, "snapshot", "demo/snap", "grand", check=0)
    tp(home, "create", "other", "--size", "8M", check=0)
    tp(home, "create", "other/big", "--size", "1G", check=0)
    return home


def _json(home, *args):
    return json.loads(tp(home, *args, "--json", check=0).stdout)


def _rows(home, *args, sep=":"):
    out = tp(home, *args, "--noheadings", "--separator", sep, check=0).out
    return [line.split(sep) for line in out.splitlines()]


def test_fields_and_exact_units_agree_with_json(pool):
    st = _json(pool, "stat", "demo")
    rows = _rows(pool, "stat", "demo", "-o", "name,dev_id,size,mapped_bytes,exclusive_blocks,"
                 "shared_bytes,data_used,block_size", "--units", "b")
    want = [[v["name"], str(v["dev_id"]), str(v["size"]), str(v["mapped_bytes"]),
             str(v["exclusive_blocks"]), str(v["shared_blocks"] * st["block_size"]),
             str(st["data_blocks_used"] * st["block_size"]), str(st["block_size"])]
            for v in st["volumes"]]
    assert rows == want
    assert [r[0] for r in rows] == ["vol0", "snap", "grand"]
    # the blocks vol0 and snap share show up on both sides
    assert int(rows[0][5]) == 2 * 65536 and rows[0][4] == "1"


@pytest.mark.parametrize("units,nosuffix,want", [
    ("k", False, "4096.00k"), ("m", False, "4.00m"), ("g", True, "0.00"),
    ("K", False, "4194.30K"), ("M", False, "4.19M"), ("s", False, "8192"),
    ("h", False, "4 MiB"), ("h", True, "4"), ("b", False, str(4 * MiB)),
])
def test_units(pool, units, nosuffix, want):
    args = ["stat", "demo/vol0", "-o", "size", "--units", units] + (["--nosuffix"] * nosuffix)
    assert _rows(pool, *args) == [[want]]


def test_plus_adds_to_the_default_and_headings(pool):
    out = tp(pool, "stat", "demo", "-o", "+read_only,ancestors,descendants", check=0).out
    head = out.splitlines()[0].split()
    assert head[:3] == ["name", "dev", "id"] and head[-5:] == ["origin", "read", "only",
                                                                 "ancestors", "descendants"]
    rows = {r[0]: r for r in _rows(pool, "stat", "demo", "-o",
                                   "name,attr,read_only,origin,ancestors,descendants")}
    assert rows["vol0"] == ["vol0", "w", "no", "", "", "snap,grand"]
    assert rows["snap"] == ["snap", "r", "yes", "vol0", "vol0", "grand"]
    assert rows["grand"] == ["grand", "w", "no", "snap", "snap,vol0", ""]
    # aligned: a missing value is '-', so every row splits into as many words
    aligned = tp(pool, "stat", "demo", "-o", "name,origin,ancestors", "--noheadings",
                 check=0).out.split("\n")
    assert [line.split() for line in aligned if line] == [
        ["vol0", "-", "-"], ["snap", "vol0", "vol0"], ["grand", "snap", "snap,vol0"]]


def test_sort(pool):
    by_mapped = _rows(pool, "stat", "demo", "-o", "name,mapped_bytes", "--units", "b",
                      "--sort", "-mapped_bytes,name")
    assert by_mapped == sorted(by_mapped, key=lambda r: (-int(r[1]), r[0]))
    assert [r[0] for r in _rows(pool, "stat", "demo", "-o", "name", "--sort", "name")] == \
        ["grand", "snap", "vol0"]
    names = [r[0] for r in _rows(pool, "list", "-o", "name", "--sort", "-size")]
    assert names[0] == "other/big" and set(names) == {"demo", "demo/vol0", "demo/snap",
                                                      "demo/grand", "other", "other/big"}


def test_list_rows_carry_their_pools_fields(pool):
    rows = {r[0]: r for r in _rows(pool, "list", "-o", "name,type,pool,size,used,data_size,"
                                   "dev_id", "--units", "b")}
    lst = {p["name"]: p for p in _json(pool, "list")}
    assert rows["demo"] == ["demo", "pool", "demo", str(16 * MiB),
                            str(lst["demo"]["data_used"]), str(16 * MiB), ""]
    assert rows["demo/snap"][:3] == ["demo/snap", "snapshot", "demo"]
    assert rows["other/big"] == ["other/big", "volume", "other", str(1 << 30), "0",
                                 str(8 * MiB), "1"]


def test_every_pool_in_stat_report(pool):
    rows = _rows(pool, "stat", "-o", "pool,name")
    assert rows == [["demo", "vol0"], ["demo", "snap"], ["demo", "grand"], ["other", "big"]]


def test_list_json_is_stat_json_per_pool(pool):
    listed = _json(pool, "list")
    assert [p["name"] for p in listed] == ["demo", "other"]
    for p in listed:
        assert p == _json(pool, "stat", p["name"])
    demo = listed[0]
    assert {v["name"]: v["read_only"] for v in demo["volumes"]} == \
        {"vol0": False, "snap": True, "grand": False}
    bs = demo["block_size"]
    assert demo["data_size"] == demo["data_blocks_total"] * bs
    assert demo["data_used"] == demo["data_blocks_used"] * bs
    for v in demo["volumes"]:
        assert v["exclusive_bytes"] == v["exclusive_blocks"] * bs
        assert v["shared_bytes"] == v["shared_blocks"] * bs


@pytest.mark.parametrize("cmd", ["list", "stat"])
def test_help_lists_the_fields(pool, cmd):
    r = tp(pool, cmd, "-o", "help", check=0)
    keys = [line.split()[0] for line in r.out.splitlines()[1:]]
    assert {"name", "size", "mapped_bytes", "read_only", "data_used", "transaction_id"} <= set(keys)
    assert ("used" in keys) == (cmd == "list")
    # every listed field can be shown
    assert tp(pool, cmd, *(["demo"] if cmd == "stat" else []), "-o", ",".join(keys),
              check=0).returncode == 0


@pytest.mark.parametrize("args,what", [
    (("stat", "demo", "-o", "name,bogus"), "unknown field 'bogus'"),
    (("list", "-o", "nope"), "unknown field 'nope'"),
    (("stat", "demo", "--sort", "zzz"), "cannot sort by unknown field 'zzz'"),
    (("stat", "demo", "-o", ","), "-o needs field names"),
    (("list", "--json", "-o", "name"), "--json prints every key"),
    (("stat", "demo", "--units", "x"), "--units"),
    (("list", "--separator", "a\nb"), "line break"),
])
def test_bad_report_options(pool, args, what):
    r = tp(pool, *args, check=2)
    assert what in r.stderr and len(r.stderr.strip().splitlines()) == 1 and r.out == ""


def test_separator_that_is_not_utf8(pool):
    import os
    import subprocess
    from tests.cli.helpers import THINPOOL, clean_env
    r = subprocess.run([*THINPOOL, "--home", str(pool), "list", "--separator",
                        os.fsdecode(b"\xff")], capture_output=True, env=clean_env())
    assert r.returncode == 2 and b"not UTF-8" in r.stderr and r.stdout == b""
