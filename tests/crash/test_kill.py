"""SIGKILL crashes: a real child process runs a workload on a pool and is killed at a random moment.

Two workloads:

* **library** (:func:`test_kill_library`): a child process runs the random op mix of
  :mod:`tests.crash.kill_workload` (create_thin, snapshot, write, discard, delete, commit) through
  the Python API and journals each operation (``begin``/``end`` lines, flushed). The parent waits
  20-400 ms after the child says it is ready and SIGKILLs it.
* **CLI** (:func:`test_kill_cli`): the parent runs ``thinpool create``, ``snapshot``, ``write``
  (stdin data) and ``delete`` as the installed console script, journaling around each process, and
  SIGKILLs one of them mid-run (mostly a few milliseconds after it took the pool's lock, which is
  when it changes things; sometimes at a random moment of its life).

After each kill the journal is turned into a :class:`~tests.crash.harness.History` (versions
stamped with journal line numbers: a write with its ``begin`` line; a commit, and every create,
snapshot and delete, which commit inside, is ``(begin, end, names)``; an operation with no ``end``
line was in flight) and the pool is checked:

* ``thin_check`` and ``thinpool.tools.check`` pass on the metadata exactly as the kill left it;
* the pool opens (read-only, then for writing) with a set of volume names that is the last
  completed commit's or the in-flight one's, with no name dropped for a missing device, every
  device named and no pending registry operation left;
* every block of every volume holds a version the model allows: its contents at the last
  completed commit, or a version written after it (for the block of a write in flight at the
  kill, also any 4 KiB-page mix of those, as a write(2) cut by a fatal signal leaves).

The pool then goes on: the next child starts from what the checks read (the new baseline), so a
chain of kills also tests that a recovered pool keeps working. ``THINPOOL_KILLS`` (default 40)
sets the number of kills; three quarters are library kills.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import multiprocessing
import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.cli.helpers import THINPOOL, clean_env
from tests.crash import kill_workload
from tests.crash.harness import History, VolumeHistory
from tests.crash.kill_workload import BS, VOL_BLOCKS, data_for
from tests.tptools import assert_checks_pass
from tests.tptools import requires_tools
import thinpool.pool as pool_module
from thinpool import Pool
from thinpool.registry import Registry
from thinpool.tools.check import check

KILLS = int(os.environ.get("THINPOOL_KILLS", "40"))
ROUNDS = 5                                  # kills per pool (a chain)
CLI_KILLS = max(1, KILLS // 4)
LIB_KILLS = max(1, KILLS - CLI_KILLS)
PAGE = 4096
POOL_BLOCKS = 48


def _fail_at_once() -> dict:
    """``error_if_no_space=True`` if Pool.create takes it (directly or as a PoolOptions field):
    a write into a full pool then fails at once instead of waiting for space."""
    params = inspect.signature(Pool.create).parameters
    takes = "error_if_no_space" in params
    if not takes and any(p.kind is p.VAR_KEYWORD for p in params.values()):
        opts = getattr(pool_module, "PoolOptions", None)
        takes = opts is not None and "error_if_no_space" in {f.name for f in dataclasses.fields(opts)}
    return {"error_if_no_space": True} if takes else {}


def create_pool(root: Path) -> None:
    Pool.create(root, data_size=POOL_BLOCKS * BS, block_size=BS, **_fail_at_once()).close()


# -- the journal as a model --------------------------------------------------------------------
@dataclass
class Model:
    hist: History
    k: int                                   # the crash point: after every journal line
    inflight: dict | None = None
    torn: dict[str, set[int]] = field(default_factory=dict)   # blocks a cut write may mix

    def describe(self) -> str:
        return f"crash after journal line {self.k - 1}, in flight: {self.inflight}"


def rebuild(baseline: dict[str, list[bytes]], records: list[dict]) -> Model:
    """The History a journal describes, on top of ``baseline`` (the volumes' contents when the
    journal began, all durable)."""
    hist = History(BS)
    names = set(baseline)
    for name, blocks in baseline.items():
        h = hist.vols[name] = VolumeHistory(VOL_BLOCKS, born=0)
        for vb, d in enumerate(blocks):
            if d != hist.zero:
                h.blocks[vb] = [(-1, d)]          # before the journal's first commit (end 0)
    hist.commits.append((0, 0, frozenset(names)))
    k = len(records) + 1
    model = Model(hist, k)
    pending: tuple[int, dict] | None = None
    for seq, rec in enumerate(records, 1):
        if rec["ph"] == "error":
            pytest.fail(f"the workload failed before the kill:\n{rec['traceback']}")
        if rec["ph"] == "begin":
            assert pending is None, (seq, rec)
            pending = (seq, rec)
        else:
            assert pending is not None, (seq, rec)
            _apply(model, names, *pending, seq, rec)
            pending = None
    if pending is not None:
        model.inflight = pending[1]
        _apply(model, names, *pending, k + 1, None)
    return model


def _apply(model: Model, names: set, b: int, rec: dict, e: int, end: dict | None) -> None:
    hist = model.hist
    op = rec["op"]
    failed = end is not None and end.get("failed")
    if op == "create":
        hist.create(rec["name"], VOL_BLOCKS, b)
        names.add(rec["name"])
    elif op == "snapshot":
        hist.create(rec["name"], VOL_BLOCKS, b, origin=rec["origin"])
        names.add(rec["name"])
    elif op == "delete":
        hist.vols[rec["name"]].died = e
        names.discard(rec["name"])
    elif op in ("write", "discard", "cli_write"):
        if failed:
            return
        data = (bytes(rec["length"]) if op == "discard"
                else data_for(rec["seed"], rec["length"]))
        hist.write(rec["name"], rec["offset"], data, b)
        if end is None:
            off, n = rec["offset"], rec["length"]
            model.torn[rec["name"]] = set(range(off // BS, (off + n - 1) // BS + 1))
        if op != "cli_write":
            return                                  # no commit
    elif op != "commit":
        raise AssertionError(f"unknown op {op!r}")
    if end is not None and "names" in end:
        assert sorted(end["names"]) == sorted(names), ("model lost track of names", rec, end)
    hist.commits.append((b, e, frozenset(names)))


# -- checking a killed pool ---------------------------------------------------------------------
def _page_mix(got: bytes, ok: list[bytes]) -> bool:
    return all(any(got[i:i + PAGE] == d[i:i + PAGE] for d in ok) for i in range(0, len(got), PAGE))


def verify(root: Path, model: Model) -> dict[str, list[bytes]]:
    """Check the pool a kill left behind against the model; return its contents (the next
    baseline)."""
    where = model.describe()
    meta = root / "metadata"
    assert_checks_pass(meta)
    report = check(meta)
    assert report.clean, f"{where}: {[str(f) for f in report.errors]}"
    since, name_sets = model.hist.states(model.k)
    shown = [sorted(s) for s in name_sets]
    with Pool.open(root, read_only=True) as pool:
        names = frozenset(pool.volumes())
        assert names in name_sets, f"{where}: read-only open shows {sorted(names)}, not one of {shown}"
    contents: dict[str, list[bytes]] = {}
    with Pool.open(root) as pool:
        names = frozenset(pool.volumes())
        assert names in name_sets, f"{where}: volumes {sorted(names)}, not one of {shown}"
        assert not any("dropped name" in n for n in pool.notes), (where, pool.notes)
        reg = pool._registry
        assert reg.pending is None, (where, reg.pending)
        assert sorted(e.dev_id for e in reg.volumes.values()) == sorted(pool.metadata.device_ids()), \
            f"{where}: names {reg.volumes} and devices {pool.metadata.device_ids()} disagree"
        for name in names:
            vol = pool.volume(name)
            assert vol.size == VOL_BLOCKS * BS, (where, name, vol.size)
            blocks = []
            for vb in range(VOL_BLOCKS):
                got = vol.read(vb * BS, BS)
                ok = model.hist.allowed(name, vb, since, model.k)
                if got not in ok and not (vb in model.torn.get(name, ()) and _page_mix(got, ok)):
                    pages = [[i // PAGE for i in range(0, BS, PAGE) if got[i:i + PAGE] != d[i:i + PAGE]]
                             for d in ok]
                    pytest.fail(f"{where}: {name} block {vb} holds data the model never allowed "
                                f"(differing 4 KiB pages per allowed version: {pages}; mapping "
                                f"{pool.metadata.lookup(vol.dev_id, vb)})")
                blocks.append(got)
            contents[name] = blocks
    on_disk = Registry.load(str(root / "names.json"))
    assert on_disk.pending is None and set(on_disk.volumes) == set(contents), \
        (where, on_disk.pending, sorted(on_disk.volumes), sorted(contents))
    return contents


def read_journal(path: Path) -> list[dict]:
    """Complete lines only: a line cut by the kill never got its newline."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        out.append(json.loads(line))
    return out


