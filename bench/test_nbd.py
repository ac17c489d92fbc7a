"""The NBD server (``thinpool serve``) against qemu-nbd on a raw file and on a qcow2 (workload 11).

Three servers run side by side for the whole module, each on a Unix socket, with their files on
the same file system (pytest's basetemp), started by the fixture and killed by pid at its end:

* **thinpool**: ``thinpool serve POOL`` (the console script, foreground), one 1 GiB volume in a
  pool of 64 KiB blocks;
* **qemu-nbd raw**: ``qemu-nbd -f raw -e 4 -t --discard=unmap`` on a 1 GiB sparse file;
* **qemu-nbd qcow2**: the same on a qcow2 image with 64 KiB clusters.

Both qemu-nbd use the host page cache (their default, writeback), as thinpool does.

Workloads (the same requests against each server, pinned to CPU 0 with the clients):

11a/b. ``nbdcopy --flush SRC URI``: 1 GiB of random data into a target emptied before each round
   (``qemu-io -c 'discard 0 1G'``, which unmaps the volume's blocks, punches the raw file and
   frees the qcow2's clusters), then ``sync``;
11c/d. ``nbdcopy URI null:``: the 1 GiB back out (base:allocation first, then reads);
11e. ``qemu-img bench`` 20,000 4 KiB reads, 16 in flight, at a stride of 257 x 4 KiB through the
   filled 1 GiB (so every 4 KiB slot is visited in a scattered order: qemu-img bench has no random
   mode; the stride is co-prime to the slot count);
11f. the same as writes (``-w``), into blocks the fill provisioned.

nbdcopy opens 2 connections here, pinned to one CPU as it is (``nbdcopy -v``: connections=2
requests=64 threads=2).

**The server's design** (thinpool/export/nbd.py): a thread per connection, blocking reads of
each request into a reused buffer, one ``sendmsg`` of header and data per reply, and
``Volume.read_into`` for large reads (straight into the reply buffer; it took three of the four
user-space copies out of the read path, which moved nbdcopy out from about 0.6x to 0.8-1.0x
qemu-nbd raw in a one-off script while this was built). An asyncio variant is measured in
bench/test_nbd_asyncio.py (workload 13): it does not beat the threads. A cProfile of nbdcopy
into a new volume showed ``pwrite`` of the data (the file system allocating the sparse data
file's blocks) as the largest cost, then waits for the pool's mutex while the periodic commit
fsynced the data under it; since the data device starts the write-back of its dirty pages every
32 MiB written (thinpool/data/device.py, "Early write-back"), a commit finds little left to sync (bench/README.md has the figures before and after).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest

from ._util import GiB, MiB, need_tool, remove, run, sparse_file, tag, thinpool_argv

SIZE = 1 * GiB
ROUNDS = 3
BENCH_OPS = 20_000
STRIDE = 257 * 4096

IN_RAW = "11a. nbdcopy 1 GiB in (--flush) vs qemu-nbd raw"
IN_QCOW = "11b. nbdcopy 1 GiB in (--flush) vs qemu-nbd qcow2"
OUT_RAW = "11c. nbdcopy 1 GiB out vs qemu-nbd raw"
OUT_QCOW = "11d. nbdcopy 1 GiB out vs qemu-nbd qcow2"
RREAD = "11e. random 4 KiB reads (qemu-img bench -d 16) vs qemu-nbd raw"
RWRITE = "11f. random 4 KiB writes (qemu-img bench -w -d 16) vs qemu-nbd raw"


def _wait_for(path: str, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{what} did not start (exit {proc.poll()})")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    for tool, package in (("nbdcopy", "libnbd-bin"), ("qemu-nbd", "qemu-utils"),
                          ("qemu-img", "qemu-utils"), ("qemu-io", "qemu-utils")):
        need_tool(tool, package)
    root = tmp_path_factory.mktemp("nbd")
    short = f"/tmp/tpbench-{os.getpid()}"
    os.makedirs(short, exist_ok=True)
    home = root / "home"
    env = {k: v for k, v in os.environ.items() if k != "THINPOOL_HOME"}
    procs: list[subprocess.Popen] = []
    src = root / "src.img"
    try:
        with open(src, "wb") as f:
            for _ in range(SIZE // MiB):
                f.write(os.urandom(MiB))
        tp = [*thinpool_argv(), "--home", str(home)]
        run([*tp, "create", "p", "--size", str(2 * SIZE)])
        run([*tp, "create", "p/vol", "--size", str(SIZE)])
        uris = {}
        sock = f"{short}/tp.sock"
        procs.append(subprocess.Popen([*tp, "serve", "p", "--socket", sock], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_for(sock, procs[-1], "thinpool serve")
        uris["thinpool"] = f"nbd+unix:///vol?socket={sock}"
        raw = root / "raw.img"
        sparse_file(raw, SIZE)
        qcow = root / "img.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", str(qcow),
             str(SIZE)])
        for side, fmt, path in (("raw", "raw", raw), ("qcow2", "qcow2", qcow)):
            sock = f"{short}/{side}.sock"
            procs.append(subprocess.Popen(["qemu-nbd", "--socket", sock, "-f", fmt, "-e", "4",
                                           "-t", "--discard=unmap", str(path)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            _wait_for(sock, procs[-1], f"qemu-nbd {side}")
            uris[side] = f"nbd+unix:///?socket={sock}"
        for uri in uris.values():
            run(["nbdcopy", "--flush", str(src), uri])
        yield {"src": src, **uris}
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        remove(src)
        shutil.rmtree(short, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


def _copy_in(benchmark, servers, side: str) -> None:
    uri = servers[side]
    argv = ["nbdcopy", "--flush", str(servers["src"]), uri]

    def setup():
        run(["qemu-io", "-f", "raw", "-c", f"discard 0 {SIZE}", uri])
        os.sync()
        return (argv,), {}

    benchmark.pedantic(run, setup=setup, rounds=ROUNDS)


def _copy_out(benchmark, servers, side: str) -> None:
    benchmark.pedantic(run, args=(["nbdcopy", servers[side], "null:"],), rounds=ROUNDS,
                       warmup_rounds=1)


def _bench(benchmark, servers, side: str, write: bool) -> None:
    argv = ["qemu-img", "bench", "-f", "raw", "-c", str(BENCH_OPS), "-s", "4096", "-d", "16",
            "-S", str(STRIDE), *(["-w"] if write else []), servers[side]]
    benchmark.pedantic(run, args=(argv,), rounds=ROUNDS, warmup_rounds=1)


def _tag_sides(benchmark, side: str, rows) -> None:
    for workload, unit, amount, target, ratio in rows:
        if side == "thinpool":
            tag(benchmark, workload, "thinpool", unit, label="thinpool serve", amount=amount,
                target=target, target_ratio=ratio)
        else:
            tag(benchmark, workload, "baseline", unit, label=f"qemu-nbd {side}", amount=amount)


SIDES = ["thinpool", "raw", "qcow2"]


@pytest.mark.benchmark(group="11 nbd copy in")
@pytest.mark.parametrize("side", SIDES)
def test_nbd_copy_in(benchmark, servers, side):
    _copy_in(benchmark, servers, side)
    amount = SIZE / MiB
    rows = {"thinpool": [(IN_RAW, "MiB/s", amount, ">= 0.8x qemu-nbd raw", 0.8),
                         (IN_QCOW, "MiB/s", amount, ">= 1.0x qemu-nbd qcow2", 1.0)],
            "raw": [(IN_RAW, "MiB/s", amount, None, None)],
            "qcow2": [(IN_QCOW, "MiB/s", amount, None, None)]}[side]
    _tag_sides(benchmark, side, rows)


@pytest.mark.benchmark(group="11 nbd copy out")
@pytest.mark.parametrize("side", SIDES)
def test_nbd_copy_out(benchmark, servers, side):
    _copy_out(benchmark, servers, side)
    amount = SIZE / MiB
    rows = {"thinpool": [(OUT_RAW, "MiB/s", amount, ">= 0.8x qemu-nbd raw", 0.8),
                         (OUT_QCOW, "MiB/s", amount, ">= 1.0x qemu-nbd qcow2", 1.0)],
            "raw": [(OUT_RAW, "MiB/s", amount, None, None)],
            "qcow2": [(OUT_QCOW, "MiB/s", amount, None, None)]}[side]
    _tag_sides(benchmark, side, rows)


@pytest.mark.benchmark(group="11 nbd random 4k")
@pytest.mark.parametrize("write", [False, True], ids=["read", "write"])
@pytest.mark.parametrize("side", ["thinpool", "raw"])
def test_nbd_random_4k(benchmark, servers, side, write):
    _bench(benchmark, servers, side, write)
    workload = RWRITE if write else RREAD
    _tag_sides(benchmark, side, [(workload, "us/op", BENCH_OPS, ">= 0.5x qemu-nbd raw", 0.5)])

