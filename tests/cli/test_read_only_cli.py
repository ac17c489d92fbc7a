"""Read-only volumes through the ``thinpool`` command as real processes: ``snapshot --read-only``,
``configure POOL/VOL --read-only|--read-write`` (the pool form unchanged), refusals of write,
import, discard and resize (exit 2, one line, every file as it was), ``stat``'s ``attr`` column,
``read-only`` line and JSON field, the flag across commands, an old names file, both checkers."""

from __future__ import annotations

import json

import pytest

from tests.cli.helpers import assert_one_line_error, fingerprint, tp
from tests.tptools import assert_checks_pass, requires_tools


@pytest.fixture
def home(tmp_path):
    h = tmp_path / "home"
    tp(h, "create", "demo", "--size", "16M", check=0)
    tp(h, "create", "demo/vol0", "--size", "1M", check=0)
    tp(h, "write", "demo/vol0", input=b"hello" * 1000, check=0)
    r = tp(h, "snapshot", "demo/vol0", "backup", "--read-only", check=0)
    assert r.out == "created read-only snapshot demo/backup of demo/vol0 (1 MiB, device id 2)\n"
    return h


def _vols(home):
    st = json.loads(tp(home, "stat", "demo", "--json", check=0).stdout)
    return {v["name"]: v["read_only"] for v in st["volumes"]}


def _table_rows(home):
    lines = tp(home, "stat", "demo", check=0).out.splitlines()
    head = next(i for i, l in enumerate(lines) if l.split()[:1] == ["name"])
    cols = lines[head].split()
    assert "attr" in cols
    rows = {}
    for l in lines[head + 2:]:
        cells = l.split()
        rows[cells[0]] = cells
    return cols, rows


def test_stat_shows_the_flag(home):
    assert _vols(home) == {"vol0": False, "backup": True}
    cols, rows = _table_rows(home)
    # attr sits before origin, the last column; sizes have a unit each ("1 MiB").
    assert rows["vol0"][-2:] == ["w", "-"]
    assert rows["backup"][-2:] == ["r", "vol0"]
    out = tp(home, "stat", "demo/backup", check=0).out
    assert "read-only         yes (writes, discards and resizes are refused; 'thinpool " \
           "configure demo/backup --read-write' makes it writable)" in out
    assert "read-only         no" in tp(home, "stat", "demo/vol0", check=0).out
    j = json.loads(tp(home, "stat", "demo/backup", "--json", check=0).stdout)
    assert j["read_only"] is True and j["origin"] == "vol0"


@pytest.mark.parametrize("args,what", [
    (("write", "demo/backup"), "write"),
    (("write", "demo/backup", "--offset", "4096"), "write"),
    (("import", "demo/backup", "{img}"), "import"),
    (("discard", "demo/backup", "--yes"), "discard"),
    (("discard", "demo/backup", "--offset", "64K", "--length", "64K", "--yes"), "discard"),
    (("resize", "demo/backup", "--size", "2M"), "resize"),
    (("resize", "demo/backup", "--size", "64K", "--yes"), "resize"),
])
def test_changes_to_a_read_only_volume_are_refused(home, tmp_path, args, what):
    img = tmp_path / "in.img"
    img.write_bytes(b"data" * 100)
    before = fingerprint(home / "demo")
    r = tp(home, *(a.replace("{img}", str(img)) for a in args), input=b"new bytes")
    assert_one_line_error(r, 2, f"volume demo/backup is read-only: {what} refused",
                          "thinpool configure demo/backup --read-write")
    assert r.out == ""
    assert fingerprint(home / "demo") == before
    assert tp(home, "read", "demo/backup", "--length", "5000", check=0).stdout == b"hello" * 1000


