"""SIGKILL of the serving daemon in the middle of a stream of writes.

A client (the tests' own, on the daemon's Unix socket) writes 4 KiB records, each into a slot
of its own, some with FUA, the others followed now and then by a FLUSH; the daemon is killed
at a random moment. After the kill: the pool passes thin_check and thinpool check as the kill
left it; a new ``thinpool serve`` starts over the dead one's files; and every write the client saw
acknowledged with FUA, or acknowledged before a FLUSH that was acknowledged, reads back exactly.
Slots never written read as zeros or as their record (a write in flight may have landed)."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

from tests.export.nbdclient import Closed, NBDClient
from tests.export.test_serve_cli import kill_pid, state_pid
from tests.cli.helpers import tp
from tests.tptools import assert_checks_pass, requires_tools

pytestmark = requires_tools

SLOT = 4096
SLOTS = 2048                      # 8 MiB of records


def record(i: int) -> bytes:
    return (f"record {i:06d} ".encode() * 300)[:SLOT]


def writer(sock: str, durable: set[int], sent: set[int], stop: threading.Event,
           seed: int) -> None:
    rng = random.Random(seed)
    pending: list[int] = []
    order = list(range(SLOTS))
    rng.shuffle(order)
    try:
        with NBDClient(sock) as c:
            c.connect("v", structured=rng.random() < 0.5, context=False)
            for i in order:
                if stop.is_set():
                    return
                fua = rng.random() < 0.3
                sent.add(i)
                if c.write(i * SLOT, record(i), flags=1 if fua else 0).error:
                    return
                if fua:
                    durable.add(i)
                else:
                    pending.append(i)
                if rng.random() < 0.1:
                    if c.flush().error:
                        return
                    durable.update(pending)
                    pending.clear()
    except (Closed, OSError):
        return


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_during_fua_writes(home, seed):  # noqa: F811 (fixture)
    tp(home, "create", "p", "--size", "64M", check=0)
    tp(home, "create", "p/v", "--size", f"{SLOTS * SLOT}", check=0)
    pool = home / "p"
    rng = random.Random(seed)
    durable: set[int] = set()
    sent: set[int] = set()
    pid = None
    try:
        r = tp(home, "serve", "p", "--daemon", "--commit-interval", "0.05")
        assert r.returncode == 0, r.stderr
        pid = state_pid(pool)
        stop = threading.Event()
        t = threading.Thread(target=writer, args=(str(pool / "nbd.sock"), durable, sent, stop,
                                                  seed))
        t.start()
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(pid, signal.SIGKILL)
        t.join(30)
        stop.set()
        assert not t.is_alive()
    finally:
        kill_pid(pid)
    deadline = time.monotonic() + 10
    from thinpool.export.state import pid_alive
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert durable, "the kill came before any write was acknowledged durable: widen the window"
    assert_checks_pass(pool / "metadata")
    # a new daemon starts over the dead one's files
    assert (pool / "exports.json").exists()
    r = tp(home, "serve", "p", "--daemon")
    pid = state_pid(pool)
    try:
        assert r.returncode == 0, r.stderr
        with NBDClient(str(pool / "nbd.sock")) as c:
            c.connect("v")
            data = b"".join(c.read(off, 1 << 20).data for off in range(0, SLOTS * SLOT, 1 << 20))
        tp(home, "serve", "p", "--stop", check=0)
    finally:
        kill_pid(pid)
    for i in range(SLOTS):
        got = data[i * SLOT:(i + 1) * SLOT]
        if i in durable:
            assert got == record(i), f"slot {i}: an acknowledged durable write was lost"
        elif i in sent:
            assert got in (record(i), bytes(SLOT)) or set(got) <= set(record(i)) | {0}
        else:
            assert got == bytes(SLOT), f"slot {i} was never written"
    assert_checks_pass(pool / "metadata")
