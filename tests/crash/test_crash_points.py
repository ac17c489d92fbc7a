"""Crash points: a recorded workload is cut at hundreds of points, in three ways (drop unflushed
writes, tear the write in flight, reorder unflushed writes); every resulting disk must open as a
consistent pool holding only what the model allows.

``THINPOOL_CRASH_POINTS`` (default 300) sets how many crash points are tried in all.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

from thinpool import Pool
from thinpool.errors import NoDataSpace
from thinpool.tools.check import check
from tests.crash.harness import History, Recorder, crash_image, snapshot_files, write_files
from tests.tptools import requires_tools, thin_check

BS = 64 * 1024
VOL_BLOCKS = 12
POINTS = int(os.environ.get("THINPOOL_CRASH_POINTS", "300"))
MODES = ("drop", "tear", "reorder")


def run_workload(root: Path, rng: random.Random, steps: int):
    """Create a pool, then record a random workload on it. Returns (initial files, events, model)."""
    Pool.create(root, data_size=48 * BS, block_size=BS, error_if_no_space=True).close()
    initial = snapshot_files(root)
    hist = History(BS)
    hist.commits.append((0, 0, frozenset()))
    counter = 0
    with Recorder(root) as rec:
        ev = rec.events
        pool = Pool.open(root)
        for _ in range(steps):
            names = sorted(n for n, v in hist.vols.items() if v.died is None)
            op = rng.random()
            if op < 0.12 or not names:
                counter += 1
                name, at = f"v{counter}", len(ev)
                pool.create_thin(name, VOL_BLOCKS * BS)
                hist.create(name, VOL_BLOCKS, at)
                hist.commits.append((at, len(ev), frozenset(pool.volumes())))
            elif op < 0.22:
                counter += 1
                name, origin, at = f"v{counter}", rng.choice(names), len(ev)
                pool.snapshot(origin, name)
                hist.create(name, VOL_BLOCKS, at, origin=origin)
                hist.commits.append((at, len(ev), frozenset(pool.volumes())))
            elif op < 0.27 and len(names) > 1:
                name, at = rng.choice(names), len(ev)
                pool.delete(name)
                hist.vols[name].died = len(ev)
                hist.commits.append((at, len(ev), frozenset(pool.volumes())))
            elif op < 0.75:
                name = rng.choice(names)
                length = rng.choice([1, 100, 4096, BS, BS + 777, 2 * BS])
                offset = rng.randrange(0, VOL_BLOCKS * BS - length + 1)
                data = bytes([rng.randrange(1, 256)]) * length
                at = len(ev)
                try:
                    pool.volume(name).write(offset, data)
                except NoDataSpace:
                    continue
                hist.write(name, offset, data, at)
            elif op < 0.85:
                name = rng.choice(names)
                length = rng.choice([BS, 3 * BS, 1000, BS + 5000])
                offset = rng.randrange(0, VOL_BLOCKS * BS - length + 1)
                at = len(ev)
                try:
                    pool.volume(name).discard(offset, length)
                except NoDataSpace:
                    continue
                hist.write(name, offset, bytes(length), at)
            else:
                at = len(ev)
                pool.commit()
                hist.commits.append((at, len(ev), frozenset(pool.volumes())))
        at = len(ev)
        pool.commit()
        hist.commits.append((at, len(ev), frozenset(pool.volumes())))
        pool.close()
    return initial, rec.events, hist


def _mix(got: bytes, ok: list[bytes]) -> bool:
    """Every byte of ``got`` is that byte of some allowed version: unflushed writes reach the
    disk in any subset and order, and a torn one in part, so a block may hold the old bytes of
    one write and the new bytes of another - but nothing that no write put there."""
    g = np.frombuffer(got, np.uint8)
    return bool((np.stack([np.frombuffer(d, np.uint8) for d in ok]) == g).any(axis=0).all())


def check_crash(tmp: Path, initial, events, hist: History, k: int, mode: str, rng,
                label: str = "") -> None:
    where = f"{label}crash before event {k} of {len(events)} ({mode})"
    files = crash_image(initial, events, k, mode, rng)
    root = tmp / "crashed"
    write_files(files, root)
    since, name_sets = hist.states(k)
    with Pool.open(root) as pool:
        names = frozenset(pool.volumes())
        assert names in name_sets, f"{where}: volumes {sorted(names)} not in {[sorted(s) for s in name_sets]}"
        assert not any("dropped name" in n for n in pool.notes), (where, pool.notes)
        for name in names:
            vol = pool.volume(name)
            for vb in range(VOL_BLOCKS):
                got = vol.read(vb * BS, BS)
                ok = hist.allowed(name, vb, since, k)
                if got not in ok and mode != "drop" and _mix(got, ok):
                    continue
                if got not in ok:
                    diffs = [(sum(a != b for a, b in zip(got, d)), next(i for i in range(BS) if got[i] != d[i]))
                             for d in ok]
                    pytest.fail(f"{where}: {name} block {vb} holds data the model never allowed "
                                f"(differing bytes, first offset, per allowed version: {diffs}; "
                                f"mapping {pool.metadata.lookup(vol.dev_id, vb)})")
    r = thin_check(root / "metadata")
    assert r.returncode == 0, f"{where}: thin_check: {r.stderr}"
    report = check(root / "metadata")
    assert report.clean, f"{where}: {[str(f) for f in report.errors]}"


@requires_tools
@pytest.mark.parametrize("mode", MODES)
def test_crash_points(tmp_path, mode):
    per_mode = max(1, POINTS // len(MODES))
    seeds = range(max(1, per_mode // 50))
    done = 0
    for seed in seeds:
        rng = random.Random(f"{mode}-{seed}")
        initial, events, hist = run_workload(tmp_path / f"w{seed}", rng, steps=60)
        n = per_mode // len(seeds) + (1 if seed < per_mode % len(seeds) else 0)
        # Crash points: spread over the whole run, plus every commit boundary's neighbourhood.
        flushes = [i for i, e in enumerate(events) if e.kind == "flush"]
        points = {rng.randrange(1, len(events) + 1) for _ in range(n)}
        for f in rng.sample(flushes, min(len(flushes), n // 3)):
            points.add(min(len(events), f + rng.choice([0, 1, 2])))
        for k in sorted(points)[: max(n, 1)]:
            check_crash(tmp_path, initial, events, hist, k, mode, rng, f"seed {mode}-{seed}: ")
            done += 1
    assert done >= per_mode


def test_flushes_per_operation(tmp_path):
    """What each operation makes durable, counted on the real system calls: a snapshot flushes
    the metadata and the names file's pending record but not the data (nothing was written to
    it); a flush after a write does flush the data; the names file catches up at close."""
    d = tmp_path / "p"
    with Pool.create(d, data_size=4 << 20) as p:
        vol = p.create_thin("v", 1 << 20)
        vol.write(0, b"x" * 4096)
        p.commit()
        with Recorder(d) as rec:
            p.snapshot("v", "s")
        flushed = [e.file for e in rec.events if e.kind == "flush"]
        assert "data" not in flushed
        assert "metadata" in flushed
        assert sum(e.kind == "replace" and e.file == "names.json" for e in rec.events) == 1
        with Recorder(d) as rec:
            p.volume("s").write(4096, b"y" * 10)
            p.commit()
        assert "data" in [e.file for e in rec.events if e.kind == "flush"]
        with Recorder(d) as rec:
            p.commit()                       # nothing new: no flush of the data
        assert "data" not in [e.file for e in rec.events if e.kind == "flush"]
    with Pool.open(d) as p:
        assert p.volumes() == ["v", "s"] and not p.notes
        assert p.volume("s").read(4096, 10) == b"y" * 10
