"""Tests for the thin-provisioning-tools test support module (tests/tptools.py).

The XML model is checked against the shared test vectors byte for byte, and
random pools are pushed through the real thin_restore / thin_check / thin_dump
(and thin_ls / thin_delta) to confirm the generator only produces valid pools
and that our reading of the tools' output formats is right.
"""

from __future__ import annotations

import collections
import gzip
import itertools
import pathlib
import random
import xml.etree.ElementTree as ET

import pytest

from thinpool.tools.check import check

from tests import tptools
from tests.tptools import assert_checks_pass
from tests.tptools import (
    TESTDATA,
    TESTDATA_CASES,
    XmlDevice,
    XmlSuperblock,
    parse_xml,
    random_superblock,
    requires_tools,
    testdata_image,
    testdata_xml,
    thin_check,
    thin_delta,
    thin_dump,
    thin_ls,
    thin_restore,
    to_xml,
)

RANDOM_SEEDS = range(20)

#: Cases that thin_restore wrote directly, with the file size it was given.
RESTORED_CASES: dict[str, int] = {
    "01-single": 4 << 20,
    "02-snapshot": 4 << 20,
    "03-large": 68 << 20,
    "04-multi": 4 << 20,
    "07-big-data-dev": 4 << 20,
}


# ---------------------------------------------------------------------------
# Helpers: independent models of what thin_ls / thin_delta should print
# ---------------------------------------------------------------------------


def expected_delta(
    left: dict[int, tuple[int, int]], right: dict[int, tuple[int, int]]
) -> list[tuple[str, int, int]]:
    """thin_delta's (kind, begin, length) ranges: compare data blocks only, merge adjacent."""
    out: list[list] = []
    for v in sorted(left.keys() | right.keys()):
        if v in left and v in right:
            kind = "same" if left[v][0] == right[v][0] else "different"
        elif v in left:
            kind = "left_only"
        else:
            kind = "right_only"
        if out and out[-1][0] == kind and out[-1][1] + out[-1][2] == v:
            out[-1][2] += 1
        else:
            out.append([kind, v, 1])
    return [(k, b, n) for k, b, n in out]


def expected_exclusive(sb: XmlSuperblock) -> dict[int, int]:
    """Per device, mappings whose data block is mapped exactly once in the whole pool."""
    counts = collections.Counter(
        data for dev in sb.devices.values() for data, _ in dev.mappings.values()
    )
    return {
        dev_id: sum(1 for data, _ in dev.mappings.values() if counts[data] == 1)
        for dev_id, dev in sb.devices.items()
    }


# ---------------------------------------------------------------------------
# XML model (no tools needed)
# ---------------------------------------------------------------------------


def test_testdata_found() -> None:
    assert TESTDATA.name == "testdata"
    assert TESTDATA_CASES == sorted(TESTDATA_CASES)
    if TESTDATA.is_dir():
        assert "01-single" in TESTDATA_CASES


@pytest.mark.parametrize("case", TESTDATA_CASES)
def test_xml_round_trip(case: str) -> None:
    text = testdata_xml(case)
    sb = parse_xml(text)
    assert to_xml(sb) == text
    for dev in sb.devices.values():
        assert dev.mapped_blocks == len(dev.mappings)


def test_parse_expands_ranges() -> None:
    sb = parse_xml(testdata_xml("01-single")) if "01-single" in TESTDATA_CASES else None
    if sb is None:
        pytest.skip("test vectors not available")
    assert sb == XmlSuperblock(
        uuid="",
        time=1,
        transaction=5,
        flags=0,
        version=2,
        data_block_size=128,
        nr_data_blocks=1024,
        devices={
            1: XmlDevice(
                dev_id=1,
                mapped_blocks=4,
                transaction=3,
                creation_time=0,
                snap_time=1,
                mappings={0: (10, 0), 1: (11, 0), 2: (12, 0), 100: (20, 1)},
            )
        },
    )


def test_to_xml_formatting() -> None:
    sb = XmlSuperblock(uuid="", time=9, transaction=3, flags=0, version=2,
                       data_block_size=256, nr_data_blocks=500)
    sb.devices[12] = XmlDevice(12, 0, 1, 2, 3)
    sb.devices[4] = XmlDevice(
        4, 7, 2, 0, 9,
        {
            # consecutive virtual and data, equal time: one range
            0: (50, 1), 1: (51, 1), 2: (52, 1),
            # consecutive but the time changes: new run (a single)
            3: (53, 2),
            # virtual consecutive, data not: new run
            4: (60, 2), 5: (61, 2),
            # gap in virtual space
            9: (62, 2),
        },
    )
    assert to_xml(sb) == (
        '<superblock uuid="" time="9" transaction="3" flags="0" version="2"'
        ' data_block_size="256" nr_data_blocks="500">\n'
        '  <device dev_id="4" mapped_blocks="7" transaction="2" creation_time="0" snap_time="9">\n'
        '    <range_mapping origin_begin="0" data_begin="50" length="3" time="1"/>\n'
        '    <single_mapping origin_block="3" data_block="53" time="2"/>\n'
        '    <range_mapping origin_begin="4" data_begin="60" length="2" time="2"/>\n'
        '    <single_mapping origin_block="9" data_block="62" time="2"/>\n'
        '  </device>\n'
        '  <device dev_id="12" mapped_blocks="0" transaction="1" creation_time="2" snap_time="3">\n'
        '  </device>\n'
        '</superblock>\n'
    )
    assert parse_xml(to_xml(sb)) == sb


