"""The pool against a model: random create / write / snapshot / discard / delete / commit / reopen.

The model is a dict of volumes, each a size and a sparse dict of block contents (immutable bytes,
so snapshots are cheap shallow copies) plus the set of blocks that must be mapped. After every
step every volume's mapped bytes are read through ``Volume.read`` and compared with the model, and
the mapping set is compared too. At the end of each example the real ``thin_check`` and
``thinpool check`` must pass,
``thin_dump``'s mappings must equal what the pool reports, and both space maps must equal the
counts recomputed from the trees (thin_check 0.9.0 does not check data counts).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, consumes, initialize, invariant,
                                 rule)

from thinpool import Pool
from thinpool.errors import NoDataSpace
from thinpool.metadata.walker import expected_counts
from thinpool.tools.check import check
from tests.tptools import parse_xml, requires_tools, thin_check, thin_dump

BS = 64 * 1024
ZERO = bytes(BS)


class Model:
    def __init__(self) -> None:
        self.vols: dict[str, dict] = {}

    def create(self, name: str, size: int) -> None:
        self.vols[name] = {"size": size, "blocks": {}, "mapped": set()}

    def snapshot(self, origin: str, name: str) -> None:
        o = self.vols[origin]
        self.vols[name] = {"size": o["size"], "blocks": dict(o["blocks"]), "mapped": set(o["mapped"])}

    def write(self, name: str, offset: int, data: bytes) -> None:
        v = self.vols[name]
        end = offset + len(data)
        for vb in range(offset // BS, (end - 1) // BS + 1):
            lo, hi = max(offset, vb * BS), min(end, (vb + 1) * BS)
            old = v["blocks"].get(vb, ZERO)
            a, b = lo - vb * BS, hi - vb * BS
            v["blocks"][vb] = old[:a] + data[lo - offset: hi - offset] + old[b:]
            v["mapped"].add(vb)

    def discard(self, name: str, offset: int, length: int) -> None:
        v = self.vols[name]
        end = offset + length
        for vb in range(offset // BS, (end - 1) // BS + 1):
            lo, hi = max(offset, vb * BS), min(end, (vb + 1) * BS)
            if hi - lo == BS:
                v["blocks"].pop(vb, None)
                v["mapped"].discard(vb)
            elif vb in v["mapped"]:
                old = v["blocks"].get(vb, ZERO)
                a, b = lo - vb * BS, hi - vb * BS
                v["blocks"][vb] = old[:a] + bytes(b - a) + old[b:]


def check_volume(pool: Pool, name: str, mv: dict) -> None:
    vol = pool.volume(name)
    mapped = {vb for vb, _, _ in vol.mappings()}
    assert mapped == mv["mapped"], f"{name}: mapped blocks differ from the model"
    assert vol.mapped_blocks == len(mapped)
    for vb in sorted(mapped):
        got = vol.read(vb * BS, min(BS, vol.size - vb * BS))
        want = mv["blocks"].get(vb, ZERO)[: len(got)]
        assert got == want, f"{name}: block {vb} differs from the model"
    # Unmapped blocks read as zeros: probe a few.
    nblocks = -(-vol.size // BS)
    for vb in list(range(0, nblocks, max(1, nblocks // 7)))[:8]:
        if vb not in mapped:
            assert vol.read(vb * BS, min(64, vol.size - vb * BS)) == bytes(min(64, vol.size - vb * BS))


def final_checks(pool_dir: Path) -> None:
    meta_path = pool_dir / "metadata"
    r = thin_check(meta_path)
    assert r.returncode == 0, r.stderr
    report = check(meta_path)                   # thinpool check: data reference counts too
    assert report.clean, report
    dumped = parse_xml(thin_dump(meta_path))
    with Pool.open(pool_dir, read_only=True) as pool:
        meta = pool.metadata
        assert sorted(dumped.devices) == meta.device_ids()
        for dev in meta.device_ids():
            ours = {}
            for keys, vals in meta.mappings(dev):
                for k, v in zip(keys.tolist(), vals.tolist()):
                    ours[k] = (v >> 24, v & 0xFFFFFF)
            assert dumped.devices[dev].mappings == ours
            assert dumped.devices[dev].mapped_blocks == len(ours)
        mc, dc = expected_counts(meta)
        assert np.array_equal(mc, meta.metadata_sm.all_counts().astype(np.int64)), "metadata ref counts"
        assert np.array_equal(dc, meta.data_sm.all_counts().astype(np.int64)), "data ref counts"


class PoolMachine(RuleBasedStateMachine):
    max_fill = 400
    data_blocks = 2048
    most_mapped = 0          # the largest total of mapped blocks any example reached

    volumes = Bundle("volumes")

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="tp-model-"))
        self.dir = self.tmp / "pool"
        self.pool = Pool.create(self.dir, data_size=self.data_blocks * BS, block_size=BS,
                                error_if_no_space=True)
        self.model = Model()
        self.counter = 0

    def teardown(self) -> None:
        try:
            if self.pool is not None:
                self.pool.commit()
                self.pool.close()
                final_checks(self.dir)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _name(self) -> str:
        self.counter += 1
        return f"v{self.counter}"

    @rule(target=volumes, blocks=st.integers(1, 4096), extra=st.integers(0, BS - 1))
    def create(self, blocks, extra):
        name = self._name()
        size = blocks * BS + extra
        self.pool.create_thin(name, size)
        self.model.create(name, size)
        return name

    @rule(target=volumes, origin=volumes)
    def snapshot(self, origin):
        name = self._name()
        self.pool.snapshot(origin, name)
        self.model.snapshot(origin, name)
        return name

    @rule(name=volumes, where=st.floats(0, 1), length=st.integers(1, 3 * BS), seed=st.integers(0, 255))
    def write(self, name, where, length, seed):
        size = self.model.vols[name]["size"]
        length = min(length, size)
        offset = int(where * (size - length))
        data = (bytes([seed or 1]) * 7 + bytes(range(seed, seed + 9 if seed < 247 else 256)))
        data = (data * (length // len(data) + 1))[:length]
        try:
            self.pool.volume(name).write(offset, data)
        except NoDataSpace:
            return
        self.model.write(name, offset, data)

    @rule(name=volumes, start=st.floats(0, 1), frac=st.floats(0, 1), stride=st.integers(1, 3))
    def fill(self, name, start, frac, stride):
        """Many one-byte writes, one per block: grows trees to internal nodes cheaply."""
        size = self.model.vols[name]["size"]
        nblocks = size // BS
        if nblocks == 0:
            return
        count = min(1 + int(frac * self.max_fill), nblocks)
        first = int(start * (nblocks - 1))
        vol = self.pool.volume(name)
        for vb in range(first, min(nblocks, first + count * stride), stride):
            off = vb * BS + (vb * 37) % BS
            try:
                vol.write(off, b"\xa5")
            except NoDataSpace:
                return
            self.model.write(name, off, b"\xa5")

    @rule(name=volumes, where=st.floats(0, 1), length=st.integers(1, 8 * BS))
    def discard(self, name, where, length):
        size = self.model.vols[name]["size"]
        length = min(length, size)
        offset = int(where * (size - length))
        try:
            self.pool.volume(name).discard(offset, length)
        except NoDataSpace:
            # A partial edge of a shared block needs a copy; the whole request fails cleanly.
            return
        self.model.discard(name, offset, length)

    @rule(name=volumes, where=st.floats(0, 1), length=st.integers(1, 1 << 30))
    def discard_big(self, name, where, length):
        size = self.model.vols[name]["size"]
        offset = (int(where * size) // BS) * BS
        length = min(length, size - offset) // BS * BS
        if length:
            self.pool.volume(name).discard(offset, length)
            self.model.discard(name, offset, length)

    @rule(name=consumes(volumes))
    def delete(self, name):
        self.pool.delete(name)
        del self.model.vols[name]

    @rule()
    def commit(self):
        self.pool.commit()

    @rule()
    def commit_and_reopen(self):
        self.pool.commit()
        self.pool.close()
        self.pool = Pool.open(self.dir)

    @invariant()
    def matches_model(self):
        if self.pool is None:
            return
        assert sorted(self.pool.volumes()) == sorted(self.model.vols)
        total = sum(len(v["mapped"]) for v in self.model.vols.values())
        type(self).most_mapped = max(type(self).most_mapped, total)
        for name, mv in self.model.vols.items():
            check_volume(self.pool, name, mv)


class BigPoolMachine(PoolMachine):
    max_fill = 3000
    data_blocks = 16384

    @initialize(target=PoolMachine.volumes, stride=st.integers(1, 3), count=st.integers(2000, 3000))
    def big_volume(self, stride, count):
        """Every example starts with a volume of thousands of mappings (internal tree nodes)."""
        name = self._name()
        size = 9216 * BS               # room for count * stride blocks (3 * 3000)
        self.pool.create_thin(name, size)
        self.model.create(name, size)
        vol = self.pool.volume(name)
        for vb in range(0, count * stride, stride):
            off = vb * BS + (vb * 37) % BS
            vol.write(off, b"\x5a")
            self.model.write(name, off, b"\x5a")
        return name


@requires_tools
def test_pool_against_model():
    run = PoolMachine.TestCase
    run.settings = settings(max_examples=40, stateful_step_count=25, deadline=None,
                            derandomize=True, suppress_health_check=list(HealthCheck))
    run().runTest()
    assert PoolMachine.most_mapped > 200


@requires_tools
def test_pool_against_model_thousands_of_blocks():
    run = BigPoolMachine.TestCase
    run.settings = settings(max_examples=6, stateful_step_count=30, deadline=None,
                            derandomize=True, suppress_health_check=list(HealthCheck))
    run().runTest()
    # The point of this machine: trees with internal nodes that split, rebalance and merge.
    assert BigPoolMachine.most_mapped >= 2000, BigPoolMachine.most_mapped
