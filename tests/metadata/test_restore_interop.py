"""Interoperability with thin_restore / thin_check / thin_dump on random pools.

For each seed: a random pool (``random_superblock``) is written by the real ``thin_restore``;
ThinMetadata must read it exactly; then it is changed through ThinMetadata (create_thin,
create_snap, insert/remove/remove_range with newly allocated data blocks, delete, transaction
id, data-device growth) over several commits and reopens, and after each commit ``thin_check``
must pass and ``thin_dump`` must print exactly the model kept here. Snapshots follow spec 6.3:
``time += 1`` (mod 2^24), the snapshot's creation and snap times are the new time, and the
origin's snap time becomes it too.
"""

from __future__ import annotations

import random

import pytest

from tests.metadata.helpers import dump, full_check, metadata_as_xml
from tests.tptools import assert_checks_pass
from tests.tptools import (XmlDevice, XmlSuperblock, parse_xml, random_superblock, requires_tools,
                           thin_dump, thin_restore, to_xml)
from thinpool.errors import AlreadyExists, InvalidArgument, NoDataSpace, NotFound
from thinpool.metadata import format as fmt
from thinpool.metadata.thin_metadata import ThinMetadata

pytestmark = requires_tools

SEEDS = range(15)


class Model:
    """The pool as thin_dump must print it, changed in step with a ThinMetadata."""

    def __init__(self, meta: ThinMetadata, sb: XmlSuperblock, rng: random.Random):
        self.meta = meta
        self.sb = sb
        self.rng = rng

    # -- operations, each applied to both ----------------------------------------------------
    def new_id(self) -> int:
        while True:
            dev = self.rng.choice([self.rng.randint(0, 20), self.rng.randint(0, fmt.MAX_DEV_ID)])
            if dev not in self.sb.devices:
                return dev

    def create_thin(self) -> None:
        dev = self.new_id()
        self.meta.create_thin(dev)
        self.sb.devices[dev] = XmlDevice(dev, 0, self.sb.transaction, self.sb.time, self.sb.time)

    def create_snap(self) -> None:
        if not self.sb.devices:
            return
        origin = self.rng.choice(sorted(self.sb.devices))
        dev = self.new_id()
        self.meta.create_snap(dev, origin)
        self.sb.time = (self.sb.time + 1) & fmt.TIME_MASK
        o = self.sb.devices[origin]
        o.snap_time = self.sb.time
        self.sb.devices[dev] = XmlDevice(dev, o.mapped_blocks, self.sb.transaction, self.sb.time,
                                         self.sb.time, dict(o.mappings))

    def alloc(self) -> int:
        try:
            return self.meta.data_sm.alloc()
        except NoDataSpace:
            grown = self.sb.nr_data_blocks + self.rng.randint(1, 3000)
            self.meta.resize_data(grown)
            self.sb.nr_data_blocks = grown
            return self.meta.data_sm.alloc()

    def insert_some(self) -> None:
        if not self.sb.devices:
            return
        dev = self.sb.devices[self.rng.choice(sorted(self.sb.devices))]
        existing = sorted(dev.mappings)
        base = self.rng.choice([0, self.rng.randint(0, 1 << 20), self.rng.randint(0, 1 << 40)])
        n = self.rng.choice([1, 5, 50, 400])
        for i in range(n):
            if existing and self.rng.random() < 0.3:
                v = self.rng.choice(existing)            # overwrite (e.g. copy-on-write)
            elif self.rng.random() < 0.7:
                v = base + i
            else:
                v = self.rng.randint(0, 1 << 40)
            b = self.alloc()
            old = self.meta.insert(dev.dev_id, v, b)
            assert old == dev.mappings.get(v)
            if old is None:
                dev.mapped_blocks += 1
            dev.mappings[v] = (b, self.sb.time)

    def remove_some(self) -> None:
        if not self.sb.devices:
            return
        dev = self.sb.devices[self.rng.choice(sorted(self.sb.devices))]
        keys = sorted(dev.mappings)
        victims = self.rng.sample(keys, min(len(keys), self.rng.choice([1, 10, 300])))
        victims.append(self.rng.randint(0, 1 << 41))       # most likely absent
        for v in victims:
            old = self.meta.remove(dev.dev_id, v)
            assert old == dev.mappings.pop(v, None)
            if old is not None:
                dev.mapped_blocks -= 1

    def remove_range(self) -> None:
        if not self.sb.devices:
            return
        dev = self.sb.devices[self.rng.choice(sorted(self.sb.devices))]
        keys = sorted(dev.mappings)
        if not keys:
            return
        lo = self.rng.choice(keys)
        hi = lo + self.rng.choice([1, 100, 1000, 1 << 30])
        gone = [k for k in keys if lo <= k < hi][:2000]
        hi = gone[-1] + 1
        assert self.meta.remove_range(dev.dev_id, lo, hi) == len(gone)
        for k in gone:
            del dev.mappings[k]
        dev.mapped_blocks -= len(gone)

    def delete(self) -> None:
        if not self.sb.devices:
            return
        dev = self.rng.choice(sorted(self.sb.devices))
        self.meta.delete(dev)
        del self.sb.devices[dev]

    def set_transaction(self) -> None:
        t = self.rng.choice([self.sb.transaction + 1, self.rng.randint(0, (1 << 64) - 1)])
        self.meta.set_transaction_id(t)
        self.sb.transaction = t

    def random_step(self) -> None:
        ops = [(self.create_thin, 1), (self.create_snap, 2), (self.insert_some, 6),
               (self.remove_some, 4), (self.remove_range, 1), (self.delete, 1),
               (self.set_transaction, 1)]
        op = self.rng.choices([o for o, _ in ops], [w for _, w in ops])[0]
        op()


