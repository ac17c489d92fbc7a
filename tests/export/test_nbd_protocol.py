"""The NBD server against the tests' own client: the handshake, every option and command,
simple and structured replies, and the moves real clients never make. Data read back is compared
with a model (a bytearray per volume); after every test both metadata checkers pass (conftest)."""

from __future__ import annotations

import os
import random
import socket
import struct

import pytest

from tests.export.conftest import BS, VOL_SIZE
from tests.export.nbdclient import NBDClient
from tests.tptools import requires_tools
from thinpool import Pool
from thinpool.export import nbd_wire as w

pytestmark = requires_tools


def client(served, name="v", structured=True, context=True) -> NBDClient:
    c = NBDClient(served.socket)
    c.connect(name, structured=structured, context=context)
    return c


def still_serving(served) -> None:
    """Another connection works: the server survived whatever the test did."""
    with client(served, "w") as c:
        assert c.write(0, b"alive").error == 0
        assert c.read(0, 5).data == b"alive"


# -- handshake -----------------------------------------------------------------------------------
def test_greeting_and_go_advertise_the_export(served):
    with NBDClient(served.socket) as c:
        assert c.hflags == 3                        # FIXED_NEWSTYLE | NO_ZEROES
        replies = c.go("v", infos=(w.INFO_NAME, w.INFO_DESCRIPTION, w.INFO_BLOCK_SIZE))
        assert replies[-1].type == 1                # ACK
        infos = {struct.unpack_from(">H", r.data)[0]: r.data for r in replies if r.type == 3}
        assert infos[1][2:] == b"v" and b"p/v" in infos[2]
        assert struct.unpack(">HIII", infos[3]) == (3, 1, BS, 32 << 20)
        assert c.size == VOL_SIZE
        want = 1 | 4 | 8 | 32 | 64 | 256 | 1024 | 2048     # no READ_ONLY, no DF (simple replies)
        assert c.tflags == want


def test_read_only_volume_and_server(served):
    with NBDClient(served.socket) as c:
        c.go("ro")
        assert c.tflags & 2 and not c.tflags & 32
    served.server.read_only = True
    try:
        with NBDClient(served.socket) as c:
            c.go("v")
            assert c.tflags & 2
            assert c.write(0, b"x").error == 1         # EPERM
    finally:
        served.server.read_only = False


def test_list_info_abort(served):
    with NBDClient(served.socket) as c:
        r = c.option(w.OPT_LIST)
        names = [x.data[4:].decode() for x in r if x.type == 2]
        assert names == ["v", "w", "ro", "big"] and r[-1].type == 1
        assert c.option(w.OPT_LIST, b"junk")[-1].type == (1 << 31) + 3     # INVALID
        r = c.go("w", opt=w.OPT_INFO)
        assert r[-1].type == 1 and c.size == VOL_SIZE
        assert c.option(w.OPT_ABORT)[-1].type == 1
        assert c.closed_by_server()
    still_serving(served)


def test_unknown_options_starttls_extended_headers_then_go(served):
    with NBDClient(served.socket) as c:
        for opt in (5, 11, 99, 12345):
            assert c.option(opt, b"abc")[-1].type == (1 << 31) + 1          # UNSUP, goes on
        c.connect("v")
        assert c.read(0, 10).data == bytes(10)


def test_meta_context_needs_structured_replies(served):
    with NBDClient(served.socket) as c:
        data = c.meta_data("v", [b"base:allocation"])
        assert c.option(10, data)[-1].type == (1 << 31) + 3                 # INVALID
        assert c.option(9, data)[-1].type == (1 << 31) + 3
        c.structured_reply()
        assert c.option(8)[-1].type == (1 << 31) + 3           # structured twice: INVALID
        r = c.option(9, c.meta_data("v", []))                   # list all
        assert [(x.type, x.data) for x in r] == [(4, b"\0\0\0\0base:allocation"), (1, b"")]
        r = c.option(10, c.meta_data("v", [b"base:allocation", b"qemu:dirty-bitmap:x"]))
        assert [(x.type, x.data) for x in r] == [(4, b"\0\0\0\1base:allocation"), (1, b"")]
        assert c.option(10, c.meta_data("nope", [b"base:allocation"]))[-1].type == (1 << 31) + 6
        assert c.option(10, b"\0\0\0\x05v")[-1].type == (1 << 31) + 3       # malformed


