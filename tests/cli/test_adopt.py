"""thinpool adopt: a metadata file thin_restore made from a generated XML, and a data file,
become a pool whose devices, sizes and mappings are what the XML (and thin_dump) say.

The oracle is the XML itself (tests/tptools.py's model) and the real thin_dump of the
adopted metadata; both checkers pass after the pool is used."""

from __future__ import annotations

import json
import os
import random

import pytest

from tests.cli.helpers import tp
from tests.tptools import (assert_checks_pass, parse_xml, random_superblock, requires_tools,
                           thin_dump, thin_restore, to_xml)

pytestmark = requires_tools


def _made(tmp_path, seed: int, bs_sectors: int = 128):
    """(model, metadata path, data path): a random pool restored by thin_restore."""
    rng = random.Random(seed)
    sb = random_superblock(rng, max_devices=5, max_mappings=600)
    sb.data_block_size = bs_sectors
    meta, data = tmp_path / f"meta{seed}", tmp_path / f"data{seed}"
    thin_restore(to_xml(sb), meta)
    with open(data, "wb") as f:
        f.truncate(sb.nr_data_blocks * bs_sectors * 512)
    return sb, meta, data


def _runs(mappings: dict[int, tuple[int, int]]) -> list[tuple[int, int]]:
    return sorted((v, d) for v, (d, _t) in mappings.items())