def test_to_xml_no_devices() -> None:
    sb = XmlSuperblock("", 0, 0, 0, 2, 128, 1)
    assert to_xml(sb) == (
        '<superblock uuid="" time="0" transaction="0" flags="0" version="2"'
        ' data_block_size="128" nr_data_blocks="1">\n</superblock>\n'
    )
    assert parse_xml(to_xml(sb)) == sb


def test_parse_defaults_like_thin_restore() -> None:
    sb = parse_xml(
        '<superblock uuid="" time="1" transaction="2" data_block_size="128" nr_data_blocks="9">'
        '<device dev_id="3" transaction="0" creation_time="0" snap_time="0">'
        '<single_mapping origin_block="1" data_block="2" time="1"/></device></superblock>'
    )
    assert (sb.flags, sb.version) == (0, 1)
    assert sb.devices[3].mapped_blocks == 1


@pytest.mark.parametrize(
    "body",
    [
        # unknown element (newer tools' shared-subtree syntax)
        '<device dev_id="1" mapped_blocks="0" transaction="0" creation_time="0" snap_time="0">'
        '<ref name="x"/></device>',
        # duplicate device
        '<device dev_id="1" mapped_blocks="0" transaction="0" creation_time="0" snap_time="0"/>'
        '<device dev_id="1" mapped_blocks="0" transaction="0" creation_time="0" snap_time="0"/>',
        # virtual block mapped twice
        '<device dev_id="1" mapped_blocks="0" transaction="0" creation_time="0" snap_time="0">'
        '<range_mapping origin_begin="0" data_begin="0" length="3" time="0"/>'
        '<single_mapping origin_block="2" data_block="7" time="0"/></device>',
        # missing attribute
        '<device dev_id="1" mapped_blocks="0" creation_time="0" snap_time="0"/>',
        # not a number
        '<device dev_id="x" mapped_blocks="0" transaction="0" creation_time="0" snap_time="0"/>',
    ],
)
def test_parse_rejects(body: str) -> None:
    text = (
        '<superblock uuid="" time="0" transaction="0" data_block_size="128" nr_data_blocks="9">'
        + body
        + "</superblock>"
    )
    with pytest.raises(ValueError):
        parse_xml(text)


def test_random_superblock_invariants() -> None:
    features: collections.Counter[str] = collections.Counter()
    for seed in range(150):
        sb = random_superblock(random.Random(seed))
        assert sb == random_superblock(random.Random(seed)), "not deterministic"
        assert sb.uuid == "" and sb.version == 2 and sb.flags == 0
        assert sb.data_block_size % 128 == 0 and 128 <= sb.data_block_size <= 2097152
        assert 0 <= sb.time < 1 << 24
        assert len(sb.devices) <= 6
        assert sum(len(d.mappings) for d in sb.devices.values()) <= 3000
        data_refs: collections.Counter[int] = collections.Counter()
        for dev_id, dev in sb.devices.items():
            assert dev.dev_id == dev_id and 0 <= dev_id < 1 << 24
            assert dev.mapped_blocks == len(dev.mappings)
            assert dev.creation_time <= dev.snap_time <= sb.time
            assert dev.transaction <= sb.transaction
            blocks = [data for data, _ in dev.mappings.values()]
            assert len(set(blocks)) == len(blocks), "data block mapped twice in one device"
            for data, time in dev.mappings.values():
                assert 0 <= data < sb.nr_data_blocks
                assert 0 <= time <= sb.time
            data_refs.update(blocks)
            features["empty device"] += not dev.mappings
            features["large id"] += dev_id > 100_000
        xml = to_xml(sb)
        features["no devices"] += not sb.devices
        features["shared data"] += any(n > 1 for n in data_refs.values())
        features["range"] += "<range_mapping" in xml
        features["single"] += "<single_mapping" in xml
    for name in ("empty device", "large id", "no devices", "shared data", "range", "single"):
        assert features[name] > 0, f"generator never produced: {name}"


def test_random_superblock_respects_limits() -> None:
    for seed in range(50):
        rng = random.Random(seed)
        sb = random_superblock(rng, max_devices=2, max_mappings=40, nr_data_blocks=25)
        assert sb.nr_data_blocks == 25
        assert len(sb.devices) <= 2
        assert sum(len(d.mappings) for d in sb.devices.values()) <= 40
        for dev in sb.devices.values():
            assert all(data < 25 for data, _ in dev.mappings.values())
    assert random_superblock(random.Random(1), max_devices=0).devices == {}


