"""thinpool's thread-per-connection NBD server against an asyncio one (workload 13).

The question: would an asyncio NBD server (``asyncio.BufferedProtocol``, payloads received
straight into reused buffers) move data faster than ``thinpool serve``? The asyncio side is a
bench probe, :mod:`bench.nbd_asyncio`, over the same public Volume API. There are no targets:
the ratio says which design wins here (> 1: the threads).

Four servers run side by side for the whole module, each on a Unix socket, each over a 1 GiB
volume of its own pool (2 GiB of 64 KiB blocks; all four pools in one home directory under
pytest's basetemp, so on one file system), all started by the module fixture and stopped by pid
(SIGTERM, then SIGKILL after 30 s) in its ``finally``:

* **thread** (the "thinpool" side of every row): ``python -m thinpool --home H serve tp
  --socket S``, foreground, default ``--commit-interval 1``;
* **inline** (baseline of 13a, d, g, j): ``python -m bench.nbd_asyncio --home H ai vol S``, the
  Volume calls run in the event loop;
* **inline, SO_SNDBUF 4 MiB** (13b, e, h, k): the same with ``--sndbuf 4194304``. With the default
  socket buffer (208 KiB here) a 256 KiB READ reply does not fit, so asyncio's transport copies
  the rest into its own buffer and sends it when the socket is writable again (one more send,
  poll and copy per reply); 4 MiB lets each reply go in one send. (A blocking ``sendmsg`` in the
  thread server just waits: no copy.) For the in-direction, whose replies are 16 bytes, it is
  the same server as inline: a measure of the noise;
* **executor** (13c, f, i, l): ``--executor``, the Volume calls in a thread pool.

Every process is started with this checkout first on ``PYTHONPATH`` (so the servers are this
tree's code, whatever is installed) and inherits the runner's pinning to CPU 0. nbdcopy still
opens 2 connections and runs 2 threads: it counts the online CPUs, not its affinity mask
(``nbdcopy -v`` says ``connections=2 requests=64 threads=2``), and every server here advertises
CAN_MULTI_CONN. So the thread server runs two connection threads that take turns at the GIL,
and each asyncio server serves both connections from its one loop.

Workloads (the same requests against each server):

13a-c. ``nbdcopy --flush SRC URI``: 1 GiB of random data into a target emptied before each round
   (``qemu-io -f raw -c 'discard 0 1G' URI``, which unmaps the volume's blocks, then ``sync``);
   afterwards (untimed) ``nbdcopy URI -`` of each volume must have the source's sha256;
13d-f. ``nbdcopy URI null:``: the 1 GiB back out;
13g-i, 13j-l. the same rounds, but the figure is the server process's CPU time in the round
   (user + system, all threads, from ``/proc/PID/stat`` before and after; 10 ms ticks), in
   seconds, lower is better. Everything runs on CPU 0, so on a quiet machine a round's wall time
   is about nbdcopy's CPU plus the server's plus the waits for the disk; on a busy one the wall
   time also carries whatever else ran on CPU 0 and the disk; the CPU time less of it (though
   it too grew by up to 2x over one busy run: a shared core's caches, the other vCPU's load).

**Rounds alternate** (as ``_util.alternate`` does, with three baselines), 1 warm-up and 7 timed
rounds per side: before each round of the thread server (warm-up included) its setup runs one
round of each asyncio server, timed here, in an order that rotates every round, then empties the
thread server's target. So a slow spell of this shared 2-CPU machine meets every side; the
asyncio rounds are the baseline rows' ``times``.

Differences the probe has on purpose (see its docstring): no structured replies and no
``base:allocation``, so nbdcopy reads the whole volume out with simple replies instead of asking
for extents first (the volume is full, so the same bytes move) and each READ reply carries a
16-byte header instead of a 28-byte chunk header; the thread server offers FUA, WRITE_ZEROES and
the rest, which nbdcopy does not use here.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from ._util import GiB, MiB, need_tool, remove, run, tag

SIZE = 1 * GiB
ROUNDS = 7
WARMUP = 1
REPO = pathlib.Path(__file__).resolve().parent.parent
SNDBUF = 4 << 20

#: side -> (pool, the probe's options (None: thinpool serve), label, row letters: in, out, CPU
#: in, CPU out)
SIDES = {
    "thread": ("tp", None, "thinpool serve (threads)", None),
    "inline": ("ai", [], "asyncio probe, inline", "adgj"),
    "sndbuf": ("as", ["--sndbuf", str(SNDBUF)], "asyncio probe, inline, SO_SNDBUF 4 MiB", "behk"),
    "executor": ("ae", ["--executor"], "asyncio probe, --executor", "cfil"),
}
VERSUS = {"inline": "asyncio inline", "sndbuf": "asyncio inline, SO_SNDBUF 4 MiB",
          "executor": "asyncio, Volume calls in an executor"}
WHAT = {"in": "nbdcopy 1 GiB in (--flush)", "out": "nbdcopy 1 GiB out",
        "cpu in": "server CPU per nbdcopy 1 GiB in", "cpu out": "server CPU per nbdcopy 1 GiB out"}
ASYNCIO = [side for side, spec in SIDES.items() if spec[1] is not None]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "THINPOOL_HOME"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _wait_for(path: str, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{what} did not start (exit {proc.poll()})")
        time.sleep(0.02)


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each server by its pid, wait, SIGKILL what is still there after 30 s."""
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    for tool, package in (("nbdcopy", "libnbd-bin"), ("qemu-io", "qemu-utils")):
        need_tool(tool, package)
    root = tmp_path_factory.mktemp("nbd-asyncio")
    short = f"/tmp/tpbench-aio-{os.getpid()}"          # socket paths must stay short
    os.makedirs(short, exist_ok=True)
    home = root / "home"
    env = _env()
    tp = [sys.executable, "-m", "thinpool", "--home", str(home)]
    procs: list[subprocess.Popen] = []
    src = root / "src.img"
    try:
        with open(src, "wb") as f:
            for _ in range(SIZE // MiB):
                f.write(os.urandom(MiB))
        uris, pids = {}, {}
        for side, (pool, probe, _, _) in SIDES.items():
            subprocess.run([*tp, "create", pool, "--size", str(2 * SIZE)], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            subprocess.run([*tp, "create", f"{pool}/vol", "--size", str(SIZE)], env=env,
                           check=True, stdout=subprocess.DEVNULL)
            sock = f"{short}/{side}.sock"
            argv = ([*tp, "serve", pool, "--socket", sock] if probe is None else
                    [sys.executable, "-m", "bench.nbd_asyncio", "--home", str(home), pool, "vol",
                     sock, *probe])
            procs.append(subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
            _wait_for(sock, procs[-1], side)
            uris[side] = f"nbd+unix:///vol?socket={sock}"
            pids[side] = procs[-1].pid
        for uri in uris.values():                      # so a copy-out alone has data to read
            run(["nbdcopy", "--flush", str(src), uri])
        yield {"src": src, "pids": pids, **uris}
    finally:
        _stop(procs)
        remove(src)
        shutil.rmtree(short, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


def _empty(uri: str) -> None:
    run(["qemu-io", "-f", "raw", "-c", f"discard 0 {SIZE}", uri])
    os.sync()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid``, all its threads (``/proc/PID/stat``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _round(argv: list[str], pid: int, cpu: list[float]) -> float:
    """Run one round; append the server's CPU seconds during it to ``cpu``; its wall time."""
    c0 = _cpu_seconds(pid)
    t0 = time.perf_counter()
    run(argv)
    elapsed = time.perf_counter() - t0
    cpu.append(_cpu_seconds(pid) - c0)
    return elapsed


def _alternating(servers, argv_of, before=None):
    """``(setup, measure, times, cpu)`` for the thread server's ``benchmark.pedantic(measure,
    setup=setup)``: before each of its rounds (warm-up included), one round of each asyncio
    server, in an order that rotates every round, each after ``before(uri)`` if given; then
    ``before`` for the thread server, outside its timing. ``times``: asyncio side -> its round
    times; ``cpu``: every side -> the server's CPU seconds in each of its rounds."""
    times: dict[str, list[float]] = {side: [] for side in ASYNCIO}
    cpu: dict[str, list[float]] = {side: [] for side in SIDES}
    order = list(ASYNCIO)
    pids = servers["pids"]

    def setup():
        for side in order:
            if before is not None:
                before(servers[side])
            times[side].append(_round(argv_of(servers[side]), pids[side], cpu[side]))
        order.append(order.pop(0))
        if before is not None:
            before(servers["thread"])
        return (), {}

    def measure():
        _round(argv_of(servers["thread"]), pids["thread"], cpu["thread"])

    return setup, measure, times, cpu


def _sha256_of(argv: list[str] | None = None, path=None) -> str:
    """sha256 of a file, or of what ``argv`` writes to its stdout."""
    h = hashlib.sha256()
    if path is not None:
        with open(path, "rb") as f:
            while chunk := f.read(4 * MiB):
                h.update(chunk)
        return h.hexdigest()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE)
    try:
        while chunk := proc.stdout.read(4 * MiB):
            h.update(chunk)
    finally:
        proc.stdout.close()
        if proc.wait() != 0:
            raise AssertionError(f"{argv[0]} exited {proc.returncode}")
    return h.hexdigest()


def _tag(benchmark, direction: str, times, cpu) -> None:
    """Tag the thread server's benchmark as the thinpool side of every row of ``direction``
    ("in", "out") and of its CPU rows, each asyncio side's figures as their baselines."""
    amount = SIZE / MiB
    col = {"in": 0, "out": 1}[direction]
    thread = SIDES["thread"][2]
    for side in ASYNCIO:
        label, letters = SIDES[side][2:]
        wall = f"13{letters[col]}. {WHAT[direction]}: threads vs {VERSUS[side]}"
        tag(benchmark, wall, "thinpool", "MiB/s", label=thread, amount=amount)
        tag(benchmark, wall, "baseline", "MiB/s", label=label, amount=amount,
            times=times[side][WARMUP:])
        used = f"13{letters[col + 2]}. {WHAT['cpu ' + direction]}: threads vs {VERSUS[side]}"
        tag(benchmark, used, "thinpool", "s", label=f"{thread}, CPU s",
            times=cpu["thread"][WARMUP:])
        tag(benchmark, used, "baseline", "s", label=f"{label}, CPU s", times=cpu[side][WARMUP:])


@pytest.mark.benchmark(group="13 nbd threads vs asyncio")
def test_nbd_asyncio_copy_in(benchmark, servers):
    setup, measure, times, cpu = _alternating(
        servers, lambda uri: ["nbdcopy", "--flush", str(servers["src"]), uri], before=_empty)
    benchmark.pedantic(measure, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP)
    want = _sha256_of(path=servers["src"])            # untimed: each side stored the bytes
    for side in SIDES:
        assert _sha256_of(["nbdcopy", servers[side], "-"]) == want, side
    _tag(benchmark, "in", times, cpu)


@pytest.mark.benchmark(group="13 nbd threads vs asyncio")
def test_nbd_asyncio_copy_out(benchmark, servers):
    setup, measure, times, cpu = _alternating(servers, lambda uri: ["nbdcopy", uri, "null:"])
    benchmark.pedantic(measure, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP)
    _tag(benchmark, "out", times, cpu)