# -- library workload in a child process --------------------------------------------------------
_CTX = None


def _context():
    """A forkserver that has thinpool imported already, so each child starts in milliseconds."""
    global _CTX
    if _CTX is None:
        _CTX = multiprocessing.get_context("forkserver")
        _CTX.set_forkserver_preload(["numpy", "thinpool.pool", "tests.crash.kill_workload"])
    return _CTX


def kill_library_child(root: Path, journal: Path, seed: int, prefix: str, delay: float) -> None:
    ctx = _context()
    ready = ctx.Event()
    child = ctx.Process(target=kill_workload.run, args=(str(root), str(journal), seed, prefix, ready),
                        daemon=True)
    child.start()
    try:
        if not ready.wait(60):
            pytest.fail(f"the child never got ready: {read_journal(journal)[-1:]}")
        time.sleep(delay)
        if child.exitcode is not None:
            read = read_journal(journal)
            pytest.fail(f"the child ended by itself (exit {child.exitcode}) before the kill: {read[-1:]}")
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
        assert child.exitcode == -signal.SIGKILL, child.exitcode
    finally:
        if child.exitcode is None:
            child.kill()
            child.join()


@requires_tools
@pytest.mark.parametrize("chain", range(max(1, -(-LIB_KILLS // ROUNDS))))
def test_kill_library(tmp_path, chain):
    rng = random.Random(f"kill-lib-{chain}")
    root = tmp_path / "pool"
    create_pool(root)
    baseline: dict[str, list[bytes]] = {}
    rounds = min(ROUNDS, LIB_KILLS - chain * ROUNDS)
    stats = []
    for rnd in range(rounds):
        journal = tmp_path / f"journal-{rnd}.jsonl"
        kill_library_child(root, journal, rng.randrange(1 << 30), f"r{rnd}",
                           rng.uniform(0.02, 0.4))
        records = read_journal(journal)
        model = rebuild(baseline, records)
        baseline = verify(root, model)
        stats.append((len(records), model.inflight and model.inflight["op"]))
    # The recovered pool is still a good pool at the end of the chain.
    assert_checks_pass(root / "metadata")
    print(f"chain {chain}: (journal lines, op in flight) per kill: {stats}")


# -- CLI workload --------------------------------------------------------------------------------
def _lock_held(pid: int) -> bool:
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if "->" not in parts and len(parts) > 4 and parts[1] == "FLOCK" and parts[4] == str(pid):
                    return True
    except OSError:
        pass
    return False


def _run_cli(home: Path, args: list[str], stdin: bytes, kill: tuple[str, float] | None):
    """Run one command; with ``kill`` = (how, delay) try to SIGKILL it: ``lock`` waits until it
    holds the pool's lock, then ``delay`` seconds; ``time`` waits ``delay`` from its start.
    Returns (killed, returncode, stderr)."""
    p = subprocess.Popen([*THINPOOL, "--home", str(home), *args], stdin=subprocess.PIPE,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=clean_env())
    if kill is None:
        _, err = p.communicate(stdin, timeout=120)
        return False, p.returncode, err.decode(errors="replace")
    try:
        p.stdin.write(stdin)
        p.stdin.close()
    except BrokenPipeError:
        pass
    how, delay = kill
    t0 = time.monotonic()
    if how == "lock":
        while p.poll() is None and not _lock_held(p.pid) and time.monotonic() - t0 < 60:
            time.sleep(0.0005)
    deadline = time.monotonic() + delay
    while p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.0005)
    killed = False
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
        killed = True
    err = p.stderr.read().decode(errors="replace")
    p.wait(30)
    return killed and p.returncode == -signal.SIGKILL, p.returncode, err


def _cli_op(rng: random.Random, names: list[str], prefix: str, counter: int):
    """(record, argv, stdin) of a random CLI operation."""
    r = rng.random()
    if r < 0.2 or not names:
        name = f"{prefix}v{counter}"
        return {"op": "create", "name": name}, ["create", f"p/{name}", "--size", str(VOL_BLOCKS * BS)], b""
    if r < 0.4 and len(names) < kill_workload.MAX_VOLUMES:
        name, origin = f"{prefix}v{counter}", rng.choice(names)
        return {"op": "snapshot", "name": name, "origin": origin}, ["snapshot", f"p/{origin}", name], b""
    if r < 0.5 and len(names) > 1:
        name = rng.choice(names)
        return {"op": "delete", "name": name}, ["delete", f"p/{name}"], b""
    name = rng.choice(names)
    length = rng.choice([1, 4096, 5000, BS, BS + 777, 2 * BS])
    offset = rng.randrange(0, VOL_BLOCKS * BS - length + 1)
    seed = rng.randrange(1 << 62)
    rec = {"op": "cli_write", "name": name, "offset": offset, "length": length, "seed": seed}
    return rec, ["write", f"p/{name}", "--offset", str(offset)], data_for(seed, length)


@requires_tools
@pytest.mark.parametrize("chain", range(max(1, -(-CLI_KILLS // ROUNDS))))
def test_kill_cli(tmp_path, chain):
    rng = random.Random(f"kill-cli-{chain}")
    home = tmp_path / "home"
    root = home / "p"
    create_pool(root)
    baseline: dict[str, list[bytes]] = {}
    rounds = min(ROUNDS, CLI_KILLS - chain * ROUNDS)
    kills = 0
    stats = []
    for rnd in range(rounds):
        records: list[dict] = []
        names = sorted(baseline)
        target = rng.randrange(3)            # commands that run to the end before the one to kill
        for i in range(target + 4):
            rec, argv, stdin = _cli_op(rng, names, f"r{rnd}", i)
            kill = None
            if i >= target:
                kill = ("lock", rng.uniform(0, 0.015)) if rng.random() < 0.75 else \
                       ("time", rng.uniform(0.0, 0.8))
            records.append({"ph": "begin", **rec})
            killed, rc, err = _run_cli(home, argv, stdin, kill)
            if killed:
                kills += 1
                stats.append((len(records), rec["op"], kill[0]))
                break
            assert "Traceback" not in err, (argv, err)
            if rc == 4 and rec["op"] == "cli_write":
                records.append({"ph": "end", "failed": "no space"})
                continue
            assert rc == 0, (argv, rc, err)
            if rec["op"] in ("create", "snapshot"):
                names.append(rec["name"])
            elif rec["op"] == "delete":
                names.remove(rec["name"])
            records.append({"ph": "end", "names": sorted(names)})
        model = rebuild(baseline, records)
        baseline = verify(root, model)
    assert_checks_pass(root / "metadata")
    print(f"chain {chain}: (journal lines, op killed, how) per kill: {stats}")
    assert kills >= rounds // 2, stats