# ---------------------------------------------------------------------------
# Against the real tools
# ---------------------------------------------------------------------------


@requires_tools
@pytest.mark.parametrize("case", TESTDATA_CASES)
def test_testdata_image_checks_and_dumps(case: str, tmp_path: pathlib.Path) -> None:
    img = testdata_image(case, tmp_path)
    assert_checks_pass(img)
    assert thin_dump(img) == testdata_xml(case)


@requires_tools
def test_metadata_snapshot_dump(tmp_path: pathlib.Path) -> None:
    if "05-metadata-snap" not in TESTDATA_CASES:
        pytest.skip("test vectors not available")
    img = testdata_image("05-metadata-snap", tmp_path)
    assert_checks_pass(img, "-m")
    snap = parse_xml(thin_dump(img, "-m"))
    live = parse_xml(testdata_xml("05-metadata-snap"))
    assert snap.nr_data_blocks == 0  # thin_dump -m does not report the data size
    assert snap.devices == live.devices


@requires_tools
@pytest.mark.parametrize("case", sorted(RESTORED_CASES))
def test_thin_restore_reproduces_testdata(case: str, tmp_path: pathlib.Path) -> None:
    if case not in TESTDATA_CASES:
        pytest.skip("test vectors not available")
    img = thin_restore(testdata_xml(case), tmp_path / "out.img", RESTORED_CASES[case])
    with gzip.open(TESTDATA / f"{case}.img.gz", "rb") as f:
        assert img.read_bytes() == f.read()


@requires_tools
@pytest.mark.parametrize("seed", RANDOM_SEEDS)
def test_random_pool_through_tools(seed: int, tmp_path: pathlib.Path) -> None:
    sb = random_superblock(random.Random(seed))
    xml = to_xml(sb)
    img = thin_restore(xml, tmp_path / "pool.img")
    assert_checks_pass(img)
    dumped = thin_dump(img)
    # thin_restore recomputes mapped_blocks; ours must agree, so even the text matches.
    assert parse_xml(dumped) == sb
    assert dumped == xml


@requires_tools
@pytest.mark.parametrize("seed", range(100, 106))
def test_thin_ls_and_thin_delta_on_random_pools(seed: int, tmp_path: pathlib.Path) -> None:
    sb = random_superblock(random.Random(seed), max_mappings=600)
    img = thin_restore(to_xml(sb), tmp_path / "pool.img")

    rows = thin_ls(
        img, "--no-headers", "-o", "DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS"
    ).splitlines()
    got = {int(r.split()[0]): tuple(int(x) for x in r.split()[1:]) for r in rows}
    exclusive = expected_exclusive(sb)
    assert got == {
        dev_id: (len(dev.mappings), exclusive[dev_id], len(dev.mappings) - exclusive[dev_id])
        for dev_id, dev in sb.devices.items()
    }

    for left, right in itertools.permutations(sorted(sb.devices)[:3], 2):
        root = ET.fromstring(thin_delta(img, "--thin1", str(left), "--thin2", str(right)))
        (diff,) = list(root)
        assert (diff.tag, diff.get("left"), diff.get("right")) == ("diff", str(left), str(right))
        ranges = [(e.tag, int(e.attrib["begin"]), int(e.attrib["length"])) for e in diff]
        assert ranges == expected_delta(sb.devices[left].mappings, sb.devices[right].mappings)


@requires_tools
def test_tools_report_failures(tmp_path: pathlib.Path) -> None:
    # A data block beyond nr_data_blocks is refused by thin_restore.
    bad = XmlSuperblock("", 0, 0, 0, 2, 128, 10)
    bad.devices[1] = XmlDevice(1, 1, 0, 0, 0, {0: (10, 0)})
    with pytest.raises(AssertionError, match="thin_restore failed"):
        thin_restore(to_xml(bad), tmp_path / "bad.img")

    # A corrupted superblock fails thin_check and thin_dump.
    good = XmlSuperblock("", 0, 0, 0, 2, 128, 10)
    good.devices[1] = XmlDevice(1, 1, 0, 0, 0, {0: (3, 0)})
    img = thin_restore(to_xml(good), tmp_path / "good.img")
    assert_checks_pass(img)
    raw = bytearray(img.read_bytes())
    raw[100] ^= 0xFF
    img.write_bytes(bytes(raw))
    assert thin_check(img).returncode != 0
    assert not check(img).clean                 # thinpool check agrees
    with pytest.raises(AssertionError, match="thin_dump failed"):
        thin_dump(img)


def test_metadata_size_estimate() -> None:
    small = to_xml(XmlSuperblock("", 0, 0, 0, 2, 128, 10))
    assert tptools.metadata_size_for(small) == 4 << 20
    big = to_xml(random_superblock(random.Random(0), max_mappings=3000, nr_data_blocks=5_000_000))
    size = tptools.metadata_size_for(big)
    assert size % 4096 == 0 and size >= 4 << 20