def _assert_reads_as(meta: ThinMetadata, sb: XmlSuperblock) -> None:
    got = metadata_as_xml(meta)
    assert got.devices.keys() == sb.devices.keys()
    for dev_id in sb.devices:
        assert got.devices[dev_id] == sb.devices[dev_id], f"device {dev_id}"
    assert got == sb


@pytest.mark.parametrize("seed", SEEDS)
def test_restore_then_change(tmp_path, seed: int) -> None:
    rng = random.Random(seed)
    sb = random_superblock(rng, max_devices=6, max_mappings=3000)
    text = to_xml(sb)
    img = thin_restore(text, tmp_path / "meta.img")
    meta = ThinMetadata.open(img, read_only=True)
    _assert_reads_as(meta, parse_xml(text))
    meta.close()

    model = Model(ThinMetadata.open(img), parse_xml(text), rng)
    for round_ in range(3):
        for _ in range(rng.randint(3, 25)):
            model.random_step()
        model.meta.commit()
        full_check(model.meta, tools=False, zero_tail=False)
        assert_checks_pass(img)
        assert dump(img) == model.sb, f"round {round_}: thin_dump differs from the model"
        _assert_reads_as(model.meta, model.sb)
        if rng.random() < 0.5:
            model.meta.close()
            model.meta = ThinMetadata.open(img)
    # An uncommitted transaction is thrown away by abort.
    for _ in range(5):
        model.random_step()
    model.meta.abort()
    saved = parse_xml(thin_dump(img))
    _assert_reads_as(model.meta, saved)
    model.meta.close()
    # Our output survives the tools' own round trip.
    out = thin_dump(img)
    again = thin_restore(out, tmp_path / "again.img")
    assert thin_dump(again) == out


def test_errors_leave_the_transaction_usable(tmp_path) -> None:
    rng = random.Random(99)
    sb = random_superblock(rng, max_devices=3, max_mappings=500)
    sb.devices.setdefault(1, XmlDevice(1, 0, 0, 0, 0))
    img = thin_restore(to_xml(sb), tmp_path / "meta.img")
    meta = ThinMetadata.open(img)
    with pytest.raises(AlreadyExists):
        meta.create_thin(1)
    with pytest.raises(AlreadyExists):
        meta.create_snap(1, 1)
    missing, other = [d for d in range(100) if d not in sb.devices][:2]
    with pytest.raises(NotFound):
        meta.create_snap(missing, other)
    with pytest.raises(NotFound):
        meta.delete(missing)
    with pytest.raises(InvalidArgument):
        meta.create_thin(fmt.MAX_DEV_ID + 1)
    with pytest.raises(InvalidArgument):
        meta.create_thin(-1)
    assert not meta.has_changes()
    meta.create_thin(missing)
    meta.commit()
    full_check(meta, zero_tail=False)
    sb.devices[missing] = XmlDevice(missing, 0, sb.transaction, sb.time, sb.time)
    assert dump(img) == sb
    meta.close()
