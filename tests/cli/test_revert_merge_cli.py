"""``thinpool revert`` and ``thinpool merge`` as real processes: output, content against the
bytes written, refusals with their exit codes leaving every file as it was, the writer lock
(exit 5, or queued with --wait), both checkers on the result."""

from __future__ import annotations

import json
import threading

import pytest

from tests.cli.helpers import assert_one_line_error, fingerprint, tp
from tests.holder import pool_held_elsewhere
from tests.tptools import assert_checks_pass, requires_tools

MiB = 1 << 20


@pytest.fixture
def home(tmp_path):
    h = tmp_path / "home"
    tp(h, "create", "demo", "--size", "16M", check=0)
    tp(h, "create", "demo/vol0", "--size", "1M", check=0)
    tp(h, "write", "demo/vol0", input=b"first" * 100, check=0)
    tp(h, "snapshot", "demo/vol0", "snap0", check=0)
    tp(h, "write", "demo/vol0", "--offset", "200000", input=b"second", check=0)
    tp(h, "write", "demo/vol0", input=b"SECOND", check=0)
    return h


def _read(home, vol, length=200006):
    return tp(home, "read", f"demo/{vol}", "--length", str(length), check=0).stdout


def _model_snap0(length=200006):
    b = bytearray(length)
    b[:500] = b"first" * 100
    return bytes(b)


def _model_vol0(length=200006):
    b = bytearray(_model_snap0(length))
    b[:6] = b"SECOND"
    b[200000:200006] = b"second"
    return bytes(b)


def _vols(home):
    return {v["name"]: v for v in json.loads(tp(home, "stat", "demo", "--json", check=0).out)["volumes"]}


@requires_tools
def test_revert(home):
    assert _read(home, "vol0") == _model_vol0()
    r = tp(home, "revert", "demo/vol0", "snap0", check=0)
    assert r.out == ("reverted demo/vol0 to snapshot demo/snap0 (device id 1 deleted, now device "
                     "id 3, 1 MiB)\n")
    assert _read(home, "vol0") == _model_snap0() == _read(home, "snap0")
    vols = _vols(home)
    assert vols["vol0"]["dev_id"] == 3 and vols["snap0"]["origin"] == "vol0"
    tp(home, "write", "demo/vol0", input=b"third", check=0)
    assert _read(home, "snap0") == _model_snap0()
    assert_checks_pass(home / "demo" / "metadata")


@requires_tools
def test_merge(home):
    tp(home, "snapshot", "demo/vol0", "other", check=0)
    r = tp(home, "merge", "demo/snap0", check=0)
    assert r.out == "merged demo/snap0 into demo/vol0 (device id 2, 1 MiB); demo/snap0 is gone\n"
    vols = _vols(home)
    assert set(vols) == {"vol0", "other"} and vols["vol0"]["dev_id"] == 2
    assert vols["other"]["origin"] == "vol0"
    assert _read(home, "vol0") == _model_snap0()
    assert _read(home, "other") == _model_vol0()
    assert_checks_pass(home / "demo" / "metadata")


@pytest.mark.parametrize("args, code, fragment", [
    (["revert", "demo/vol0", "nosuch"], 1, "no volume 'nosuch'"),
    (["revert", "demo/nosuch", "snap0"], 1, "no volume 'nosuch'"),
    (["revert", "demo/snap0", "vol0"], 2, "not a snapshot of 'snap0'"),
    (["revert", "demo/vol0", "vol0"], 2, "not a snapshot of 'vol0'"),
    (["revert", "demo/vol0", "other/snap0"], 2, "stays in its origin's pool"),
    (["revert", "demo/vol0", "bad/name/x"], 2, ""),
    (["revert", "nopool/vol0", "snap0"], 1, "nopool"),
    (["merge", "demo/vol0"], 2, "not a snapshot"),
    (["merge", "demo/nosuch"], 1, "no volume 'nosuch'"),
    (["merge", "demo"], 2, "POOL/"),
])
def test_refusals_change_nothing(home, args, code, fragment):
    before = fingerprint(home / "demo")
    r = tp(home, *args)
    assert_one_line_error(r, code, fragment)
    assert fingerprint(home / "demo") == before


def test_merge_refused_when_the_origin_is_gone(home):
    tp(home, "delete", "demo/vol0", check=0)
    before = fingerprint(home / "demo")
    assert_one_line_error(tp(home, "merge", "demo/snap0"), 2, "not a snapshot")
    assert fingerprint(home / "demo") == before


def test_busy_pool_refuses_and_wait_queues(home):
    before = fingerprint(home / "demo")
    with pool_held_elsewhere(home / "demo") as holder:
        for args in (["revert", "demo/vol0", "snap0"], ["merge", "demo/snap0"]):
            assert_one_line_error(tp(home, *args), 5, f"process {holder.pid}", "--wait")
        assert fingerprint(home / "demo") == before
        threading.Timer(0.5, holder.release).start()
        r = tp(home, "revert", "demo/vol0", "snap0", "--wait=60", check=0)
    assert r.out.startswith("reverted demo/vol0")
    assert _read(home, "vol0") == _model_snap0()