def test_go_unknown_name_then_retry(served):
    with NBDClient(served.socket) as c:
        assert c.go("nosuch")[-1].type == (1 << 31) + 6                     # UNKNOWN
        assert c.option(7, b"\0\0\0\x09v")[-1].type == (1 << 31) + 3        # malformed
        assert c.go("v")[-1].type == 1
        assert c.write(0, b"retry").error == 0


def test_export_name_fallback(served):
    with NBDClient(served.socket, flags=1) as c:        # no NO_ZEROES: 124 zeros follow
        c.export_name("v")
        assert c.size == VOL_SIZE
        assert c.write(100, b"old style").error == 0
        assert c.read(100, 9).data == b"old style"
    with NBDClient(served.socket) as c:
        c.send_option(w.OPT_EXPORT_NAME, b"missing")
        assert c.closed_by_server()                      # this option cannot fail: hang up
    still_serving(served)


def test_bad_client_flags_and_option_magic_and_huge_option(served):
    with NBDClient(served.socket, flags=1 << 5) as c:
        assert c.closed_by_server()
    with NBDClient(served.socket) as c:
        c.sock.sendall(struct.pack(">QII", 0x1234, 7, 0))
        assert c.closed_by_server()
    with NBDClient(served.socket) as c:
        c.send_option(7, b"", length=1 << 20)            # 1 MiB of option data: too big
        assert c.opt_reply().type == (1 << 31) + 9
        assert c.closed_by_server()
    still_serving(served)