def test_revert_and_merge_onto_a_read_only_volume_are_refused(home):
    tp(home, "configure", "demo/vol0", "--read-only", check=0)
    tp(home, "configure", "demo/backup", "--read-write", check=0)
    before = fingerprint(home / "demo")
    assert_one_line_error(tp(home, "revert", "demo/vol0", "backup"), 2,
                          "volume demo/vol0 is read-only: revert to snapshot 'backup' refused")
    assert_one_line_error(tp(home, "merge", "demo/backup"), 2,
                          "volume demo/vol0 is read-only: merge of snapshot 'backup' into it")
    assert fingerprint(home / "demo") == before


def test_configure_a_volume(home):
    r = tp(home, "configure", "demo/backup", check=0)
    assert r.out == "volume demo/backup is read-only\n"
    r = tp(home, "configure", "demo/backup", "--read-write", check=0)
    assert r.out == "volume demo/backup is writable now\n"
    tp(home, "write", "demo/backup", input=b"changed", check=0)
    assert tp(home, "read", "demo/backup", "--length", "9", check=0).stdout == b"changedll"
    assert tp(home, "read", "demo/vol0", "--length", "5", check=0).stdout == b"hello"
    r = tp(home, "configure", "demo/vol0", "--read-only", check=0)
    assert r.out == ("volume demo/vol0 is read-only now (make it writable again with "
                     "'thinpool configure demo/vol0 --read-write')\n")
    before = fingerprint(home / "demo")
    r = tp(home, "configure", "demo/vol0", "--read-only", check=0)
    assert r.out == "volume demo/vol0 is read-only already; nothing was changed\n"
    assert fingerprint(home / "demo") == before
    j = json.loads(tp(home, "configure", "demo/vol0", "--json", check=0).stdout)
    assert j == {"pool": "demo", "name": "vol0", "read_only": True}
    assert _vols(home) == {"vol0": True, "backup": False}
    # Snapshots of a read-only volume are writable unless asked; deleting one is allowed.
    tp(home, "snapshot", "demo/vol0", "work", check=0)
    tp(home, "write", "demo/work", input=b"W", check=0)
    tp(home, "delete", "demo/vol0", check=0)
    assert _vols(home) == {"backup": False, "work": False}


def test_configure_pool_form_and_misuse(home):
    before = fingerprint(home / "demo")
    assert_one_line_error(tp(home, "configure", "demo", "--read-only"), 2,
                          "--read-only and --read-write apply to volumes, not to pools")
    assert_one_line_error(tp(home, "configure", "demo/vol0", "--low-water", "1M"), 2,
                          "--low-water applies to pools, not to volumes")
    assert_one_line_error(tp(home, "configure", "demo/nope", "--read-only"), 1, "no volume 'nope'")
    assert fingerprint(home / "demo") == before
    r = tp(home, "configure", "demo", "--error-if-no-space", check=0)
    assert "fail writes at once" in r.out
    j = json.loads(tp(home, "configure", "demo", "--json", check=0).stdout)
    assert j["error_if_no_space"] is True


def test_old_names_file_without_the_field(home):
    pool = home / "demo"
    for name in ("names.json", "names.copy.json"):
        doc = json.loads((pool / name).read_text())
        for e in doc["volumes"].values():
            e.pop("read_only", None)
        (pool / name).write_text(json.dumps(doc))
    assert _vols(home) == {"vol0": False, "backup": False}
    tp(home, "write", "demo/backup", input=b"ok", check=0)
    _, rows = _table_rows(home)
    assert rows["backup"][-2:] == ["w", "vol0"]


@requires_tools
def test_both_checkers_after_refusals(home):
    tp(home, "configure", "demo/vol0", "--read-only", check=0)
    tp(home, "discard", "demo/vol0", "--yes", check=2)
    tp(home, "write", "demo/vol0", input=b"x", check=2)
    tp(home, "snapshot", "demo/vol0", "w", check=0)
    tp(home, "write", "demo/w", input=b"w" * 70000, check=0)
    assert_checks_pass(home / "demo" / "metadata")
