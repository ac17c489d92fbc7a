"""``thinpool rename POOL NEW``: a pool's directory gets a new name under its writer lock."""

from __future__ import annotations

import pytest

from tests.cli.helpers import assert_one_line_error, fingerprint, tp
from tests.holder import pool_held_elsewhere
from tests.tptools import assert_checks_pass, requires_tools


@pytest.fixture
def home(tmp_path):
    h = tmp_path / "home"
    tp(h, "create", "demo", "--size", "16M", check=0)
    tp(h, "create", "demo/v", "--size", "1M", check=0)
    tp(h, "write", "demo/v", input=b"kept", check=0)
    return h


@requires_tools
def test_a_pool_renamed_keeps_everything(home):
    before = fingerprint(home / "demo")
    r = tp(home, "rename", "demo", "lab", check=0)
    assert r.out.startswith("renamed pool demo to lab")
    assert not (home / "demo").exists() and fingerprint(home / "lab") == before
    assert tp(home, "read", "lab/v", "--length", "4", check=0).stdout == b"kept"
    assert [line.split()[0] for line in tp(home, "list", check=0).out.splitlines()[2:4]] == \
        ["lab", "lab/v"]
    assert_checks_pass(home / "lab" / "metadata")


def test_pool_rename_refusals_change_nothing(home):
    tp(home, "create", "other", "--size", "16M", check=0)
    before = fingerprint(home / "demo")
    assert_one_line_error(tp(home, "rename", "demo", "other"), 1, "exists already")
    assert_one_line_error(tp(home, "rename", "demo", "../x"), 2, "invalid pool name")
    assert_one_line_error(tp(home, "rename", "nope", "x"), 1, "no pool named 'nope'")
    with pool_held_elsewhere(home / "demo") as holder:
        assert_one_line_error(tp(home, "rename", "demo", "lab"), 5, f"process {holder.pid}",
                              "--wait")
    assert fingerprint(home / "demo") == before and not (home / "lab").exists()