def _mapped(home, vol: str, bs: int) -> list[tuple[int, int]]:
    """(virtual block, data block) pairs of a volume, from thinpool map --json."""
    out = []
    for e in json.loads(tp(home, "map", vol, "--json", check=0).stdout):
        if e["data"]:
            assert e["start"] % bs == 0 and e["length"] % bs == 0
            out += [(e["start"] // bs + i, e["offset"] // bs + i) for i in range(e["length"] // bs)]
    return out


@pytest.mark.parametrize("seed", [3, 11, 42, 5])
def test_adopted_pool_lists_what_the_xml_says(tmp_path, seed):
    home = tmp_path / "home"
    sb, meta, data = _made(tmp_path, seed)
    bs = sb.data_block_size * 512
    ids = sorted(sb.devices)
    given = {ids[0]: 5 << 30} if ids else {}
    r = tp(home, "adopt", "old", "--data", str(data), "--metadata", str(meta), "--json",
           *[f"--size={i}={s}" for i, s in given.items()], check=0)
    doc = json.loads(r.stdout)
    assert doc["block_size"] == bs and doc["data_size"] == sb.nr_data_blocks * bs
    assert doc["transaction_id"] == sb.transaction
    assert [v["dev_id"] for v in doc["volumes"]] == ids
    for v in doc["volumes"]:
        dev = sb.devices[v["dev_id"]]
        assert v["name"] == str(dev.dev_id) and v["mapped_blocks"] == dev.mapped_blocks
        if dev.dev_id in given:
            assert (v["size"], v["size_from"]) == (given[dev.dev_id], "given")
        elif dev.mappings:
            assert (v["size"], v["size_from"]) == ((max(dev.mappings) + 1) * bs, "mapped")
        else:
            assert (v["size"], v["size_from"]) == (bs, "empty")
    st = json.loads(tp(home, "stat", "old", "--json", check=0).stdout)
    assert {v["dev_id"]: v["mapped_blocks"] for v in st["volumes"]} == \
        {d.dev_id: d.mapped_blocks for d in sb.devices.values()}
    assert {v["dev_id"]: v["size"] for v in st["volumes"]} == \
        {v["dev_id"]: v["size"] for v in doc["volumes"]}
    for dev in sb.devices.values():
        assert _mapped(home, f"old/{dev.dev_id}", bs) == _runs(dev.mappings)
    # thin_dump of the adopted pool's metadata: the devices and mappings of the XML
    dumped = parse_xml(thin_dump(meta))
    assert {d: _runs(x.mappings) for d, x in dumped.devices.items()} == \
        {d: _runs(x.mappings) for d, x in sb.devices.items()}
    # and it is a pool like any other: a new volume gets a new id, data goes in and out
    tp(home, "create", "old/fresh", "--size", "1M", check=0)
    fresh = json.loads(tp(home, "stat", "old/fresh", "--json", check=0).stdout)
    assert fresh["dev_id"] == max(ids, default=0) + 1
    if sb.nr_data_blocks > sb.nr_data_blocks - len({d for x in sb.devices.values()
                                                    for d, _ in x.mappings.values()}) > 0:
        tp(home, "write", "old/fresh", input=b"x" * 1000, check=0)
        assert tp(home, "read", "old/fresh", "--length", "1000", check=0).stdout == b"x" * 1000
    tp(home, "check", "old", check=0)
    assert_checks_pass(meta)


def test_says_where_sizes_came_from(tmp_path):
    home = tmp_path / "home"
    sb, meta, data, _dev = _one_device(tmp_path)
    r = tp(home, "adopt", "old", "--data", str(data), "--metadata", str(meta), check=0)
    assert r.out.startswith(f"adopted pool old in {home / 'old'}: {len(sb.devices)} device")
    assert "up to its highest mapped block; --size" in r.out
    assert "named by their ids" in r.stderr
    assert os.path.exists(meta) and os.path.exists(data)


def _one_device(tmp_path):
    rng = random.Random(7)
    sb = random_superblock(rng, max_devices=5, max_mappings=200)
    while not any(d.mappings for d in sb.devices.values()):
        sb = random_superblock(rng, max_devices=5, max_mappings=200)
    sb.data_block_size = 128
    meta, data = tmp_path / "meta", tmp_path / "data"
    thin_restore(to_xml(sb), meta)
    with open(data, "wb") as f:
        f.truncate(sb.nr_data_blocks * 65536)
    dev = next(d for d in sb.devices.values() if d.mappings)
    return sb, meta, data, dev


def test_refusals_leave_nothing(tmp_path):
    home = tmp_path / "home"
    sb, meta, data, dev = _one_device(tmp_path)
    before = meta.read_bytes()
    last = max(dev.mappings)

    def refused(code, what, *args, m=meta, d=data):
        r = tp(home, "adopt", "old", "--data", str(d), "--metadata", str(m), *args, check=code)
        assert what in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (home / "old").exists()

    refused(2, "no device 16777215", "--size", "16777215=1G")
    refused(2, f"maps block {last}", "--size", f"{dev.dev_id}={last * 65536}")
    refused(2, "is not ID=SIZE", "--size", "ten=1G")
    refused(2, "two sizes", "--size", f"{dev.dev_id}=1G", "--size", f"{dev.dev_id}=2G")
    small = tmp_path / "small"
    small.write_bytes(b"")
    refused(2, "less than the", d=small)
    refused(2, "does not exist", d=tmp_path / "nope")
    junk = tmp_path / "junk"
    junk.write_bytes(os.urandom(1 << 20))
    refused(3, "", m=junk)
    broken = tmp_path / "broken"
    broken.write_bytes(before)
    with open(broken, "r+b") as f:      # a mapping tree block: the check finds it
        f.seek(4096 * 5)
        f.write(b"\xff" * 64)
    tp(home, "adopt", "old", "--data", str(data), "--metadata", str(broken), check=3)
    assert not (home / "old").exists()
    assert meta.read_bytes() == before
    # a pool's own files are refused for another
    tp(home, "adopt", "old", "--data", str(data), "--metadata", str(meta), check=0)
    r = tp(home, "adopt", "again", "--data", str(data), "--metadata", str(meta), check=5)
    assert "holds one pool only" in r.stderr
    r = tp(home, "adopt", "old", "--data", str(tmp_path / "x"), "--metadata", str(meta), check=1)
    assert "exists already" in r.stderr
