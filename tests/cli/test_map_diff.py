"""``thinpool map`` and ``thinpool diff`` against independent oracles.

* map: the real ``qemu-img map --output=json -f raw`` on ``thinpool export``'s sparse file says
  which blocks hold data (export writes a mapped block's non-zero pages and leaves holes for the
  rest, so qemu's data blocks are the mapped blocks that are not all zeros); every offset is
  checked by reading the pool's data file there; ``shared`` against every volume's mappings as
  the pool itself reports them (``Volume.mappings``, not the walker) and thin_ls's count.
* diff: agrees with ``thinpool delta --format json`` and the real ``thin_delta`` on the same
  pair, and every byte outside the diff reads the same on both volumes.
"""

from __future__ import annotations

import itertools
import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.cli.helpers import assert_one_line_error, fingerprint, tp
from tests.tptools import requires_tools, thin_delta, thin_ls
from thinpool import Pool

BS = 64 * 1024
SIZE = 4 << 20 | 12345          # not a whole number of blocks: the last extent is cut
NBLK = -(-SIZE // BS)


def _build(home: Path) -> dict[str, int]:
    """A lineage after writes, discards and snapshots; returns name -> dev id."""
    rng = random.Random(12)
    with Pool.create(home / "demo", data_size=32 << 20, block_size=BS) as pool:
        a = pool.create_thin("a", SIZE)

        def scribble(vol, n):
            for _ in range(n):
                off = rng.randrange(0, SIZE - 1)
                ln = min(rng.choice([7, 5000, BS, 3 * BS + 17]), SIZE - off)
                vol.write(off, bytes(rng.randrange(1, 256) for _ in range(min(ln, 64))) * (ln // 64)
                          + b"\x01" * (ln % 64))

        scribble(a, 12)
        a.write(5 * BS, bytes(BS))                   # a mapped block of zeros (export: a hole)
        a.write(6 * BS, b"x" * (4 * BS))             # data blocks in a row: one extent
        pool.snapshot("a", "s1")
        scribble(a, 6)
        a.discard(6 * BS + 100, 2 * BS)              # one whole block unmapped, edges zeroed
        pool.snapshot("a", "s2")
        scribble(pool.volume("s1"), 4)
        a.discard(0, 3 * BS)
        scribble(a, 3)
        pool.snapshot("s1", "s3")
        pool.create_thin("empty", SIZE)
        return {n: pool.volume(n).dev_id for n in pool.volumes()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    home = tmp_path_factory.mktemp("mapdiff") / "home"
    ids = _build(home)
    return home, ids


def _bytes(home: Path) -> dict[str, bytes]:
    with Pool.open(home / "demo", read_only=True) as pool:
        return {n: pool.volume(n).read(0, pool.volume(n).size) for n in pool.volumes()}


def _mappings(home: Path) -> dict[str, dict[int, int]]:
    with Pool.open(home / "demo", read_only=True) as pool:
        return {n: {vb: db for vb, db, _ in pool.volume(n).mappings()} for n in pool.volumes()}


def _blocks_of(extents, key: str, start="start") -> set[int]:
    out = set()
    for e in extents:
        if e[key]:
            out.update(range(e[start] // BS, -(-(e[start] + e["length"]) // BS)))
    return out


# -- map -------------------------------------------------------------------------------------
def test_map_covers_the_volume_and_points_at_the_data(built):
    home, ids = built
    before = fingerprint(home / "demo")
    maps = _mappings(home)
    contents = _bytes(home)
    everyone = [db for m in maps.values() for db in m.values()]
    data_file = (home / "demo" / "data").read_bytes()
    for name in ids:
        ext = json.loads(tp(home, "map", f"demo/{name}", "--json", check=0).stdout)
        at = 0
        for e in ext:                          # contiguous, exact, qemu's keys
            assert e["start"] == at and e["length"] > 0 and e["depth"] == 0
            assert e["data"] == e["present"] == (not e["zero"])
            assert ("offset" in e) == ("shared" in e) == e["data"]
            at += e["length"]
        assert at == SIZE
        for x, y in itertools.pairwise(ext):        # merged: neighbours differ in something
            if not x["data"] and not y["data"]:
                pytest.fail(f"two holes in a row in {name}: {x} {y}")
            if x["data"] and y["data"]:
                assert (x["offset"] + x["length"] != y["offset"] or x["shared"] != y["shared"])
        assert _blocks_of(ext, "data") == set(maps[name])
        for e in ext:
            if not e["data"]:
                assert contents[name][e["start"]:e["start"] + e["length"]] == bytes(e["length"])
                continue
            assert data_file[e["offset"]:e["offset"] + e["length"]] == \
                contents[name][e["start"]:e["start"] + e["length"]]
            for vb in range(e["start"] // BS, -(-(e["start"] + e["length"]) // BS)):
                assert (everyone.count(maps[name][vb]) > 1) == e["shared"], (name, vb)
    assert fingerprint(home / "demo") == before


@requires_tools
def test_map_shared_counts_are_thin_ls(built):
    home, ids = built
    want = {int(r.split()[0]): int(r.split()[1]) for r in thin_ls(
        home / "demo" / "metadata", "--no-headers", "-o", "DEV,SHARED_BLOCKS").splitlines()}
    for name, dev in ids.items():
        ext = json.loads(tp(home, "map", f"demo/{name}", "--json", check=0).stdout)
        assert len(_blocks_of([e for e in ext if e["data"] and e["shared"]], "data")) == want[dev]
    assert any(want.values())


@pytest.mark.skipif(not shutil.which("qemu-img"), reason="qemu-img is not installed")
def test_map_agrees_with_qemu_img_on_the_export(built, tmp_path):
    home, ids = built
    contents = _bytes(home)
    zero_blocks_seen = False
    for name in ids:
        img = tmp_path / f"{name}.img"
        tp(home, "export", f"demo/{name}", str(img), check=0)
        q = json.loads(subprocess.run(["qemu-img", "map", "--output=json", "-f", "raw", str(img)],
                                      capture_output=True, check=True, timeout=60).stdout)
        assert sum(e["length"] for e in q) == -(-SIZE // 512) * 512   # qemu counts sectors
        ours = json.loads(tp(home, "map", f"demo/{name}", "--json", check=0).stdout)
        mapped = _blocks_of(ours, "data")
        nonzero = {b for b in mapped if any(contents[name][b * BS:(b + 1) * BS])}
        zero_blocks_seen |= nonzero != mapped
        assert _blocks_of(q, "data") == nonzero, name
        holes = set(range(NBLK)) - mapped       # what we call zero, qemu calls zero too
        assert holes <= _blocks_of(q, "zero") - _blocks_of(q, "data"), name
    assert zero_blocks_seen                     # the all-zeros mapped block was exercised


def test_map_table(built):
    home, _ = built
    r = tp(home, "map", "demo/empty", check=0)
    assert r.out.splitlines()[0] == "volume demo/empty: 0 B mapped of 4.01 MiB in 0 extent(s)"
    rows = [ln.split() for ln in r.out.splitlines()[3:]]
    assert rows == [["0", str(SIZE), "4.01", "MiB", "zero", "-", "-"]]
    r = tp(home, "map", "demo/a", check=0)
    assert "data offset" in r.out and " yes " in r.out


# -- diff ------------------------------------------------------------------------------------
def _ranges_from_runs(runs) -> list[dict]:
    """delta's runs (kind, begin, length in blocks) as rbd diff's merged byte ranges."""
    out: list[dict] = []
    for kind, begin, length in runs:
        if kind == "same":
            continue
        exists = kind in ("different", "right_only")
        off, end = begin * BS, min((begin + length) * BS, SIZE)
        if out and out[-1]["exists"] == exists and out[-1]["offset"] + out[-1]["length"] == off:
            out[-1]["length"] = end - out[-1]["offset"]
        else:
            out.append({"offset": off, "length": end - off, "exists": exists})
    return out


PAIRS = [("s1", "a"), ("a", "s1"), ("s1", "s2"), ("s2", "a"), ("s1", "s3"), ("s3", "a"),
         ("empty", "a"), ("a", "empty"), ("a", "a")]


def test_diff_agrees_with_delta_and_the_bytes(built):
    home, ids = built
    contents = _bytes(home)
    maps = _mappings(home)
    for left, right in PAIRS:
        got = json.loads(tp(home, "diff", f"demo/{left}", f"demo/{right}", "--json",
                            check=0).stdout)
        d = json.loads(tp(home, "delta", "demo", "--snap1", left, "--snap2", right,
                          "--format", "json", check=0).stdout)
        assert got == _ranges_from_runs((r["kind"], r["begin"], r["length"]) for r in d["runs"])
        inside = bytearray(SIZE)
        for r in got:
            blocks = range(r["offset"] // BS, -(-(r["offset"] + r["length"]) // BS))
            assert r["exists"] == all(b in maps[right] for b in blocks)
            inside[r["offset"]:r["offset"] + r["length"]] = b"\x01" * r["length"]
        a, b = contents[left], contents[right]
        outside = [i for i in range(0, SIZE, 512) if not inside[i]]
        assert all(a[i:i + 512] == b[i:i + 512] for i in outside), (left, right)
        assert got or a == b, (left, right)
        if ids[left] == ids[right] or {left, right} == {"s1", "s3"}:    # s3: s1 untouched
            assert got == []


@requires_tools
def test_diff_agrees_with_thin_delta(built):
    import re
    home, ids = built
    meta = home / "demo" / "metadata"
    for left, right in PAIRS:
        got = json.loads(tp(home, "diff", f"demo/{left}", f"demo/{right}", "--json",
                            check=0).stdout)
        xml = thin_delta(meta, "--thin1", str(ids[left]), "--thin2", str(ids[right]))
        runs = [(k, int(b), int(n)) for k, b, n in
                re.findall(r'<(same|different|left_only|right_only) begin="(\d+)" '
                           r'length="(\d+)"/>', xml)]
        assert got == _ranges_from_runs(runs), (left, right, xml)


def test_diff_table(built):
    home, _ = built
    r = tp(home, "diff", "demo/a", "demo/a", check=0)
    assert r.out == "demo/a -> demo/a: 0 B may differ, in 0 range(s)\n"
    r = tp(home, "diff", "demo/empty", "demo/a", check=0)
    assert " data" in r.out and "offset" in r.out


# -- refusals --------------------------------------------------------------------------------
def test_refusals(built, tmp_path):
    home, _ = built
    before = fingerprint(home / "demo")
    assert_one_line_error(tp(home, "map", "nopool/a"), 1, "no pool named 'nopool'")
    assert_one_line_error(tp(home, "map", "demo/nope"), 1, "no volume 'nope'")
    assert_one_line_error(tp(home, "diff", "demo/a", "demo/nope"), 1, "no volume 'nope'")
    assert_one_line_error(tp(home, "diff", "nopool/a", "nopool/b"), 1, "no pool named")
    assert_one_line_error(tp(home, "diff", "demo/a", "other/a"), 2, "different pools")
    assert_one_line_error(tp(home, "map", "demo"), 2, "give a volume as POOL/NAME")
    assert tp(home, "diff", "demo/a").returncode == 2
    assert fingerprint(home / "demo") == before