# -- commands against a model ------------------------------------------------------------------------
@pytest.mark.parametrize("structured", [False, True])
def test_random_io_matches_a_model(served, structured):
    rng = random.Random(7 + structured)
    model = bytearray(VOL_SIZE)
    with client(served, structured=structured) as c:
        for step in range(300):
            op = rng.choice("wwwrrtzZf")
            off = rng.randrange(VOL_SIZE - 1)
            n = min(rng.choice([1, 511, 4096, BS, 3 * BS + 17, 300_000]), VOL_SIZE - off)
            if op == "w":
                data = os.urandom(n)
                assert c.write(off, data, flags=rng.choice([0, 1])).error == 0
                model[off:off + n] = data
            elif op == "r":
                r = c.read(off, n)
                assert r.error == 0 and r.data == model[off:off + n], (step, off, n)
            elif op in "tz":
                r = c.trim(off, n) if op == "t" else c.zero(off, n)
                assert r.error == 0
                model[off:off + n] = bytes(n)
            elif op == "Z":
                assert c.zero(off, n, flags=2).error == 0          # NO_HOLE: provisioned
                model[off:off + n] = bytes(n)
            else:
                assert c.flush().error == 0
        assert c.read(0, VOL_SIZE // 2).data == model[:VOL_SIZE // 2]
        assert c.read(VOL_SIZE // 2, VOL_SIZE // 2).data == model[VOL_SIZE // 2:]
        c.disconnect()
        assert c.closed_by_server()
    assert served.pool.volume("v").read(0, VOL_SIZE) == bytes(model)


def test_structured_read_reply_shapes(served):
    with client(served) as c:
        c.write(0, b"abc")
        r = c.read(0, 3)
        assert r.chunks == [1] and r.data == b"abc"                 # one OFFSET_DATA, DONE
        r = c.read(0, 0)
        assert r.chunks == [0] and r.error == 0                     # NONE
        r = c.read(VOL_SIZE - 2, 4)
        assert r.chunks == [0x8001] and r.error == 22 and "past the end" in r.message
        r = c.read(0, 3, flags=4)                                   # DF
        assert r.chunks == [1] and r.data == b"abc"


def test_simple_read_error_sends_no_payload(served):
    with client(served, structured=False) as c:
        r = c.read(VOL_SIZE, 512)
        assert r.error == 22 and r.data == b""
        assert c.read(VOL_SIZE - 1, 1).data == b"\0"                # still in step
        assert c.read(0, 1, flags=4).error == 22                    # DF without structured


def test_errors_of_each_command(served):
    with client(served) as c:
        assert c.write(VOL_SIZE - 1, b"xy").error == 28             # ENOSPC past the end
        assert c.zero(VOL_SIZE - 1, 2).error == 28
        assert c.trim(VOL_SIZE - 1, 2).error == 22                  # EINVAL
        assert c.request(w.CMD_CACHE, VOL_SIZE, 1).error == 22
        assert c.request(w.CMD_CACHE, 0, 4096).error == 0
        assert c.block_status(VOL_SIZE, 1).error == 22
        assert c.block_status(0, 0).error == 22
        assert c.request(42, 0, 0).error == 22                      # unknown command
        assert c.request(w.CMD_FLUSH, 0, 0, flags=1 << 9).error == 22   # unknown flag
        assert c.request(w.CMD_WRITE, 0, 1, flags=2, payload=b"x").error == 22  # NO_HOLE on WRITE
        assert c.zero(0, BS, flags=2 | 16).error == 95              # FAST_ZERO + NO_HOLE
        assert c.zero(0, BS, flags=16).error == 0                   # FAST_ZERO, may unmap
        assert c.write(0, b"ok").error == 0                         # the connection goes on
    with client(served, "ro") as c:
        assert c.write(0, b"x").error == 1                          # EPERM
        assert c.trim(0, BS).error == 1
        assert c.zero(0, BS).error == 1
        assert c.read(0, 4).data == bytes(4)


def test_block_status_from_the_thin_mapping(served):
    with client(served) as c:
        c.write(2 * BS, b"x" * (BS + 1))                            # blocks 2 and 3 mapped
        c.zero(6 * BS, BS, flags=2)                                 # block 6 provisioned zeros
        r = c.block_status(0, 8 * BS)
        assert r.error == 0 and r.chunks == [5]
        assert r.extents == [(2 * BS, 3), (2 * BS, 0), (2 * BS, 3), (BS, 0), (BS, 3)]
        r = c.block_status(BS // 2, 8 * BS, flags=8)                # REQ_ONE
        assert r.extents == [(BS + BS // 2, 3)]
        r = c.block_status(2 * BS + 5, 10, flags=8)
        assert r.extents == [(10, 0)]
        c.trim(2 * BS, 2 * BS)
        assert c.block_status(0, 8 * BS).extents == [(6 * BS, 3), (BS, 0), (BS, 3)]
    with client(served, context=False) as c:
        assert c.block_status(0, BS).error == 22                    # no context negotiated
    with client(served, structured=False) as c:
        assert c.block_status(0, BS).error == 22


def test_pipelined_cookies(served):
    with client(served) as c:
        cookies = {}
        for i in range(64):
            cookies[c.send_request(w.CMD_WRITE, i * 4096, 4096, payload=bytes([i]) * 4096,
                                   cookie=1000 + i)] = i
        for _ in range(64):
            assert c.reply(w.CMD_WRITE).cookie in cookies
        sent = [c.send_request(w.CMD_READ, i * 4096, 4096, cookie=(1 << 63) + i)
                for i in range(64)]
        got = {}
        for _ in sent:
            r = c.reply(w.CMD_READ, 4096)
            got[r.cookie] = r.data
        assert got == {(1 << 63) + i: bytes([i]) * 4096 for i in range(64)}


# -- hostile and vanishing clients --------------------------------------------------------------------
def test_bad_request_magic_closes_only_that_connection(served):
    with client(served) as c:
        c.send_request(w.CMD_READ, 0, 1, magic=0xDEADBEEF)
        assert c.closed_by_server()
    still_serving(served)


def test_truncated_request_and_huge_write(served):
    with client(served) as c:
        c.sock.sendall(w.REQUEST.pack(w.REQUEST_MAGIC, 0, 0, 1, 0, 1)[:17])
        c.sock.shutdown(socket.SHUT_WR)
        assert c.closed_by_server()
    with client(served) as c:
        c.send_request(w.CMD_WRITE, 0, 1 << 31)                     # 2 GiB payload announced
        assert c.closed_by_server()
    still_serving(served)


def test_client_vanishing_mid_write_writes_nothing(served):
    with client(served) as c:
        assert c.write(0, b"A" * BS).error == 0
        c.send_request(w.CMD_WRITE, 0, 200_000, payload=b"B" * 100_000)   # half the payload
    with client(served, "v") as c2:
        assert c2.read(0, BS).data == b"A" * BS                     # nothing of B landed
    with client(served) as c:
        c.send_request(w.CMD_WRITE, BS, 1000, payload=b"C" * 10)
    still_serving(served)
    assert served.pool.volume("v").read(BS, 1000) == bytes(1000)


def test_many_connections_share_one_volume(served):
    conns = [client(served) for _ in range(4)]
    try:
        for i, c in enumerate(conns):
            assert c.write(i * BS, bytes([i + 1]) * BS).error == 0
        assert conns[0].flush().error == 0                           # multi-conn: one flush
        for c in conns:
            for i in range(4):
                assert c.read(i * BS, BS).data == bytes([i + 1]) * BS
    finally:
        for c in conns:
            c.close()


def test_flush_and_fua_commit(served):
    meta = served.pool.metadata
    served.server.commit_interval = None
    with client(served) as c:
        c.write(0, b"x" * 10)                   # a new block: a metadata change
        assert c.flush().error == 0
        assert not meta.has_changes()
        c.write(5 * BS, b"y", flags=1)          # FUA
        assert not meta.has_changes()


def test_out_of_data_space_is_enospc(tmp_path):
    from tests.export.conftest import short_dir
    from thinpool.export.nbd import NBDServer
    pool = Pool.create(tmp_path / "small", data_size=4 * BS, block_size=BS)
    d = short_dir()
    server = None
    try:
        pool.create_thin("big", 64 * BS)
        pool.wait_for_space = False
        server = NBDServer(pool)
        sock = server.listen_unix(os.path.join(d, "s"))
        server.start()
        with NBDClient(sock) as c:
            c.connect("big")
            assert c.write(0, b"z" * 4 * BS).error == 0
            assert c.write(10 * BS, b"z").error == 28               # no data space: ENOSPC
            assert c.zero(10 * BS, BS, flags=2).error == 28
            assert c.trim(0, 2 * BS).error == 0 and c.flush().error == 0
            assert c.write(10 * BS, b"z").error == 0                # space came back
    finally:
        if server is not None:
            server.close()
        pool.close()
        os.rmdir(d) if os.path.isdir(d) and not os.listdir(d) else None
    from tests.tptools import assert_checks_pass
    assert_checks_pass(tmp_path / "small" / "metadata")


def test_timer_commits_and_close_commits(served):
    import time
    meta = served.pool.metadata
    with client(served) as c:
        c.write(0, b"timer")
        deadline = time.monotonic() + 10
        while meta.has_changes() and time.monotonic() < deadline:
            time.sleep(0.05)                    # the 0.2 s timer of the fixture
        assert not meta.has_changes()
    served.server.commit_interval = 3600
    with client(served) as c:
        c.write(3 * BS, b"disconnect")
        c.disconnect()
        assert c.closed_by_server()
    deadline = time.monotonic() + 10
    while meta.has_changes() and time.monotonic() < deadline:
        time.sleep(0.02)                        # committed as the connection closed
    assert not meta.has_changes()
