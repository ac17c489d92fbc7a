"""The admin's view of damaged pools (issue 11): every message names the damaged file and the
command that helps, ``thinpool check POOL`` finds what the other commands complained about (no
advice in a circle), and damage a read-only command found stops later writes.

Each test fails on the commit before (where a truncated data file, a damaged names.json or
pool.json all said "its metadata is damaged; run thinpool check" and check said clean, and a
write after ``stat`` found damage committed on top of it)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.cli.helpers import assert_one_line_error, tp
from tests.tools.helpers import device_roots, flip_bit
from tests.tptools import assert_checks_pass, requires_tools, thin_check

MiB = 1 << 20


@pytest.fixture
def home(tmp_path):
    h = tmp_path / "home"
    tp(h, "create", "p", "--size", "16M", check=0)
    tp(h, "create", "p/a", "--size", "8M", check=0)
    tp(h, "create", "p/b", "--size", "8M", check=0)
    tp(h, "write", "p/a", input=os.urandom(200_000), check=0)
    tp(h, "snapshot", "p/a", "s", check=0)
    return h


def _stat(home, pool="p") -> dict:
    return json.loads(tp(home, "stat", pool, "--json", check=0).stdout)


def _names(home) -> dict:
    return {v["name"]: (v["dev_id"], v["size"], v["origin"]) for v in _stat(home)["volumes"]}


@requires_tools
def test_a_write_after_stat_found_damage_is_refused_until_check_is_clean(home, tmp_path):
    pool = home / "p"
    good = tmp_path / "good"
    shutil.copyfile(pool / "metadata", good)
    flip_bit(pool / "metadata", device_roots(pool / "metadata")[1], 100)
    r = tp(home, "stat", "p")
    assert_one_line_error(r, 3, str(pool / "metadata"), "thinpool check p", "block ")
    before = (pool / "metadata").read_bytes()
    r = tp(home, "write", "p/b", input=b"on top of damage")
    assert_one_line_error(r, 1, "read-only until it is checked", "thinpool check p")
    with open(pool / "metadata", "rb") as f:                 # nothing committed, only the flag
        assert f.read(4096)[:4] == before[:4] and f.read() == before[4096:]
    assert thin_check(pool / "metadata").returncode != 0
    tp(home, "check", "p", check=3)
    shutil.copyfile(good, pool / "metadata")                 # the admin repaired it
    assert_one_line_error(tp(home, "write", "p/b", input=b"x"), 1, "thinpool check p")
    r = tp(home, "check", "p", check=0)
    assert "mark is cleared" in r.stderr
    tp(home, "write", "p/b", input=b"after the check", check=0)
    assert_checks_pass(pool / "metadata")


@requires_tools
def test_check_finding_metadata_damage_marks_the_pool_too(home):
    pool = home / "p"
    flip_bit(pool / "metadata", device_roots(pool / "metadata")[1], 100)
    tp(home, "check", "p", check=3)
    assert_one_line_error(tp(home, "write", "p/b", input=b"x"), 1, "thinpool check p")


def test_a_short_data_file_is_named_with_its_sizes(home):
    data = home / "p" / "data"
    os.truncate(data, MiB)
    r = tp(home, "stat", "p")
    assert_one_line_error(r, 3, str(data), "1048576 bytes", "16777216 bytes",
                          f"truncate -s 16777216 {data}")
    assert "metadata is damaged" not in r.stderr
    r = tp(home, "check", "p")
    assert r.returncode == 3 and str(data) in r.out and "16777216" in r.out, (r.out, r.stderr)
    os.truncate(data, 16 * MiB)
    tp(home, "check", "p", check=0)
    tp(home, "write", "p/b", input=b"x", check=0)


@pytest.mark.parametrize("which", ["names.json", "names.copy.json", "pool.json", "pool.copy.json"])
def test_check_reports_a_damaged_record_and_the_next_write_mends_it(home, which):
    want = _names(home)
    f = home / "p" / which
    f.write_text("{ damaged")
    assert _names(home) == want                    # nothing lost meanwhile
    r = tp(home, "check", "p")
    assert r.returncode == 3 and str(f) in r.out and "damaged" in r.out, (r.out, r.stderr)
    r = tp(home, "write", "p/b", input=b"x", check=0)
    assert which in r.stderr                                 # the note says what was rewritten
    assert (home / "p" / f"{which}.damaged").read_text() == "{ damaged"
    tp(home, "check", "p", check=0)
    assert _names(home) == want


def test_both_pool_json_copies_lost_says_what_to_write_back(home):
    for f in ("pool.json", "pool.copy.json"):
        (home / "p" / f).unlink()
    r = tp(home, "stat", "p")
    assert_one_line_error(r, 3, "pool.json is missing", "pool.copy.json is missing",
                          '{"data": "data", "metadata": "metadata"}')
    r = tp(home, "check", "p")
    assert r.returncode == 3 and "pool.json is missing" in r.out
    (home / "p" / "pool.json").write_text('{"data": "data", "metadata": "metadata"}')
    tp(home, "check", "p", check=0)         # one file as older versions kept: no problem
    tp(home, "write", "p/b", input=b"x", check=0)
    assert json.loads((home / "p" / "pool.copy.json").read_text())["data"] == "data"
    tp(home, "check", "p", check=0)


def test_every_names_copy_lost_warns_and_rename_names_them_again(home):
    want = {v["name"]: (v["dev_id"], v["size"]) for v in _stat(home)["volumes"]}
    for f in ("names.json", "names.copy.json"):
        (home / "p" / f).unlink()
    r = tp(home, "stat", "p", check=0)
    assert "were lost" in r.stderr and "thinpool rename p/1 NAME" in r.stderr, r.stderr
    assert all(v["guessed"] for v in _stat(home)["volumes"])
    assert tp(home, "check", "p").returncode == 3
    for name, (dev, size) in want.items():
        tp(home, "rename", f"p/{dev}", name, check=0)
        tp(home, "resize", f"p/{name}", "--size", str(size), check=0)
    r = tp(home, "stat", "p", check=0)
    assert "were lost" not in r.stderr
    assert {v["name"]: (v["dev_id"], v["size"]) for v in _stat(home)["volumes"]} == want
    tp(home, "check", "p", check=0)
    assert_one_line_error(tp(home, "rename", "p/a", "b"), 1, "exists already")
    assert_one_line_error(tp(home, "rename", "p/a", "bad/name"), 2, "stays in its pool")
