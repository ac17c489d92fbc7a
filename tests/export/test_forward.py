"""Volume commands while a pool is served: ``thinpool serve`` runs them for the command line
(create, snapshot, rename, configure, resize, discard, revert, merge, delete), with the same
output and exit codes as without a server; it refuses (exit 5) to delete, revert, merge, rename
or resize a volume an NBD client has open; commands it does not run for others still get exit 5.
The oracle for the bytes is what the NBD client wrote; afterwards both checkers pass."""

from __future__ import annotations

import json

import pytest

from thinpool.export import nbd_wire as w
from tests.cli.helpers import assert_one_line_error, tp
from tests.export.nbdclient import NBDClient
from tests.export.test_serve_cli import kill_pid, state_pid
from tests.tptools import assert_checks_pass, requires_tools

pytestmark = requires_tools
BS = 64 * 1024


@pytest.fixture
def served_pool(home):
    tp(home, "create", "p", "--size", "64M", check=0)
    tp(home, "create", "p/v", "--size", "4M", check=0)
    tp(home, "serve", "p", "--daemon", check=0)
    pid = state_pid(home / "p")
    try:
        yield home, pid
    finally:
        kill_pid(pid)


def _client(home, name: str) -> NBDClient:
    c = NBDClient(str(home / "p" / "nbd.sock"))
    c.connect(name)
    return c


def _names(home) -> dict[str, dict]:
    doc = json.loads(tp(home, "stat", "p", "--json", check=0).stdout)
    return {v["name"]: v for v in doc["volumes"]}


def test_volume_commands_run_by_the_server(served_pool):
    home, pid = served_pool
    with _client(home, "v") as c:
        assert not c.write(0, b"A" * BS, flags=w.CMD_FLAG_FUA).error
    # a snapshot of a live volume sees every acknowledged write
    r = tp(home, "snapshot", "p/v", "s", check=0)
    assert r.out.strip() == "created snapshot p/s of p/v (4 MiB, device id 2)"
    with _client(home, "v") as c:
        assert not c.write(0, b"B" * BS, flags=w.CMD_FLAG_FUA).error
    assert tp(home, "read", "p/s", "--length", str(BS), check=0).stdout == b"A" * BS
    assert tp(home, "read", "p/v", "--length", str(BS), check=0).stdout == b"B" * BS
    # the new snapshot is an export at once
    with _client(home, "s") as c:
        assert c.read(0, 4).data == b"AAAA"
    tp(home, "create", "p/x", "--size", "1M", check=0)
    tp(home, "rename", "p/x", "y", check=0)
    tp(home, "configure", "p/y", "--read-only", check=0)
    tp(home, "resize", "p/s", "--size", "+1M", check=0)
    r = tp(home, "discard", "p/s", "--offset", "64K", "--length", "64K", "--yes", check=0)
    assert "p/s" in r.out
    # failures come back as they are: the same line and code as without a server
    assert_one_line_error(tp(home, "snapshot", "p/v", "s"), 1, "exists")
    assert_one_line_error(tp(home, "delete", "p/nope"), 1, "nope")
    assert_one_line_error(tp(home, "resize", "p/y", "--size", "2M"), 2, "read-only")
    assert_one_line_error(tp(home, "resize", "p/s", "--size", "1M"), 1, "--yes")
    names = _names(home)
    assert {n: (v["size"], v["read_only"], v["origin"]) for n, v in names.items()} == {
        "v": (4 << 20, False, None), "s": (5 << 20, False, "v"), "y": (1 << 20, True, None)}
    tp(home, "revert", "p/v", "s", check=0)
    assert tp(home, "read", "p/v", "--length", str(BS), check=0).stdout == b"A" * BS
    tp(home, "merge", "p/s", check=0)
    tp(home, "delete", "p/y", check=0)
    assert set(_names(home)) == {"v"}
    assert tp(home, "read", "p/v", "--length", str(BS), check=0).stdout == b"A" * BS
    # commands it does not run for others: exit 5, as before
    assert_one_line_error(tp(home, "write", "p/v", input=b"x"), 5, "thinpool serve p --stop")
    assert_one_line_error(tp(home, "destroy", "p", "--yes"), 5, "thinpool serve p --stop")
    assert_one_line_error(tp(home, "rename", "p", "q"), 5, "")
    tp(home, "serve", "p", "--stop", check=0)
    assert tp(home, "read", "p/v", "--length", str(BS), check=0).stdout == b"A" * BS
    tp(home, "check", "p", check=0)
    assert_checks_pass(home / "p" / "metadata")


def test_a_volume_open_on_nbd_is_in_use(served_pool):
    home, pid = served_pool
    tp(home, "snapshot", "p/v", "s", check=0)
    with _client(home, "v") as c:
        assert not c.write(0, b"C" * 100, flags=w.CMD_FLAG_FUA).error
        for args in (("delete", "p/v"), ("revert", "p/v", "s"), ("merge", "p/s"),
                     ("rename", "p/v", "other"), ("resize", "p/v", "--size", "8M")):
            r = tp(home, *args)
            assert_one_line_error(r, 5, "volume p/v is in use: open on 1 NBD connection",
                                  f"process {pid}")
        assert set(_names(home)) == {"v", "s"}
        # the volume's data is as the client left it, and the client goes on
        assert c.read(0, 100).data == b"C" * 100
        tp(home, "delete", "p/s", check=0)      # a volume nobody has open
    tp(home, "delete", "p/v", check=0)          # once the client is gone
    assert _names(home) == {}
    tp(home, "serve", "p", "--stop", check=0)
    assert_checks_pass(home / "p" / "metadata")
